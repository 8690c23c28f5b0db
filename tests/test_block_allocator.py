"""BlockAllocator (the block pool): exact-id unit tests on tiny pools, bad-input
errors, and the invariant check on a pool of a million blocks."""

from __future__ import annotations

import pytest

from paged_attention.core.block_allocator import (
    MAX_BLOCK_SIZE,
    BlockAllocator,
    validate_block_size,
)
from paged_attention.core.block_pool import BlockPool
from paged_attention.core.block_table import BlockTable
from paged_attention.core.prefix_cache import PrefixChain


class _Holder:
    """A stand-in for a block table: just a list of block ids."""

    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = block_ids


def _state(alloc: BlockAllocator) -> tuple[list[int], list[int]]:
    return alloc.free_block_ids(), [alloc.ref_count(b) for b in range(alloc.num_blocks)]


# --------------------------------------------------------------- fresh pool
def test_fresh_pool_hands_out_ids_in_order():
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    assert alloc.free_block_ids() == [0, 1, 2, 3, 4]
    assert alloc.num_free_blocks == 5
    assert alloc.num_used_blocks == 0
    assert [alloc.allocate() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert alloc.num_free_blocks == 0
    assert alloc.num_used_blocks == 5
    assert [alloc.ref_count(b) for b in range(5)] == [1] * 5
    alloc.check_invariants()


def test_allocate_many_takes_the_front_of_the_queue():
    alloc = BlockAllocator(6, 2)
    assert alloc.allocate_many(3) == [0, 1, 2]
    assert alloc.allocate_many(2) == [3, 4]
    assert alloc.free_block_ids() == [5]
    assert alloc.allocate_many(0) == []
    assert alloc.free_block_ids() == [5]


# ---------------------------------------------------------------- FIFO reuse
def test_freed_block_goes_to_the_back_of_the_queue():
    alloc = BlockAllocator(4, 1)
    assert alloc.allocate() == 0
    assert alloc.allocate() == 1
    assert alloc.free(0) is True
    # 2 and 3 were never used; 0 was just freed, so it comes last.
    assert alloc.free_block_ids() == [2, 3, 0]
    assert alloc.allocate() == 2
    assert alloc.allocate() == 3
    assert alloc.allocate() == 0
    assert alloc.allocate() is None


def test_free_order_decides_reuse_order():
    alloc = BlockAllocator(4, 8)
    assert alloc.allocate_many(4) == [0, 1, 2, 3]
    for b in (2, 0, 3, 1):
        alloc.free(b)
    assert alloc.free_block_ids() == [2, 0, 3, 1]
    assert alloc.allocate_many(4) == [2, 0, 3, 1]


def test_what_is_free_after_a_free():
    alloc = BlockAllocator(3, 2)
    ids = alloc.allocate_many(3)
    assert ids == [0, 1, 2]
    assert alloc.free_block_ids() == []
    assert alloc.free(1) is True
    assert alloc.free_block_ids() == [1]
    assert alloc.ref_count(1) == 0
    assert alloc.ref_count(0) == 1 and alloc.ref_count(2) == 1
    assert alloc.num_free_blocks == 1 and alloc.num_used_blocks == 2
    alloc.check_invariants([_Holder([0, 2])])


# ----------------------------------------------------------- fork / sharing
def test_fork_increments_ref_count_and_free_returns_true_only_at_zero():
    alloc = BlockAllocator(3, 4)
    b = alloc.allocate()
    assert b == 0
    assert alloc.ref_count(b) == 1
    assert not alloc.is_shared(b)
    assert not alloc.needs_copy_on_write(b)

    assert alloc.fork(b) == b
    assert alloc.ref_count(b) == 2
    assert alloc.is_shared(b)
    assert alloc.needs_copy_on_write(b)
    assert alloc.fork(b) == b
    assert alloc.ref_count(b) == 3
    alloc.check_invariants([_Holder([0]), _Holder([0]), _Holder([0])])

    # Forking never takes a block from the pool.
    assert alloc.free_block_ids() == [1, 2]

    assert alloc.free(b) is False
    assert alloc.ref_count(b) == 2
    assert alloc.free_block_ids() == [1, 2]
    assert alloc.free(b) is False
    assert alloc.ref_count(b) == 1
    assert not alloc.is_shared(b)
    assert alloc.free_block_ids() == [1, 2]
    assert alloc.free(b) is True
    assert alloc.ref_count(b) == 0
    assert alloc.free_block_ids() == [1, 2, 0]
    alloc.check_invariants([])


def test_fork_of_a_free_block_is_an_error():
    alloc = BlockAllocator(2, 4)
    with pytest.raises(ValueError, match=r"\b1\b"):
        alloc.fork(1)
    assert _state(alloc) == ([0, 1], [0, 0])


# ----------------------------------------------------------- running out
def test_running_out_returns_none_and_changes_nothing():
    alloc = BlockAllocator(3, 2)
    alloc.allocate_many(2)
    alloc.fork(0)
    assert alloc.can_allocate(1)
    assert not alloc.can_allocate(2)
    before = _state(alloc)
    assert alloc.allocate_many(2) is None
    assert _state(alloc) == before
    assert alloc.allocate() == 2
    assert not alloc.can_allocate(1)
    assert alloc.can_allocate(0)
    before = _state(alloc)
    assert alloc.allocate() is None
    assert alloc.allocate_many(1) is None
    assert _state(alloc) == before
    assert before == ([], [2, 1, 1])
    alloc.check_invariants([_Holder([0, 1]), _Holder([0]), _Holder([2])])


def test_can_allocate_matches_free_count():
    alloc = BlockAllocator(4, 1)
    for used in range(5):
        assert alloc.can_allocate(4 - used)
        assert not alloc.can_allocate(5 - used)
        if used < 4:
            alloc.allocate()


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, 3, 512, -1, -2, 6, 12, 255, 257, 1024])
def test_block_size_not_a_power_of_two_in_range(bad):
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        validate_block_size(bad)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        BlockAllocator(4, bad)


@pytest.mark.parametrize("bad", [2.0, "16", None])
def test_block_size_of_wrong_type(bad):
    with pytest.raises(ValueError, match="block_size"):
        BlockAllocator(4, bad)


@pytest.mark.parametrize("good", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_every_power_of_two_block_size_is_accepted(good):
    assert MAX_BLOCK_SIZE == 256
    assert validate_block_size(good) == good
    alloc = BlockAllocator(2, good)
    assert alloc.block_size == good


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_num_blocks_below_one(bad):
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        BlockAllocator(bad, 16)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        BlockAllocator(total_blocks=bad, block_size=16)


def test_num_blocks_missing_or_wrong_type():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(block_size=16)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(2.0, 16)


def test_total_blocks_alias_and_hidden_dim():
    alloc = BlockAllocator(total_blocks=7, block_size=16, hidden_dim=512)
    assert alloc.num_blocks == alloc.total_blocks == 7
    assert alloc.hidden_dim == 512
    assert alloc.free_block_ids() == list(range(7))
    assert BlockAllocator(7, 16, total_blocks=7).num_blocks == 7
    with pytest.raises(ValueError, match=r"num_blocks=7 and total_blocks=8"):
        BlockAllocator(7, 16, total_blocks=8)
    with pytest.raises(ValueError, match=r"got 0\b"):
        BlockAllocator(7, 16, hidden_dim=0)


def test_double_free_is_an_error_naming_the_block():
    alloc = BlockAllocator(3, 2)
    alloc.allocate_many(2)
    assert alloc.free(1) is True
    before = _state(alloc)
    with pytest.raises(ValueError, match=r"block 1 .*double free"):
        alloc.free(1)
    assert _state(alloc) == before
    # A never-allocated block cannot be freed either.
    with pytest.raises(ValueError, match=r"block 2\b"):
        alloc.free(2)
    assert _state(alloc) == before
    alloc.check_invariants()


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_ids_outside_the_pool(bad):
    alloc = BlockAllocator(3, 2)
    alloc.allocate_many(3)
    for op in (alloc.free, alloc.fork, alloc.ref_count, alloc.is_shared):
        with pytest.raises(ValueError, match=rf"block id {bad}\b"):
            op(bad)
    assert [alloc.ref_count(b) for b in range(3)] == [1, 1, 1]


# ------------------------------------------------------ invariant checker
def test_check_invariants_catches_a_ref_count_that_does_not_match_holders():
    alloc = BlockAllocator(4, 2)
    alloc.allocate_many(2)
    alloc.fork(1)
    alloc.check_invariants([_Holder([0, 1]), _Holder([1])])
    with pytest.raises(AssertionError, match="block 1"):
        alloc.check_invariants([_Holder([0, 1])])
    with pytest.raises(AssertionError, match="block 2"):
        alloc.check_invariants([_Holder([0, 1]), _Holder([1, 2])])


def test_check_invariants_catches_corrupt_free_list():
    alloc = BlockAllocator(4, 2)
    alloc.allocate()
    alloc._released[0] = None  # block 0 both used and free
    with pytest.raises(AssertionError):
        alloc.check_invariants()
    alloc = BlockAllocator(4, 2)
    alloc._released[1] = None  # block 1 free twice: never handed out, and released
    with pytest.raises(AssertionError, match="twice"):
        alloc.check_invariants()


# ------------------------------------------------------------- generations
def test_generation_counts_allocations_not_revivals():
    alloc = BlockAllocator(2, 2)
    assert [alloc.generation(b) for b in range(2)] == [0, 0]
    assert alloc.allocate_many(2) == [0, 1]
    assert [alloc.generation(b) for b in range(2)] == [1, 1]
    alloc.fork(0)
    alloc.free(0)
    alloc.free(0)
    assert alloc.allocate() == 0
    assert alloc.generation(0) == 2
    # A cached block freed and revived by a cache hit keeps its contents, and
    # its generation; evicting it for a new allocation bumps it.
    assert alloc.enable_prefix_caching
    alloc.free(0)
    alloc.free(1)
    table, chain = BlockTable(alloc), PrefixChain()
    assert table.admit([7, 7, 7], 3, chain) is not None and table.block_ids == [0, 1]
    alloc.cache_full_blocks(table, chain, [7, 7, 7])
    table.free()
    chain = PrefixChain()
    assert alloc.evictable_block_ids() == [0]
    assert table.admit([7, 7, 7], 1, chain) is not None and table.block_ids == [0, 1]
    assert alloc.generation(0) == 3
    table.free()
    assert alloc.allocate_many(2) == [1, 0]  # block 0 evicted
    assert alloc.generation(0) == 4
    with pytest.raises(ValueError, match=r"block id 2\b"):
        alloc.generation(2)


# ------------------------------------------------- a pool of a million blocks
BIG = 1_000_000


def _big_pool() -> tuple[BlockPool, list[_Holder]]:
    """A million blocks, a handful used: 0, 1 (shared), 2 released, 3 cached."""
    pool = BlockPool(BIG, 4)
    a, b = _Holder(pool.allocate_many(3)), _Holder([])
    b.block_ids.append(pool.fork(1))
    assert pool.free(2) is True
    a.block_ids.remove(2)
    table, chain = BlockTable(pool), PrefixChain()
    assert table.admit([5] * 5, 5, chain) is not None and table.block_ids == [3, 4]
    assert pool.cache_full_blocks(table, chain, [5] * 5) == 1
    pool.check_invariants([a, b, table])
    return pool, [a, b, table]


def test_seed_name_is_the_pool():
    assert BlockAllocator is BlockPool


def test_a_million_block_pool_hands_out_untouched_blocks_before_released_ones():
    pool, _ = _big_pool()
    assert pool.num_used_blocks == 4 and pool.num_free_blocks == BIG - 4
    assert [pool.ref_count(b) for b in range(6)] == [1, 2, 0, 1, 1, 0]
    assert pool.free_block_ids()[:2] == [5, 6] and pool.free_block_ids()[-1] == 2
    assert pool.allocate() == 5
    assert pool.allocate_many(BIG - 6) == list(range(6, BIG))
    assert pool.allocate() == 2  # the released block, after every untouched one
    assert pool.allocate() is None
    assert pool.generation(2) == 2 and pool.generation(BIG - 1) == 1


def test_check_invariants_on_a_million_blocks_catches_an_off_by_one_ref_count():
    pool, holders = _big_pool()
    pool._ref_counts[1] += 1
    with pytest.raises(AssertionError, match=r"block 1: ref count 3 but 2 holders"):
        pool.check_invariants(holders)
    pool._ref_counts[1] -= 2
    with pytest.raises(AssertionError, match=r"block 1: ref count 1 but 2 holders"):
        pool.check_invariants(holders)
    pool._ref_counts[1] += 1
    pool.check_invariants(holders)
    holders[0].block_ids.append(BIG - 1)  # a table holding a block nobody handed out
    with pytest.raises(AssertionError, match=rf"block {BIG - 1}: ref count 0 but 1 holders"):
        pool.check_invariants(holders)


def test_check_invariants_on_a_million_blocks_catches_a_block_both_free_and_used():
    pool, holders = _big_pool()
    pool._released[0] = None  # used block 0 also on the free list
    with pytest.raises(AssertionError, match=r"block 0 is both free and used"):
        pool.check_invariants(holders)
    del pool._released[0]
    pool._ref_counts[BIG - 1] = 1  # used, yet above the never-handed-out mark
    with pytest.raises(AssertionError, match=rf"block {BIG - 1} is both used and never handed out"):
        pool.check_invariants()
    del pool._ref_counts[BIG - 1]
    pool._evictable[0] = None  # used block 0 also evictable
    with pytest.raises(AssertionError, match=r"block 0 is both evictable and used"):
        pool.check_invariants()
    del pool._evictable[0]
    pool._released[3] = None  # cached block 3 (in use) also on the free list
    with pytest.raises(AssertionError, match=r"block 3 is both free and used"):
        pool.check_invariants()
    del pool._released[3]
    del pool._released[2]  # released block 2 lost
    with pytest.raises(AssertionError, match=r"free twice, or lost"):
        pool.check_invariants()
    pool._released[2] = None
    pool.check_invariants(holders)


def test_recent_first_pool_reuses_the_last_released_block_before_untouched_ones():
    """The host swap pool's order: released blocks (already resident pages),
    most recent first, come before blocks never touched."""
    pool = BlockPool(8, 4, enable_prefix_caching=False, reuse_recent_first=True)
    a, b, c = pool.allocate_many(3)
    assert (a, b, c) == (0, 1, 2)
    pool.free(a)
    pool.free(c)
    assert pool.free_block_ids() == [2, 0, 3, 4, 5, 6, 7]
    assert pool.allocate() == 2 and pool.allocate() == 0 and pool.allocate() == 3
    assert pool.num_touched_blocks == 4  # swapping in and out again touches no new page
    pool.check_invariants()


def test_fifo_pool_hands_out_untouched_blocks_before_released_ones():
    pool = BlockPool(4, 4, enable_prefix_caching=False)
    first = pool.allocate()
    pool.free(first)
    assert pool.free_block_ids() == [1, 2, 3, 0]
    assert pool.allocate() == 1
