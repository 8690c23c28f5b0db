"""The preallocated KV pool: per layer, K and V as [num_blocks, num_kv_heads, block_size, head_dim].

Heads outside tokens within a block (the original PagedAttention layout): one
block of one layer is one piece (swaps and copy-on-write copy whole blocks),
and one head's tokens in a block are one piece too, so decode attention
gathers a sequence's keys head-major, [Hkv, tokens, head_dim], ready for a
batched matmul, with one `index_select` of (block, head) rows; values are read
in place, slot by slot, by `embedding_bag`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from paged_attention.core.block_allocator import validate_block_size
from paged_attention.core.block_table import CopyOnWrite


class KVCachePool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = validate_block_size(block_size)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # One allocation for everything: [layer, k|v, block, head, slot, dim].
        # `empty`, not `zeros`: only written slots are ever read, and on the CPU
        # untouched pages then cost no RAM and no start-up time.
        self.data = torch.empty(
            num_layers,
            2,
            num_blocks,
            num_kv_heads,
            block_size,
            head_dim,
            dtype=dtype,
            device=self.device,
            pin_memory=pin_memory,
        )
        # Per-layer views made once: every layer asks for its pools every step.
        self._keys = [self.data[layer, 0] for layer in range(num_layers)]
        self._values = [self.data[layer, 1] for layer in range(num_layers)]

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def bytes_per_token_for(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * element

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    # ------------------------------------------------------------------ views
    def key(self, layer: int) -> torch.Tensor:
        return self._keys[layer]  # [num_blocks, H, block_size, D]

    def value(self, layer: int) -> torch.Tensor:
        return self._values[layer]

    # ---------------------------------------------------------------- writes
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new tokens' K/V ([T, H, D]) at flat slots `slot_mapping` ([T])."""
        write_kv(self.key(layer), self.value(layer), k, v, slot_mapping)

    def copy_blocks(self, copies: Iterable[CopyOnWrite]) -> None:
        """Perform copy-on-write copies for every layer at once."""
        copy_between_pools(self, self, copies)


def slot_rows(
    slots: torch.Tensor, num_kv_heads: int, block_size: int, heads_first: bool = False
) -> torch.Tensor:
    """Where each (slot, head) lives in a pool viewed as rows [N * Hkv * block_size, D]:
    [len(slots), Hkv], or [Hkv, len(slots)] with `heads_first`."""
    blocks, offsets = slots // block_size, slots % block_size
    heads = torch.arange(num_kv_heads, device=slots.device)
    if heads_first:
        return (blocks[None, :] * num_kv_heads + heads[:, None]) * block_size + offsets[None, :]
    return (blocks[:, None] * num_kv_heads + heads[None, :]) * block_size + offsets[:, None]


def write_kv(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """Write K/V [T, H, D] into contiguous pools [N, H, block_size, D] at flat
    slots [T] (slot = block * block_size + offset). `rows`, when given, is
    `slot_rows(slot_mapping, H, block_size)`: the engine builds it once a step
    (`AttentionMetadata.write_rows`) instead of once a layer.

    Slots are bounds-checked once per step when the metadata is built, not here
    in every layer."""
    num_kv_heads, block_size, head_dim = k_pool.shape[1:]
    assert k_pool.is_contiguous() and v_pool.is_contiguous(), "write_kv needs contiguous pools"
    if rows is None:
        rows = slot_rows(slot_mapping, num_kv_heads, block_size)
    rows = rows.view(-1)
    k_pool.view(-1, head_dim).index_copy_(0, rows, k.reshape(-1, head_dim).to(k_pool.dtype))
    v_pool.view(-1, head_dim).index_copy_(0, rows, v.reshape(-1, head_dim).to(v_pool.dtype))


def copy_between_pools(src: KVCachePool, dst: KVCachePool, copies) -> None:
    """Copy whole blocks (every layer, K and V) from one pool to another, e.g.
    device -> host for a swap-out. `copies` holds (src, dst) block-id pairs."""
    pairs = list(copies)
    if not pairs:
        return
    src_ids = torch.tensor([c.src for c in pairs], device=src.device)
    dst_ids = torch.tensor([c.dst for c in pairs], device=dst.device)
    # On CUDA with a pinned host pool this copy runs without blocking the host.
    dst.data[:, :, dst_ids] = src.data[:, :, src_ids].to(dst.device, non_blocking=True)
