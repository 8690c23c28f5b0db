"""One sequence's map from logical blocks to physical blocks.

Logical block i holds the sequence's tokens [i*block_size, (i+1)*block_size).
Token t lives in slot `block_ids[t // block_size] * block_size + t % block_size`
of the flattened pool. Tables grow append-only; only the last block may be
partly filled, and only the last block is ever copied on write (a full block
is never written again).

With prefix caching the table also tracks how far along its blocks the cache's
hash chain has got (`num_hashed_blocks`, `prefix_tail`), so the engine can
register each block once, as soon as it is full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.prefix_cache import CachedBlock, TokenSource


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
    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.block_ids: list[int] = []
        self.num_tokens = 0
        # Prefix-cache chain: the first `num_hashed_blocks` (full) blocks have
        # been offered to the cache; `prefix_tail` is the entry standing for
        # exactly those tokens (ours, or an identical block's), None before the
        # first block or when the chain broke.
        self.num_hashed_blocks = 0
        self.prefix_tail: CachedBlock | None = None

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
        if num_new_tokens > 0 and self.num_tokens % self.block_size:
            self._assert_not_cached(self.block_ids[-1], "written")
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
        self._assert_not_cached(src, "copied on write")
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
        # Shared blocks share their hashes: the child goes on from the same chain.
        child.set_prefix_chain(self.num_hashed_blocks, self.prefix_tail)
        return child

    def free(self) -> None:
        """Release every block reference and empty the table."""
        self.allocator.free_blocks(self.block_ids)
        self.block_ids = []
        self.num_tokens = 0
        self.set_prefix_chain(0, None)

    # ---------------------------------------------------------- prefix cache
    def adopt_prefix(self, block_ids: Sequence[int]) -> int:
        """Make an empty table start with full cached blocks the caller already
        took (`PrefixCache.match`). Returns the tokens they hold, which count as
        computed."""
        assert not self.block_ids and self.num_tokens == 0, f"{self}: adopt_prefix needs an empty table"
        if not block_ids:
            return 0
        cache = self.allocator.prefix_cache
        assert cache is not None, "adopt_prefix with prefix caching off"
        tail = cache.entry(block_ids[-1])
        assert tail is not None, f"block {block_ids[-1]} is not cached"
        self.block_ids = list(block_ids)
        self.num_tokens = len(block_ids) * self.block_size
        self.set_prefix_chain(len(block_ids), tail)
        return self.num_tokens

    def admit(self, token_ids: Sequence[int], max_new_tokens: int) -> Admission | None:
        """Make room for up to `max_new_tokens` more of `token_ids` (the whole
        sequence; the table holds its first `num_tokens`). An empty table first
        reuses the longest cached full-block prefix. Returns None -- taking
        nothing and counting no cache query -- when the pool cannot hold it."""
        assert max_new_tokens >= 0, f"cannot append {max_new_tokens} tokens"
        assert len(token_ids) >= self.num_tokens, (
            f"{self}: token_ids has only {len(token_ids)} tokens"
        )
        if self.block_ids:  # e.g. a forked sample: nothing to look up
            n = min(len(token_ids) - self.num_tokens, max_new_tokens)
            appended = self.append_slots(n)
            return None if appended is None else Admission(0, n, *appended)
        cache = self.allocator.prefix_cache
        hits = cache.lookup(token_ids) if cache is not None else []
        num_cached = len(hits) * self.block_size
        n = min(len(token_ids) - num_cached, max_new_tokens)
        needed = -(-(num_cached + n) // self.block_size) - len(hits)
        # Reviving an evictable hit uses up one of the allocatable blocks too.
        revived = sum(1 for b in hits if self.allocator.ref_count(b) == 0)
        if not self.allocator.can_allocate(needed + revived):
            return None
        if cache is not None:
            taken = cache.match(token_ids)
            assert taken == hits, f"match {taken} disagrees with lookup {hits}"
            self.adopt_prefix(taken)
        appended = self.append_slots(n)
        assert appended is not None, "room was checked, append failed"
        slots, cow = appended
        assert cow is None, "a fresh table's full blocks needed a copy"
        return Admission(num_cached, n, slots)

    def cache_full_blocks(self, token_ids: TokenSource) -> int:
        """Offer the blocks that became full to the prefix cache (no-op with
        caching off). `token_ids`: the sequence's tokens, a list or a
        `token_ids(start, end)` function. Returns how many got cached."""
        cache = self.allocator.prefix_cache
        if cache is None:
            return 0
        return cache.cache_full_blocks(self, token_ids)

    def set_prefix_chain(self, num_hashed_blocks: int, tail: CachedBlock | None) -> None:
        """For the prefix cache: where this table's hash chain stands."""
        assert 0 <= num_hashed_blocks <= self.num_tokens // self.block_size, (
            f"{self}: {num_hashed_blocks} hashed blocks but fewer are full"
        )
        self.num_hashed_blocks = num_hashed_blocks
        self.prefix_tail = tail

    def check_invariants(self) -> None:
        assert self.capacity - self.block_size < self.num_tokens <= self.capacity or (
            self.num_tokens == 0 and not self.block_ids
        ), f"{self}: block count does not match the token count"
        for block_id in self.block_ids:
            assert self.allocator.ref_count(block_id) >= 1, f"{self} holds free block {block_id}"
        num_full = self.num_tokens // self.block_size
        cache = self.allocator.prefix_cache
        if cache is not None:
            # A cached block must never be written: it has to be full here.
            for i, block_id in enumerate(self.block_ids[num_full:], num_full):
                assert not cache.is_cached(block_id), (
                    f"{self}: cached block {block_id} is partly filled at position {i}"
                )
        assert 0 <= self.num_hashed_blocks <= num_full, (
            f"{self}: {self.num_hashed_blocks} hashed blocks, {num_full} full"
        )

    def _assert_not_cached(self, block_id: int, what: str) -> None:
        cache = self.allocator.prefix_cache
        assert cache is None or not cache.is_cached(block_id), (
            f"cached block {block_id} would be {what}; cached blocks are immutable"
        )

    def _last_block_needs_copy(self) -> bool:
        return (
            bool(self.block_ids)
            and self.num_tokens % self.block_size != 0
            and self.allocator.is_shared(self.block_ids[-1])
        )
