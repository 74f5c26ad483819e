"""Sampler: each transform against a slow per-row reference, plus the public behaviour."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import splitserve.engine.sampler as sampler_mod
from splitserve.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    _draw,
    _filter,
)
from splitserve.protocol.sampling import SamplingParams

V = 64
EOS = 2


def make_rows(params_list, prompt=(5, 6, 7), outputs=None, seeds=None):
    rows = []
    for i, p in enumerate(params_list):
        out = outputs[i] if outputs is not None else ()
        gen = None
        if p.seed is not None:
            gen = torch.Generator().manual_seed(p.seed)
        elif seeds is not None and seeds[i] is not None:
            gen = torch.Generator().manual_seed(seeds[i])
        rows.append(
            SamplingRow(
                params=p, prompt_token_ids=list(prompt), output_token_ids=out, generator=gen
            )
        )
    return rows


# -- slow references -----------------------------------------------------------------------------


def ref_penalties(logits: torch.Tensor, row: SamplingRow, eos: int | None) -> torch.Tensor:
    x = logits.clone()
    p = row.params
    if p.allowed_token_ids:
        for t in set(range(len(x))) - set(p.allowed_token_ids):
            x[t] = -math.inf
    for t, b in p.logit_bias or ():
        x[t] += b
    if len(row.output_token_ids) < p.min_tokens:
        for t in {*p.stop_token_ids, *([eos] if eos is not None else [])}:
            x[t] = -math.inf
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_token_ids) | set(row.output_token_ids):
            v = float(x[t])
            x[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t, c in Counter(row.output_token_ids).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def ref_allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens temperature + top-k + top-p + min-p leave, computed one token at a time."""
    x = [float(v) / p.temperature for v in logits]
    allowed = set(range(len(x)))
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        allowed = {t for t in allowed if x[t] >= kth}
    if p.top_p < 1.0:
        m = max(x[t] for t in allowed)
        z = sum(math.exp(x[t] - m) for t in allowed)
        mass, kept = 0.0, set()
        for t in sorted(allowed, key=lambda t: -x[t]):
            if mass >= p.top_p:
                break
            kept.add(t)
            mass += math.exp(x[t] - m) / z
        allowed = kept
    if p.min_p > 0.0:
        m = max(x[t] for t in allowed)
        allowed = {t for t in allowed if math.exp(x[t] - m) >= p.min_p}
    return allowed


# -- transforms vs references ----------------------------------------------------------------------


def _penalties_vs_reference(params, outputs, g, prompt_len):
    """Rows with random prompts, random logits; the sampler's logit transforms must equal the
    reference row by row and leave the input alone. Returns (rows, logits, transformed)."""
    rows = [
        SamplingRow(p, torch.randint(0, V, (prompt_len,), generator=g).tolist(), o, None)
        for p, o in zip(params, outputs, strict=True)
    ]
    logits = torch.randn(len(rows), V, generator=g) * 3
    before = logits.clone()
    got = Sampler(V, EOS)._apply_penalties(logits, rows)
    assert torch.equal(logits, before), "input logits must not be modified"
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i], ref_penalties(logits[i], row, EOS))
    return rows, logits, got


def test_penalties_and_min_tokens_match_reference():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5),
        SamplingParams(min_tokens=4, stop_token_ids=(9, 11), max_tokens=20, repetition_penalty=0.5),
        SamplingParams(min_tokens=2, repetition_penalty=1.5, max_tokens=20),  # reached: EOS allowed
        SamplingParams(),
    ]
    outputs = [
        [1, 3, 3, 40],
        [1, 3, 3, 3, 40, 7],
        [5, 5, 12, 63],
        [1, 2],
        [8, 8, 9],
        [3, 4],
    ]
    rows, logits, got = _penalties_vs_reference(params, outputs, g, prompt_len=10)
    # The penalties touched exactly the expected entries, nothing else.
    changed = (got != logits).nonzero().tolist()
    assert [0, 5] in changed and [3, EOS] in changed and [3, 9] in changed and [3, 11] in changed
    assert not any(r == 5 for r, _ in changed)
    assert got[4, EOS] == logits[4, EOS] or EOS in rows[4].prompt_token_ids


def test_allowed_token_ids_and_logit_bias_match_reference():
    """Both come before the penalties: a biased token is then penalised from its biased value."""
    g = torch.Generator().manual_seed(2)
    params = [
        SamplingParams(logit_bias={3: 2.5, 40: -7.0, 63: 0.25}),
        SamplingParams(),
        SamplingParams(allowed_token_ids=[5, 9, 40, 9]),
        SamplingParams(logit_bias={5: -1.5, 9: 4.0}, allowed_token_ids=(9, 5, 12)),
        SamplingParams(logit_bias={3: 1.0}, repetition_penalty=1.4, frequency_penalty=0.5),
        SamplingParams(allowed_token_ids=(EOS, 7), min_tokens=2, max_tokens=4),
    ]
    outputs = [[1], [3], [9], [], [3, 3, 8], [7]]
    rows, logits, got = _penalties_vs_reference(params, outputs, g, prompt_len=6)
    assert torch.equal(got[1], logits[1])
    assert torch.isfinite(got[2]).nonzero().flatten().tolist() == [5, 9, 40]
    assert torch.isfinite(got[5]).nonzero().flatten().tolist() == [7]  # EOS: min_tokens


def test_no_penalties_returns_input_without_copy():
    logits = torch.randn(3, V)
    rows = make_rows([SamplingParams(temperature=0.0)] * 3)
    assert Sampler(V, EOS)._apply_penalties(logits, rows) is logits


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(top_k=10, top_p=0.8),
        SamplingParams(temperature=0.5, min_p=0.2),
        SamplingParams(top_k=20, top_p=0.9, min_p=0.05, temperature=2.0),
        SamplingParams(top_p=0.05),
        SamplingParams(),
    ],
    ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}",
)
def test_filter_matches_reference(p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=g) * 2
    # Mixed batch: the row under test sits between rows with other settings.
    others = [SamplingParams(top_k=3), SamplingParams(top_p=0.5, temperature=0.9)]
    params = [others[0], p, others[1], p, p, others[0]]
    x = _filter(logits.clone(), params, owned=True)
    for i, pi in enumerate(params):
        allowed = {t for t in range(V) if math.isfinite(float(x[i, t]))}
        assert allowed == ref_allowed(logits[i], pi), i
        idx = sorted(allowed)
        torch.testing.assert_close(x[i, idx], logits[i, idx] / pi.temperature)


def test_filter_on_a_large_vocabulary_matches_reference():
    """Flat rows keep thousands of tokens, peaked ones a handful; all in one batch."""
    n = 3000
    g = torch.Generator().manual_seed(8)
    flat = torch.randn(n, generator=g) * 0.1  # top-p 0.9 keeps ~2700 tokens
    peaked = torch.randn(n, generator=g) * 0.1
    peaked[:5] += 12.0  # top-p 0.9 stops within the 5 boosted tokens
    logits = torch.stack([flat, peaked, flat, peaked, flat, flat, peaked])
    logits[4, 17] = -math.inf  # as min_tokens leaves it
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=12, top_p=0.95),
        SamplingParams(top_k=2000, top_p=0.99),
        SamplingParams(top_k=2000),
        SamplingParams(top_k=7, temperature=0.5),
        SamplingParams(top_p=0.5, min_p=0.3, temperature=1.7),
    ]
    before = logits.clone()
    x = _filter(logits, params, owned=False)
    assert torch.equal(logits, before)
    for i, p in enumerate(params):
        allowed = {t for t in range(n) if math.isfinite(float(x[i, t]))}
        assert allowed == ref_allowed(logits[i], p), i
    assert not math.isfinite(float(x[4, 17]))


def test_top_k_keeps_ties_and_top_p_keeps_the_top_token():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [0.0, 10.0, 0.0, 0.0, 0.0]])
    x = _filter(logits, [SamplingParams(top_k=2), SamplingParams(top_p=0.01)], owned=False)
    assert torch.isfinite(x[0]).tolist() == [False, True, True, True, False]
    assert torch.isfinite(x[1]).tolist() == [False, True, False, False, False]


# -- public behaviour ------------------------------------------------------------------------------


def _sample(logits, params, **kw):
    return Sampler(V, EOS)(logits, make_rows(params, **kw))


def test_greedy_is_argmax_and_degenerate_filters_are_greedy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, V, generator=g)
    expected = logits.argmax(-1).tolist()
    torch.manual_seed(0)
    for p in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-6, top_k=7, top_p=0.3),
        SamplingParams(top_k=1, temperature=1.5),
        SamplingParams(top_p=1e-6, temperature=2.0),
        SamplingParams(min_p=1.0, temperature=3.0),
    ):
        for _ in range(3):
            out = _sample(logits, [p] * 8)
            assert out.token_ids == expected, p
            assert out.logprobs == [None] * 8


def test_mixed_greedy_and_random_batch():
    logits = torch.randn(4, V)
    logits[:, 17] += 50.0  # random rows are all but certain to pick 17 too
    out = _sample(
        logits,
        [
            SamplingParams(temperature=0),
            SamplingParams(),
            SamplingParams(temperature=0),
            SamplingParams(top_k=3),
        ],
    )
    assert out.token_ids == [17, 17, 17, 17]


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(3, V + 16)
    logits[:, V:] = 100.0
    out = Sampler(V, EOS)(
        logits,
        make_rows([SamplingParams(temperature=0), SamplingParams(), SamplingParams(logprobs=2)]),
    )
    assert all(t < V for t in out.token_ids)
    assert all(t.token_id < V for t in out.logprobs[2].top)
    assert out.logprobs[2].logprob == pytest.approx(-math.log(V), abs=1e-5)


def test_input_logits_are_not_modified():
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.2),
        SamplingParams(min_tokens=3, max_tokens=9, presence_penalty=1.0),
        SamplingParams(),
        SamplingParams(temperature=0.0),
    ]
    _sample(logits, params, outputs=[[1], [1, 2], [], [4]])
    assert torch.equal(logits, before)


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.zeros(3, V)
    logits[:, EOS] = 30.0
    logits[:, 40] = 25.0
    logits[:, 50] = 20.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(40,), max_tokens=8)
    out = _sample(logits, [p, p, p], outputs=[[1], [1, 1], [1, 1, 1]])
    assert out.token_ids == [50, 50, EOS]
    # Random rows are constrained the same way.
    pr = SamplingParams(min_tokens=3, stop_token_ids=(40,), max_tokens=8)
    for _ in range(5):
        assert _sample(logits[:1], [pr], outputs=[[1]]).token_ids == [50]


def test_min_tokens_blocks_every_eos_id():
    logits = torch.zeros(2, V)
    logits[:, 3] = 30.0
    logits[:, 4] = 25.0
    logits[:, 5] = 20.0
    p = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=8)
    rows = make_rows([p, p], outputs=[[1], [1, 1]])
    assert Sampler(V, [3, 4])(logits, rows).token_ids == [5, 3]
    assert Sampler(V, None)(logits, rows).token_ids == [3, 3]


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 10] = 2.0  # in the prompt
    logits[0, 11] = 1.5
    plain = _sample(logits, [SamplingParams(temperature=0)], prompt=[10, 3])
    assert plain.token_ids == [10]
    pen = _sample(logits, [SamplingParams(temperature=0, repetition_penalty=1.5)], prompt=[10])
    assert pen.token_ids == [11]
    # Presence / frequency penalties look at output tokens only, not the prompt.
    pres = SamplingParams(temperature=0, presence_penalty=2.0)
    assert _sample(logits, [pres], prompt=[10]).token_ids == [10]
    assert _sample(logits, [pres], prompt=[3], outputs=[[10]]).token_ids == [11]


def test_logit_bias_forces_a_token_for_greedy_and_random_rows():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(64, V, generator=g) * 3
    forced = {13: 100.0}
    params = [
        SamplingParams(temperature=0.0, logit_bias=forced),
        SamplingParams(logit_bias=forced),
        SamplingParams(temperature=1.5, top_k=5, top_p=0.9, logit_bias=forced),
        SamplingParams(seed=3, min_p=0.1, logit_bias=forced),
    ] * 16
    for _ in range(5):
        assert _sample(logits, params).token_ids == [13] * 64


def test_negative_logit_bias_bans_a_token():
    n, draws = 8, 4000
    logits = torch.tensor([0.0, 1.0, 0.5, 6.0, -1.0, 0.2, 2.0, 0.0])  # 3 wins ~90% unbiased
    sampler = Sampler(n, None)
    ban = SamplingParams(logit_bias={3: -100})
    torch.manual_seed(0)
    out = sampler(logits.expand(draws, n), make_rows([ban] * draws, prompt=[0]))
    assert 3 not in out.token_ids
    assert set(out.token_ids) >= {1, 6}  # the rest still follow the softmax
    seeded = make_rows([SamplingParams(seed=5, temperature=2.0, logit_bias={3: -100})], prompt=[0])
    assert all(sampler(logits[None], seeded).token_ids != [3] for _ in range(500))
    greedy = SamplingParams(temperature=0.0, logit_bias={3: -100})
    assert sampler(logits[None], make_rows([greedy], prompt=[0])).token_ids == [6]


def test_allowed_token_ids_restrict_draws():
    n, draws = 16, 4000
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, generator=g)
    logits[4] = 9.0  # by far the most likely token, but not allowed
    allowed = (1, 7, 12)
    sampler = Sampler(n, None)
    torch.manual_seed(0)
    p = SamplingParams(temperature=1.3, allowed_token_ids=allowed)
    out = sampler(logits.expand(draws, n), make_rows([p] * draws, prompt=[0]))
    freq = _frequencies(out.token_ids, n)
    expected = torch.zeros(n, dtype=torch.double)
    expected[list(allowed)] = torch.softmax(logits[list(allowed)].double() / 1.3, -1)
    assert set(out.token_ids) == set(allowed)
    assert (freq - expected).abs().max() < 0.03  # renormalised over the allowed tokens
    seeded = make_rows([SamplingParams(seed=9, allowed_token_ids=allowed)], prompt=[0])
    assert {sampler(logits[None], seeded).token_ids[0] for _ in range(300)} <= set(allowed)
    greedy = SamplingParams(temperature=0.0, allowed_token_ids=allowed)
    best = max(allowed, key=lambda t: float(logits[t]))
    assert sampler(logits[None], make_rows([greedy], prompt=[0])).token_ids == [best]


def test_rows_without_bias_or_allowed_ids_are_unaffected():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(6, V, generator=g) * 2
    plain = [SamplingParams(temperature=0.0), SamplingParams(seed=21, top_p=0.9)]
    constrained = [
        SamplingParams(temperature=0.0, logit_bias={0: 100}),
        SamplingParams(seed=22, allowed_token_ids=[1, 2]),
        SamplingParams(logit_bias={4: -100.0}, allowed_token_ids=[4, 5]),
        SamplingParams(seed=23, logit_bias=[(6, 100.0)]),
    ]
    order = [constrained[0], plain[0], constrained[1], plain[1], constrained[2], constrained[3]]
    for _ in range(3):
        mixed = _sample(logits, order).token_ids
        alone = _sample(logits[[1, 3]], plain).token_ids
        assert [mixed[1], mixed[3]] == alone
        assert mixed[0] == 0 and mixed[2] in (1, 2) and mixed[4] == 5 and mixed[5] == 6


def test_logprobs_match_log_softmax_of_raw_logits_and_ranks():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g) * 2
    params = [
        SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=1.7),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(logprobs=20, temperature=0.0, presence_penalty=2.0),
    ]
    out = _sample(logits, params, outputs=[[1, 2], [3], [], [4, 4]])
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-5)
        order = sorted(range(V), key=lambda t: -float(ref[i, t]))
        assert lp.rank == order.index(tok) + 1
        k = params[i].logprobs
        assert [t.token_id for t in lp.top] == order[:k]
        assert [t.rank for t in lp.top] == list(range(1, k + 1))
        for t in lp.top:
            assert t.logprob == pytest.approx(float(ref[i, t.token_id]), abs=1e-5)
    assert out.logprobs[1].top == ()


def test_logprobs_stay_raw_under_logit_bias_and_allowed_token_ids():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(3, V, generator=g) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=3, logit_bias={30: 100}),
        SamplingParams(logprobs=2, allowed_token_ids=[31]),
        SamplingParams(logprobs=1, logit_bias={32: 100}, allowed_token_ids=[32, 33]),
    ]
    out = _sample(logits, params)
    assert out.token_ids == [30, 31, 32]
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(out.logprobs):
        tok = out.token_ids[i]
        order = sorted(range(V), key=lambda t: -float(ref[i, t]))
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-5)
        assert lp.rank == order.index(tok) + 1
        assert [t.token_id for t in lp.top] == order[: params[i].logprobs]


def test_seeded_rows_are_reproducible_whatever_the_batch():
    g = torch.Generator().manual_seed(6)
    steps = [torch.randn(5, V, generator=g) for _ in range(6)]
    seeded = SamplingParams(seed=1234, temperature=1.5, top_p=0.95, top_k=40)

    def run(batch_params, position):
        rows = make_rows(batch_params)
        sampler = Sampler(V, EOS)
        got = []
        for logits in steps:
            batch = logits[: len(rows)].clone()
            batch[position] = logits[0]  # the seeded row always sees the same logits
            out = sampler(batch, rows)
            got.append(out.token_ids[position])
            for r, t in zip(rows, out.token_ids, strict=True):
                r.output_token_ids = [*r.output_token_ids, t]
        return got

    alone = run([seeded], 0)
    crowded = run(
        [
            SamplingParams(),
            SamplingParams(temperature=0),
            seeded,
            SamplingParams(top_p=0.3),
            SamplingParams(seed=99, min_p=0.1),
        ],
        2,
    )
    torch.manual_seed(42)  # the global generator's state must not matter either
    again = run([SamplingParams(seed=7), seeded], 1)
    assert alone == crowded == again
    other = run([SamplingParams(seed=4321, temperature=1.5, top_p=0.95, top_k=40)], 0)
    assert other != alone  # different seed, different draws (6 steps over ~40 tokens)


def test_unseeded_rows_follow_the_global_generator():
    logits = torch.zeros(16, V)
    torch.manual_seed(3)
    a = _sample(logits, [SamplingParams()] * 16).token_ids
    torch.manual_seed(3)
    b = _sample(logits, [SamplingParams()] * 16).token_ids
    c = _sample(logits, [SamplingParams()] * 16).token_ids
    assert a == b != c


def _frequencies(tokens: list[int], n: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=n).double() / len(tokens)


def test_sampling_frequencies_follow_softmax():
    n, draws = 8, 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    sampler = Sampler(n, None)
    torch.manual_seed(0)
    out = sampler(logits.expand(draws, n), make_rows([SamplingParams()] * draws, prompt=[0]))
    freq = _frequencies(out.token_ids, n)
    expected = torch.softmax(logits.double(), -1)
    # 40k draws: standard error <= 0.0025 per token; 0.012 is > 4.5 sigma.
    assert (freq - expected).abs().max() < 0.012

    # Temperature + top-k: renormalised over the surviving tokens.
    p = SamplingParams(temperature=0.5, top_k=3)
    out = sampler(logits.expand(draws, n), make_rows([p] * draws, prompt=[0]))
    freq = _frequencies(out.token_ids, n)
    kept = torch.tensor([0, 1, 6])
    expected = torch.zeros(n, dtype=torch.double)
    expected[kept] = torch.softmax(logits[kept].double() / 0.5, -1)
    assert (freq - expected).abs().max() < 0.012


def test_seeded_sampling_frequencies_follow_softmax():
    n, draws = 6, 6000
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0, -2.0]])
    sampler = Sampler(n, None)
    rows = make_rows([SamplingParams(seed=11)], prompt=[0])
    tokens = [sampler(logits, rows).token_ids[0] for _ in range(draws)]
    freq = _frequencies(tokens, n)
    assert (freq - torch.softmax(logits[0].double(), -1)).abs().max() < 0.03


def test_draw_never_picks_masked_tokens_even_with_zero_noise():
    x = torch.full((2, V), -math.inf)
    x[:, 7] = 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert _draw(x.clone(), [None, g]).tolist() == [7, 7]


def test_empty_batch_and_shape_errors():
    assert Sampler(V, EOS)(torch.zeros(0, V), []) == SamplerOutput([], [])
    with pytest.raises(ValueError, match="logits"):
        Sampler(V, EOS)(torch.zeros(2, V), make_rows([SamplingParams()]))
    with pytest.raises(ValueError, match="vocab"):
        Sampler(V, EOS)(torch.zeros(1, V - 1), make_rows([SamplingParams()]))


def test_seeded_rows_reproducible_at_full_vocabulary_size():
    """The real vocabulary size, LM-shaped logits, a busy batch (other filter paths are taken)."""
    n = 49152
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, n + 1, dtype=torch.float32)
    steps = [
        torch.stack([(-1.2 * ranks.log())[torch.randperm(n, generator=g)] for _ in range(6)])
        for _ in range(5)
    ]
    others = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=3000, top_p=0.99),
        SamplingParams(logprobs=3, repetition_penalty=1.3, temperature=0.6),
    ]

    def run(params, at):
        rows = make_rows(params)
        sampler = Sampler(n, EOS)
        got = []
        for logits in steps:
            batch = logits[: len(rows)].clone()
            batch[at] = logits[0]
            out = sampler(batch, rows)
            got.append(out.token_ids[at])
            for r, t in zip(rows, out.token_ids, strict=True):
                r.output_token_ids = [*r.output_token_ids, t]
        return got

    for target in (
        SamplingParams(seed=5, temperature=0.9, top_p=0.92),
        SamplingParams(seed=7, top_k=40, min_p=0.05, presence_penalty=1.0),
    ):
        crowd = others[:3] + [target] + others[3:]
        assert run([target], 0) == run(crowd, 3), target


def test_torch_fallbacks_match_numpy_fast_paths(monkeypatch):
    """Off the CPU the whole-row primitives use torch: same masks, same seeded tokens."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 3000, generator=g) * 2
    params = [
        SamplingParams(top_p=0.8, seed=1),
        SamplingParams(top_k=5, seed=2),
        SamplingParams(top_k=900, seed=3),  # >= V/4: the sort path of top-k
        SamplingParams(min_p=0.2, temperature=0.7, seed=4),
        SamplingParams(top_k=50, top_p=0.9, seed=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.4),
    ]

    def once():
        x = _filter(logits[:5].clone(), params[:5], owned=True)
        rows = make_rows(params, outputs=[[1, 2]] * 6)
        return x, Sampler(3000, EOS)(logits, rows).token_ids

    fast_x, fast_tokens = once()
    monkeypatch.setattr(sampler_mod, "_cpu", lambda t: False)
    slow_x, slow_tokens = once()
    assert torch.equal(torch.isfinite(fast_x), torch.isfinite(slow_x))
    assert fast_tokens == slow_tokens
