"""BlockTable: exact slots, forking, copy-on-write, running out, freeing."""

from __future__ import annotations

import pytest

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable, CopyOnWrite


def _alloc_state(alloc: BlockAllocator):
    return alloc.free_block_ids(), [alloc.ref_count(b) for b in range(alloc.num_blocks)]


def _table_state(table: BlockTable):
    return list(table.block_ids), table.num_tokens


# ------------------------------------------------------------------ slots
def test_append_across_block_boundaries_gives_exact_slots():
    alloc = BlockAllocator(8, 4)
    t = BlockTable(alloc)
    assert t.block_ids == [] and t.num_tokens == 0 and t.capacity == 0
    t.check_invariants()

    assert t.append_slots(3) == ([0, 1, 2], None)
    assert t.block_ids == [0] and t.num_tokens == 3 and t.capacity == 4
    t.check_invariants()

    # Fills the last slot of block 0, then spills into block 1.
    assert t.append_slots(3) == ([3, 4, 5], None)
    assert t.block_ids == [0, 1] and t.num_tokens == 6
    t.check_invariants()

    # Exactly fills block 1 (no new block), then one token opens block 2.
    assert t.append_slots(2) == ([6, 7], None)
    assert t.block_ids == [0, 1] and t.num_tokens == 8
    t.check_invariants()
    assert t.append_slots(1) == ([8], None)
    assert t.block_ids == [0, 1, 2] and t.num_tokens == 9
    t.check_invariants()

    # A big append spanning several blocks at once.
    slots, cow = t.append_slots(10)
    assert cow is None
    assert t.block_ids == [0, 1, 2, 3, 4]
    assert slots == list(range(9, 19))
    assert t.num_tokens == 19
    t.check_invariants()
    alloc.check_invariants([t])


def test_first_append_to_an_existing_block_returns_its_slots():
    alloc = BlockAllocator(4, 4)
    t = BlockTable(alloc)
    t.append_slots(3)
    slots, cow = t.append_slots(3)
    assert (slots, cow) == ([3, 4, 5], None)
    assert t.block_ids == [0, 1]


def test_slots_follow_scattered_block_ids():
    alloc = BlockAllocator(6, 4)
    alloc.allocate_many(6)
    for b in (4, 1, 5, 0, 3, 2):
        alloc.free(b)
    t = BlockTable(alloc)
    slots, cow = t.append_slots(10)
    assert cow is None
    assert t.block_ids == [4, 1, 5]
    expected = [b * 4 + o for b in (4, 1, 5) for o in range(4)][:10]
    assert slots == expected
    assert slots == [16, 17, 18, 19, 4, 5, 6, 7, 20, 21]
    assert [t.slot(i) for i in range(10)] == expected
    assert t.slots(0, 10) == expected
    assert t.slots(3, 7) == expected[3:7]
    assert t.slots(5, 5) == []
    # Capacity counts the unfilled tail of the last block.
    assert t.capacity == 12
    assert t.slot(11) == 5 * 4 + 3
    slots, _ = t.append_slots(3)
    assert slots == [22, 23, 0 * 4 + 0]
    assert t.block_ids == [4, 1, 5, 0]


@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
def test_slot_formula_for_each_block_size(block_size):
    alloc = BlockAllocator(12, block_size)
    # Shuffle the free order deterministically.
    alloc.allocate_many(12)
    for b in (7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 4, 6):
        alloc.free(b)
    t = BlockTable(alloc)
    n = 3 * block_size + (block_size // 2 or 1)
    taken = []
    for chunk in (1, block_size, n - 1 - block_size):
        slots, cow = t.append_slots(chunk)
        assert cow is None
        taken += slots
    assert len(taken) == n == t.num_tokens
    assert taken == [t.block_ids[i // block_size] * block_size + i % block_size for i in range(n)]
    assert t.block_ids == [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 4, 6][: -(-n // block_size)]
    assert len(set(taken)) == n
    t.check_invariants()


def test_slot_outside_capacity_is_an_error():
    t = BlockTable(BlockAllocator(4, 4))
    t.append_slots(2)
    with pytest.raises(AssertionError, match="token 4"):
        t.slot(4)
    with pytest.raises(AssertionError):
        t.slot(-1)
    with pytest.raises(AssertionError):
        t.slots(0, 5)


def test_append_zero_tokens_changes_nothing():
    alloc = BlockAllocator(4, 4)
    t = BlockTable(alloc)
    assert t.append_slots(0) == ([], None)
    assert _table_state(t) == ([], 0)
    t.append_slots(2)
    child = t.fork()
    before = (_alloc_state(alloc), _table_state(t), _table_state(child))
    # Even with a shared partly filled last block, appending nothing copies nothing.
    assert child.append_slots(0) == ([], None)
    assert (_alloc_state(alloc), _table_state(t), _table_state(child)) == before


# ------------------------------------------------------------------- fork
def test_fork_shares_all_blocks():
    alloc = BlockAllocator(8, 4)
    parent = BlockTable(alloc)
    parent.append_slots(10)
    assert parent.block_ids == [0, 1, 2]
    child = parent.fork()
    assert child is not parent
    assert child.block_ids == [0, 1, 2]
    assert child.block_ids is not parent.block_ids
    assert child.num_tokens == 10
    assert [alloc.ref_count(b) for b in range(8)] == [2, 2, 2, 0, 0, 0, 0, 0]
    assert alloc.free_block_ids() == [3, 4, 5, 6, 7]
    assert child.slots(0, 10) == parent.slots(0, 10)
    grandchild = child.fork()
    assert [alloc.ref_count(b) for b in range(3)] == [3, 3, 3]
    for t in (parent, child, grandchild):
        t.check_invariants()
    alloc.check_invariants([parent, child, grandchild])


def test_fork_of_empty_table():
    alloc = BlockAllocator(2, 4)
    parent = BlockTable(alloc)
    child = parent.fork()
    assert _table_state(child) == ([], 0)
    assert alloc.free_block_ids() == [0, 1]


# ---------------------------------------------------------- copy-on-write
def test_copy_on_write_of_shared_partly_filled_last_block():
    alloc = BlockAllocator(6, 4)
    parent = BlockTable(alloc)
    parent.append_slots(6)  # blocks [0, 1], block 1 holds 2 of 4 tokens
    child = parent.fork()
    assert child.blocks_needed(1) == 1  # the copy
    assert child.blocks_needed(2) == 1  # still fits in the copied block
    assert child.blocks_needed(3) == 2  # copy + one more block

    slots, cow = child.append_slots(1)
    assert cow == CopyOnWrite(src=1, dst=2)
    assert child.block_ids == [0, 2]
    assert slots == [2 * 4 + 2]
    assert child.num_tokens == 7
    assert [alloc.ref_count(b) for b in range(4)] == [2, 1, 1, 0]
    assert alloc.free_block_ids() == [3, 4, 5]

    # The parent now owns block 1 alone: it writes in place, no copy.
    assert parent.blocks_needed(1) == 0
    slots, cow = parent.append_slots(1)
    assert cow is None
    assert slots == [1 * 4 + 2]
    assert parent.block_ids == [0, 1]
    for t in (parent, child):
        t.check_invariants()
    alloc.check_invariants([parent, child])


def test_copy_on_write_then_new_block_in_one_append():
    alloc = BlockAllocator(6, 4)
    parent = BlockTable(alloc)
    parent.append_slots(5)  # [0, 1], block 1 holds 1 token
    child = parent.fork()
    slots, cow = child.append_slots(5)  # copy block 1 -> 2, then 3 fill + 2 in block 3
    assert cow == CopyOnWrite(1, 2)
    assert child.block_ids == [0, 2, 3]
    assert slots == [9, 10, 11, 12, 13]
    assert child.num_tokens == 10
    alloc.check_invariants([parent, child])


def test_copy_on_write_never_copies_a_full_block():
    alloc = BlockAllocator(6, 4)
    parent = BlockTable(alloc)
    parent.append_slots(8)  # two full blocks
    child = parent.fork()
    assert child.blocks_needed(1) == 1  # only a new block, no copy
    assert child.copy_on_write_last() is None
    assert child.block_ids == [0, 1]
    slots, cow = child.append_slots(1)
    assert cow is None
    assert child.block_ids == [0, 1, 2]
    assert slots == [8]
    assert [alloc.ref_count(b) for b in range(3)] == [2, 2, 1]
    alloc.check_invariants([parent, child])


def test_copy_on_write_last_directly():
    alloc = BlockAllocator(4, 4)
    t = BlockTable(alloc)
    assert t.copy_on_write_last() is None  # empty table
    t.append_slots(3)
    assert t.copy_on_write_last() is None  # not shared
    other = t.fork()
    cow = other.copy_on_write_last()
    assert cow == CopyOnWrite(0, 1)
    assert other.block_ids == [1] and other.num_tokens == 3
    assert t.block_ids == [0]
    assert other.copy_on_write_last() is None  # now private
    assert t.copy_on_write_last() is None
    alloc.check_invariants([t, other])


def test_copy_on_write_with_no_free_block_raises_and_changes_nothing():
    alloc = BlockAllocator(1, 4)
    t = BlockTable(alloc)
    t.append_slots(1)
    other = t.fork()
    before = (_alloc_state(alloc), _table_state(t), _table_state(other))
    with pytest.raises(RuntimeError, match="copy-on-write"):
        other.copy_on_write_last()
    assert (_alloc_state(alloc), _table_state(t), _table_state(other)) == before


# --------------------------------------------------------------- running out
def test_append_when_pool_is_too_small_returns_none_and_changes_nothing():
    alloc = BlockAllocator(3, 4)
    t = BlockTable(alloc)
    assert t.can_append(12)
    assert not t.can_append(13)
    assert t.append_slots(13) is None
    assert _table_state(t) == ([], 0)
    assert _alloc_state(alloc) == ([0, 1, 2], [0, 0, 0])

    t.append_slots(5)
    before = (_alloc_state(alloc), _table_state(t))
    assert t.append_slots(8) is None
    assert (_alloc_state(alloc), _table_state(t)) == before
    assert t.append_slots(7) is not None
    assert t.num_tokens == 12 and alloc.num_free_blocks == 0
    assert t.append_slots(1) is None
    assert t.num_tokens == 12


def test_append_that_needs_a_copy_counts_the_copy_when_checking_room():
    alloc = BlockAllocator(3, 4)
    parent = BlockTable(alloc)
    parent.append_slots(6)  # [0, 1], block 1 partly filled
    child = parent.fork()
    # One free block: enough for the copy, not for copy + a new block.
    assert child.can_append(2)
    assert not child.can_append(3)
    before = (_alloc_state(alloc), _table_state(parent), _table_state(child))
    assert child.append_slots(3) is None
    assert (_alloc_state(alloc), _table_state(parent), _table_state(child)) == before
    # Block 1 is still shared, so the parent would have to copy too.
    assert parent.blocks_needed(1) == 1
    # Use up the last block so that the copy itself cannot be made.
    spare = BlockTable(alloc)
    spare.append_slots(1)
    assert alloc.num_free_blocks == 0
    before = (_alloc_state(alloc), _table_state(parent), _table_state(child))
    assert not child.can_append(1)
    assert child.append_slots(1) is None
    assert (_alloc_state(alloc), _table_state(parent), _table_state(child)) == before
    alloc.check_invariants([parent, child, spare])


# -------------------------------------------------------------------- free
def test_free_releases_all_blocks():
    alloc = BlockAllocator(5, 2)
    t = BlockTable(alloc)
    t.append_slots(7)
    assert t.block_ids == [0, 1, 2, 3]
    t.free()
    assert _table_state(t) == ([], 0)
    assert t.capacity == 0
    assert alloc.free_block_ids() == [4, 0, 1, 2, 3]
    assert all(alloc.ref_count(b) == 0 for b in range(5))
    t.check_invariants()
    # Freeing an emptied table is a no-op, not a double free.
    t.free()
    assert alloc.num_free_blocks == 5
    # The table can be reused.
    assert t.append_slots(1) == ([8], None)


def test_free_of_a_fork_keeps_the_shared_blocks_for_the_other_owner():
    alloc = BlockAllocator(6, 4)
    parent = BlockTable(alloc)
    parent.append_slots(6)
    child = parent.fork()
    child.append_slots(1)  # copy block 1 -> 2
    child.free()
    assert [alloc.ref_count(b) for b in range(3)] == [1, 1, 0]
    assert alloc.free_block_ids() == [3, 4, 5, 2]
    parent.check_invariants()
    alloc.check_invariants([parent])
    parent.free()
    assert sorted(alloc.free_block_ids()) == list(range(6))
    alloc.check_invariants([])


# ------------------------------------------------------- invariant checker
def test_table_check_invariants_catches_a_wrong_token_count():
    alloc = BlockAllocator(4, 4)
    t = BlockTable(alloc)
    t.append_slots(5)
    t.check_invariants()
    t.num_tokens = 9  # more tokens than slots
    with pytest.raises(AssertionError):
        t.check_invariants()
    t.num_tokens = 4  # last block empty
    with pytest.raises(AssertionError):
        t.check_invariants()
    t.num_tokens = 5
    alloc.free(t.block_ids[1])  # table now holds a free block
    with pytest.raises(AssertionError, match="free block 1"):
        t.check_invariants()


def test_negative_append_is_rejected_without_change():
    allocator = BlockAllocator(4, 2)
    table = BlockTable(allocator)
    table.append_slots(3)
    with pytest.raises(AssertionError, match="-1"):
        table.append_slots(-1)
    assert table.num_tokens == 3 and table.block_ids == [0, 1]
