"""One sequence's map from logical blocks to physical blocks.

Logical block i holds the sequence's tokens [i*block_size, (i+1)*block_size).
Token t lives in slot `block_ids[t // block_size] * block_size + t % block_size`
of the flattened pool. Tables grow append-only; only the last block may be
partly filled, and only the last block is ever copied on write (a full block
is never written again).
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_attention.core.block_allocator import BlockAllocator


@dataclass(frozen=True)
class CopyOnWrite:
    """Copy the KV contents of block `src` into block `dst` before writing."""

    src: int
    dst: int


class BlockTable:
    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.block_ids: list[int] = []
        self.num_tokens = 0

    def __repr__(self) -> str:
        return f"BlockTable(blocks={self.block_ids}, num_tokens={self.num_tokens})"

    # ----------------------------------------------------------------- queries
    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.block_size

    def blocks_needed(self, num_new_tokens: int) -> int:
        """New blocks that appending `num_new_tokens` takes, counting a
        copy-on-write of a shared, partly filled last block."""
        total = self.num_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(self.block_ids)
        if num_new_tokens > 0 and self._last_block_needs_copy():
            needed += 1
        return max(needed, 0)

    def can_append(self, num_new_tokens: int) -> bool:
        return self.allocator.can_allocate(self.blocks_needed(num_new_tokens))

    def slot(self, token_index: int) -> int:
        assert 0 <= token_index < self.capacity, (
            f"token {token_index} outside the table's {self.capacity} slots"
        )
        block, offset = divmod(token_index, self.block_size)
        return self.block_ids[block] * self.block_size + offset

    def slots(self, start: int, end: int) -> list[int]:
        """Physical slots of tokens [start, end)."""
        bs, ids = self.block_size, self.block_ids
        assert 0 <= start <= end <= self.capacity, (
            f"tokens [{start}, {end}) outside the table's {self.capacity} slots"
        )
        return [ids[t // bs] * bs + t % bs for t in range(start, end)]

    # ----------------------------------------------------------------- actions
    def append_slots(self, num_new_tokens: int) -> tuple[list[int], CopyOnWrite | None] | None:
        """Make room for `num_new_tokens` more tokens.

        Returns the slots the new tokens go to, and the copy the caller must
        perform first if the last block was shared; or None, changing nothing,
        when the pool has too few free blocks.
        """
        assert num_new_tokens >= 0, f"cannot append {num_new_tokens} tokens"
        if not self.can_append(num_new_tokens):
            return None
        cow = self.copy_on_write_last() if num_new_tokens > 0 else None
        total = self.num_tokens + num_new_tokens
        extra = -(-total // self.block_size) - len(self.block_ids)
        if extra > 0:
            new_ids = self.allocator.allocate_many(extra)
            assert new_ids is not None, "can_append said yes, allocation failed"
            self.block_ids.extend(new_ids)
        start = self.num_tokens
        self.num_tokens = total
        return self.slots(start, total), cow

    def copy_on_write_last(self) -> CopyOnWrite | None:
        """Give this table a private copy of its last block if that block is
        shared and partly filled. Returns the copy to perform, or None."""
        if not self._last_block_needs_copy():
            return None
        src = self.block_ids[-1]
        dst = self.allocator.allocate()
        if dst is None:
            raise RuntimeError("no free block for copy-on-write; check can_append first")
        self.allocator.free(src)
        self.block_ids[-1] = dst
        return CopyOnWrite(src, dst)

    def fork(self) -> BlockTable:
        """A new table that shares every block of this one."""
        child = BlockTable(self.allocator)
        child.block_ids = [self.allocator.fork(b) for b in self.block_ids]
        child.num_tokens = self.num_tokens
        return child

    def free(self) -> None:
        """Release every block reference and empty the table."""
        for block_id in self.block_ids:
            self.allocator.free(block_id)
        self.block_ids = []
        self.num_tokens = 0

    def check_invariants(self) -> None:
        assert self.capacity - self.block_size < self.num_tokens <= self.capacity or (
            self.num_tokens == 0 and not self.block_ids
        ), f"{self}: block count does not match the token count"
        for block_id in self.block_ids:
            assert self.allocator.ref_count(block_id) >= 1, f"{self} holds free block {block_id}"

    def _last_block_needs_copy(self) -> bool:
        return (
            bool(self.block_ids)
            and self.num_tokens % self.block_size != 0
            and self.allocator.is_shared(self.block_ids[-1])
        )
