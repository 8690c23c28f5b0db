"""A random paged batch for checking attention kernels against the reference:
NaN-filled pools with every sequence's whole context written at shuffled
blocks, so a kernel that reads a slot outside a sequence's context, or misses
a mask, produces NaN. Used by tests/test_triton_kernels.py and
benchmarks/gpu_bench.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.kv_cache import write_kv


def random_paged_batch(
    num_computed: Sequence[int],
    query_lens: Sequence[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """K and V pools [blocks, KV heads, block_size, head_dim] and the step's
    metadata, for sequences with `num_computed` tokens cached and `query_lens`
    new ones each. `spare_blocks` unused blocks stay NaN. Values are drawn on
    the CPU from `seed`, so a batch is the same on every device."""
    if len(num_computed) != len(query_lens):
        raise ValueError(f"got {len(num_computed)} computed counts for {len(query_lens)} query lengths")
    g = torch.Generator().manual_seed(seed)
    contexts = [c + q for c, q in zip(num_computed, query_lens)]
    needed = [-(-c // block_size) for c in contexts]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(perm[at : at + n])
        at += n
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_pool = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_pool = torch.full(shape, float("nan"), dtype=dtype, device=device)
    whole = AttentionMetadata.build(tables, [0] * len(contexts), contexts, block_size, num_blocks, device)
    total = sum(contexts)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g).to(device, dtype)
    write_kv(k_pool, v_pool, k, v, whole.slot_mapping)
    meta = AttentionMetadata.build(tables, num_computed, query_lens, block_size, num_blocks, device)
    return k_pool, v_pool, meta
