"""Pure-Python bookkeeping: block pool, block tables (no tensors here)."""

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable, CopyOnWrite

__all__ = ["BlockAllocator", "BlockTable", "CopyOnWrite"]
