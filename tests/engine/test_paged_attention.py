"""The torch and cpu paged-attention backends equal dense causal attention (fp32, float64
reference)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import get_attention_backend

CASES = [
    # (specs, block_size, hq, hkv, d)
    ([(0, 37)], 16, 4, 4, 64),  # one fresh prompt, not a block multiple
    ([(20, 1), (47, 1), (3, 1)], 16, 9, 3, 64),  # decodes only, GQA 3
    ([(15, 1), (0, 5), (33, 17), (16, 16)], 16, 8, 1, 32),  # mixed, MQA, context + chunk
    ([(100, 1), (0, 64), (61, 3)], 32, 6, 2, 128),  # block 32, head_dim 128
    ([(0, 1)], 8, 2, 2, 16),  # a one-token prompt goes the decode way
    ([(9, 1), (30, 1), (0, 12), (5, 7)], 8, 16, 16, 16),  # many KV heads: per-head decode path
    # many decodes of very different lengths: several length buckets (and one out of order)
    ([(c, 1) for c in (4, 6, 9, 11, 39, 43, 49, 59, 199, 3, 209, 250)], 8, 4, 2, 32),
]


def _backends():
    from splitserve.kernels import cpu

    yield "torch"
    yield pytest.param(
        "cpu", marks=pytest.mark.skipif(not cpu.available(), reason="C++ kernels not built")
    )


@pytest.mark.parametrize("backend", list(_backends()))
@pytest.mark.parametrize(("specs", "block_size", "hq", "hkv", "d"), CASES)
def test_backend_matches_dense(backend, specs, block_size, hq, hkv, d, attn_helpers):
    layer = 1
    kv, meta, seqs, q, k, v = attn_helpers.build_batch(specs, block_size, hq, hkv, d, layer=layer)
    step = get_attention_backend(backend).prepare(kv, meta)
    out = step(layer, q, k, v)
    ref = attn_helpers.dense_reference(seqs, hq, hkv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the new K/V landed in their slots
    bs = block_size
    for slot, krow in zip(meta.slot_mapping.tolist(), k, strict=True):
        assert torch.equal(kv[slot // bs, layer, 0, slot % bs], krow)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_engine_greedy_tokens_equal_torch_backend(backend, tiny_llama_dir):
    """The whole engine (chunked prefill with context, decodes, preemption-free) gives the same
    greedy tokens with the C++ decode kernel as with pure torch, in float32."""
    from splitserve import LLM, SamplingParams

    prompts = [[5, 17, 300, 9000, 44], list(range(100, 161)), [7] * 9, list(range(40, 43))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for name in ("torch", backend):
        llm = LLM(
            model=str(tiny_llama_dir),
            dtype="float32",
            block_size=8,
            num_kv_blocks=64,
            max_num_batched_tokens=32,
            attention_backend=name,
        )
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        llm.engine.check_integrity()
    assert outs[backend] == outs["torch"]


@pytest.mark.model
@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_bf16_default_model_agrees_with_torch_backend(backend, default_model_dir):
    """bf16 on SmolLM2 (the cpu backend's C++ prefill and decode kernels where the CPU has
    AVX512-BF16): the first tokens' logprobs match the pure-torch backend closely, and greedy
    picks agree wherever torch's top two are not near-tied. Prompts are long enough for several
    key tiles, and one is chunked across steps (context + new tokens)."""
    from splitserve import LLM, SamplingParams

    text = "the quick brown fox jumps over the lazy dog while a small cat sleeps"
    words = text.split(" ")
    prompts = [" ".join(words[: 3 + i] * (1 + 3 * i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
    runs = {}
    for name in ("torch", backend):
        llm = LLM(dtype="bfloat16", max_num_batched_tokens=96, attention_backend=name)
        runs[name] = [o.outputs[0] for o in llm.generate(prompts, params)]
    for ref, got in zip(runs["torch"], runs[backend], strict=True):
        first_ref, first_got = ref.logprobs[0], got.logprobs[0]
        assert abs(first_ref.logprob - first_got.logprob) < 0.15
        top = first_ref.top
        if top[0].logprob - top[1].logprob > 0.3:
            assert got.token_ids[0] == ref.token_ids[0]


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
@pytest.mark.parametrize("group", [3, 16], ids=["kernel-prefill", "sdpa-prefill"])
def test_bf16_mixed_batch_matches_dense(backend, group, attn_helpers):
    """bf16 decodes and prompts (one with context) in one step: the C++ prefill kernel where it
    takes the head ratio (<= 8 query heads per KV head), SDPA per prompt beyond it."""
    layer, hkv = 1, 2
    specs = [(20, 1), (47, 1), (0, 9), (33, 17)]
    kv, meta, seqs, q, k, v = attn_helpers.build_batch(specs, 16, hkv * group, hkv, 64, layer=layer)
    kv, q, k, v = (t.bfloat16() for t in (kv, q, k, v))
    seqs = [tuple(x.bfloat16() if torch.is_tensor(x) else x for x in s) for s in seqs]
    step = get_attention_backend(backend).prepare(kv, meta)
    out = step(layer, q, k, v)
    from splitserve.kernels import cpu

    assert step.prefill_kernel == (group <= 8 and 2 in cpu.available_impls())
    ref = attn_helpers.dense_reference(seqs, hkv * group, hkv)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2
