"""The physical block pool: a free list and a reference count per block.

A block is `block_size` token slots of KV memory in the preallocated pool. The
allocator only hands out block *ids*; it never touches tensors, so it is pure
Python and unit-tested with exact ids.

Invariants (checked by `check_invariants`):
  * every block is either free (ref count 0, in the free list exactly once) or
    used (ref count >= 1, not in the free list);
  * num_free + num_used == num_blocks;
  * given the block tables that exist, each used block's ref count equals the
    number of table entries that hold it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Protocol

MAX_BLOCK_SIZE = 256


class HoldsBlocks(Protocol):
    """Anything that owns references to blocks (a block table)."""

    @property
    def block_ids(self) -> list[int]: ...


def validate_block_size(block_size: int) -> int:
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or block_size < 1
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size must be a power of two in 1..{MAX_BLOCK_SIZE}, got {block_size!r}"
        )
    return block_size


class BlockAllocator:
    """Free list + reference counts over `num_blocks` blocks of `block_size` slots.

    Blocks are handed out in FIFO order of release: a fresh pool gives 0, 1, 2,
    ...; a freed block goes to the back of the queue, so recently freed blocks
    are reused last (this keeps their contents around longest, which the prefix
    cache relies on).

    `total_blocks` and `hidden_dim` are the original project's spelling
    (`BlockAllocator(total_blocks=128, block_size=16, hidden_dim=512)`);
    `hidden_dim` is only recorded, for `PagedKVCache` to size its pool.
    """

    def __init__(
        self,
        num_blocks: int | None = None,
        block_size: int = 16,
        *,
        total_blocks: int | None = None,
        hidden_dim: int | None = None,
    ) -> None:
        if num_blocks is None:
            num_blocks = total_blocks
        elif total_blocks is not None and total_blocks != num_blocks:
            raise ValueError(
                f"num_blocks={num_blocks} and total_blocks={total_blocks} disagree"
            )
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim < 1):
            raise ValueError(f"hidden_dim must be an integer >= 1, got {hidden_dim!r}")
        self.num_blocks: int = num_blocks
        self.block_size: int = validate_block_size(block_size)
        self.hidden_dim: int | None = hidden_dim
        self._ref_counts: list[int] = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    # ----------------------------------------------------------------- queries
    @property
    def total_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list in the order blocks will be handed out."""
        return list(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        return n <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def is_shared(self, block_id: int) -> bool:
        """True when more than one owner holds the block: writing to it needs a copy."""
        return self.ref_count(block_id) > 1

    needs_copy_on_write = is_shared

    # ----------------------------------------------------------------- actions
    def allocate(self) -> int | None:
        """Take one block (ref count 1), or None when the pool is empty."""
        if not self._free:
            return None
        block_id = self._free.popleft()
        self._ref_counts[block_id] = 1
        return block_id

    def allocate_many(self, n: int) -> list[int] | None:
        """Take `n` blocks at once, or None (taking nothing) if fewer are free."""
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        return ids

    def fork(self, block_id: int) -> int:
        """Add an owner to a used block (sharing). Returns the same id."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot fork block {block_id}: it is free")
        self._ref_counts[block_id] += 1
        return block_id

    def free(self, block_id: int) -> bool:
        """Drop one owner. Returns True when the block went back to the pool."""
        self._check_id(block_id)
        count = self._ref_counts[block_id]
        if count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        self._ref_counts[block_id] = count - 1
        if count == 1:
            self._free.append(block_id)
            return True
        return False

    # ------------------------------------------------------------- invariants
    def check_invariants(self, holders: Iterable[HoldsBlocks] | None = None) -> None:
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "a block is in the free list twice"
        used = {b for b, c in enumerate(self._ref_counts) if c > 0}
        assert not (free_set & used), f"blocks both free and used: {sorted(free_set & used)}"
        assert len(free_set) + len(used) == self.num_blocks, (
            f"free ({len(free_set)}) + used ({len(used)}) != total ({self.num_blocks})"
        )
        assert all(c >= 0 for c in self._ref_counts), "negative reference count"
        if holders is not None:
            held: Counter[int] = Counter()
            for holder in holders:
                held.update(holder.block_ids)
            for block_id in range(self.num_blocks):
                assert held[block_id] == self._ref_counts[block_id], (
                    f"block {block_id}: ref count {self._ref_counts[block_id]} "
                    f"but {held[block_id]} holders"
                )

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(
                f"block id {block_id} is outside the pool (0..{self.num_blocks - 1})"
            )
