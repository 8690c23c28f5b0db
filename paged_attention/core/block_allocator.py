"""The physical block pool: a free list and a reference count per block.

A block is `block_size` token slots of KV memory in the preallocated pool. The
allocator only hands out block *ids*; it never touches tensors, so it is pure
Python and unit-tested with exact ids.

With prefix caching on, a block whose last owner lets go while it holds a
cached prefix is not freed but becomes *evictable*: still allocatable, handed
out only when no truly free block is left, least recently used first (its
cache entry is dropped then).

Invariants (checked by `check_invariants`):
  * every block is exactly one of: free (ref count 0, in the free list once),
    evictable (ref count 0, cached, in the LRU list once) or used (ref count
    >= 1);
  * num_free + num_evictable + num_used == num_blocks;
  * evictable blocks and only those have a cache entry at ref count 0;
  * given the block tables that exist, each used block's ref count equals the
    number of table entries that hold it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from paged_attention.core.prefix_cache import PrefixCache

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

    Free blocks are handed out in FIFO order of release: a fresh pool gives 0,
    1, 2, ...; a freed block goes to the back of the queue. Evictable blocks
    (cached prefixes nobody holds, see `prefix_cache`) come after every free
    block, least recently released first.

    `enable_prefix_caching=False` leaves `prefix_cache` None: nothing is ever
    evictable and the pool is a plain FIFO free list.

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
        enable_prefix_caching: bool = True,
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
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(  # noqa: TRY004  (house style: ValueError for bad input)
                f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}"
            )
        self.num_blocks: int = num_blocks
        self.block_size: int = validate_block_size(block_size)
        self.hidden_dim: int | None = hidden_dim
        self._ref_counts: list[int] = [0] * num_blocks
        # Bumped each time a block is handed out: tells a new allocation of the
        # same id from the old one (the swap manager's records rely on it).
        self._generations: list[int] = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(self) if enable_prefix_caching else None
        )

    # ----------------------------------------------------------------- queries
    @property
    def total_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated: truly free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def free_block_ids(self) -> list[int]:
        """Every allocatable block in the order they will be handed out: the
        free list, then the evictable blocks, least recently used first."""
        return [*self._free, *self._evictable]

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks, least recently used (next to be evicted) first."""
        return list(self._evictable)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def can_allocate(self, n: int = 1) -> bool:
        return n <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def generation(self, block_id: int) -> int:
        """How many times the block has been allocated. Reviving a cached block
        does not count: its contents did not change."""
        self._check_id(block_id)
        return self._generations[block_id]

    def is_shared(self, block_id: int) -> bool:
        """True when more than one owner holds the block: writing to it needs a copy."""
        return self.ref_count(block_id) > 1

    needs_copy_on_write = is_shared

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
        """Add an owner to a cached block, reviving it if it was evictable.
        The prefix cache's way in; tables share blocks with `fork`."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            assert block_id in self._evictable, f"block {block_id} is free, not cached"
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1
        return block_id

    def uncache(self, block_id: int) -> None:
        """Drop a block's cache entry; an evictable block becomes truly free."""
        assert self.prefix_cache is not None, "prefix caching is off"
        self.prefix_cache.forget(block_id)
        if block_id in self._evictable:
            del self._evictable[block_id]
            self._free.append(block_id)

    def fork(self, block_id: int) -> int:
        """Add an owner to a used block (sharing). Returns the same id."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot fork block {block_id}: it is free (or only evictable)")
        self._ref_counts[block_id] += 1
        return block_id

    def free(self, block_id: int) -> bool:
        """Drop one owner. Returns True when the block went back to the pool:
        to the back of the free list, or, if it holds a cached prefix, to the
        most recently used end of the evictable list."""
        self._check_id(block_id)
        count = self._ref_counts[block_id]
        if count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        self._ref_counts[block_id] = count - 1
        if count > 1:
            return False
        if self.prefix_cache is not None and self.prefix_cache.is_cached(block_id):
            self._evictable[block_id] = None
        else:
            self._free.append(block_id)
        return True

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Drop one owner of each of a sequence's blocks. Uncached blocks join
        the free list in sequence order; cached ones turn evictable in
        *reverse* order, so the sequence's tail is evicted before its head: a
        cached block can only be matched through every block before it, so
        evicting the head first would strand the rest."""
        cache = self.prefix_cache
        cached = [b for b in block_ids if cache is not None and cache.is_cached(b)]
        for block_id in block_ids:
            if cache is None or not cache.is_cached(block_id):
                self.free(block_id)
        for block_id in reversed(cached):
            self.free(block_id)

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            assert self.prefix_cache is not None, "evictable block without a prefix cache"
            self.prefix_cache.forget(block_id)
        self._ref_counts[block_id] = 1
        self._generations[block_id] += 1
        return block_id

    # ------------------------------------------------------------- invariants
    def check_invariants(self, holders: Iterable[HoldsBlocks] | None = None) -> None:
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "a block is in the free list twice"
        evictable = set(self._evictable)
        used = {b for b, c in enumerate(self._ref_counts) if c > 0}
        assert not (free_set & used), f"blocks both free and used: {sorted(free_set & used)}"
        assert not (evictable & used), f"blocks both evictable and used: {sorted(evictable & used)}"
        assert not (free_set & evictable), (
            f"blocks both free and evictable: {sorted(free_set & evictable)}"
        )
        assert len(free_set) + len(evictable) + len(used) == self.num_blocks, (
            f"free ({len(free_set)}) + evictable ({len(evictable)}) + used ({len(used)}) "
            f"!= total ({self.num_blocks})"
        )
        assert all(c >= 0 for c in self._ref_counts), "negative reference count"
        cache = self.prefix_cache
        if cache is None:
            assert not evictable, "evictable blocks with prefix caching off"
        else:
            for block_id in evictable:
                assert cache.is_cached(block_id), f"evictable block {block_id} has no cache entry"
            for block_id in cache.cached_block_ids():
                assert block_id not in free_set, f"cached block {block_id} is on the free list"
            cache.check_invariants()
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
