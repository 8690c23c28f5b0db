"""The block pool: the one owner of every KV block's lifecycle.

A block is `block_size` token slots of KV memory in the preallocated pool. The
pool hands out block *ids*; it never touches tensors, so it is pure Python and
unit-tested with exact ids. It alone keeps and changes:
  * the free list: blocks never handed out (every id from `_watermark` up, so
    a pool costs nothing per block until the block is used), then released
    blocks, least recently released first;
  * the reference count of each block in use;
  * with prefix caching, the hash -> block map of full blocks (its records
    live in core/prefix_cache.py) and the LRU list of cached blocks nobody
    holds. Such a block is *evictable*: still allocatable, but handed out only
    when no free block is left, least recently used first, and its cache
    entry goes then.

Invariants (checked by `check_invariants` in time proportional to the blocks
in use and cached, never to the pool's size):
  * every block is exactly one of: untouched (id >= watermark), released (in
    the release queue), evictable (cached, ref count 0, in the LRU list) or
    used (ref count >= 1);
  * untouched + released + evictable + used == num_blocks;
  * a cache entry's block is used or evictable, and every evictable block has one;
  * given the block tables that exist, each used block's ref count equals the
    number of table entries that hold it.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from paged_attention.core.prefix_cache import (
    CachedBlock,
    PrefixChain,
    TokenSource,
    hash_block,
    read_tokens,
)

MAX_BLOCK_SIZE = 256


class HoldsBlocks(Protocol):
    """Anything that owns references to blocks (a block table)."""

    @property
    def block_ids(self) -> list[int]: ...


class FilledBlocks(HoldsBlocks, Protocol):
    """A block table as the prefix cache reads it: its first `num_tokens`
    tokens are computed."""

    @property
    def num_tokens(self) -> int: ...


def validate_block_size(block_size: int) -> int:
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or block_size < 1
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two in 1..{MAX_BLOCK_SIZE}, got {block_size!r}")
    return block_size


class BlockPool:
    """Free list, reference counts, prefix cache and eviction over `num_blocks`
    blocks of `block_size` slots.

    Free blocks are handed out in FIFO order of release: a fresh pool gives 0,
    1, 2, ...; a freed block goes to the back of the queue. Evictable blocks
    come after every free block, least recently released first.

    `enable_prefix_caching=False` caches nothing: nothing is ever evictable
    and the pool is a plain FIFO free list.

    `total_blocks` and `hidden_dim` are the seed API's spelling
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
        enable_prefix_caching: bool = True,
        reuse_recent_first: bool = False,
    ) -> None:
        if num_blocks is None:
            num_blocks = total_blocks
        elif total_blocks is not None and total_blocks != num_blocks:
            raise ValueError(f"num_blocks={num_blocks} and total_blocks={total_blocks} disagree")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim < 1):
            raise ValueError(f"hidden_dim must be an integer >= 1, got {hidden_dim!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        self.num_blocks: int = num_blocks
        self.block_size: int = validate_block_size(block_size)
        self.hidden_dim: int | None = hidden_dim
        self.enable_prefix_caching: bool = enable_prefix_caching
        # Host memory pools (the swap pool, and the KV pool on the CPU) hand
        # out the most recently released block first: its pages are already
        # resident, so reuse does not touch (and commit) fresh memory. GPU
        # pools keep FIFO order.
        self.reuse_recent_first: bool = reuse_recent_first
        # Blocks from `_watermark` up were never handed out; they come before
        # `_released`, which is exactly a FIFO queue that started as range(n).
        self._watermark = 0
        self._released: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._ref_counts: dict[int, int] = {}  # used blocks only
        # Bumped each time a block is handed out: tells a new allocation of the
        # same id from the old one (the swap manager's records rely on it).
        self._generations: dict[int, int] = {}
        # The prefix cache: every full block with an entry, used or evictable.
        self._by_hash: dict[int, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._serials = itertools.count()
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ----------------------------------------------------------------- queries
    @property
    def total_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated: truly free plus evictable."""
        return self.num_blocks - self._watermark + len(self._released) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_touched_blocks(self) -> int:
        """Blocks ever handed out: for a host pool, the pages it has committed."""
        return self._watermark

    def free_block_ids(self) -> list[int]:
        """Every allocatable block in the order they will be handed out: the
        free list, then the evictable blocks, least recently used first.
        Takes time in the pool's size."""
        untouched = range(self._watermark, self.num_blocks)
        if self.reuse_recent_first:
            return [*reversed(self._released), *untouched, *self._evictable]
        return [*untouched, *self._released, *self._evictable]

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks, least recently used (next to be evicted) first."""
        return list(self._evictable)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def can_allocate(self, n: int = 1) -> bool:
        return n <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts.get(block_id, 0)

    def generation(self, block_id: int) -> int:
        """How many times the block has been allocated. Reviving a cached block
        does not count: its contents did not change."""
        self._check_id(block_id)
        return self._generations.get(block_id, 0)

    def is_shared(self, block_id: int) -> bool:
        """True when more than one owner holds the block: writing to it needs a copy."""
        return self.ref_count(block_id) > 1

    needs_copy_on_write = is_shared

    # ---------------------------------------------------- prefix-cache queries
    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a cache entry, in use or evictable."""
        return len(self._by_block)

    @property
    def hit_rate(self) -> float:
        """Tokens served from the cache / tokens queried by `match`. Below 1 even
        for a repeated prompt: its last token is always computed."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._by_block

    def cached_entry(self, block_id: int) -> CachedBlock | None:
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
    def allocate(self) -> int | None:
        """Take one block (ref count 1): a free one, else the least recently
        used evictable one (its cached prefix is lost); None when neither is left."""
        if not self.can_allocate(1):
            return None
        return self._take()

    def allocate_many(self, n: int) -> list[int] | None:
        """Take `n` blocks at once, or None (taking nothing) if fewer are free."""
        if not self.can_allocate(n):
            return None
        return [self._take() for _ in range(n)]

    def acquire(self, block_id: int) -> int:
        """Add an owner to a cached block, reviving it if it was evictable:
        how a cache hit is taken. Tables share blocks with `fork`."""
        self._check_id(block_id)
        count = self._ref_counts.get(block_id, 0)
        if count == 0:
            assert block_id in self._evictable, f"block {block_id} is free, not cached"
            del self._evictable[block_id]
        self._ref_counts[block_id] = count + 1
        return block_id

    def fork(self, block_id: int) -> int:
        """Add an owner to a used block (sharing). Returns the same id."""
        self._check_id(block_id)
        count = self._ref_counts.get(block_id, 0)
        if count == 0:
            raise ValueError(f"cannot fork block {block_id}: it is free (or only evictable)")
        self._ref_counts[block_id] = count + 1
        return block_id

    def free(self, block_id: int) -> bool:
        """Drop one owner. Returns True when the block went back to the pool:
        to the back of the free list, or, if it holds a cached prefix, to the
        most recently used end of the evictable list."""
        self._check_id(block_id)
        count = self._ref_counts.get(block_id, 0)
        if count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        if count > 1:
            self._ref_counts[block_id] = count - 1
            return False
        del self._ref_counts[block_id]
        if block_id in self._by_block:
            self._evictable[block_id] = None
        else:
            self._released[block_id] = None
        return True

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Drop one owner of each of a sequence's blocks. Uncached blocks join
        the free list in sequence order; cached ones turn evictable in
        *reverse* order, so the sequence's tail is evicted before its head: a
        cached block can only be matched through every block before it, so
        evicting the head first would strand the rest."""
        cached = [b for b in block_ids if b in self._by_block]
        for block_id in block_ids:
            if block_id not in self._by_block:
                self.free(block_id)
        for block_id in reversed(cached):
            self.free(block_id)

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """`lookup`, then take every hit block (ref count +1, revived if it was
        evictable) and count the query in the hit-rate stats."""
        hits = self.lookup(token_ids)
        for block_id in hits:
            self.acquire(block_id)
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def cache_full_blocks(self, table: FilledBlocks, chain: PrefixChain, token_ids: TokenSource) -> int:
        """Register every block of `table` that became full since `chain` last
        moved, and move `chain` on (no-op with caching off).

        `token_ids` holds (at least) the table's tokens; only the new full
        blocks' tokens are read. A block identical to one already cached (two
        requests computed the same prefix at once) stays uncached: the
        existing entry is kept, and no running table's ids are swapped.
        Returns how many blocks were newly cached.
        """
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        start, end = chain.num_hashed_blocks, table.num_tokens // bs
        if end <= start:
            return 0
        tokens = read_tokens(token_ids, start * bs, end * bs)
        assert len(tokens) == (end - start) * bs, (
            f"token_ids holds fewer than the table's {table.num_tokens} tokens"
        )
        tail = chain.tail
        added = 0
        for i in range(start, end):
            block_tokens = tokens[(i - start) * bs : (i - start + 1) * bs]
            tail, created = self._register(table.block_ids[i], block_tokens, tail, first=i == 0)
            added += created  # not the change in size: a new entry may displace a stale one
        chain.num_hashed_blocks, chain.tail = end, tail
        return added

    # ------------------------------------------------------------- invariants
    def check_invariants(self, holders: Iterable[HoldsBlocks] | None = None) -> None:
        """Costs time in the blocks used, evictable and cached (and the holders'
        entries), never in the pool's size: an engine checks after every step."""
        used, released, evictable = self._ref_counts, self._released, self._evictable
        watermark = self._watermark
        assert 0 <= watermark <= self.num_blocks, f"watermark {watermark} outside the pool"
        for block_id, count in used.items():
            assert count >= 1, f"block {block_id} is used with ref count {count}"
            assert block_id < watermark, f"block {block_id} is both used and never handed out"
            assert block_id not in released, f"block {block_id} is both free and used"
            assert block_id not in evictable, f"block {block_id} is both evictable and used"
        for block_id in evictable:
            assert block_id < watermark, f"evictable block {block_id} was never handed out"
            assert block_id not in released, f"block {block_id} is both free and evictable"
            assert block_id in self._by_block, f"evictable block {block_id} has no cache entry"
        untouched = self.num_blocks - watermark
        assert untouched + len(released) + len(evictable) + len(used) == self.num_blocks, (
            f"untouched ({untouched}) + released ({len(released)}) + evictable "
            f"({len(evictable)}) + used ({len(used)}) != total ({self.num_blocks}): "
            "a block is free twice, or lost"
        )
        self._check_cache()
        if holders is not None:
            held: Counter[int] = Counter()
            for holder in holders:
                held.update(holder.block_ids)
            for block_id in held.keys() | used.keys():
                assert held[block_id] == used.get(block_id, 0), (
                    f"block {block_id}: ref count {used.get(block_id, 0)} but {held[block_id]} holders"
                )

    def _check_cache(self) -> None:
        if not self.enable_prefix_caching:
            assert not self._by_block and not self._evictable, "cached blocks with caching off"
        assert len(self._by_hash) == len(self._by_block), "hash and block maps disagree"
        for block_id, entry in self._by_block.items():
            assert block_id in self._ref_counts or block_id in self._evictable, (
                f"cached block {block_id} is on the free list"
            )
            assert entry.block_id == block_id, f"entry for block {block_id} names {entry.block_id}"
            assert self._by_hash.get(entry.block_hash) is entry, f"block {block_id} is not under its hash"
            assert len(entry.token_ids) == self.block_size, f"cached block {block_id} is not full"
            assert hash_block(entry.parent_hash, entry.token_ids) == entry.block_hash, (
                f"cached block {block_id}: stored token ids do not hash to its key"
            )
            assert (entry.parent_hash is None) == (entry.parent_serial is None), (
                f"cached block {block_id}: half a parent link"
            )

    # ---------------------------------------------------------------- helpers
    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside the pool (0..{self.num_blocks - 1})")

    def _take(self) -> int:
        if self.reuse_recent_first and self._released:
            block_id, _ = self._released.popitem(last=True)
        elif self._watermark < self.num_blocks:
            block_id = self._watermark
            self._watermark += 1
        elif self._released:
            block_id, _ = self._released.popitem(last=False)
        else:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(block_id)
        self._ref_counts[block_id] = 1
        self._generations[block_id] = self._generations.get(block_id, 0) + 1
        return block_id

    def _forget(self, block_id: int) -> None:
        """Drop a block's cache entry (the block itself stays where it is)."""
        entry = self._by_block.pop(block_id)
        del self._by_hash[entry.block_hash]

    def _uncache(self, block_id: int) -> None:
        """Drop a block's cache entry; an evictable block becomes truly free."""
        self._forget(block_id)
        if block_id in self._evictable:
            del self._evictable[block_id]
            self._released[block_id] = None

    def _walk(self, token_ids: Sequence[int]) -> list[CachedBlock]:
        bs = self.block_size
        hits: list[CachedBlock] = []
        parent_hash: int | None = None
        parent_serial: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            block_tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            entry = self._by_hash.get(hash_block(parent_hash, block_tokens))
            if entry is None or entry.token_ids != block_tokens or entry.parent_serial != parent_serial:
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
            if occupant.block_id in self._ref_counts:
                return None, False  # a collision with a block in use: leave ours uncached
            # An evictable block that can no longer be matched (its parent was
            # evicted) or a collision loser: give its slot to the live chain.
            self._uncache(occupant.block_id)
        entry = CachedBlock(
            block_id, block_hash, parent_hash, parent_serial, block_tokens, next(self._serials)
        )
        self._by_hash[block_hash] = entry
        self._by_block[block_id] = entry
        return entry, True
