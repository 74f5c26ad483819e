"""OpenAI-style behaviour of the offline API on the real default model: seeds, stop strings,
logprobs, chat, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve import SamplingParams

pytestmark = pytest.mark.model


def test_seeded_sampling_is_reproducible_whatever_the_batch(default_llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, min_tokens=16)
    alone = default_llm.generate(["Tell me a story about a cat."], params)[0]
    crowd = default_llm.generate(
        ["Tell me a story about a cat.", "Write a poem.", "List three fruits:"],
        [params, SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(max_tokens=5)],
    )[0]
    assert alone.outputs[0].token_ids == crowd.outputs[0].token_ids
    other = default_llm.generate(
        ["Tell me a story about a cat."],
        SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=16, min_tokens=16),
    )[0]
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_stop_string_truncates_and_is_never_partially_emitted(default_llm):
    base = SamplingParams(temperature=0.0, max_tokens=40)
    full = default_llm.generate(["1, 2, 3, 4,"], base)[0].outputs[0].text
    assert " 7," in full
    stopped = default_llm.generate(
        ["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=40, stop=[" 7,"])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == " 7,"
    assert stopped.text == full[: full.index(" 7,")]
    # streaming deltas never show a prefix of the stop string that later turns out to match
    engine = default_llm.engine
    engine.add_request(
        "s", "1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=40, stop=[" 7,"])
    )
    texts = []
    while engine.has_unfinished():
        texts += [d.text for d in engine.step()]
    assert "".join(texts) == stopped.text
    with_stop = default_llm.generate(
        ["1, 2, 3, 4,"],
        SamplingParams(temperature=0, max_tokens=40, stop=[" 7,"], include_stop_str_in_output=True),
    )[0].outputs[0]
    assert with_stop.text == stopped.text + " 7,"


def test_stop_token_ids_and_eos(default_llm):
    tok = default_llm.tokenizer
    comma = tok.encode(",", add_special_tokens=False)[0]
    out = default_llm.generate(
        ["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[comma])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == comma
    assert out.token_ids[-1] == comma and comma not in out.token_ids[:-1]
    chat = default_llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200)
    )[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in chat.text and chat.text.strip()


def test_logprobs_are_raw_model_log_probabilities(default_llm, hf_default_model):
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3)
    out = default_llm.generate(["The capital of France is"], params)[0]
    seq = out.outputs[0]
    assert seq.logprobs is not None and len(seq.logprobs) == 4
    ids = torch.tensor([out.prompt_token_ids + seq.token_ids])
    with torch.no_grad():
        logits = hf_default_model(ids).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    start = len(out.prompt_token_ids) - 1
    for i, lp in enumerate(seq.logprobs):
        assert lp.token_id == seq.token_ids[i]
        assert lp.rank == 1  # greedy picks the top token
        assert math.isclose(lp.logprob, ref[start + i, lp.token_id].item(), abs_tol=1e-3)
        assert len(lp.top) == 3
        top_ids = ref[start + i].topk(3).indices.tolist()
        assert [t.token_id for t in lp.top] == top_ids
    assert seq.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in seq.logprobs))


def test_prompt_logprobs_match_hf_through_chunks_and_a_shared_prefix(hf_default_model):
    """Every prompt token's logprob given the ones before it (vLLM's prompt_logprobs: None for
    the first token), equal to HF's log_softmax, whether the prompt runs in one step or in
    chunks, and even when its prefix is in the cache (prompt logprobs bypass prefix hits)."""
    from splitserve import LLM

    llm = LLM(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=24, block_size=8)
    prefix = "Paris is the capital of France, and Berlin is the capital of Germany. "
    prompts = [prefix + "Rome is", prefix + "Madrid is the capital of", "Hi"]
    llm.generate([prefix + "Warm the cache"], SamplingParams(max_tokens=1))
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    outs = llm.generate(prompts, params)
    for out in outs:
        ids = out.prompt_token_ids
        assert out.num_cached_tokens == 0
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(hf_default_model(torch.tensor([ids])).logits[0].float(), -1)
        for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
            assert lp.token_id == ids[pos]
            assert math.isclose(lp.logprob, ref[pos - 1, ids[pos]].item(), abs_tol=1e-3)
            assert lp.rank == 1 + int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum())
            assert [t.token_id for t in lp.top] == ref[pos - 1].topk(2).indices.tolist()
    # without the parameter: no prompt logprobs, and the prefix cache serves the shared blocks
    plain = llm.generate([prompts[0]], SamplingParams(max_tokens=1))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0
    llm.engine.check_integrity()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"top_k": -5}, "top_k"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_engine_keeps_serving(default_llm):
    engine = default_llm.engine
    engine.add_request("keep", "Hello there,", SamplingParams(temperature=0, max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        default_llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        default_llm.generate(["hi"], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="prompt"):
        default_llm.generate([[1] * engine.max_model_len], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids"):
        default_llm.generate([[10**9]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="messages"):
        default_llm.chat([], SamplingParams())
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert deltas[-1].request_id == "keep" and deltas[-1].finish_reason == "length"
    assert len(deltas) == 8
    engine.check_integrity()
