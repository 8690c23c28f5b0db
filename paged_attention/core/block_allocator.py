"""The seed API's name for the block pool.

`BlockAllocator(total_blocks=128, block_size=16, hidden_dim=512)` is the seed
API; it is `BlockPool` (core/block_pool.py), which owns the free list,
reference counts, the prefix cache and eviction.
"""

from __future__ import annotations

from paged_attention.core.block_pool import (
    MAX_BLOCK_SIZE,
    BlockPool,
    HoldsBlocks,
    validate_block_size,
)

BlockAllocator = BlockPool

__all__ = ["MAX_BLOCK_SIZE", "BlockAllocator", "BlockPool", "HoldsBlocks", "validate_block_size"]
