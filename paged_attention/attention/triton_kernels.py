"""Triton kernels for the paged KV pool (the CUDA path; the PyTorch
implementation in `torch_attention.py` is the oracle they are tested against).

Pools are [num_blocks, num_kv_heads, block_size, head_dim], as `KVCachePool`
lays them out; the kernels address them through their strides, so any view
with a unit-stride last dimension works. Three kernels:

* `write_kv`: scatter the step's new K/V [T, Hkv, D] to their flat slots.
  Negative slots are skipped, so CUDA-graph padding rows (slot -1) write nothing.
* `decode_attention`: one query per sequence. A program owns one (sequence,
  KV head, split) and processes all the query heads of that KV head together
  as the rows of one matrix, so each K/V tile is read from memory once per
  group, not once per query head (the group is padded to 16 rows, tl.dot's
  minimum: wasted multiply-adds, but decode is bound by memory, not math).
  With `num_splits > 1` the context is cut
  into contiguous ranges whose partial results (normalised output plus the
  log-sum-exp) a second kernel merges: this keeps the GPU busy when a few
  long sequences would otherwise give only B * Hkv programs.
* `prefill_attention`: variable-length queries whose K/V (earlier tokens and
  the new ones) are already in the pool: prompts, prefix-cache hits, chunked
  prefill and decode rows alike. Query j of a sequence with context C and
  query length L sits at position C - L + j and sees keys 0..C - L + j. The
  rows of a tile are (query, head-in-group) pairs, again so a K/V tile is read
  once per group. The grid is flat over query tiles (see `_find_sequence`).

Tokens are tiled BLOCK_N at a time regardless of the pool's block size: each
token looks up its own block in the table, so block sizes from 1 to 256 and
tiles that straddle blocks need no special case. The block size is a
compile-time constant (one engine uses one), so `// BLOCK_SIZE` is a shift. head_dim is padded to a power
of two (tl.arange needs one) and masked. Softmax runs in base 2 (exp2) with
the scale folded into log2(e) * scale; accumulation is float32 whatever the
input dtype. Masked lanes load 0, so the never-written slots of an `empty`
pool (which can hold NaN) never reach the arithmetic.

All index arithmetic on pool offsets is int64: one layer's pool can pass 2**31
elements on an 80 GB GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Tiles. Not autotuned: autotuning would run at start-up and inside CUDA-graph
# capture. These are the usual flash-attention shapes for head_dim <= 128;
# gpu_bench.py measures them.
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
PREFILL_BLOCK_M = 64  # rows = queries x padded group
PREFILL_BLOCK_N = 64
# 4 warps spill registers on sm_80 for the 64 x 128 prefill tile (ptxas, via an
# offline compile); 8 do not.
PREFILL_NUM_WARPS = 8
# tl.dot needs every matrix dimension >= 16 on the GPU.
MIN_DOT_DIM = 16
MAX_DECODE_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 256


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run as TF32 on the GPU (10-bit mantissa);
    # tests compare float32 against the reference, so keep full precision there.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- write K/V
@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_pool_ptr,
    v_pool_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pb,
    stride_ps,
    stride_ph,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row of a CUDA graph
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    dst = (slot // BLOCK_SIZE) * stride_pb + (slot % BLOCK_SIZE) * stride_ps + h * stride_ph + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    assert k_pool.dim() == 4 and k_pool.shape == v_pool.shape, (
        f"pools must be [num_blocks, Hkv, block_size, D] and alike, got "
        f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
    )
    # The kernels take one set of strides for both pools (KVCachePool's K and V
    # are sibling views of one allocation, so they always agree).
    assert k_pool.stride() == v_pool.stride() and k_pool.stride(-1) == 1, (
        "pools need equal, unit-last strides"
    )


def _pool_strides(pool: torch.Tensor) -> tuple[int, int, int]:
    """The kernels' (block, slot, head) strides of a [N, Hkv, block_size, D] pool."""
    return pool.stride(0), pool.stride(2), pool.stride(1)


def write_kv(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `kv_cache.write_kv`: K/V [T, Hkv, D] into the pools at flat
    slots [T] (int32 or int64); slots < 0 are skipped."""
    _check_pools(k_pool, v_pool)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _unit_last(k), _unit_last(v)
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_pool,
        v_pool,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *_pool_strides(k_pool),
        num_heads,
        head_dim,
        BLOCK_SIZE=k_pool.shape[2],
        BLOCK_H=_pow2(num_heads),
        BLOCK_D=_pow2(head_dim),
    )


# ------------------------------------------------------------------ decode
@triton.jit
def _decode_kernel(
    q_ptr,
    k_pool_ptr,
    v_pool_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    # Each split owns a contiguous, BLOCK_N-aligned token range; trailing
    # splits of a short context are empty and report lse = -inf.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GROUP_PAD, D_PAD]

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    table = block_tables_ptr + b * stride_bt
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = block * stride_pb + (n % BLOCK_SIZE) * stride_ps + kv_head * stride_ph  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_pool_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds at least one real token, so m_new is finite.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_pool_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # Empty range (a padding row with context 0, or a trailing split): output 0,
    # lse -inf, so the merge gives it zero weight and nothing turns into NaN.
    nonempty = denom > 0
    out = acc / tl.where(nonempty, denom, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, denom, 1.0)), float("-inf"))  # base 2
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: context 0
    w = tl.exp2(lse - top)  # [SPLITS_PAD]; 0 for empty splits
    part = tl.load(
        partial_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [SPLITS_PAD, D_PAD]
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, num_sms: int, max_context_len: int | None = None
) -> int:
    """How many ranges to cut each context into. Split only when B * Hkv programs
    cannot fill the GPU (about two programs per SM), and, when the longest
    context is known, keep at least MIN_TOKENS_PER_SPLIT tokens per range so
    the merge does not cost more than it saves. CUDA graphs pass no context
    length: the grid is frozen at capture, so it may depend on the batch only."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    splits = min(MAX_DECODE_SPLITS, math.ceil(2 * num_sms / programs))
    if max_context_len is not None:
        splits = min(splits, math.ceil(max_context_len / MIN_TOKENS_PER_SPLIT))
    return max(1, splits)


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int = DECODE_BLOCK_N,
    num_warps: int = DECODE_NUM_WARPS,
) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] over the pools; block_tables
    [B, max_blocks] int32, context_lens [B] int32 (0 = a padding row, output 0).
    Returns [B, Hq, D] in q's dtype. block_n and num_warps are for tuning runs."""
    _check_pools(k_pool, v_pool)
    q = _unit_last(q)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads over {num_kv_heads} KV heads"
    assert block_tables.stride(-1) == 1, "block_tables rows must be contiguous"
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    common = dict(
        BLOCK_SIZE=k_pool.shape[2],
        GROUP=group,
        GROUP_PAD=_pow2(group, MIN_DOT_DIM),
        HEAD_DIM=head_dim,
        D_PAD=_pow2(head_dim, MIN_DOT_DIM),
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
    )
    strides = (
        q.stride(0),
        q.stride(1),
        *_pool_strides(k_pool),
        block_tables.stride(0),
    )
    grid = (batch, num_kv_heads, num_splits)
    qk_scale = scale * LOG2E
    if num_splits == 1:
        _decode_kernel[grid](
            q,
            k_pool,
            v_pool,
            block_tables,
            context_lens,
            out,
            out,  # lse unused
            *strides,
            out.stride(0),
            out.stride(1),
            0,
            0,
            0,
            qk_scale,
            **common,
        )
        return out
    partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        q,
        k_pool,
        v_pool,
        block_tables,
        context_lens,
        partial,
        lse,
        *strides,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        qk_scale,
        **common,
    )
    _merge_splits_kernel[(batch, num_heads)](
        partial,
        lse,
        out,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        SPLITS_PAD=_pow2(num_splits),
        HEAD_DIM=head_dim,
        D_PAD=_pow2(head_dim),
    )
    return out


# ----------------------------------------------------------------- prefill
@triton.jit
def _find_sequence(query_start_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global query tile `q_block`. Sequence i's tiles are
    numbered from first_i = query_start[i] // BLOCK_Q + i; the +i guarantees
    first_{i+1} - first_i >= cdiv(query_len_i, BLOCK_Q), so the ranges never
    overlap and a 1-D grid of T // BLOCK_Q + B tiles covers every sequence,
    wasting at most one tile per sequence. Binary search for the last i with
    first_i <= q_block (first_0 = 0, so one exists)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_pool_ptr,
    v_pool_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_ptr,
    out_ptr,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_bt,
    stride_ot,
    stride_oh,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # A flat grid over query tiles, not (sequence, tile) with the tile axis
    # sized for the longest query: in a chunked-prefill step with hundreds of
    # decode rows the latter would launch mostly empty programs.
    global_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = _find_sequence(query_start_ptr, global_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    q_block = global_block - (q_start // BLOCK_Q + b)
    if q_block * BLOCK_Q >= q_len:  # a tile past the end of its sequence
        return
    ctx = tl.load(context_lens_ptr + b)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    qi = q_block * BLOCK_Q + r // GROUP_PAD  # query index within the sequence
    g = r % GROUP_PAD
    row_mask = (qi < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, D_PAD]
    # Absolute position of each row's query. Padding rows (qi >= q_len) land at
    # or past ctx and so see every key: finite, never stored. Real rows always
    # see key 0, which is in the first tile, so their running max is finite.
    q_pos = ctx - q_len + qi

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    table = block_tables_ptr + b * stride_bt
    # Keys past the last query of this tile are masked for every row: skip them.
    end = tl.minimum(ctx - q_len + (q_block + 1) * BLOCK_Q, ctx)
    for tile in range(0, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = block * stride_pb + (n % BLOCK_SIZE) * stride_ps + kv_head * stride_ph
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_pool_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_pool_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int = PREFILL_BLOCK_M,
    num_warps: int = PREFILL_NUM_WARPS,
) -> torch.Tensor:
    """Packed queries q [T, Hq, D] (sequence i owns rows query_start[i] ..
    query_start[i + 1], int32 [B + 1]) over the pools, causal with the
    context offset. The queries' own K/V must already be in the pool.
    Returns [T, Hq, D] in q's dtype. block_m and num_warps are for tuning runs."""
    _check_pools(k_pool, v_pool)
    q = _unit_last(q)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads over {num_kv_heads} KV heads"
    assert block_tables.stride(-1) == 1, "block_tables rows must be contiguous"
    group = num_heads // num_kv_heads
    group_pad = _pow2(group)
    # A tile's rows are BLOCK_Q queries x the padded group; a group wider than
    # the tile gets one query per tile.
    block_q = max(1, block_m // group_pad)
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = query_start.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    grid = (num_tokens // block_q + batch, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_pool,
        v_pool,
        block_tables,
        context_lens,
        query_start,
        out,
        batch,
        q.stride(0),
        q.stride(1),
        *_pool_strides(k_pool),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale * LOG2E,
        BLOCK_SIZE=k_pool.shape[2],
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        D_PAD=_pow2(head_dim, MIN_DOT_DIM),
        BLOCK_Q=block_q,
        BLOCK_N=PREFILL_BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return out
