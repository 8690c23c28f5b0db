"""Tests for SamplingParams validation and the batched Sampler."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_attention.guided.bitmask import TokenMask
from paged_attention.sampler import Sampler, SamplerOutput, greedy_and_normalizer, make_generator
from paged_attention.sampling_params import SamplingParams
from tests.profiles import examples

FAST = settings(max_examples=examples(40))


# ---------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1, 1.0, 1.0, -1, 0.0)
    assert (p.seed, p.max_tokens, p.stop, p.stop_token_ids) == (None, 16, [], [])
    assert (p.ignore_eos, p.logprobs, p.use_beam_search) == (False, None, False)
    assert (p.length_penalty, p.early_stopping) == (1.0, True)
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (True, False)
    assert not p.is_greedy


def test_normalisations() -> None:
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(2, 7)).stop_token_ids == [2, 7]
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(temperature=0).temperature == 0.0
    assert SamplingParams(temperature=0).is_greedy
    # Below the epsilon is greedy too: such a division would overflow.
    assert SamplingParams(temperature=1e-7).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_beam_search_defaults_temperature_to_zero() -> None:
    p = SamplingParams(use_beam_search=True, best_of=4, n=2)
    assert p.temperature == 0.0 and p.is_greedy
    assert SamplingParams(use_beam_search=True, best_of=2, temperature=0.0).best_of == 2


def test_replace_revalidates() -> None:
    p = SamplingParams(top_p=0.5)
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"n": 0}, ["n must", ">= 1", "0"]),
        ({"n": 1.5}, ["n must", "1.5"]),
        ({"n": True}, ["n must", "True"]),
        ({"n": 3, "best_of": 2}, ["best_of", "n=3", "2"]),
        ({"temperature": -0.5}, ["temperature", ">= 0", "-0.5"]),
        ({"temperature": math.nan}, ["temperature", "nan"]),
        ({"temperature": math.inf}, ["temperature", "finite", "inf"]),
        ({"top_p": 0.0}, ["top_p must be in (0, 1]", "0.0"]),
        ({"top_p": 1.5}, ["top_p must be in (0, 1]", "1.5"]),
        ({"top_p": math.nan}, ["top_p", "nan"]),
        ({"top_k": -2}, ["top_k", "-1", "-2"]),
        ({"top_k": 2.5}, ["top_k", "2.5"]),
        ({"min_p": -0.1}, ["min_p must be in [0, 1]", "-0.1"]),
        ({"min_p": 1.5}, ["min_p must be in [0, 1]", "1.5"]),
        ({"max_tokens": 0}, ["max_tokens", ">= 1", "0"]),
        ({"seed": 1.0}, ["seed", "1.0"]),
        ({"stop": ["ok", ""]}, ["stop", "''"]),
        ({"stop": [7]}, ["stop", "7"]),
        ({"stop_token_ids": [3, -1]}, ["stop_token_ids", ">= 0", "-1"]),
        ({"logprobs": -1}, ["logprobs", ">= 0", "-1"]),
        ({"length_penalty": math.inf}, ["length_penalty", "finite", "inf"]),
        ({"length_penalty": math.nan}, ["length_penalty", "nan"]),
        ({"early_stopping": "sometimes"}, ["early_stopping", "'never'", "sometimes"]),
        ({"use_beam_search": True}, ["best_of", "beam width", ">= 2", "1"]),
        (
            {"use_beam_search": True, "best_of": 2, "temperature": 0.7},
            ["temperature must be 0", "deterministic", "0.7"],
        ),
        (
            {"use_beam_search": True, "best_of": 2, "top_p": 0.9},
            ["top_p must be 1", "deterministic", "0.9"],
        ),
        (
            {"use_beam_search": True, "best_of": 2, "top_k": 5},
            ["top_k must be -1", "deterministic", "5"],
        ),
        (
            {"use_beam_search": True, "best_of": 2, "min_p": 0.1},
            ["min_p must be 0", "deterministic", "0.1"],
        ),
        ({"use_beam_search": True, "n": 3, "best_of": 2}, ["best_of", "n=3", "2"]),
    ],
)
def test_validation_errors_name_value_and_limit(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_boundary_values_are_accepted() -> None:
    SamplingParams(top_p=1.0, min_p=0.0, top_k=-1, temperature=0.0, max_tokens=1)
    SamplingParams(top_p=1e-9, min_p=1.0, top_k=1, seed=-5, logprobs=0)
    SamplingParams(n=2, best_of=5, length_penalty=-2.0, early_stopping="never")


# ---------------------------------------------------------------------------
# make_generator
# ---------------------------------------------------------------------------


def _draw(gen: torch.Generator) -> list[float]:
    return torch.empty(8).exponential_(generator=gen).tolist()


def test_make_generator_uses_seed_then_fallback() -> None:
    assert _draw(make_generator(7, fallback_seed=1)) == _draw(make_generator(7, fallback_seed=2))
    assert _draw(make_generator(None, fallback_seed=3)) == _draw(make_generator(3, fallback_seed=9))
    assert _draw(make_generator(None, fallback_seed=3)) != _draw(make_generator(None, fallback_seed=4))
    # Python ints outside torch's seed range still work (reduced mod 2**64).
    assert _draw(make_generator(2**64 + 5, 0)) == _draw(make_generator(5, 0))
    make_generator(-1, 0)
    with pytest.raises(ValueError, match="seed must be an int, got 1.5"):
        make_generator(1.5, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Sampler: helpers
# ---------------------------------------------------------------------------


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
) -> SamplerOutput:
    if generators is None:
        generators = [None] * len(params)
    return Sampler().sample(logits, params, generators)


def _spaced_logits(draw: st.DrawFn, vocab: int) -> torch.Tensor:
    """Logits with no two values closer than 1e-2, so filter sets have no ties.

    Built from positive gaps and a shuffle rather than by filtering random
    floats, so Hypothesis does not throw most examples away.
    """
    start = draw(st.floats(-8.0, 8.0))
    gaps = draw(st.lists(st.floats(1e-2, 3.0), min_size=vocab - 1, max_size=vocab - 1))
    ascending = [start]
    for gap in gaps:
        ascending.append(ascending[-1] + gap)
    order = draw(st.permutations(range(vocab)))
    return torch.tensor([ascending[i] for i in order], dtype=torch.float32)


def _allowed_tokens(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Reference filter in float64 with a small slack at each boundary.

    The slack only ever widens the allowed set, so a token outside it is a real
    violation rather than float noise.
    """
    scaled = logits.double() / p.temperature
    vocab = scaled.numel()
    allowed = set(range(vocab))
    if 0 < p.top_k < vocab:
        kth = scaled.sort(descending=True).values[p.top_k - 1]
        allowed &= {j for j in range(vocab) if scaled[j] >= kth}
    if p.top_p < 1.0:
        keep = torch.tensor([j in allowed for j in range(vocab)])
        probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)
        allowed &= {j for j in allowed if probs[probs > probs[j]].sum().item() < p.top_p + 1e-5}
    if p.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        limit = p.min_p * probs.max().item() * (1 - 1e-5)
        allowed &= {j for j in range(vocab) if probs[j].item() >= limit}
    return allowed


# ---------------------------------------------------------------------------
# Sampler: greedy
# ---------------------------------------------------------------------------


def test_greedy_equals_argmax_and_uses_no_randomness() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0  # a tie: first index wins
    seeded = [make_generator(i, 0) for i in range(6)]
    before = [g.get_state().clone() for g in seeded]
    global_before = torch.get_rng_state().clone()

    params = [SamplingParams(temperature=0.0)] * 5 + [SamplingParams(temperature=1e-7)]
    out = _sample(logits, params, seeded)

    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[2] == 7
    # An all-greedy batch must not consume any generator: a request's seeded
    # stream stays where it was.
    assert all(torch.equal(g.get_state(), s) for g, s in zip(seeded, before))
    assert torch.equal(torch.get_rng_state(), global_before)


@FAST
@given(
    logits=st.lists(st.integers(-3, 3), min_size=1, max_size=12),
    temperature=st.floats(1e-4, 100.0),
    seed=st.integers(0, 2**32),
)
def test_top_k_one_equals_greedy(logits: list[int], temperature: float, seed: int) -> None:
    # Small integer logits make ties common: top_k=1 must break them like argmax.
    row = torch.tensor(logits, dtype=torch.float32)
    batch = row.repeat(4, 1)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 4
    gens = [make_generator(seed + i, 0) for i in range(4)]
    out = _sample(batch, params, gens)
    assert out.token_ids == [int(row.argmax())] * 4


# ---------------------------------------------------------------------------
# Sampler: seeded reproducibility
# ---------------------------------------------------------------------------


def _seeded_run(position: int, companions: list[SamplingParams], seed: int) -> list[int]:
    """Ten steps of one seeded request placed at `position` among `companions`."""
    data = torch.Generator().manual_seed(99)  # same logits in every run
    target = SamplingParams(temperature=0.8, seed=seed)
    target_gen = make_generator(target.seed, fallback_seed=0)
    companion_gens = [
        make_generator(None, fallback_seed=100 + i) if i % 2 else None for i in range(len(companions))
    ]
    tokens = []
    for _ in range(10):
        target_logits = torch.randn(1, 64, generator=data)
        others = torch.randn(len(companions), 64) * 3  # differ run to run
        logits = torch.cat([others[:position], target_logits, others[position:]])
        params = companions[:position] + [target] + companions[position:]
        gens = companion_gens[:position] + [target_gen] + companion_gens[position:]
        tokens.append(_sample(logits, params, gens).token_ids[position])
    return tokens


def test_same_seed_same_tokens_alone_and_in_any_batch() -> None:
    companions = [
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.3),
        SamplingParams(min_p=0.2, temperature=0.5),
    ]
    with torch.random.fork_rng():  # companions draw from the global RNG
        torch.manual_seed(0)
        alone = _seeded_run(0, [], seed=1234)
        for position in (0, 2, 4):
            assert _seeded_run(position, companions, seed=1234) == alone
        # The check can fail: another seed gives another sequence.
        assert _seeded_run(0, [], seed=4321) != alone


# ---------------------------------------------------------------------------
# Sampler: filters never leave the allowed set
# ---------------------------------------------------------------------------


@st.composite
def _filtered_rows(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams]]:
    vocab = draw(st.integers(2, 16))
    rows = draw(st.integers(1, 5))
    logits = torch.stack([_spaced_logits(draw, vocab) for _ in range(rows)])
    params = [
        SamplingParams(
            temperature=draw(st.floats(0.1, 5.0)),
            top_k=draw(st.sampled_from([-1, 0, 1, 2, 3, vocab - 1, vocab, vocab + 3])),
            top_p=draw(st.sampled_from([1.0, 0.05, 0.3, 0.5, 0.9, 0.999])),
            min_p=draw(st.sampled_from([0.0, 0.01, 0.2, 0.5, 1.0])),
        )
        for _ in range(rows)
    ]
    return logits, params


@FAST
@given(case=_filtered_rows(), seed=st.integers(0, 2**32))
def test_filters_never_produce_a_disallowed_token(
    case: tuple[torch.Tensor, list[SamplingParams]], seed: int
) -> None:
    logits, params = case
    copies = 64  # many draws per row, all rows in one batch
    batch = logits.repeat_interleave(copies, dim=0)
    batch_params = [p for p in params for _ in range(copies)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = _sample(batch, batch_params)
    for row, p in enumerate(params):
        allowed = _allowed_tokens(logits[row], p)
        drawn = set(out.token_ids[row * copies : (row + 1) * copies])
        assert drawn <= allowed, (p, drawn, allowed)


def test_unfiltered_row_can_reach_every_token_next_to_filtered_rows() -> None:
    # A mask built for the other rows must not leak into a row without filters.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(2, 1)
    copies = 2000
    params = [SamplingParams(top_k=1, top_p=0.1, min_p=0.9), SamplingParams()] * copies
    with torch.random.fork_rng():
        torch.manual_seed(5)
        out = _sample(logits.repeat(copies, 1), params)
    assert set(out.token_ids[0::2]) == {0}
    assert set(out.token_ids[1::2]) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------
# Sampler: empirical distribution
# ---------------------------------------------------------------------------

# Upper 0.1% point of chi-square with 1..3 degrees of freedom.
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}
_LOGITS4 = torch.tensor([1.0, 0.5, -0.5, -2.0])


def _expected(params: SamplingParams) -> torch.Tensor:
    probs = torch.softmax(_LOGITS4.double() / params.temperature, dim=-1)
    allowed = _allowed_tokens(_LOGITS4, params)
    probs[[j for j in range(4) if j not in allowed]] = 0.0
    return probs / probs.sum()


def _chi_square(counts: torch.Tensor, expected: torch.Tensor, draws: int) -> tuple[float, int]:
    support = expected > 0
    exp_counts = expected[support] * draws
    stat = ((counts[support].double() - exp_counts) ** 2 / exp_counts).sum().item()
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(top_p=0.8),  # keeps tokens 0 and 1 (mass 0.52 + 0.32)
        SamplingParams(temperature=0.7, min_p=0.1),
    ],
    ids=["plain", "temp2_topk3", "top_p", "min_p"],
)
def test_empirical_frequencies_match_softmax(params: SamplingParams) -> None:
    draws = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        out = _sample(_LOGITS4.repeat(draws, 1), [params] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4)
    expected = _expected(params)
    assert counts[expected == 0].sum() == 0
    stat, dof = _chi_square(counts, expected, draws)
    assert dof >= 1
    assert stat < _CHI2_999[dof], (counts.tolist(), expected.tolist(), stat)


def test_empirical_frequencies_with_per_row_generators() -> None:
    draws = 5_000
    gens: list[torch.Generator | None] = [make_generator(s, 0) for s in range(draws)]
    out = _sample(_LOGITS4.repeat(draws, 1), [SamplingParams()] * draws, gens)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4)
    stat, dof = _chi_square(counts, _expected(SamplingParams()), draws)
    assert stat < _CHI2_999[dof], counts.tolist()


# ---------------------------------------------------------------------------
# Sampler: logprobs
# ---------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_of_sampled_token() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 40, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.3, top_k=4),
        SamplingParams(temperature=2.5, top_p=0.5),
        SamplingParams(min_p=0.3),
        SamplingParams(temperature=1.7, logprobs=40),
    ]
    out = _sample(logits, params, [make_generator(i, 0) for i in range(5)])
    raw = torch.log_softmax(logits, dim=-1)
    for row, token in enumerate(out.token_ids):
        # Reported under the raw distribution, not the temperature-scaled one.
        assert out.logprobs[row] == pytest.approx(raw[row, token].item(), abs=1e-6)
        assert out.logprobs[row] <= 0.0
    assert out.top_logprobs[:4] == [None] * 4
    full = out.top_logprobs[4]
    assert full is not None and len(full) == 40
    total = sum(math.exp(v) for v in full.values())
    assert total <= 1.0 + 1e-5 and total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n", [0, 1, 3, 10, 100])
def test_top_logprobs_has_n_sorted_entries_plus_sampled(n: int) -> None:
    vocab = 30
    gen = torch.Generator().manual_seed(11)
    # Flat-ish logits so the sampled token is often outside the top n.
    logits = torch.randn(8, vocab, generator=gen) * 0.1
    params = [SamplingParams(logprobs=n)] * 4 + [SamplingParams(logprobs=n, temperature=0)] * 4
    out = _sample(logits, params, [make_generator(i, 0) for i in range(8)])
    raw = torch.log_softmax(logits, dim=-1)
    outside_seen = False
    for row, entry in enumerate(out.top_logprobs):
        assert entry is not None
        k = min(n, vocab)
        top_ids = raw[row].topk(k).indices.tolist()
        sampled = out.token_ids[row]
        outside = sampled not in top_ids
        outside_seen |= outside
        assert len(entry) == k + int(outside)
        items = list(entry.items())
        values = [v for _, v in items[:k]]
        assert values == sorted(values, reverse=True)
        assert set(tok for tok, _ in items[:k]) == set(top_ids)
        assert entry[sampled] == pytest.approx(raw[row, sampled].item(), abs=1e-6)
        for tok, value in items:
            assert value == pytest.approx(raw[row, tok].item(), abs=1e-6)
    if 0 < n < 10:
        assert outside_seen  # the "plus the sampled token" case was exercised


# ---------------------------------------------------------------------------
# Sampler: grammar masks
# ---------------------------------------------------------------------------


def _pack(allowed: list[list[bool]]) -> torch.Tensor:
    """Pack [rows][vocab] booleans into the int32 bitmask layout (bit j of word w: token 32w + j)."""
    vocab = len(allowed[0])
    words = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for r, row in enumerate(allowed):
        for t, ok in enumerate(row):
            if ok:
                words[r, t // 32] |= 1 << (t % 32)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # two's complement


@st.composite
def _masked_batch(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams], list[int], list[list[bool]]]:
    vocab = draw(st.integers(2, 70))
    rows = draw(st.integers(1, 5))
    logits = torch.stack([_spaced_logits(draw, vocab) for _ in range(rows)])
    params = [
        draw(
            st.sampled_from(
                [
                    SamplingParams(temperature=0),
                    SamplingParams(temperature=1.0),
                    SamplingParams(temperature=0.5, top_k=3),
                    SamplingParams(temperature=1.5, top_p=0.6, min_p=0.1),
                ]
            )
        )
        for _ in range(rows)
    ]
    masked = sorted(draw(st.sets(st.integers(0, rows - 1), min_size=1)))
    allowed = [draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab).filter(any)) for _ in masked]
    return logits, params, masked, allowed


@FAST
@given(case=_masked_batch(), seed=st.integers(0, 2**32))
def test_masked_rows_only_draw_allowed_tokens_and_others_are_untouched(
    case: tuple[torch.Tensor, list[SamplingParams], list[int], list[list[bool]]], seed: int
) -> None:
    logits, params, masked, allowed = case
    gens = lambda: [make_generator(seed + i, 0) for i in range(len(params))]  # noqa: E731
    out = Sampler().sample(logits, params, gens(), TokenMask(masked, _pack(allowed)))
    plain = Sampler().sample(logits, params, gens())
    for j, row in enumerate(masked):
        token = out.token_ids[row]
        assert allowed[j][token]
        if params[row].is_greedy:  # greedy is the argmax among the allowed tokens
            best = max(
                (t for t in range(logits.shape[1]) if allowed[j][t]), key=lambda t: logits[row, t].item()
            )
            assert token == best
        # Log-probs: log-softmax of the raw logits over the allowed tokens.
        keep = torch.tensor(allowed[j])
        expected = torch.log_softmax(logits[row].masked_fill(~keep, -math.inf), dim=-1)[token]
        assert out.logprobs[row] == pytest.approx(expected.item(), abs=1e-5)
    for row in set(range(len(params))) - set(masked):
        assert out.token_ids[row] == plain.token_ids[row]
        assert out.logprobs[row] == plain.logprobs[row]


def test_top_logprobs_of_a_masked_row_list_only_allowed_tokens() -> None:
    logits = torch.arange(40, dtype=torch.float32).unsqueeze(0)
    allowed = [[t in (3, 5, 7) for t in range(40)]]
    out = Sampler().sample(
        logits, [SamplingParams(temperature=0, logprobs=10)], [None], TokenMask([0], _pack(allowed))
    )
    assert out.token_ids == [7]
    assert list(out.top_logprobs[0] or {}) == [7, 5, 3]


def test_mask_input_checks() -> None:
    full = _pack([[True] * 8])
    with pytest.raises(ValueError, match="outside the batch"):
        Sampler().sample(torch.zeros(1, 8), [SamplingParams()], [None], TokenMask([1], full))
    with pytest.raises(ValueError, match="allows no token"):
        Sampler().sample(torch.zeros(1, 8), [SamplingParams()], [None], TokenMask([0], _pack([[False] * 8])))
    with pytest.raises(ValueError, match="one row per masked batch row"):
        TokenMask([0, 1], full)


# ---------------------------------------------------------------------------
# Sampler: input checks
# ---------------------------------------------------------------------------


def test_sampler_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(5,\)"):
        _sample(torch.zeros(5), [SamplingParams()])
    with pytest.raises(ValueError, match="batch=2, got 1 params and 2 generators"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [None, None])
    empty = _sample(torch.zeros(0, 5), [])
    assert empty == SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (7, 1000), (64, 4099), (3, 5)])
def test_greedy_and_normalizer_match_pytorch(rows: int, vocab: int) -> None:
    """The C pass (where it builds) picks torch.max's first maximum and the
    row's logsumexp; ties and forbidden (-inf) tokens included."""
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[0, vocab // 3] = logits[0, vocab - 1] = logits[0].max() + 1  # a tie: the first wins
    if rows > 1:
        logits[1, ::2] = -math.inf
    ids, lse = greedy_and_normalizer(logits)
    assert torch.equal(ids, logits.max(dim=-1).indices)
    assert int(ids[0]) == vocab // 3
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=2e-6, atol=1e-5)


def test_greedy_and_normalizer_fall_back_for_nan_and_inf() -> None:
    logits = torch.randn(4, 300)
    logits[1, 7] = math.nan
    logits[2, 9] = math.inf
    ids, lse = greedy_and_normalizer(logits)
    assert torch.equal(ids, logits.max(dim=-1).indices)
    assert torch.equal(lse.isnan(), torch.logsumexp(logits, dim=-1).isnan())
    torch.testing.assert_close(lse[[0, 3]], torch.logsumexp(logits, dim=-1)[[0, 3]])
