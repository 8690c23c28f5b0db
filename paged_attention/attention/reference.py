"""Paged attention in plain PyTorch: the CPU path and the oracle for GPU kernels.

For each layer the context K/V of every sequence in the step is gathered with
one `index_select` over the flat pool (only the real lengths, no padding),
then each sequence runs `scaled_dot_product_attention` on transposed views of
its slice (no `.contiguous()` copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paged_attention.attention.metadata import AttentionMetadata

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
    num_kv_heads = k_pool.shape[2]
    group = check_head_counts(num_heads, num_kv_heads)
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} tokens, metadata {meta.num_tokens}"

    keys = k_pool.view(-1, num_kv_heads, head_dim).index_select(0, meta.context_slots)
    values = v_pool.view(-1, num_kv_heads, head_dim).index_select(0, meta.context_slots)
    if q.dtype != keys.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = torch.empty_like(q)
    qs, cs = meta.query_start, meta.context_start
    for i, q_len in enumerate(meta.query_lens):
        k_i = keys[cs[i] : cs[i + 1]].transpose(0, 1)  # [Hkv, C, D]
        v_i = values[cs[i] : cs[i + 1]].transpose(0, 1)
        if q_len == 1:
            # Decode: fold the query heads that share a KV head into one matrix
            # [Hkv, group, D], so each K/V head is read once and no mask is needed.
            q_i = q[qs[i]].view(num_kv_heads, group, head_dim)
            o_i = F.scaled_dot_product_attention(q_i, k_i, v_i, scale=scale)
            out[qs[i]] = o_i.reshape(num_heads, head_dim)
            continue
        q_i = q[qs[i] : qs[i + 1]].transpose(0, 1)  # [Hq, L, D]
        mask = meta.causal_mask(i)
        causal = q_len == meta.context_lens[i]
        if group > 1 and not _HAS_ENABLE_GQA:
            k_i = k_i.repeat_interleave(group, dim=0)
            v_i = v_i.repeat_interleave(group, dim=0)
        extra = {"enable_gqa": True} if group > 1 and _HAS_ENABLE_GQA else {}
        o_i = F.scaled_dot_product_attention(
            q_i, k_i, v_i,
            attn_mask=None if causal else mask,
            is_causal=causal,
            scale=scale,
            **extra,
        )
        out[qs[i] : qs[i + 1]] = o_i.transpose(0, 1)
    return out
