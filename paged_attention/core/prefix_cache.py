"""Automatic prefix caching: reuse full KV blocks that another request computed.

A full block is named by a hash chained through every block before it,
`hash_block(parent_hash, token_ids)`, so equal hashes mean "the same tokens
after the same prefix" -- almost always. A hit is confirmed, never trusted: the
entry must hold the very token ids asked for *and* hang off the entry that the
previous hit matched (entries carry serials that are never reused). By
induction a chain of hits holds exactly the query's tokens from position 0, so
a hash collision can cost a miss but can never hand out another prefix's KV.

The cache only names blocks; the allocator owns them. A cached block that some
table holds is in use; at ref count 0 it is *evictable*: it counts as
allocatable, but the allocator hands it out (dropping its entry here) only when
no uncached free block is left, least recently used first.

A cached block is full, and full blocks are never written again (copy-on-write
only copies a partly filled last block), so its KV stays valid for as long as
it is cached.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # both import this module at run time
    from paged_attention.core.block_allocator import BlockAllocator
    from paged_attention.core.block_table import BlockTable

# Tokens of a sequence: a list, or a `Request.token_ids(start, end)`-style
# function, so the engine can hand over only the new blocks' tokens each step
# instead of copying the whole sequence.
TokenSource = Sequence[int] | Callable[[int, int], Sequence[int]]


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block. Python's hash is enough: entries live
    only as long as the process, and every hit is confirmed by content."""
    return hash((parent_hash, token_ids))


@dataclass(frozen=True, eq=False)
class CachedBlock:
    """One cache entry. Compared by identity: a re-registered block is a new entry."""

    block_id: int
    block_hash: int
    parent_hash: int | None  # None for a sequence's first block
    parent_serial: int | None  # serial of the entry this one extends; None for the first block
    token_ids: tuple[int, ...]
    serial: int  # unique per cache, never reused


def read_tokens(source: TokenSource, start: int, end: int) -> tuple[int, ...]:
    if callable(source):
        return tuple(source(start, end))
    return tuple(source[start:end])


class PrefixCache:
    """Hash -> full block map beside a `BlockAllocator` (which creates it)."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self._allocator = allocator
        self.block_size = allocator.block_size
        self._by_hash: dict[int, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._serials = itertools.count()
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_cached_blocks(self) -> int:
        """Blocks with an entry, in use or evictable."""
        return len(self._by_block)

    @property
    def hit_rate(self) -> float:
        """Tokens served from the cache / tokens queried by `match`. Below 1 even
        for a repeated prompt: its last token is always computed."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._by_block

    def entry(self, block_id: int) -> CachedBlock | None:
        return self._by_block.get(block_id)

    def cached_block_ids(self) -> list[int]:
        return sorted(self._by_block)

    def is_alive(self, entry: CachedBlock) -> bool:
        """False once the entry's block was evicted or its entry replaced."""
        return self._by_block.get(entry.block_id) is entry

    def lookup(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached full-block prefix of `token_ids`,
        changing nothing. At most (len - 1) // block_size blocks: the last
        token is always left to compute, since the model must yield its logits."""
        return [e.block_id for e in self._walk(token_ids)]

    # ----------------------------------------------------------------- actions
    def match(self, token_ids: Sequence[int]) -> list[int]:
        """`lookup`, then take every hit block (ref count +1, revived if it was
        evictable) and count the query in the hit-rate stats."""
        hits = self.lookup(token_ids)
        for block_id in hits:
            self._allocator.acquire(block_id)
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def cache_full_blocks(self, table: BlockTable, token_ids: TokenSource) -> int:
        """Register every block of `table` that became full since the last call.

        `token_ids` holds (at least) the table's tokens; only the new full
        blocks' tokens are read. A block identical to one already cached (two
        requests computed the same prefix at once) stays uncached: the
        existing entry is kept, and no running table's ids are swapped.
        Returns how many blocks were newly cached.
        """
        bs = self.block_size
        start, end = table.num_hashed_blocks, table.num_tokens // bs
        if end <= start:
            return 0
        tokens = read_tokens(token_ids, start * bs, end * bs)
        assert len(tokens) == (end - start) * bs, (
            f"token_ids holds fewer than the table's {table.num_tokens} tokens"
        )
        tail = table.prefix_tail
        added = 0
        for i in range(start, end):
            block_tokens = tokens[(i - start) * bs : (i - start + 1) * bs]
            tail, created = self._register(table.block_ids[i], block_tokens, tail, first=i == 0)
            added += created  # not the change in size: a new entry may displace a stale one
        table.set_prefix_chain(end, tail)
        return added

    def forget(self, block_id: int) -> None:
        """Drop a block's entry. The allocator calls this when it evicts the block."""
        entry = self._by_block.pop(block_id)
        del self._by_hash[entry.block_hash]

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        assert len(self._by_hash) == len(self._by_block), "hash and block maps disagree"
        for block_id, entry in self._by_block.items():
            assert entry.block_id == block_id, f"entry for block {block_id} names {entry.block_id}"
            assert self._by_hash.get(entry.block_hash) is entry, (
                f"block {block_id} is not under its hash"
            )
            assert len(entry.token_ids) == self.block_size, f"cached block {block_id} is not full"
            assert hash_block(entry.parent_hash, entry.token_ids) == entry.block_hash, (
                f"cached block {block_id}: stored token ids do not hash to its key"
            )
            assert (entry.parent_hash is None) == (entry.parent_serial is None), (
                f"cached block {block_id}: half a parent link"
            )

    # ---------------------------------------------------------------- helpers
    def _walk(self, token_ids: Sequence[int]) -> list[CachedBlock]:
        bs = self.block_size
        hits: list[CachedBlock] = []
        parent_hash: int | None = None
        parent_serial: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            block_tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            entry = self._by_hash.get(hash_block(parent_hash, block_tokens))
            if (
                entry is None
                or entry.token_ids != block_tokens
                or entry.parent_serial != parent_serial
            ):
                break
            hits.append(entry)
            parent_hash, parent_serial = entry.block_hash, entry.serial
        return hits

    def _register(
        self,
        block_id: int,
        block_tokens: tuple[int, ...],
        tail: CachedBlock | None,
        *,
        first: bool,
    ) -> tuple[CachedBlock | None, bool]:
        """Cache one full block after `tail` (the entry for the prefix before
        it). Returns the entry that now stands for the prefix ending with this
        block -- its own, or an identical one's -- or None when the chain is
        broken and later blocks of this table cannot be cached; and whether a
        new entry was made."""
        own = self._by_block.get(block_id)
        if own is not None:
            # Adopted as a hit, or a fork sharing this block registered it first.
            assert own.token_ids == block_tokens, (
                f"block {block_id} is cached with other token ids than the table's"
            )
            return own, False
        if not first and (tail is None or not self.is_alive(tail)):
            # The prefix before this block has no live entry (our copy of it was
            # a duplicate whose original got evicted): an entry here could
            # never be matched, so do not waste a slot on it.
            return None, False
        parent_hash = None if tail is None else tail.block_hash
        parent_serial = None if tail is None else tail.serial
        block_hash = hash_block(parent_hash, block_tokens)
        occupant = self._by_hash.get(block_hash)
        if occupant is not None:
            if occupant.token_ids == block_tokens and occupant.parent_serial == parent_serial:
                return occupant, False  # identical block cached elsewhere: keep it
            if self._allocator.ref_count(occupant.block_id) > 0:
                return None, False  # a collision with a block in use: leave ours uncached
            # An evictable block that can no longer be matched (its parent was
            # evicted) or a collision loser: give its slot to the live chain.
            self._allocator.uncache(occupant.block_id)
        entry = CachedBlock(
            block_id, block_hash, parent_hash, parent_serial, block_tokens, next(self._serials)
        )
        self._by_hash[block_hash] = entry
        self._by_block[block_id] = entry
        return entry, True
