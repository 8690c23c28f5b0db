"""The single-layer API: one attention layer over one sequence.

    allocator = BlockAllocator(total_blocks=128, block_size=16, hidden_dim=512)
    kv_cache = PagedKVCache(block_size=16, hidden_dim=512, allocator=allocator)
    attention = PagedAttention(hidden_dim=512, num_heads=8, block_size=16)
    output = attention(torch.randn(1, 1, 512), kv_cache)

A thin view over the engine's parts: the cache is a one-layer `KVCachePool`
plus one `BlockTable`; the layer projects new tokens to q, k, v, appends k and v
through the table (taking blocks as the sequence grows) and runs the same
`paged_attention` the engine uses. The cache stores each token's k/v as one
`hidden_dim` vector (one "head" of width hidden_dim); the layer views it as
[num_kv_heads, head_dim], a free (strided) view.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.kv_cache import KVCachePool


class PagedKVCache:
    """K/V of a single sequence in one layer, stored in pages from `allocator`."""

    def __init__(
        self,
        block_size: int,
        hidden_dim: int,
        allocator: BlockAllocator | None = None,
        *,
        num_blocks: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if allocator is None:
            allocator = BlockAllocator(num_blocks, block_size, hidden_dim=hidden_dim)
        if allocator.block_size != block_size:
            raise ValueError(f"block_size {block_size} differs from the allocator's {allocator.block_size}")
        if allocator.hidden_dim is not None and allocator.hidden_dim != hidden_dim:
            raise ValueError(f"hidden_dim {hidden_dim} differs from the allocator's {allocator.hidden_dim}")
        self.allocator = allocator
        self.block_size = block_size
        self.hidden_dim = hidden_dim
        self.pool = KVCachePool(1, allocator.num_blocks, block_size, 1, hidden_dim, dtype, device)
        self.block_table = BlockTable(allocator)

    @property
    def num_tokens(self) -> int:
        return self.block_table.num_tokens

    @property
    def block_ids(self) -> list[int]:
        return self.block_table.block_ids

    def append(self, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Store k, v ([T, hidden_dim]) for T new tokens; returns their slots."""
        if k.shape != v.shape or k.dim() != 2 or k.shape[1] != self.hidden_dim:
            raise ValueError(
                f"k and v must both be [T, {self.hidden_dim}], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        appended = self.block_table.append_slots(k.shape[0])
        if appended is None:
            raise RuntimeError(
                f"KV cache is full: {self.allocator.num_free_blocks} free blocks cannot hold "
                f"{k.shape[0]} more tokens after {self.num_tokens}"
            )
        slots, cow = appended
        if cow is not None:
            self.pool.copy_blocks([cow])
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=self.pool.device)
        # The cache holds values, not autograd history (inference only, like the engine).
        self.pool.write(0, k.detach()[:, None, :], v.detach()[:, None, :], slot_tensor)
        return slots

    def metadata(self, num_new_tokens: int) -> AttentionMetadata:
        """Attention metadata for the last `num_new_tokens` appended tokens."""
        return AttentionMetadata.build(
            [self.block_table.block_ids],
            [self.num_tokens - num_new_tokens],
            [num_new_tokens],
            self.block_size,
            self.allocator.num_blocks,
            self.pool.device,
        )

    def free(self) -> None:
        """Return every block to the allocator."""
        self.block_table.free()

    def memory_stats(self) -> dict[str, int]:
        return {
            "num_tokens": self.num_tokens,
            "num_blocks": len(self.block_ids),
            "bytes_per_block": self.pool.bytes_per_block,
            "bytes_per_token": self.pool.bytes_per_token,
            "allocated_bytes": len(self.block_ids) * self.pool.bytes_per_block,
        }


class PagedAttention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention whose K/V history
    lives in a `PagedKVCache`. Call it with the new tokens' hidden states."""

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        block_size: int = 16,
        *,
        num_kv_heads: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_head_counts(num_heads, num_kv_heads)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_dim // num_heads
        self.block_size = block_size
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor, kv_cache: PagedKVCache) -> torch.Tensor:
        """x: [1, T, hidden_dim] new tokens -> [1, T, hidden_dim]."""
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != self.hidden_dim:
            raise ValueError(f"expected input [1, T, {self.hidden_dim}] (one sequence), got {tuple(x.shape)}")
        if kv_cache.block_size != self.block_size:
            raise ValueError(f"cache block_size {kv_cache.block_size} != layer block_size {self.block_size}")
        kv_dim = self.num_kv_heads * self.head_dim
        if kv_cache.hidden_dim != kv_dim:
            raise ValueError(f"cache hidden_dim {kv_cache.hidden_dim} != layer K/V width {kv_dim}")
        tokens = x[0]  # [T, hidden]
        num_new = tokens.shape[0]
        q = self.q_proj(tokens).view(num_new, self.num_heads, self.head_dim)
        kv_cache.append(self.k_proj(tokens), self.v_proj(tokens))
        pool = kv_cache.pool
        # The cache's one "head" of width hidden_dim holds the tokens' heads side
        # by side: a strided [num_blocks, Hkv, block_size, head_dim] view, no copy.
        heads_view = (pool.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        out = paged_attention(
            q,
            pool.key(0).view(heads_view).transpose(1, 2),
            pool.value(0).view(heads_view).transpose(1, 2),
            kv_cache.metadata(num_new),
            scale=self.head_dim**-0.5,
        )
        return self.o_proj(out.reshape(num_new, self.hidden_dim))[None]
