"""Speculative decoding (n-gram prompt lookup): exact, and invisible in the output.

Greedy output must be token-identical to decoding without speculation and to HF; seeded output
must equal non-speculative seeded output whatever else the request asks (the generator is wound
back past rejected positions); unseeded output must follow the target's distribution (a
chi-square test against probabilities computed with HF, with a negative control showing the test
can fail); the KV books stay exact through rejections, budget cuts and preemption, and prefix-cache
hashes only ever cover accepted tokens.

Random tiny models rarely repeat a token, so most tests restrict the vocabulary to a few ids
(``allowed_token_ids``): outputs then repeat, the n-gram lookup proposes drafts, and both accepted
and rejected drafts occur (each test asserts that it saw both).
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.spec_decode import SpeculativeConfig
from splitserve.engine.spec_decode.ngram import ngram_draft
from splitserve.engine.spec_decode.speculator import accepted_prefix
from splitserve.protocol.block_hash import hash_block_tokens
from splitserve.protocol.sampling import StructuredOutput

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
        "prompt_lookup_min": 1}  # fmt: skip
VOCAB = (100, 200, 300, 400, 500, 600)
LOOP = [100, 200, 300, 100, 200, 400, 500, 100, 600, 300]


def _llm(model_dir, spec=None, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("block_size", 4)
    return LLM(model=str(model_dir), dtype="float32", speculative_config=spec, **kw)


def _tokens(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def _spec_counts(llm: LLM) -> tuple[int, int]:
    s = llm.engine.stats().spec_decode
    assert s is not None
    return s.num_draft_tokens, s.num_accepted_tokens


def _assert_saw_accept_and_reject(llm: LLM, before=(0, 0)) -> None:
    drafts, accepted = (a - b for a, b in zip(_spec_counts(llm), before, strict=True))
    assert 0 < accepted < drafts, f"{accepted} of {drafts} drafts accepted"


# --- proposer and config -------------------------------------------------------------------------


def test_ngram_draft_takes_the_longest_then_earliest_match():
    # vLLM's example: [2, 3] matches after [1]; only three tokens follow it
    assert ngram_draft([1, 2, 3, 4, 2, 3], 2, 3, 4) == [4, 2, 3]
    # the 3-gram [7, 8, 9] beats the later 2-gram [8, 9]
    assert ngram_draft([7, 8, 9, 1, 8, 9, 2, 7, 8, 9], 2, 3, 2) == [1, 8]
    # two occurrences of the same n-gram: the earliest one's continuation
    assert ngram_draft([5, 6, 1, 5, 6, 2, 5, 6], 2, 2, 1) == [1]
    assert ngram_draft([1, 2, 3, 4], 1, 3, 4) == []  # no earlier occurrence
    assert ngram_draft([1, 2, 1, 3], 2, 3, 4) == []  # only a 1-gram matches, min is 2
    assert ngram_draft([9, 9, 9], 1, 2, 5) == [9]  # overlapping match, cut at the end
    assert ngram_draft([1, 2, 1], 1, 1, 0) == []


def test_speculative_config_follows_vllm_and_names_bad_fields():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4,
                                     "prompt_lookup_max": 4})  # fmt: skip
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    c = SpeculativeConfig.from_dict('{"num_speculative_tokens": 2}')
    assert (c.method, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 5, 5)
    assert SpeculativeConfig.from_dict({"model": "/d", "num_speculative_tokens": 3}).method == (
        "draft_model"
    )
    bad = [
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2, "speculative_model": "x"}, "unsupported keys"),
        ({"num_speculative_tokens": 2, "method": "eagle"}, "method"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "min"),
        ({"num_speculative_tokens": 2, "method": "draft_model"}, "model"),
    ]
    for spec, field in bad:
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.from_dict(spec)
    with pytest.raises(ValueError, match="JSON"):
        SpeculativeConfig.from_dict("{num_speculative_tokens: 2")


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7, 8], [5, 6, 7]) == 3
    assert accepted_prefix([5, 9, 7, 8], [5, 6, 7]) == 1
    assert accepted_prefix([4, 6], [5]) == 0


# --- greedy: token-identical ---------------------------------------------------------------------


def _hf_greedy_allowed(hf, prompt, max_new, allowed):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
            min_new_tokens=max_new, do_sample=False, pad_token_id=2,
            prefix_allowed_tokens_fn=None if allowed is None else lambda b, s: list(allowed),
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_greedy_is_token_identical_to_plain_decoding_and_hf(tiny_llama_dir, hf_greedy):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = [LOOP, LOOP[3:] + LOOP, [100, 200] * 9, list(range(300, 321))]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, allowed_token_ids=VOCAB, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20),  # full vocabulary
    ]
    plain, spec = _llm(tiny_llama_dir), _llm(tiny_llama_dir, SPEC)
    for p in params:
        expected = _tokens(plain.generate(prompts, p))
        assert _tokens(spec.generate(prompts, p)) == expected  # one concurrent batch
        # (the plain engine's parity with HF is tested at length elsewhere: one anchor each)
        assert expected[1][0] == _hf_greedy_allowed(hf, prompts[1], 20, p.allowed_token_ids)
    _assert_saw_accept_and_reject(spec)
    spec.engine.check_integrity()


def test_interactivity_speculates_over_int8_weights_and_keeps_greedy_output(tiny_llama_dir):
    """The interactivity mode's defaults together (int8 weights, 4 n-gram drafts) and the
    issue's own vLLM spelling: greedy output equals plain decoding with the same int8 weights."""
    prompts = [LOOP, LOOP[3:] + LOOP, [100, 200] * 9]
    params = SamplingParams(temperature=0.0, max_tokens=20, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    expected = _tokens(_llm(tiny_llama_dir, quantization="int8").generate(prompts, params))
    mode = _llm(tiny_llama_dir, performance_mode="interactivity")
    assert mode.engine.config.quantization == "int8" and mode.engine.speculator is not None
    assert _tokens(mode.generate(prompts, params)) == expected
    _assert_saw_accept_and_reject(mode)
    vllm = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    issue = _llm(tiny_llama_dir, vllm, quantization="int8")
    assert issue.engine.config.speculative == SpeculativeConfig(
        num_speculative_tokens=4, method="ngram", prompt_lookup_min=4, prompt_lookup_max=4
    )
    assert _tokens(issue.generate(prompts, params)) == expected
    assert _spec_counts(issue)[0] > 0
    mode.engine.check_integrity()


@pytest.mark.model
def test_default_model_greedy_with_ngram_matches_hf(default_model_dir, hf_default_model, hf_greedy):
    prompts = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
        "fibonacci(n - 2)\n\ndef fib2(n):",
        " ".join(["The quick brown fox jumps over the lazy dog."] * 6),
        "1, 2, 3, 4,",
    ]
    spec = LLM(dtype="float32", num_kv_blocks=256, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    })  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
    for out in spec.generate(prompts, params):
        expected = hf_greedy(hf_default_model, out.prompt_token_ids, 32)
        assert out.outputs[0].token_ids == expected
    _assert_saw_accept_and_reject(spec)
    spec.engine.check_integrity()


# --- seeded: equal to plain decoding, whatever else the request asks ------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05),
        dict(temperature=1.0, presence_penalty=0.2, frequency_penalty=0.1, repetition_penalty=1.1),
        dict(temperature=1.0, logit_bias={300: 2.0, 500: -1.0}),
        dict(temperature=1.0, min_tokens=14, logprobs=3),
        dict(temperature=1.0, n=3),
    ],
    ids=["plain", "top-k-p-min-p", "penalties", "logit-bias", "min-tokens-logprobs", "n3"],
)
def test_seeded_output_equals_plain_decoding(tiny_llama_dir, kw):
    params = SamplingParams(seed=7, max_tokens=16, allowed_token_ids=VOCAB + (2,), **kw)
    prompts = [LOOP, [100, 200] * 6, LOOP[::-1]]
    plain, spec = _llm(tiny_llama_dir), _llm(tiny_llama_dir, SPEC)
    expected = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert _tokens(got) == _tokens(expected)
    for e, g in zip(expected, got, strict=True):
        for ec, gc in zip(e.outputs, g.outputs, strict=True):
            assert (gc.text, gc.finish_reason) == (ec.text, ec.finish_reason)
            if params.logprobs is not None:
                assert [lp.token_id for lp in gc.logprobs] == [lp.token_id for lp in ec.logprobs]
                for a, b in zip(gc.logprobs, ec.logprobs, strict=True):
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
    _assert_saw_accept_and_reject(spec)
    spec.engine.check_integrity()


def test_stop_strings_stop_tokens_and_max_tokens_inside_accepted_drafts(tiny_llama_dir):
    plain, spec = _llm(tiny_llama_dir), _llm(tiny_llama_dir, SPEC)
    base = SamplingParams(temperature=0.0, max_tokens=24, allowed_token_ids=VOCAB, ignore_eos=True)
    text = plain.generate([LOOP], base)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cases = [
        SamplingParams(**{**base.__dict__, "stop": (stop,)}),
        SamplingParams(**{**base.__dict__, "stop_token_ids": (600,)}),
        SamplingParams(**{**base.__dict__, "max_tokens": 7}),
        SamplingParams(**{**base.__dict__, "stop": (stop,), "include_stop_str_in_output": True}),
    ]
    for params in cases:
        (e,) = plain.generate([LOOP], params)
        (g,) = spec.generate([LOOP], params)
        ec, gc = e.outputs[0], g.outputs[0]
        assert (gc.token_ids, gc.text, gc.finish_reason, gc.stop_reason) == (
            ec.token_ids, ec.text, ec.finish_reason, ec.stop_reason,
        )  # fmt: skip
    assert spec.engine.stats().spec_decode.num_accepted_tokens > 0
    spec.engine.check_integrity()


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=3)])
def test_grammar_constrained_requests_speculate_and_keep_their_output(tiny_llama_dir, kw):
    plain, spec = _llm(tiny_llama_dir), _llm(tiny_llama_dir, SPEC)
    params = SamplingParams(
        max_tokens=48, structured_output=StructuredOutput(regex="(ab |cd ){12,30}x"), **kw
    )
    prompts = [LOOP, LOOP[::-1]]
    expected = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert _tokens(got) == _tokens(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    _assert_saw_accept_and_reject(spec)  # drafts walked through the grammar
    spec.engine.check_integrity()


# --- unseeded: the target's distribution ----------------------------------------------------------


def _chi_square_p(observed: Counter, probs: dict, n: int) -> float:
    """p-value of Pearson's chi-square goodness of fit; cells expected < 5 are pooled."""
    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for key, p in probs.items():
        exp = p * n
        if exp < 5:
            pooled_obs += observed.get(key, 0)
            pooled_exp += exp
            continue
        stat += (observed.get(key, 0) - exp) ** 2 / exp
        dof += 1
    pooled_obs += n - sum(observed.get(k, 0) for k in probs)  # (none: the support is complete)
    pooled_exp += n - sum(p * n for p in probs.values())
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def _target_joint(model_dir, prompt, vocab, temperature) -> dict[tuple[int, int, int], float]:
    """P(t1, t2, t3) of sampling three tokens from ``vocab`` at ``temperature`` (HF, float64)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    allowed = torch.tensor(vocab)

    def next_probs(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + p for p in prefixes])).logits[:, -1]
        return torch.softmax(logits[:, allowed] / temperature, dim=-1)

    p1 = next_probs([[]])[0]
    pairs = [[a] for a in vocab]
    p2 = next_probs(pairs)
    triples = [[a, b] for a in vocab for b in vocab]
    p3 = next_probs(triples).view(len(vocab), len(vocab), len(vocab))
    joint = {}
    for i, a in enumerate(vocab):
        for j, b in enumerate(vocab):
            for k, c in enumerate(vocab):
                joint[(a, b, c)] = float(p1[i] * p2[i, j] * p3[i, j, k])
    return joint


def _marginals(joint: dict) -> tuple[dict, dict]:
    second, pair = Counter(), Counter()
    for (_, b, c), p in joint.items():
        second[c] += p
        pair[(b, c)] += p
    return dict(second), dict(pair)


def _sample_triples(llm: LLM, n: int) -> list[tuple[int, ...]]:
    torch.manual_seed(1234)  # unseeded rows draw from the global generator
    params = SamplingParams(temperature=1.0, n=100, max_tokens=3, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    outs = llm.generate([LOOP] * (n // 100), params)
    return [tuple(c.token_ids) for o in outs for c in o.outputs]


def test_unseeded_output_follows_the_target_distribution(tiny_llama_dir, monkeypatch):
    n = 2000
    joint = _target_joint(tiny_llama_dir, LOOP, VOCAB, 1.0)
    third, last_two = _marginals(joint)
    spec = _llm(tiny_llama_dir, SPEC, max_num_seqs=256, num_kv_blocks=2048)
    samples = _sample_triples(spec, n)
    _assert_saw_accept_and_reject(spec)
    p_third = _chi_square_p(Counter(s[2] for s in samples), third, n)
    p_pair = _chi_square_p(Counter((s[1], s[2]) for s in samples), last_two, n)
    p_joint = _chi_square_p(Counter(samples), joint, n)
    print("p-values", p_third, p_pair, p_joint)
    assert min(p_third, p_pair, p_joint) > 1e-3, (p_third, p_pair, p_joint)

    # Negative control: accepting every draft is not exact, and this test sees it.
    import splitserve.engine.engine_core as core

    monkeypatch.setattr(core, "accepted_prefix", lambda targets, drafts: len(drafts))
    wrong = _sample_triples(_llm(tiny_llama_dir, SPEC, max_num_seqs=256, num_kv_blocks=2048), n)
    print("wrong", _chi_square_p(Counter((s[1], s[2]) for s in wrong), last_two, n))
    assert _chi_square_p(Counter((s[1], s[2]) for s in wrong), last_two, n) < 1e-6


# --- the KV books ---------------------------------------------------------------------------------


def _step_checking_books(llm: LLM) -> list:
    """Step to the end; after every step each running request's table covers exactly its
    computed tokens, and every cached block is a block of its request's accepted tokens."""
    core, deltas = llm.engine, []
    bs = core.kv.block_size
    while core.has_unfinished():
        deltas += core.step()
        for req in core.scheduler.running:
            assert len(core.kv.tables[req.request_id]) == -(-req.num_computed_tokens // bs)
            assert req.num_computed_tokens <= req.num_tokens
        core.check_integrity()
    return deltas


def test_rejected_drafts_free_their_blocks_and_never_reach_the_prefix_cache(tiny_llama_dir):
    spec = _llm(tiny_llama_dir, {**SPEC, "num_speculative_tokens": 5}, block_size=2)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    core = spec.engine
    for i, prompt in enumerate([LOOP, LOOP[2:] * 2]):
        core.add_request(f"r{i}", prompt, params)
    deltas = _step_checking_books(spec)
    _assert_saw_accept_and_reject(spec)
    outputs = {f"r{i}": [t for d in deltas if d.request_id == f"r{i}" for t in d.token_ids]
               for i in range(2)}  # fmt: skip
    # Every cached block's hash is the chained hash of some request's accepted tokens.
    valid = set()
    for i, prompt in enumerate([LOOP, LOOP[2:] * 2]):
        tokens = prompt + outputs[f"r{i}"]
        parent = None
        for b in range(len(tokens) // 2):
            parent = hash_block_tokens(parent, tokens[2 * b : 2 * b + 2], ())
            valid.add(parent)
    cached = {b.block_hash for b in core.kv.pool.cached_blocks()}
    assert cached and cached <= valid


def test_budget_cuts_and_preemption_keep_greedy_output(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=40, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    prompts = [LOOP, LOOP[1:], [100, 200] * 5, LOOP[::-1]]
    expected = _tokens(_llm(tiny_llama_dir).generate(prompts, params))
    # 6 tokens per step for 4 requests: drafts are cut to what the budget leaves; 60 slots of
    # KV for 4 x 50 tokens: requests are preempted and recomputed
    spec = _llm(tiny_llama_dir, {**SPEC, "num_speculative_tokens": 4}, num_kv_blocks=30,
                block_size=2, max_num_batched_tokens=6)  # fmt: skip
    for i, prompt in enumerate(prompts):
        spec.engine.add_request(f"r{i}", prompt, params)
    deltas = _step_checking_books(spec)
    got = [[[t for d in deltas if d.request_id == f"r{i}" for t in d.token_ids]] for i in
           range(len(prompts))]  # fmt: skip
    assert got == expected
    assert spec.engine.scheduler.num_preemptions > 0
    _assert_saw_accept_and_reject(spec)


def test_disable_by_batch_size_turns_speculation_off_for_large_batches(tiny_llama_dir):
    spec = _llm(tiny_llama_dir, {**SPEC, "disable_by_batch_size": 2})
    params = SamplingParams(temperature=0.0, max_tokens=12, allowed_token_ids=VOCAB)
    spec.generate([LOOP] * 3, params)
    assert _spec_counts(spec) == (0, 0)
    spec.generate([LOOP] * 2, params)
    assert _spec_counts(spec)[0] > 0


# --- disaggregated: the decode engine speculates -------------------------------------------------


def test_decode_engine_speculates_after_a_kv_hand_off(tiny_llama_dir):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    (expected,) = _tokens(_llm(tiny_llama_dir).generate([LOOP], params))
    prefill, decode = _llm(tiny_llama_dir), _llm(tiny_llama_dir, SPEC)
    a, b = prefill.engine, decode.engine
    first = SamplingParams(**{**params.__dict__, "max_tokens": 1})
    a.add_request("r", LOOP, first, hold_kv=True)
    deltas = []
    while a.has_unfinished():
        deltas += a.step()
    held = next(d.held_block_ids for d in deltas if d.held_block_ids)
    reservation = b.reserve_import("r", LOOP, params)
    for s, d in zip(held[reservation.first_block :], reservation.block_ids, strict=True):
        b.kv_cache[d].copy_(a.kv_cache[s])
    a.release_kv("r")
    out = b.commit_import("r", [(deltas[0].token_ids[0], None)])
    out += _step_checking_books(decode)
    assert [[t for d in out for t in d.token_ids]] == expected
    _assert_saw_accept_and_reject(decode)
    a.check_integrity()


# --- draft model ---------------------------------------------------------------------------------


def _draft(model_dir, k=3) -> dict:
    return {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": k}


def test_a_draft_equal_to_the_target_has_every_draft_accepted(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24)
    prompts = [LOOP, list(range(300, 340)), [7] * 19]
    expected = _tokens(_llm(tiny_llama_dir).generate(prompts, params))
    spec = _llm(tiny_llama_dir, _draft(tiny_llama_dir))
    assert _tokens(spec.generate(prompts, params)) == expected
    drafts, accepted = _spec_counts(spec)
    assert drafts > 0 and accepted == drafts
    stats = spec.engine.stats().spec_decode
    assert stats.mean_accepted_length == pytest.approx(1 + drafts / stats.num_drafts)
    spec.engine.check_integrity()


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8, seed=4, n=2)])
def test_a_different_draft_model_never_changes_the_output(tiny_llama_dir, tiny_qwen2_dir, kw):
    params = SamplingParams(max_tokens=20, allowed_token_ids=VOCAB, ignore_eos=True, **kw)
    prompts = [LOOP, LOOP[::-1], [100, 200] * 7]
    expected = _tokens(_llm(tiny_llama_dir).generate(prompts, params))
    spec = _llm(tiny_llama_dir, _draft(tiny_qwen2_dir))
    assert _tokens(spec.generate(prompts, params)) == expected
    _assert_saw_accept_and_reject(spec)
    spec.engine.check_integrity()


def test_draft_model_through_preemption_and_a_hand_off(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=40, allowed_token_ids=VOCAB,
                            ignore_eos=True)  # fmt: skip
    prompts = [LOOP, LOOP[1:], [100, 200] * 5, LOOP[::-1]]
    expected = _tokens(_llm(tiny_llama_dir).generate(prompts, params))
    spec = _llm(tiny_llama_dir, _draft(tiny_llama_dir, 3), num_kv_blocks=30, block_size=2,
                max_num_batched_tokens=16)  # fmt: skip
    for i, prompt in enumerate(prompts):
        spec.engine.add_request(f"r{i}", prompt, params)
    deltas = _step_checking_books(spec)
    got = [[[t for d in deltas if d.request_id == f"r{i}" for t in d.token_ids]]
           for i in range(len(prompts))]  # fmt: skip
    assert got == expected
    assert spec.engine.scheduler.num_preemptions > 0
    # a decode engine with a draft: the draft computes the imported prompt itself
    prefill, decode = _llm(tiny_llama_dir), _llm(tiny_llama_dir, _draft(tiny_llama_dir))
    a, b = prefill.engine, decode.engine
    a.add_request("h", LOOP, SamplingParams(**{**params.__dict__, "max_tokens": 1}), hold_kv=True)
    first = []
    while a.has_unfinished():
        first += a.step()
    held = next(d.held_block_ids for d in first if d.held_block_ids)
    reservation = b.reserve_import("h", LOOP, params)
    for s, d in zip(held[reservation.first_block :], reservation.block_ids, strict=True):
        b.kv_cache[d].copy_(a.kv_cache[s])
    a.release_kv("h")
    out = b.commit_import("h", [(first[0].token_ids[0], None)]) + _step_checking_books(decode)
    assert [t for d in out for t in d.token_ids] == expected[0][0]
    assert _spec_counts(decode)[1] > 0


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / "other" / name)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        _llm(tiny_llama_dir, _draft(tmp_path / "other"))
