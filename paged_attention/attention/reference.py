"""Paged attention in plain PyTorch: the CPU path and the oracle for GPU kernels.

Decode sequences (one new token each) are attended in buckets of similar
length: whole blocks gathered into a padded batch, then two batched matmuls.
Prompt chunks gather only their real context slots and run one causal
`scaled_dot_product_attention` each on transposed views (no copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paged_attention.attention.metadata import AttentionMetadata, DecodeBucket

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
    [num_blocks, block_size, Hkv, D]. The new tokens' K/V must already be in the
    pool. Returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    check_head_counts(num_heads, k_pool.shape[2])
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} tokens, metadata {meta.num_tokens}"
    buckets = meta.decode_buckets
    if len(buckets) == 1 and buckets[0].all_rows:
        return _decode_bucket(q, k_pool, v_pool, meta, buckets[0], scale)
    out = torch.empty_like(q)
    for bucket in buckets:
        out.index_copy_(0, bucket.rows, _decode_bucket(q, k_pool, v_pool, meta, bucket, scale))
    _prefill(q, k_pool, v_pool, meta, scale, out)
    return out


def _decode_bucket(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    bucket: DecodeBucket,
    scale: float,
) -> torch.Tensor:
    """One query per sequence: two batched matmuls over block-padded K/V.

    K/V are gathered whole blocks at a time into [b, L, Hkv * D] (a memcpy per
    block, no transposes). Each query head must meet only its own KV head, so the
    queries are laid out block-diagonally, [b, Hq, Hkv * D] with zeros outside
    their head: Hkv times the multiply-adds, but on this layout one matmul per
    product beats a loop of per-sequence SDPA calls several times over (the
    work is bound by reading K/V, not by arithmetic)."""
    b = bucket.num_seqs
    num_heads, head_dim = q.shape[1:]
    num_blocks, block_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    length = bucket.num_blocks * block_size
    row = block_size * num_kv_heads * head_dim
    keys = _gather_blocks(k_pool.reshape(num_blocks, row), bucket.block_ids, meta, "k")
    values = _gather_blocks(v_pool.reshape(num_blocks, row), bucket.block_ids, meta, "v")
    keys = keys.view(b, length, num_kv_heads * head_dim)
    values = values.view(b, length, num_kv_heads * head_dim)
    # Slots past a context are masked below. Padding blocks hold written K/V,
    # but the unwritten tail of a last block may hold NaN, and 0 * NaN is NaN.
    values.view(-1, num_kv_heads * head_dim).index_fill_(0, bucket.tail_rows, 0)
    queries = (q if bucket.all_rows else q.index_select(0, bucket.rows)).to(keys.dtype)
    if num_kv_heads > 1:
        eye = torch.eye(num_kv_heads, dtype=keys.dtype, device=q.device)
        queries = queries.view(b, num_kv_heads, group, 1, head_dim) * eye.view(1, num_kv_heads, 1, num_kv_heads, 1)
    queries = queries.reshape(b, num_heads, num_kv_heads * head_dim)
    # Softmax in at least float32 (bf16/fp16 scores are widened, as transformers' eager path does).
    softmax_dtype = torch.promote_types(keys.dtype, torch.float32)
    scores = torch.bmm(queries, keys.transpose(1, 2)).to(softmax_dtype).mul_(scale)
    scores.masked_fill_(bucket.padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    mixed = torch.bmm(probs, values)  # [b, Hq, Hkv * D]: keep each head's own block
    if num_kv_heads > 1:
        mixed = torch.diagonal(mixed.view(b, num_kv_heads, group, num_kv_heads, head_dim), dim1=1, dim2=3)
        mixed = mixed.permute(0, 3, 1, 2)  # [b, Hkv, group, D]
    return mixed.reshape(b, num_heads, head_dim).to(q.dtype)


def _gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, meta: AttentionMetadata, name: str) -> torch.Tensor:
    """pool [N, row] rows `block_ids`, into the step's workspace when autograd is
    not watching (out= cannot record a graph; the layer API may run with grad)."""
    if pool.requires_grad and torch.is_grad_enabled():
        return pool.index_select(0, block_ids)
    out = meta.workspace(name, (block_ids.numel(), pool.shape[1]), pool.dtype)
    return torch.index_select(pool, 0, block_ids, out=out)


def _prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Sequences with several new tokens (prompt chunks): one causal SDPA each
    over its gathered context, which already holds the chunk's own K/V."""
    gather = meta.prefill_gather
    if not gather.seqs:
        return
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pool.shape[2]
    group = num_heads // num_kv_heads
    keys = k_pool.view(-1, num_kv_heads, head_dim).index_select(0, gather.slots)
    values = v_pool.view(-1, num_kv_heads, head_dim).index_select(0, gather.slots)
    if q.dtype != keys.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    qs, cs = meta.query_start, gather.start
    for j, i in enumerate(gather.seqs):
        k_i = keys[cs[j] : cs[j + 1]].transpose(0, 1)  # [Hkv, C, D]
        v_i = values[cs[j] : cs[j + 1]].transpose(0, 1)
        q_i = q[qs[i] : qs[i + 1]].transpose(0, 1)  # [Hq, L, D]
        causal = meta.query_lens[i] == meta.context_lens[i]
        if group > 1 and not _HAS_ENABLE_GQA:
            k_i = k_i.repeat_interleave(group, dim=0)
            v_i = v_i.repeat_interleave(group, dim=0)
        extra = {"enable_gqa": True} if group > 1 and _HAS_ENABLE_GQA else {}
        o_i = F.scaled_dot_product_attention(
            q_i, k_i, v_i,
            attn_mask=None if causal else meta.causal_mask(i),
            is_causal=causal,
            scale=scale,
            **extra,
        )
        out[qs[i] : qs[i + 1]] = o_i.transpose(0, 1)
