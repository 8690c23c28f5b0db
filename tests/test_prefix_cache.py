"""Automatic prefix caching: exact block ids on tiny pools.

A `Seq` plays a request: a block table and its hash chain. `_admit` is
admission (reuse the cached prefix, make room for the rest) and `_cache` is
the engine's after-step hook, `BlockPool.cache_full_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from paged_attention.core import block_pool as block_pool_module
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import Admission, BlockTable, CopyOnWrite
from paged_attention.core.prefix_cache import PrefixChain, TokenSource
from paged_attention.core.request import Request

BS = 4


@dataclass
class Seq:
    """What the prefix cache needs of a request: its table and its hash chain."""

    table: BlockTable
    chain: PrefixChain = field(default_factory=PrefixChain)

    @property
    def block_ids(self) -> list[int]:
        return self.table.block_ids

    def fork(self) -> Seq:
        return Seq(self.table.fork(), self.chain.copy())

    def free(self) -> None:
        """`Request.free_blocks`: the chain starts over with the table."""
        self.table.free()
        self.chain = PrefixChain()

    def check_invariants(self) -> None:
        self.table.check_invariants()
        self.chain.check_invariants(self.table.num_full_blocks)


def _admit(alloc: BlockAllocator, tokens: list[int], budget: int = 1000) -> tuple[Seq, Admission]:
    seq = Seq(BlockTable(alloc))
    got = seq.table.admit(tokens, budget, seq.chain)
    assert got is not None
    return seq, got


def _cache(seq: Seq, tokens: TokenSource) -> int:
    return seq.table.pool.cache_full_blocks(seq.table, seq.chain, tokens)


def _run(alloc: BlockAllocator, tokens: list[int]) -> Seq:
    """Admit a whole prompt, "compute" it, and cache its full blocks."""
    seq, _ = _admit(alloc, tokens)
    _cache(seq, tokens)
    return seq


def _refs(alloc: BlockAllocator) -> list[int]:
    return [alloc.ref_count(b) for b in range(alloc.num_blocks)]


P = list(range(1, 11))  # 10 tokens: two full blocks and 2 tokens over


# ---------------------------------------------------------------- hits
def test_same_prompt_hits_the_full_blocks_and_computes_only_the_rest():
    alloc = BlockAllocator(8, BS)
    a, got = _admit(alloc, P)
    assert got == Admission(0, 10, list(range(10)))
    assert _cache(a, P) == 2
    assert alloc.cached_block_ids() == [0, 1]
    assert (a.chain.num_hashed_blocks, a.chain.tail) == (2, alloc.cached_entry(1))
    # Calling again with nothing newly full caches nothing.
    assert _cache(a, P) == 0

    b, got = _admit(alloc, P)
    assert got == Admission(num_cached_tokens=8, num_new_tokens=2, slots=[12, 13])
    assert b.block_ids == [0, 1, 3] and b.table.num_tokens == 10
    assert b.chain.num_hashed_blocks == 2
    assert _refs(alloc) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert alloc.free_block_ids() == [4, 5, 6, 7]
    alloc.check_invariants([a, b])
    a.check_invariants()
    b.check_invariants()


def test_the_last_prompt_token_is_always_computed():
    alloc = BlockAllocator(6, BS)
    prompt = list(range(8))  # exactly two full blocks
    a = _run(alloc, prompt)
    assert a.block_ids == [0, 1] and alloc.cached_block_ids() == [0, 1]
    # Only (8 - 1) // 4 = 1 block may be reused: block 1 would leave nothing to compute.
    assert alloc.lookup(prompt) == [0]
    b, got = _admit(alloc, prompt)
    assert got == Admission(4, 4, [8, 9, 10, 11])
    assert b.block_ids == [0, 2]
    # Shorter than one block, or one block exactly: nothing to reuse.
    assert alloc.lookup(prompt[:4]) == []
    assert alloc.lookup(prompt[:5]) == [0]
    assert alloc.lookup([]) == []


def test_prompt_diverging_inside_a_block_hits_only_the_full_blocks_before_it():
    alloc = BlockAllocator(8, BS)
    a = _run(alloc, P)
    other = P[:6] + [99, 98, 97]  # differs at token 6, inside block 1
    b, got = _admit(alloc, other)
    assert got == Admission(4, 5, [12, 13, 14, 15, 16])
    assert b.block_ids == [0, 3, 4]
    _cache(b, other)
    # Block 3 holds P[4:6] + [99, 98]: a different prefix, cached beside block 1.
    assert alloc.cached_block_ids() == [0, 1, 3]
    assert alloc.lookup(other + [0]) == [0, 3]
    assert alloc.lookup(P) == [0, 1]
    # Same block contents after a different first block: no hit at all.
    assert alloc.lookup([0] + P[1:]) == []
    alloc.check_invariants([a, b])


def test_chunked_prefill_caches_blocks_as_they_fill():
    alloc = BlockAllocator(8, BS)
    prompt = list(range(20, 33))  # 13 tokens
    a, got = _admit(alloc, prompt, budget=6)
    assert got == Admission(0, 6, list(range(6)))
    assert _cache(a, prompt) == 1  # block 0 only: block 1 holds 2 tokens
    assert a.table.append_slots(5) == ([6, 7, 8, 9, 10], None)
    assert _cache(a, prompt) == 1  # block 1; block 2 holds 3 tokens
    assert a.chain.num_hashed_blocks == 2
    # A request arriving mid-prefill reuses what is computed so far.
    b, got = _admit(alloc, prompt)
    assert got.num_cached_tokens == 8 and b.block_ids[:2] == [0, 1]
    # The engine may pass Request.token_ids(start, end) instead of a list.
    a.table.append_slots(2)
    assert _cache(a, lambda s, e: prompt[s:e]) == 1
    assert alloc.cached_block_ids() == [0, 1, 2]


def test_admitting_a_forked_table_appends_without_a_lookup():
    alloc = BlockAllocator(8, BS)
    parent = _run(alloc, P)
    child = parent.fork()  # e.g. a second sample waiting for its first token
    queried = alloc.num_queried_tokens
    got = child.table.admit(P + [77], 100, child.chain)
    assert got == Admission(0, 1, [14], CopyOnWrite(src=2, dst=3))
    assert child.block_ids == [0, 1, 3] and child.table.num_tokens == 11
    assert alloc.num_queried_tokens == queried
    # Nothing to do is fine too; no room gives None and changes nothing.
    assert child.table.admit(P + [77], 0, child.chain) == Admission(0, 0, [])
    alloc.allocate_many(alloc.num_free_blocks)
    assert parent.table.admit(P + [1, 2, 3], 3, parent.chain) is None
    assert parent.block_ids == [0, 1, 2] and parent.table.num_tokens == 10


# ----------------------------------------------------- evictable blocks
def test_freed_cached_blocks_become_evictable_tail_first():
    alloc = BlockAllocator(6, BS)
    a = _run(alloc, P)
    assert a.block_ids == [0, 1, 2]
    a.free()
    # Block 2 (partly filled, uncached) is free; 0 and 1 stay cached. The
    # tail goes first: block 1 can only ever be matched through block 0.
    assert alloc.evictable_block_ids() == [1, 0]
    assert alloc.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert alloc.num_free_blocks == 6 and alloc.num_evictable_blocks == 2
    assert alloc.num_used_blocks == 0
    assert _refs(alloc) == [0] * 6
    assert alloc.num_cached_blocks == 2
    alloc.check_invariants([])


def test_evictable_blocks_are_reused_only_when_no_free_block_is_left_lru_first():
    alloc = BlockAllocator(6, BS)
    x = _run(alloc, [1] * 8 + [0])  # blocks 0, 1 cached, 2 not
    y = _run(alloc, [2] * 8 + [0])  # blocks 3, 4 cached, 5 not
    y.free()
    x.free()
    assert alloc.free_block_ids() == [5, 2, 4, 3, 1, 0]
    assert alloc.evictable_block_ids() == [4, 3, 1, 0]

    t = BlockTable(alloc)
    t.append_slots(8)  # the two free blocks first: nothing evicted
    assert t.block_ids == [5, 2]
    assert alloc.cached_block_ids() == [0, 1, 3, 4]
    assert t.append_slots(4) == ([16, 17, 18, 19], None)  # evicts LRU block 4
    assert t.block_ids == [5, 2, 4]
    assert alloc.cached_block_ids() == [0, 1, 3]
    assert alloc.evictable_block_ids() == [3, 1, 0]
    assert alloc.allocate() == 3
    assert alloc.allocate_many(2) == [1, 0]
    assert alloc.num_cached_blocks == 0 and alloc.num_free_blocks == 0
    assert alloc.allocate() is None
    # Evicted prefixes are gone.
    assert alloc.lookup([1] * 9) == []


def test_a_revived_block_leaves_the_evictable_list_and_rejoins_it_most_recent():
    alloc = BlockAllocator(6, BS)
    x = _run(alloc, [1] * 8 + [0])
    y = _run(alloc, [2] * 8 + [0])
    x.free()
    y.free()
    assert alloc.evictable_block_ids() == [1, 0, 4, 3]

    z, got = _admit(alloc, [1] * 6)  # hits block 0 only
    assert got == Admission(4, 2, [8, 9])  # block 2 was the first free block
    assert z.block_ids == [0, 2]
    assert alloc.evictable_block_ids() == [1, 4, 3]
    assert _refs(alloc) == [1, 0, 1, 0, 0, 0]
    assert alloc.num_free_blocks == 4  # 5, and evictable 1, 4, 3
    z.free()
    assert alloc.evictable_block_ids() == [1, 4, 3, 0]
    # Block 1 is now least recently used even though block 0 was its parent.
    assert alloc.free_block_ids() == [5, 2, 1, 4, 3, 0]
    alloc.check_invariants([])


def test_admission_that_does_not_fit_takes_nothing_and_counts_nothing():
    alloc = BlockAllocator(3, BS)
    prompt = list(range(9))
    a = _run(alloc, prompt)
    a.free()
    assert alloc.free_block_ids() == [2, 1, 0] and alloc.evictable_block_ids() == [1, 0]
    stats = (alloc.num_queried_tokens, alloc.num_hit_tokens)
    longer = prompt[:8] + [50, 51, 52, 53, 54]  # 13 tokens: hits 0, 1 and needs 2 more
    t = BlockTable(alloc)
    # 3 allocatable blocks, but reviving the two hits uses two of them.
    assert t.admit(longer, 100, PrefixChain()) is None
    assert t.block_ids == [] and t.num_tokens == 0
    assert alloc.free_block_ids() == [2, 1, 0] and _refs(alloc) == [0, 0, 0]
    assert (alloc.num_queried_tokens, alloc.num_hit_tokens) == stats
    # With a budget of one new token it fits.
    assert t.admit(longer, 1, PrefixChain()) == Admission(8, 1, [8])
    assert t.block_ids == [0, 1, 2]
    alloc.check_invariants([t])


# ------------------------------------------------------ shared prefixes
def test_identical_blocks_computed_at_once_keep_the_first_entry():
    alloc = BlockAllocator(8, BS)
    a, _ = _admit(alloc, P)
    longer = P[:8] + [40, 41, 42, 43, 44]
    b, _ = _admit(alloc, longer)  # admitted before a's blocks were cached
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4, 5, 6]
    assert _cache(a, P) == 2
    assert _cache(b, longer) == 1  # blocks 3, 4 duplicate 0, 1; block 5 is new
    assert alloc.cached_block_ids() == [0, 1, 5]
    assert b.block_ids == [3, 4, 5, 6]  # no ids swapped under a running request
    # Block 5 hangs off block 1's entry, so one chain serves both prefixes.
    assert alloc.lookup(longer) == [0, 1, 5]
    b.free()
    assert alloc.free_block_ids() == [7, 3, 4, 6, 5]
    alloc.check_invariants([a])


def test_fork_carries_the_hash_chain():
    alloc = BlockAllocator(8, BS)
    prompt = list(range(6))
    parent, _ = _admit(alloc, prompt)
    _cache(parent, prompt)
    child = parent.fork()
    assert (child.chain.num_hashed_blocks, child.chain.tail) == (1, parent.chain.tail)
    # The first writer copies the shared, partly filled block 1.
    assert parent.table.append_slots(2) == ([10, 11], CopyOnWrite(1, 2))
    assert child.table.append_slots(2) == ([6, 7], None)
    parent_tokens, child_tokens = prompt + [7, 7], prompt + [8, 8]
    assert _cache(parent, parent_tokens) == 1
    assert _cache(child, child_tokens) == 1
    assert alloc.cached_block_ids() == [0, 1, 2]
    assert alloc.lookup(parent_tokens + [0]) == [0, 2]
    assert alloc.lookup(child_tokens + [0]) == [0, 1]
    # A fork of a full-block table: the block was cached by whoever got there first.
    grandchild = child.fork()
    child.table.append_slots(4)
    grandchild.table.append_slots(4)
    assert _cache(child, child_tokens + [1, 2, 3, 4]) == 1
    assert _cache(grandchild, child_tokens + [1, 2, 3, 4]) == 0  # duplicate
    assert (child.block_ids, grandchild.block_ids) == ([0, 1, 3], [0, 1, 4])
    alloc.check_invariants([parent, child, grandchild])


def test_a_chain_whose_prefix_was_evicted_stops_caching():
    alloc = BlockAllocator(7, BS)
    head = [1, 2, 3, 4, 5, 6, 7, 8]
    a_tokens = head + [9]
    b_tokens = head + [6, 6, 6, 6] + [0]
    a, _ = _admit(alloc, a_tokens)
    b, _ = _admit(alloc, b_tokens, budget=8)  # prefill in chunks
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4]
    assert _cache(a, a_tokens) == 2
    assert _cache(b, b_tokens) == 0  # 3, 4 duplicate 0, 1
    assert b.chain.tail is alloc.cached_entry(1)
    a.free()
    filler = BlockTable(alloc)
    filler.append_slots(4 * 5)  # takes 5, 6, 2, then evicts 1 and 0
    assert filler.block_ids == [5, 6, 2, 1, 0]
    assert alloc.num_cached_blocks == 0
    filler.free()
    # b's next block would hang off an evicted entry: it could never be
    # matched, so it is not cached.
    assert b.table.append_slots(4) == ([20, 21, 22, 23], None)
    assert _cache(b, b_tokens) == 0
    assert b.chain.num_hashed_blocks == 3 and b.chain.tail is None
    assert alloc.num_cached_blocks == 0
    alloc.check_invariants([b])


def test_a_stranded_evictable_entry_gives_its_slot_to_a_live_chain():
    alloc = BlockAllocator(7, BS)
    head = [1, 2, 3, 4]
    a_tokens = head + [5, 6, 7, 8, 9]
    b_tokens = head + [7, 7, 7, 7] + [0]
    a, _ = _admit(alloc, a_tokens)
    b, _ = _admit(alloc, b_tokens)  # admitted before a's blocks were cached
    _cache(a, a_tokens)
    _cache(b, b_tokens)
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4, 5]
    # Block 3 duplicates block 0; block 4 is cached after block 0's entry.
    assert alloc.cached_block_ids() == [0, 1, 4]
    a.free()
    filler = BlockTable(alloc)
    filler.append_slots(4 * 4)  # takes 6, 2, then evicts 1 and 0
    assert filler.block_ids == [6, 2, 1, 0]
    filler.free()
    b.free()
    # Block 4's parent entry is gone: it stays cached but can never be matched.
    assert alloc.evictable_block_ids() == [4]
    assert alloc.lookup(b_tokens) == []
    assert alloc.free_block_ids() == [6, 2, 1, 0, 3, 5, 4]

    # Computing the same prefix again: block 4's stale entry yields its hash
    # slot (block 4 turns plain free) and the new chain is matchable.
    c = _run(alloc, b_tokens)
    assert c.block_ids == [6, 2, 1]
    assert alloc.cached_block_ids() == [2, 6]
    assert alloc.evictable_block_ids() == []
    assert alloc.free_block_ids() == [0, 3, 5, 4]
    assert alloc.lookup(b_tokens) == [6, 2]
    alloc.check_invariants([c])


def test_a_new_entry_that_displaces_a_stale_one_counts_as_cached():
    """Found by the memory state machine: the count of newly cached blocks was
    the change in the cache's size, so an entry that took a stale entry's hash
    slot counted as nothing."""
    alloc = BlockAllocator(6, 1)
    a = Seq(BlockTable(alloc))
    a.table.append_slots(1)
    assert _cache(a, [0]) == 1
    a.free()
    b = Seq(BlockTable(alloc))
    b.table.append_slots(5)
    assert _cache(b, [0] * 5) == 4  # its first block duplicates a's, which is kept
    b.free()
    c = Seq(BlockTable(alloc))
    c.table.append_slots(2)
    assert c.block_ids == [1, 0]  # a's block evicted: b's chain after it is stranded
    assert _cache(c, [0, 0]) == 2  # block 0 takes the stranded entry's slot
    assert alloc.cached_block_ids() == [0, 1, 3, 4, 5] and not alloc.is_cached(2)
    assert alloc.lookup([0, 0, 0]) == [1, 0]
    alloc.check_invariants([c])


# -------------------------------------------------------------- collisions
def test_forged_hash_collisions_never_return_wrong_blocks(monkeypatch):
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, tokens: 0)
    alloc = BlockAllocator(8, BS)
    a = _run(alloc, P)
    # Every block has hash 0: block 0 took the slot, block 1 could not be cached.
    assert alloc.cached_block_ids() == [0]
    assert alloc.lookup(P) == [0]
    assert alloc.lookup([9, 9, 9, 9, 9]) == []  # same hash, other tokens
    assert alloc.lookup(P[4:8] + P[:4] + [0]) == []
    b, got = _admit(alloc, [5, 6, 7, 8] + P[4:])
    assert got.num_cached_tokens == 0 and b.block_ids == [3, 4, 5]
    alloc.check_invariants([a, b])


def test_a_colliding_child_is_confirmed_by_its_parent_not_just_its_tokens(monkeypatch):
    # A hash that ignores the parent: [x, Y] and [z, Y] give Y the same hash.
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, tokens: hash(tokens))
    alloc = BlockAllocator(8, BS)
    x, y, z = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    first = _run(alloc, x + y + [0])
    second = _run(alloc, z + [0])
    assert first.block_ids == [0, 1, 2] and second.block_ids == [3, 4]
    assert alloc.cached_block_ids() == [0, 1, 3]
    # Block 1 holds y's KV computed after x: it must not serve z + y.
    assert alloc.lookup(z + y + [0]) == [3]
    assert alloc.lookup(x + y + [0]) == [0, 1]


# ------------------------------------------------------------------ stats
def test_hit_rate_counts_hit_tokens_over_queried_tokens():
    alloc = BlockAllocator(16, BS)
    assert alloc.hit_rate == 0.0 and alloc.num_cached_blocks == 0
    _run(alloc, P)  # 10 queried, 0 hit
    assert (alloc.num_queried_tokens, alloc.num_hit_tokens) == (10, 0)
    _run(alloc, P)  # 10 queried, 8 hit
    _run(alloc, P[:5] + [0, 0, 0])  # 8 queried, 4 hit
    assert (alloc.num_queried_tokens, alloc.num_hit_tokens) == (28, 12)
    assert alloc.hit_rate == pytest.approx(12 / 28)
    assert alloc.num_cached_blocks == 3  # 0, 1 and the second prompt's block 1
    alloc.lookup(P)  # lookups are not queries
    assert alloc.num_queried_tokens == 28


# ------------------------------------------------------------- caching off
def test_with_caching_off_nothing_is_cached_and_the_pool_is_fifo():
    alloc = BlockAllocator(6, BS, enable_prefix_caching=False)
    assert not alloc.enable_prefix_caching
    a, got = _admit(alloc, P)
    assert got == Admission(0, 10, list(range(10)))
    assert _cache(a, P) == 0 and a.chain.num_hashed_blocks == 0
    b, got = _admit(alloc, P, budget=3)
    assert got == Admission(0, 3, [12, 13, 14]) and b.block_ids == [3]
    a.free()
    assert alloc.free_block_ids() == [4, 5, 0, 1, 2]
    assert alloc.num_evictable_blocks == 0
    alloc.check_invariants([b])
    with pytest.raises(ValueError, match="enable_prefix_caching.*'yes'"):
        BlockAllocator(4, BS, enable_prefix_caching="yes")


# ------------------------------------------------------------- invariants
def test_invariants_catch_a_corrupt_cache():
    alloc = BlockAllocator(4, BS)
    a = _run(alloc, P)
    alloc.check_invariants([a])
    a.check_invariants()

    # A cached block's stored tokens must still hash to its key.
    entry = alloc.cached_entry(0)
    object.__setattr__(entry, "token_ids", (9, 9, 9, 9))
    with pytest.raises(AssertionError, match="block 0.*hash"):
        alloc.check_invariants()
    object.__setattr__(entry, "token_ids", tuple(P[:4]))
    alloc.check_invariants()

    # Evictable means cached at ref count 0.
    a.free()
    alloc._evictable[2] = None  # block 2 is free and uncached
    with pytest.raises(AssertionError, match="evictable"):
        alloc.check_invariants()
    del alloc._evictable[2]
    alloc.check_invariants()
    alloc._released[1] = None  # cached block 1 also on the free list
    with pytest.raises(AssertionError, match="block 1 is both free and evictable"):
        alloc.check_invariants()


def test_a_cached_block_can_never_be_written():
    alloc = BlockAllocator(4, BS)
    prompt = list(range(8))
    a = _run(alloc, prompt)
    assert alloc.cached_block_ids() == [0, 1]
    a.table.num_tokens = 7  # pretend block 1 is only partly filled
    with pytest.raises(AssertionError, match="cached block 1"):
        a.check_invariants()
    with pytest.raises(AssertionError, match="cached block 1 would be written"):
        a.table.append_slots(1)


def test_acquire_of_a_free_block_and_fork_of_an_evictable_block_are_errors():
    alloc = BlockAllocator(4, BS)
    a = _run(alloc, P)
    a.free()
    assert alloc.is_evictable(0)
    with pytest.raises(ValueError, match=r"block 0\b"):
        alloc.fork(0)
    with pytest.raises(AssertionError, match=r"block 2 is free"):
        alloc.acquire(2)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(0)


# ------------------------------------------------------- the request's chain
def test_a_request_freeing_its_blocks_starts_its_chain_over():
    alloc = BlockAllocator(8, BS)
    _run(alloc, P)
    req = Request.create("r", P, alloc, max_tokens=4)
    table = req.block_table
    assert table.admit(P, 100, req.prefix_chain) == Admission(8, 2, [12, 13])
    assert (req.prefix_chain.num_hashed_blocks, req.prefix_chain.tail) == (2, alloc.cached_entry(1))
    req.num_computed_tokens = 10
    req.check_invariants()
    stale = req.prefix_chain
    table.free()  # the table alone: its owner's chain still says 2 blocks
    req.num_computed_tokens = 0
    with pytest.raises(AssertionError, match="2 hashed blocks but only 0 full"):
        req.check_invariants()
    with pytest.raises(AssertionError, match="hash chain must start over"):
        table.admit(P, 100, stale)
    assert table.block_ids == [] and alloc.num_used_blocks == 3  # the first run's table
    req.free_blocks()
    assert req.prefix_chain == PrefixChain() and req.prefix_chain is not stale
    req.check_invariants()
    assert table.admit(P, 100, req.prefix_chain) == Admission(8, 2, [16, 17])
    assert table.block_ids == [0, 1, 4]
