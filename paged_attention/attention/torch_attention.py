"""Paged attention in PyTorch ops: the "torch" backend, which serves every
device without the Triton kernels (CPU above all) and is the oracle they are
tested against.

Decode sequences (one new token each) are attended in buckets of similar
length: whole (block, head) pieces gathered into a padded head-major batch,
then two batched matmuls.
Prompt chunks gather only their real context slots, head-major, and run one
causal `scaled_dot_product_attention` each on slices of them (no copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paged_attention.attention.metadata import (
    AttentionMetadata,
    DecodeBucket,
    PrefillGather,
)

_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def check_head_counts(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head; raises if the counts do not divide."""
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    return num_heads // num_kv_heads


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of packed queries q [T, Hq, D] over paged K/V pools
    [num_blocks, Hkv, block_size, D]. The new tokens' K/V must already be in the
    pool. Returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    check_head_counts(num_heads, k_pool.shape[1])
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} tokens, metadata {meta.num_tokens}"
    buckets = meta.decode_buckets
    if len(buckets) == 1 and buckets[0].all_rows:
        return _decode_bucket(q, k_pool, v_pool, meta, buckets[0], scale)
    out = torch.empty_like(q)
    for bucket in buckets:
        out.index_copy_(0, bucket.rows, _decode_bucket(q, k_pool, v_pool, meta, bucket, scale))
    prefill_into(q, k_pool, v_pool, meta, scale, out)
    return out


def _decode_bucket(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    bucket: DecodeBucket,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over block-padded K/V.

    Scores: each (block, KV head) of the pool is one contiguous piece, so one
    `index_select` gathers every context head-major, [b * Hkv, tokens, D], and
    the queries of a KV head's group are the rows of one matrix ([b * Hkv,
    group, D] is a free view of q): one batched matmul. Padded slots are masked.
    Output: the probability-weighted sum of value rows is exactly what
    `embedding_bag(mode="sum", per_sample_weights=probs)` computes, reading the
    pool in place: no gathered copy of V (3-4x faster on CPU than gather + bmm)."""
    b = bucket.num_seqs
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, block_size = k_pool.shape[1], k_pool.shape[2]
    group = num_heads // num_kv_heads
    length = bucket.num_blocks * block_size
    block_rows, tail_rows = bucket.head_rows(num_kv_heads)
    # The pool's dtype, or float32 where float32 queries read a bfloat16 pool.
    compute = torch.promote_types(q.dtype, k_pool.dtype)
    keys = _gather_rows(k_pool, block_rows, meta, "k").view(b * num_kv_heads, length, head_dim).to(compute)
    queries = q if bucket.all_rows else q.index_select(0, bucket.rows)
    queries = queries.to(compute).reshape(b * num_kv_heads, group, head_dim)
    # Softmax in at least float32 (bf16/fp16 scores are widened, as transformers' eager path does).
    softmax_dtype = torch.promote_types(compute, torch.float32)
    scores = torch.bmm(queries, keys.transpose(1, 2)).to(softmax_dtype).mul_(scale)
    scores.view(b, num_heads, length).masked_fill_(bucket.padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(compute)
    if v_pool.is_contiguous() and v_pool.dtype == compute:
        slots, bag_starts = bucket.value_slots(num_kv_heads, group)
        # The op itself: F.embedding_bag's argument checks cost more than the sum at one token.
        out = torch.embedding_bag(
            v_pool.view(-1, head_dim),
            slots,
            bag_starts,
            scale_grad_by_freq=False,
            mode=0,  # sum
            sparse=False,
            per_sample_weights=probs.view(-1),
        )[0]
        return out.view(b, num_heads, head_dim).to(q.dtype)
    values = _gather_rows(v_pool, block_rows, meta, "v").view(b * num_kv_heads, length, head_dim).to(compute)
    # Padding blocks hold written K/V, but the unwritten tail of a last block
    # may hold NaN, and a masked score's 0 * NaN is still NaN.
    values.view(-1, head_dim).index_fill_(0, tail_rows, 0)
    return torch.bmm(probs, values).view(b, num_heads, head_dim).to(q.dtype)


def _gather_rows(pool: torch.Tensor, rows: torch.Tensor, meta: AttentionMetadata, name: str) -> torch.Tensor:
    """(block, head) rows of pool [N, Hkv, block_size, D] as [len(rows), block_size, D]
    (row = block * Hkv + head), into the step's workspace."""
    num_blocks, num_kv_heads, block_size, head_dim = pool.shape
    if pool.is_contiguous():
        out = meta.workspace(name, (rows.numel(), block_size * head_dim), pool.dtype)
        return torch.index_select(pool.view(num_blocks * num_kv_heads, -1), 0, rows, out=out)
    # A strided view (the layer API's, whose heads sit side by side in a slot).
    return pool[rows // num_kv_heads, rows % num_kv_heads]


def _gather_slots(pool: torch.Tensor, gather: PrefillGather) -> torch.Tensor:
    """The context slots of the prompt chunks, head-major: [Hkv, len(slots), D]."""
    num_kv_heads, block_size, head_dim = pool.shape[1:]
    if pool.is_contiguous():
        rows = gather.head_rows(num_kv_heads)
        return pool.view(-1, head_dim).index_select(0, rows.view(-1)).view(num_kv_heads, -1, head_dim)
    blocks, offsets = gather.slots // block_size, gather.slots % block_size
    return pool[blocks, :, offsets].transpose(0, 1)


def prefill_into(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Sequences with several new tokens (prompt chunks), written into their
    rows of `out`: one causal SDPA each over its gathered context, which
    already holds the chunk's own K/V."""
    gather = meta.prefill_gather
    if not gather.seqs:
        return
    num_heads = q.shape[1]
    group = num_heads // k_pool.shape[1]
    keys = _gather_slots(k_pool, gather)  # [Hkv, context tokens, D]
    values = _gather_slots(v_pool, gather)
    if q.dtype == torch.float32 and keys.dtype == torch.bfloat16:
        # float32 activations over a bfloat16 pool (dtype "auto", quantized):
        # prompts attend in bfloat16, 2.2x faster than widening K/V for a
        # float32 SDPA (SmolLM2, 512 tokens, one thread: 56 against 124 ms);
        # decode steps, which the generated tokens see, compute in float32.
        q = q.to(torch.bfloat16)
    elif q.dtype != keys.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    qs, cs = meta.query_start, gather.start
    for j, i in enumerate(gather.seqs):
        k_i = keys[:, cs[j] : cs[j + 1]]  # [Hkv, C, D]
        v_i = values[:, cs[j] : cs[j + 1]]
        q_i = q[qs[i] : qs[i + 1]].transpose(0, 1)  # [Hq, L, D]
        causal = meta.query_lens[i] == meta.context_lens[i]
        if group > 1 and not _HAS_ENABLE_GQA:
            k_i = k_i.repeat_interleave(group, dim=0)
            v_i = v_i.repeat_interleave(group, dim=0)
        extra = {"enable_gqa": True} if group > 1 and _HAS_ENABLE_GQA else {}
        # 4-D operands: PyTorch's CPU flash kernel takes only batched inputs
        # (3-D ones fall back to the math path, 4-10x slower in bfloat16).
        o_i = F.scaled_dot_product_attention(
            q_i.unsqueeze(0),
            k_i.unsqueeze(0),
            v_i.unsqueeze(0),
            attn_mask=None if causal else meta.causal_mask(i),
            is_causal=causal,
            scale=scale,
            **extra,
        )
        out[qs[i] : qs[i + 1]] = o_i[0].transpose(0, 1)
