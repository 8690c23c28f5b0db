"""Paged attention over the block pool equals plain attention on contiguous tensors.

The oracle: for each sequence, its full contiguous K/V, and an explicit
softmax(q k^T * scale + causal mask) v in float64, with K/V heads repeated
(repeat_interleave) for GQA. Pools are filled with NaN (or random values)
first, so reading any slot that is not the sequence's own shows up.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.kv_cache import KVCachePool
from tests.profiles import examples

TOL = 1e-5


# ------------------------------------------------------------------ oracle
def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, Hq, D] (the last L of the C positions), k/v [C, Hkv, D]; float64 result [L, Hq, D]."""
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,chd->hlc", q.double(), k) * scale
    q_pos = torch.arange(ctx - q_len, ctx)
    allowed = torch.arange(ctx)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hlc,chd->lhd", probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A second oracle: torch SDPA on contiguous [H, L, D] tensors, explicit bottom-right mask."""
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).transpose(0, 1).contiguous()
    v = v.repeat_interleave(group, dim=1).transpose(0, 1).contiguous()
    q_pos = torch.arange(ctx - q_len, ctx)
    allowed = torch.arange(ctx)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).contiguous(), k, v, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


def test_oracle_matches_sdpa_and_is_causal():
    """The float64 oracle is itself right: agrees with SDPA, and a query's
    output does not depend on keys after its position."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 8, generator=g)
    k = torch.randn(9, 2, 8, generator=g)
    v = torch.randn(9, 2, 8, generator=g)
    ref = plain_attention(q, k, v, 0.3)
    assert (ref.float() - sdpa_attention(q, k, v, 0.3)).abs().max() <= TOL
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 5.0
    v2[-1] -= 5.0
    ref2 = plain_attention(q, k2, v2, 0.3)
    assert torch.allclose(ref[:-1], ref2[:-1])  # earlier queries cannot see key 8
    assert not torch.allclose(ref[-1], ref2[-1])
    # Single query over a single key returns that value.
    one = plain_attention(q[:1], k[:1], v[:1], 0.3)
    assert torch.allclose(one, v[:1].double().repeat_interleave(2, dim=1))


# --------------------------------------------------------------- scenarios
@dataclass
class Case:
    out: torch.Tensor  # paged result [T, Hq, D]
    expected: torch.Tensor  # oracle [T, Hq, D] float64
    meta: AttentionMetadata
    tables: list[list[int]]
    pool: KVCachePool
    layer: int
    q: torch.Tensor
    scale: float


def run_case(
    seqs: list[tuple[int, int]],
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    *,
    seed: int,
    table_mode: str = "allocator",
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    garbage: str = "nan",
    attention: Callable[..., torch.Tensor] = paged_attention,
) -> Case:
    """seqs: (cached tokens already in the pool from earlier steps, new tokens this step).
    `attention` is the implementation under test (the PyTorch path by default).

    garbage: what fills the pool before any write: "nan" (reading any slot that
    was not written poisons the output) or "normal" (random finite values)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    ctx_lens = [c + n for c, n in seqs]
    blocks_per_seq = [-(-ctx // block_size) for ctx in ctx_lens]
    num_blocks = sum(blocks_per_seq) + rng.randint(1, 6)
    layer = rng.randrange(num_layers)
    scale = rng.uniform(0.05, 1.5) / math.sqrt(head_dim)

    pool = KVCachePool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    if garbage == "nan":
        pool.data.fill_(float("nan"))
    else:
        pool.data.normal_(generator=g)

    full_k = [torch.randn(ctx, num_kv_heads, head_dim, generator=g, dtype=dtype) for ctx in ctx_lens]
    full_v = [torch.randn(ctx, num_kv_heads, head_dim, generator=g, dtype=dtype) for ctx in ctx_lens]

    # Earlier steps: put the cached tokens in the pool, in one to three chunks each.
    new_slots_from_tables: list[int] = []
    if table_mode == "allocator":
        alloc = BlockAllocator(num_blocks, block_size)
        # Scramble the free order: take every block, give them back shuffled.
        ids = alloc.allocate_many(num_blocks)
        rng.shuffle(ids)
        for b in ids:
            alloc.free(b)
        tables = [BlockTable(alloc) for _ in seqs]
        # Interleave the sequences' earlier chunks so their blocks mix.
        pending = []
        for i, (cached, _) in enumerate(seqs):
            cuts = sorted(rng.sample(range(1, cached), min(2, cached - 1))) if cached > 1 else []
            bounds = [0, *cuts, cached] if cached else []
            pending += [(i, a, b) for a, b in zip(bounds, bounds[1:])]
        rng.shuffle(pending)
        pending.sort(key=lambda p: p[1])  # stable: each sequence's chunks stay in order
        for i, a, b in pending:
            assert tables[i].num_tokens == a
            slots, cow = tables[i].append_slots(b - a)
            assert cow is None
            pool.write(layer, full_k[i][a:b], full_v[i][a:b], torch.tensor(slots))
        for i, (_, new) in enumerate(seqs):
            slots, cow = tables[i].append_slots(new)
            assert cow is None
            new_slots_from_tables += slots
        block_tables = [t.block_ids for t in tables]
        alloc.check_invariants(tables)
    else:
        perm = torch.randperm(num_blocks, generator=g).tolist()
        block_tables, start = [], 0
        for n in blocks_per_seq:
            block_tables.append(perm[start : start + n])
            start += n
        flat = torch.arange(num_blocks * block_size).view(num_blocks, block_size)
        for i, (cached, new) in enumerate(seqs):
            slots = flat[torch.tensor(block_tables[i], dtype=torch.long)].reshape(-1)[: cached + new]
            pool.write(layer, full_k[i][:cached], full_v[i][:cached], slots[:cached])
            new_slots_from_tables += slots[cached:].tolist()

    # This step: metadata, write the new tokens' K/V, run attention.
    meta = AttentionMetadata.build(
        block_tables, [c for c, _ in seqs], [n for _, n in seqs], block_size, num_blocks
    )
    assert meta.slot_mapping.tolist() == new_slots_from_tables
    new_k = torch.cat([full_k[i][c:] for i, (c, _) in enumerate(seqs)])
    new_v = torch.cat([full_v[i][c:] for i, (c, _) in enumerate(seqs)])
    pool.write(layer, new_k, new_v, meta.slot_mapping)

    q = torch.randn(sum(n for _, n in seqs), num_heads, head_dim, generator=g, dtype=dtype)
    out = attention(q, pool.key(layer), pool.value(layer), meta, scale)

    expected = []
    start = 0
    for i, (_, new) in enumerate(seqs):
        expected.append(plain_attention(q[start : start + new], full_k[i], full_v[i], scale))
        start += new
    return Case(out, torch.cat(expected), meta, [list(t) for t in block_tables], pool, layer, q, scale)


def assert_matches(case: Case) -> None:
    assert case.out.shape == case.expected.shape
    assert case.out.dtype == torch.float32
    assert not bool(case.out.isnan().any()), f"NaN in output: read an unwritten slot (tables {case.tables})"
    err = (case.out.double() - case.expected).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} > {TOL} (tables {case.tables})"


def _not_multiple(rng: random.Random, lo: int, hi: int, block_size: int) -> int:
    """A length in [lo, hi] that is not a multiple of block_size (when block_size > 1)."""
    while True:
        n = rng.randint(lo, hi)
        if block_size == 1 or n % block_size:
            return n


def _seqs_for(mode: str, block_size: int, rng: random.Random) -> list[tuple[int, int]]:
    hi = 3 * block_size + 5
    if mode == "prefill":
        return [(0, _not_multiple(rng, 2, hi, block_size))]
    if mode == "prefill_cached":
        return [(_not_multiple(rng, 1, hi, block_size), _not_multiple(rng, 2, hi, block_size))]
    if mode == "decode":
        return [(_not_multiple(rng, 1, hi, block_size), 1) for _ in range(3)] + [(0, 1)]
    assert mode == "mixed"
    return [
        (0, _not_multiple(rng, 2, hi, block_size)),  # prefill from scratch
        (_not_multiple(rng, 1, hi, block_size), 1),  # decode
        (_not_multiple(rng, 1, hi, block_size), _not_multiple(rng, 2, hi, block_size)),  # chunked prefill
        (block_size * 2, 1),  # decode right after a full block
        (_not_multiple(rng, 1, hi, block_size), 1),  # decode
        (block_size, block_size),  # exactly block-aligned chunk
    ]


@pytest.mark.parametrize("with_prefill", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_buckets_split_by_length_and_match(block_size, with_prefill, monkeypatch):
    """Decode sequences of very different lengths are cut into several padded
    buckets (each bucket's rows scattered back to batch order); the result still
    equals plain attention, with NaN in every unwritten slot."""
    import paged_attention.attention.metadata as metadata

    monkeypatch.setattr(metadata, "MIN_PADDING_SAVED", 0)  # split at every drop in length
    rng = random.Random(block_size)
    seqs = [(rng.choice([1, 3, 9, 40, 41, 90]) * block_size // 4 + rng.randint(0, 3), 1) for _ in range(12)]
    if with_prefill:
        seqs.insert(5, (block_size + 1, 7))
    case = run_case(seqs, block_size, 3, 2, 8, seed=block_size, table_mode="allocator")
    assert_matches(case)
    buckets = case.meta.decode_buckets
    assert len(buckets) >= 3
    rows = sorted(r for b in buckets for r in b.rows.tolist())
    decode_rows = [case.meta.query_start[i] for i, (_, n) in enumerate(seqs) if n == 1]
    assert rows == decode_rows  # every decode query in exactly one bucket
    for b in buckets:  # padding stays within the bucket's own longest sequence
        lens = [case.meta.context_lens[case.meta.query_start.index(r)] for r in b.rows.tolist()]
        assert b.num_blocks == -(-max(lens) // block_size)


def test_one_decode_bucket_keeps_batch_order():
    """Similar lengths: one bucket covering the whole batch in order, so its
    output needs no row shuffling."""
    case = run_case([(30, 1), (28, 1), (33, 1)], 4, 2, 2, 8, seed=5)
    assert_matches(case)
    [bucket] = case.meta.decode_buckets
    assert bucket.all_rows and bucket.rows.tolist() == [0, 1, 2]


@pytest.mark.parametrize("table_mode", ["allocator", "random"])
@pytest.mark.parametrize("mode", ["prefill", "prefill_cached", "decode", "mixed"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
def test_paged_equals_plain_attention(block_size, group, mode, table_mode):
    seed = zlib.crc32(repr((block_size, group, mode, table_mode)).encode())
    rng = random.Random(seed)
    seqs = _seqs_for(mode, block_size, rng)
    num_kv_heads = rng.randint(2, 3)  # >1, so a wrong query-head -> KV-head map shows
    head_dim = rng.choice([4, 8, 16])
    case = run_case(seqs, block_size, num_kv_heads, group, head_dim, seed=seed, table_mode=table_mode)
    assert_matches(case)
    if mode == "decode":
        assert case.meta.is_decode_only
    else:
        assert not case.meta.is_decode_only


def test_blocks_really_are_scattered():
    """The scenarios do exercise non-contiguous, out-of-order block tables."""
    case = run_case([(37, 5), (20, 1), (0, 9)], 4, 2, 2, 8, seed=5)
    assert_matches(case)
    flat = [b for t in case.tables for b in t]
    assert len(set(flat)) == len(flat)
    assert flat != sorted(flat)
    assert any(t != list(range(t[0], t[0] + len(t))) for t in case.tables)


def test_wrong_block_table_would_be_detected():
    """Sanity for the harness: had the metadata pointed at another block, the
    output would not match (the pool is full of garbage)."""
    case = run_case([(6, 3)], 4, 1, 2, 8, seed=11, table_mode="random", garbage="normal")
    assert_matches(case)
    table = case.tables[0]
    spare = next(b for b in range(case.pool.num_blocks) if b not in table)
    bad = AttentionMetadata.build([[spare, *table[1:]]], [6], [3], 4, case.pool.num_blocks)
    out = paged_attention(case.q, case.pool.key(case.layer), case.pool.value(case.layer), bad, case.scale)
    assert (out.double() - case.expected).abs().max().item() > 1e-2
    # And with a NaN-filled pool, the same mistake poisons the output.
    case = run_case([(6, 3)], 4, 1, 2, 8, seed=11, table_mode="random", garbage="nan")
    assert_matches(case)
    out = paged_attention(case.q, case.pool.key(case.layer), case.pool.value(case.layer), bad, case.scale)
    assert bool(out.isnan().any())


@settings(max_examples=examples(40))
@given(
    block_size=st.sampled_from([1, 2, 4, 8, 16, 32]),
    num_kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([1, 3, 8, 16, 32]),
    seqs=st.lists(st.tuples(st.integers(0, 70), st.integers(1, 24)), min_size=1, max_size=5),
    table_mode=st.sampled_from(["allocator", "random"]),
    garbage=st.sampled_from(["nan", "normal"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_equals_plain_attention_random_shapes(
    block_size, num_kv_heads, group, head_dim, seqs, table_mode, garbage, seed
):
    assert_matches(
        run_case(
            seqs, block_size, num_kv_heads, group, head_dim, seed=seed, table_mode=table_mode, garbage=garbage
        )
    )


@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
@pytest.mark.parametrize("group", [1, 4])
def test_chunked_prefill_then_decode_equals_one_shot(block_size, group):
    """One sequence over several steps (chunks, then decodes), each step's
    K/V written into the pool before attention; the concatenated outputs equal
    plain causal attention over the whole sequence."""
    seed = block_size * 10 + group
    g = torch.Generator().manual_seed(seed)
    num_kv_heads, head_dim = 2, 8
    chunks = [block_size + 1, 3, max(1, block_size - 1), 1, 1, 1]
    total = sum(chunks)
    scale = 1 / math.sqrt(head_dim)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=g)

    num_blocks = -(-total // block_size) + 4
    alloc = BlockAllocator(num_blocks, block_size)
    ids = alloc.allocate_many(num_blocks)
    random.Random(seed).shuffle(ids)
    for b in ids:
        alloc.free(b)
    pool = KVCachePool(1, num_blocks, block_size, num_kv_heads, head_dim)
    pool.data.fill_(float("nan"))  # any read of an unwritten slot poisons the output
    table = BlockTable(alloc)
    outs, done = [], 0
    for n in chunks:
        slots, _ = table.append_slots(n)
        meta = AttentionMetadata.build([table.block_ids], [done], [n], block_size, num_blocks)
        assert meta.slot_mapping.tolist() == slots
        pool.write(0, k[done : done + n], v[done : done + n], meta.slot_mapping)
        outs.append(paged_attention(q[done : done + n], pool.key(0), pool.value(0), meta, scale))
        done += n
    got = torch.cat(outs).double()
    assert not bool(got.isnan().any())
    expected = plain_attention(q, k, v, scale)
    assert (got - expected).abs().max().item() <= TOL


def test_float64_pool_is_exact_to_float64_precision():
    case = run_case([(5, 3), (9, 1)], 4, 2, 2, 8, seed=3, dtype=torch.float64)
    assert case.out.dtype == torch.float64
    assert (case.out - case.expected).abs().max().item() <= 1e-10


# ---------------------------------------------------------------- metadata
def test_metadata_exact_slots_and_offsets():
    meta = AttentionMetadata.build([[5, 2], [7]], [3, 0], [2, 3], block_size=4, num_blocks=8)
    assert meta.num_seqs == 2
    assert meta.num_tokens == 5
    assert meta.query_lens == [2, 3]
    assert meta.context_lens == [5, 3]
    assert meta.query_start == [0, 2, 5]
    assert meta.context_start == [0, 5, 8]
    # Seq 0: tokens 0..4 -> block 5 slots 20..23, block 2 slot 8; new are tokens 3, 4.
    # Seq 1: tokens 0..2 -> block 7 slots 28..30, all new.
    assert meta.slot_mapping.tolist() == [23, 8, 28, 29, 30]
    assert meta.context_slots.tolist() == [20, 21, 22, 23, 8, 28, 29, 30]
    assert meta.slot_mapping.dtype == torch.long
    assert meta.context_slots.dtype == torch.long
    assert not meta.is_decode_only
    assert meta.block_tables == [[5, 2], [7]]


def test_metadata_causal_mask():
    meta = AttentionMetadata.build([[5, 2], [7], [1]], [3, 0, 2], [2, 3, 1], block_size=4, num_blocks=8)
    # Queries at positions 3 and 4 of a 5-token context.
    assert meta.causal_mask(0).tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    # Plain lower-triangular when all tokens are new.
    assert meta.causal_mask(1).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert meta.causal_mask(2) is None  # a single query sees everything


def test_metadata_decode_only():
    meta = AttentionMetadata.build([[0], [3, 1]], [2, 4], [1, 1], block_size=4, num_blocks=4)
    assert meta.is_decode_only
    assert meta.slot_mapping.tolist() == [2, 4]
    assert meta.context_slots.tolist() == [0, 1, 2, 12, 13, 14, 15, 4]


@pytest.mark.parametrize("bad", [8, 9, 100, -1])
def test_block_table_outside_the_pool_is_rejected(bad):
    with pytest.raises(ValueError, match=rf"block {bad}\b"):
        AttentionMetadata.build([[0, 1], [2, bad]], [0, 0], [3, 5], block_size=4, num_blocks=8)


def test_block_table_too_short_is_rejected():
    with pytest.raises(AssertionError, match="needs 9"):
        AttentionMetadata.build([[0, 1]], [6], [3], block_size=4, num_blocks=8)


def test_batch_lengths_must_agree():
    with pytest.raises(AssertionError, match="batch lengths"):
        AttentionMetadata.build([[0], [1]], [0], [1, 1], block_size=4, num_blocks=8)


# -------------------------------------------------------------- head counts
@pytest.mark.parametrize("heads, kv_heads, group", [(1, 1, 1), (4, 4, 1), (8, 2, 4), (6, 3, 2), (9, 3, 3)])
def test_check_head_counts_returns_group(heads, kv_heads, group):
    assert check_head_counts(heads, kv_heads) == group


@pytest.mark.parametrize("heads, kv_heads", [(6, 4), (3, 2), (2, 4), (4, 0), (0, 2), (5, -1)])
def test_check_head_counts_rejects(heads, kv_heads):
    with pytest.raises(ValueError, match=rf"num_heads \({heads}\).*num_kv_heads \({kv_heads}\)"):
        check_head_counts(heads, kv_heads)


@pytest.mark.parametrize("q_len", [1, 3])
def test_paged_attention_rejects_heads_not_a_multiple(q_len):
    pool = KVCachePool(1, 4, 4, 4, 8)
    meta = AttentionMetadata.build([[0, 1]], [2], [q_len], block_size=4, num_blocks=4)
    q = torch.randn(q_len, 6, 8)
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        paged_attention(q, pool.key(0), pool.value(0), meta, 0.1)


def test_paged_attention_rejects_token_count_mismatch():
    pool = KVCachePool(1, 4, 4, 2, 8)
    meta = AttentionMetadata.build([[0, 1]], [2], [3], block_size=4, num_blocks=4)
    with pytest.raises(AssertionError, match="q has 2 tokens, metadata 3"):
        paged_attention(torch.randn(2, 2, 8), pool.key(0), pool.value(0), meta, 0.1)


def test_metadata_of_an_empty_batch_is_empty():
    meta = AttentionMetadata.build([], [], [], block_size=4, num_blocks=8)
    assert meta.num_seqs == 0 and meta.num_tokens == 0
    assert meta.slot_mapping.numel() == 0 and meta.context_slots.numel() == 0
