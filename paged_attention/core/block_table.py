"""One sequence's map from logical blocks to physical blocks.

Logical block i holds the sequence's tokens [i*block_size, (i+1)*block_size).
Token t lives in slot `block_ids[t // block_size] * block_size + t % block_size`
of the flattened pool. Tables grow append-only; only the last block may be
partly filled, and only the last block is ever copied on write (a full block
is never written again).

Blocks come from, and go back to, the `BlockPool`, which also decides what the
prefix cache holds; how far the cache's hash chain has got along a sequence's
blocks is the request's (`PrefixChain`), handed in where it matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from paged_attention.core.block_pool import BlockPool
from paged_attention.core.prefix_cache import PrefixChain


@dataclass(frozen=True)
class CopyOnWrite:
    """Copy the KV contents of block `src` into block `dst` before writing."""

    src: int
    dst: int


@dataclass(frozen=True)
class Admission:
    """What `admit` did: `num_cached_tokens` came from the prefix cache (they
    count as computed); `slots` are where the next `num_new_tokens` go, after
    `cow` if that is set."""

    num_cached_tokens: int
    num_new_tokens: int
    slots: list[int]
    cow: CopyOnWrite | None = None


class BlockTable:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.block_ids: list[int] = []
        self.num_tokens = 0

    def __repr__(self) -> str:
        return f"BlockTable(blocks={self.block_ids}, num_tokens={self.num_tokens})"

    # ----------------------------------------------------------------- queries
    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.block_size

    @property
    def num_full_blocks(self) -> int:
        return self.num_tokens // self.block_size

    def blocks_needed(self, num_new_tokens: int) -> int:
        """New blocks that appending `num_new_tokens` takes, counting a
        copy-on-write of a shared, partly filled last block."""
        total = self.num_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(self.block_ids)
        if num_new_tokens > 0 and self._last_block_needs_copy():
            needed += 1
        return max(needed, 0)

    def can_append(self, num_new_tokens: int) -> bool:
        return self.pool.can_allocate(self.blocks_needed(num_new_tokens))

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
        if num_new_tokens > 0 and self.num_tokens % self.block_size:
            self._assert_not_cached(self.block_ids[-1], "written")
        total = self.num_tokens + num_new_tokens
        extra = -(-total // self.block_size) - len(self.block_ids)
        if extra > 0:
            new_ids = self.pool.allocate_many(extra)
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
        self._assert_not_cached(src, "copied on write")
        dst = self.pool.allocate()
        if dst is None:
            raise RuntimeError("no free block for copy-on-write; check can_append first")
        self.pool.free(src)
        self.block_ids[-1] = dst
        return CopyOnWrite(src, dst)

    def fork(self) -> BlockTable:
        """A new table that shares every block of this one. (Its owner's hash
        chain is a copy of this one's owner's: `PrefixChain.copy`.)"""
        child = BlockTable(self.pool)
        child.block_ids = [self.pool.fork(b) for b in self.block_ids]
        child.num_tokens = self.num_tokens
        return child

    def free(self) -> None:
        """Release every block reference and empty the table. (Its owner's
        hash chain starts over: a fresh `PrefixChain`.)"""
        self.pool.free_blocks(self.block_ids)
        self.block_ids = []
        self.num_tokens = 0

    # ------------------------------------------------------------- admission
    def admit(
        self, token_ids: Sequence[int], max_new_tokens: int, chain: PrefixChain, use_cache: bool = True
    ) -> Admission | None:
        """Make room for up to `max_new_tokens` more of `token_ids` (the whole
        sequence; the table holds its first `num_tokens`). An empty table first
        takes the longest cached full-block prefix, and `chain` (the owner's
        hash chain, fresh with the empty table) starts after it. Returns None
        -- taking nothing and counting no cache query -- when the pool cannot
        hold it. `use_cache=False` skips the lookup (every token is computed)."""
        assert max_new_tokens >= 0, f"cannot append {max_new_tokens} tokens"
        assert len(token_ids) >= self.num_tokens, f"{self}: token_ids has only {len(token_ids)} tokens"
        if self.block_ids:  # e.g. a forked sample: nothing to look up
            n = min(len(token_ids) - self.num_tokens, max_new_tokens)
            appended = self.append_slots(n)
            return None if appended is None else Admission(0, n, *appended)
        assert chain.num_hashed_blocks == 0 and chain.tail is None, (
            f"{self}: an empty table's hash chain must start over, got {chain}"
        )
        pool = self.pool
        caching = pool.enable_prefix_caching and use_cache
        hits = pool.lookup(token_ids) if caching else []
        num_cached = len(hits) * self.block_size
        n = min(len(token_ids) - num_cached, max_new_tokens)
        needed = -(-(num_cached + n) // self.block_size) - len(hits)
        # Reviving an evictable hit uses up one of the allocatable blocks too.
        revived = sum(1 for b in hits if pool.ref_count(b) == 0)
        if not pool.can_allocate(needed + revived):
            return None
        if caching:
            taken = pool.match(token_ids)
            assert taken == hits, f"match {taken} disagrees with lookup {hits}"
        if hits:
            self.block_ids = list(hits)
            self.num_tokens = num_cached
            chain.num_hashed_blocks, chain.tail = len(hits), pool.cached_entry(hits[-1])
        appended = self.append_slots(n)
        assert appended is not None, "room was checked, append failed"
        slots, cow = appended
        assert cow is None, "a fresh table's full blocks needed a copy"
        return Admission(num_cached, n, slots)

    def check_invariants(self) -> None:
        assert self.capacity - self.block_size < self.num_tokens <= self.capacity or (
            self.num_tokens == 0 and not self.block_ids
        ), f"{self}: block count does not match the token count"
        for block_id in self.block_ids:
            assert self.pool.ref_count(block_id) >= 1, f"{self} holds free block {block_id}"
        # A cached block must never be written: it has to be full here.
        num_full = self.num_full_blocks
        for i, block_id in enumerate(self.block_ids[num_full:], num_full):
            assert not self.pool.is_cached(block_id), (
                f"{self}: cached block {block_id} is partly filled at position {i}"
            )

    def _assert_not_cached(self, block_id: int, what: str) -> None:
        assert not self.pool.is_cached(block_id), (
            f"cached block {block_id} would be {what}; cached blocks are immutable"
        )

    def _last_block_needs_copy(self) -> bool:
        return (
            bool(self.block_ids)
            and self.num_tokens % self.block_size != 0
            and self.pool.is_shared(self.block_ids[-1])
        )
