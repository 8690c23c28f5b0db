"""Stateful test of the memory manager: random sequences of new table /
append / fork / copy-on-write / free, plus the prefix cache (start a table on a
prompt, reusing cached blocks; cache full blocks), over a small pool.

Alongside the real objects the machine keeps a model: the token ids and the
token labels each table should hold, in order. Every token's label is written
into a tiny real KVCachePool (1 layer, 1 head, dim 1) at the slot the table
hands out, and copy-on-write copies go through `copy_blocks`, so after every
step each table's tokens must read back exactly its own labels: a write into a
shared block, a lost copy or a block handed to two owners would show up as a
wrong label. Token ids come from a two-letter alphabet so that prefixes repeat
and the cache gets hits.

The model also keeps its own prefix cache, keyed by the whole token prefix a
block ends (no hashing), with each entry linked to the entry it extends. From
it the machine predicts exactly which blocks a prompt reuses, which blocks get
cached, which are evicted and in what order blocks are handed out. On top:
every cached block holds the KV labels it held when it was cached (cached
contents never change), and every table holding a cached block has that
block's exact token prefix (a hit never hands out another prefix's KV).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from paged_attention.core.block_pool import BlockPool
from paged_attention.core.block_table import Admission, BlockTable, CopyOnWrite
from paged_attention.core.prefix_cache import PrefixChain
from paged_attention.core.request import Request
from paged_attention.kv_cache import KVCachePool
from tests.profiles import examples

TOKENS = st.lists(st.integers(0, 1), max_size=12)
# Prompts: a cut of one of a few base prompts plus a short random tail, so
# that whole prefixes repeat often enough to hit, duplicate and go stale.
_BASES = [(0,) * 12, (0, 1) * 6, (1, 1, 0, 0) * 3]
PROMPTS = st.builds(
    lambda base, cut, tail: list(base[:cut]) + tail,
    st.sampled_from(_BASES),
    st.integers(0, 12),
    st.lists(st.integers(0, 1), max_size=3),
).filter(bool)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class ModelEntry:
    """The model's cache entry: compared by identity, like the real one."""

    block_id: int
    prefix: tuple[int, ...]  # every token up to the end of this block
    labels: list[float]  # the block's KV labels when it was cached
    parent: ModelEntry | None


class MemoryMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(1, 10),
        caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, block_size: int, num_blocks: int, caching: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caching = caching
        self.alloc = BlockPool(num_blocks, block_size, enable_prefix_caching=caching)
        self.pool = KVCachePool(1, num_blocks, block_size, 1, 1, dtype=torch.float64)
        self.tables: list[BlockTable] = []
        self.prefix_chains: list[PrefixChain] = []  # each table's real hash chain, as a request holds it
        self.tokens: list[list[int]] = []  # the model: each table's token ids
        self.expected: list[list[float]] = []  # ... and token labels
        self.chains: list[tuple[int, ModelEntry | None]] = []  # ... and hash-chain state
        self.entries: dict[int, ModelEntry] = {}  # block id -> live entry
        self.by_prefix: dict[tuple[int, ...], ModelEntry] = {}
        self.queried = 0
        self.hit = 0
        self.next_label = 1.0

    # ------------------------------------------------------------ model helpers
    def model_ref_counts(self) -> Counter[int]:
        counts: Counter[int] = Counter()
        for table in self.tables:
            counts.update(table.block_ids)
        return counts

    def model_num_free(self) -> int:
        return self.num_blocks - len(self.model_ref_counts())

    def snapshot(self):
        return (
            self.alloc.free_block_ids(),
            self.alloc.evictable_block_ids(),
            [self.alloc.ref_count(b) for b in range(self.num_blocks)],
            [(list(t.block_ids), t.num_tokens) for t in self.tables],
        )

    def needs_copy(self, table: BlockTable, num_tokens: int) -> bool:
        return (
            bool(table.block_ids)
            and num_tokens % self.block_size != 0
            and self.model_ref_counts()[table.block_ids[-1]] > 1
        )

    def write_labels(self, i: int, slots: list[int]) -> None:
        labels = [self.next_label + j for j in range(len(slots))]
        self.next_label += len(slots)
        if slots:
            kv = torch.tensor(labels, dtype=torch.float64).view(-1, 1, 1)
            self.pool.write(0, kv, -kv, torch.tensor(slots))
        self.expected[i] += labels

    def drop_entry(self, block_id: int) -> None:
        entry = self.entries.pop(block_id)
        del self.by_prefix[entry.prefix]

    def note_taken(self, taken: list[int]) -> None:
        """Blocks just allocated: an evictable one lost its cache entry."""
        for block_id in taken:
            if block_id in self.entries:
                self.drop_entry(block_id)

    def model_hits(self, tokens: list[int]) -> list[ModelEntry]:
        bs = self.block_size
        hits: list[ModelEntry] = []
        if not self.caching:
            return hits
        for j in range((len(tokens) - 1) // bs):
            entry = self.by_prefix.get(tuple(tokens[: (j + 1) * bs]))
            if entry is None or entry.parent is not (hits[-1] if hits else None):
                break
            hits.append(entry)
        return hits

    def do_append(self, i: int, new_tokens: list[int]) -> None:
        table = self.tables[i]
        n = len(new_tokens)
        old_ids, old_tokens = list(table.block_ids), table.num_tokens
        assert old_tokens == len(self.expected[i]) == len(self.tokens[i])
        copy = n > 0 and self.needs_copy(table, old_tokens)
        needed = _ceil_div(old_tokens + n, self.block_size) - len(old_ids) + int(copy)
        free_before = self.alloc.free_block_ids()
        assert table.blocks_needed(n) == needed
        before = self.snapshot()

        result = table.append_slots(n)
        if needed > len(free_before):
            assert result is None
            assert self.snapshot() == before
            return
        assert result is not None
        slots, cow = result
        # Blocks come off the front: free ones first, then evictable ones, LRU first.
        taken = free_before[:needed]
        if copy:
            assert cow == CopyOnWrite(src=old_ids[-1], dst=taken[0])
            assert table.block_ids == old_ids[:-1] + taken
            self.pool.copy_blocks([cow])
        else:
            assert cow is None
            assert table.block_ids == old_ids + taken
        assert self.alloc.free_block_ids() == free_before[needed:]
        self.note_taken(taken)
        assert table.num_tokens == old_tokens + n
        bs = self.block_size
        assert slots == [table.block_ids[t // bs] * bs + t % bs for t in range(old_tokens, old_tokens + n)]
        self.write_labels(i, slots)
        self.tokens[i] += new_tokens

    def add_table(
        self, table: BlockTable, prefix_chain: PrefixChain, tokens: list[int], labels: list[float], chain
    ) -> int:
        self.tables.append(table)
        self.prefix_chains.append(prefix_chain)
        self.tokens.append(tokens)
        self.expected.append(labels)
        self.chains.append(chain)
        return len(self.tables) - 1

    # -------------------------------------------------------------------- rules
    @rule(tokens=TOKENS)
    def new_table(self, tokens: list[int]) -> None:
        i = self.add_table(BlockTable(self.alloc), PrefixChain(), [], [], (0, None))
        self.do_append(i, tokens)

    @rule(tokens=PROMPTS, budget=st.integers(1, 12), compute=st.booleans())
    def new_prompt_table(self, tokens: list[int], budget: int, compute: bool) -> None:
        """Admission: reuse the cached prefix, make room for up to `budget` more;
        with `compute`, cache the full blocks at once as the engine's step would."""
        bs = self.block_size
        hits = self.model_hits(tokens)
        hit_ids = [e.block_id for e in hits]
        num_cached = len(hits) * bs
        n = min(len(tokens) - num_cached, budget)
        needed = _ceil_div(num_cached + n, bs) - len(hits)
        counts = self.model_ref_counts()
        revived = [b for b in hit_ids if counts[b] == 0]
        free_before = self.alloc.free_block_ids()
        assert set(revived) <= set(self.alloc.evictable_block_ids())
        before = self.snapshot()

        table, prefix_chain = BlockTable(self.alloc), PrefixChain()
        got = table.admit(tokens, budget, prefix_chain)
        if needed + len(revived) > len(free_before):
            assert got is None
            assert table.block_ids == [] and table.num_tokens == 0
            assert prefix_chain == PrefixChain()
            assert self.snapshot() == before
            return
        self.queried += len(tokens)
        self.hit += num_cached
        remaining = [b for b in free_before if b not in revived]
        taken = remaining[:needed]
        assert got is not None
        assert table.block_ids == hit_ids + taken
        slots = [table.block_ids[t // bs] * bs + t % bs for t in range(num_cached, num_cached + n)]
        assert got == Admission(num_cached, n, slots)
        assert self.alloc.free_block_ids() == remaining[needed:]
        self.note_taken(taken)
        labels = [x for e in hits for x in e.labels]
        assert prefix_chain.num_hashed_blocks == len(hits)
        i = self.add_table(
            table, prefix_chain, tokens[:num_cached], labels, (len(hits), hits[-1] if hits else None)
        )
        self.write_labels(i, got.slots)
        self.tokens[i] += tokens[num_cached : num_cached + n]
        if compute:
            self.cache_blocks(i)

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def cache_blocks(self, pick: int) -> None:
        """The engine's after-step hook; predicted from the model's own cache."""
        i = pick % len(self.tables)
        table, tokens = self.tables[i], self.tokens[i]
        bs = self.block_size
        counts = self.model_ref_counts()
        free_part = self.alloc.free_block_ids()[: -self.alloc.num_evictable_blocks or None]
        evictable = self.alloc.evictable_block_ids()
        hashed, tail = self.chains[i]
        num_full = table.num_tokens // bs
        added = 0
        for j in range(hashed, num_full if self.caching else hashed):
            block_id, prefix = table.block_ids[j], tuple(tokens[: (j + 1) * bs])
            own = self.entries.get(block_id)
            if own is not None:
                assert own.prefix == prefix
                tail = own
                continue
            if j > 0 and (tail is None or self.entries.get(tail.block_id) is not tail):
                tail = None  # the prefix before has no live entry: chain broken
                continue
            occupant = self.by_prefix.get(prefix)
            if occupant is not None and occupant.parent is tail:
                tail = occupant  # identical block already cached: keep it
                continue
            if occupant is not None and counts[occupant.block_id] > 0:
                tail = None  # a stale entry (its parent was evicted) in use: keeps its slot
                continue
            if occupant is not None:
                # A stale evictable entry yields its slot and its block turns free.
                self.drop_entry(occupant.block_id)
                evictable.remove(occupant.block_id)
                free_part.append(occupant.block_id)
            labels = self.expected[i][j * bs : (j + 1) * bs]
            tail = ModelEntry(block_id, prefix, labels, tail)
            self.entries[block_id] = tail
            self.by_prefix[prefix] = tail
            added += 1
        if self.caching:
            self.chains[i] = (num_full, tail)

        assert self.alloc.cache_full_blocks(table, self.prefix_chains[i], tokens) == added
        assert self.prefix_chains[i].num_hashed_blocks == self.chains[i][0]
        assert self.alloc.free_block_ids() == free_part + evictable
        assert self.alloc.evictable_block_ids() == evictable

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6), tokens=TOKENS)
    def append(self, pick: int, tokens: list[int]) -> None:
        self.do_append(pick % len(self.tables), tokens)

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def fork(self, pick: int) -> None:
        i = pick % len(self.tables)
        parent = self.tables[i]
        counts = self.model_ref_counts()
        free_before = self.alloc.free_block_ids()
        parent_chain = self.prefix_chains[i]
        child, child_chain = parent.fork(), parent_chain.copy()  # as the engine forks a request
        assert child.block_ids == parent.block_ids
        assert child.num_tokens == parent.num_tokens
        assert (child_chain.num_hashed_blocks, child_chain.tail) == (
            parent_chain.num_hashed_blocks,
            parent_chain.tail,
        )
        assert child_chain is not parent_chain
        assert self.alloc.free_block_ids() == free_before
        for b in set(parent.block_ids):
            assert self.alloc.ref_count(b) == counts[b] + parent.block_ids.count(b)
        self.add_table(child, child_chain, list(self.tokens[i]), list(self.expected[i]), self.chains[i])

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def copy_on_write(self, pick: int) -> None:
        i = pick % len(self.tables)
        table = self.tables[i]
        copy = self.needs_copy(table, table.num_tokens)
        free_before = self.alloc.free_block_ids()
        before = self.snapshot()
        old_ids = list(table.block_ids)
        if copy and not free_before:
            try:
                table.copy_on_write_last()
            except RuntimeError:
                pass
            else:
                raise AssertionError("copy-on-write with an empty pool did not raise")
            assert self.snapshot() == before
            return
        cow = table.copy_on_write_last()
        if not copy:
            assert cow is None
            assert self.snapshot() == before
            return
        assert cow == CopyOnWrite(src=old_ids[-1], dst=free_before[0])
        assert table.block_ids == old_ids[:-1] + [free_before[0]]
        assert table.num_tokens == len(self.expected[i])
        self.note_taken([free_before[0]])
        self.pool.copy_blocks([cow])

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def free_table(self, pick: int) -> None:
        i = pick % len(self.tables)
        table, prefix_chain = self.tables.pop(i), self.prefix_chains.pop(i)
        for model in (self.tokens, self.expected, self.chains):
            model.pop(i)
        others = self.model_ref_counts()  # holders left after this table goes
        evictable = self.alloc.evictable_block_ids()
        free_part = self.alloc.free_block_ids()[: len(self.alloc.free_block_ids()) - len(evictable)]
        released = [b for b in table.block_ids if others[b] == 0]
        owner = Request("freed", [], table, 0, prefix_chain=prefix_chain)
        owner.free_blocks()
        assert table.block_ids == [] and table.num_tokens == 0
        assert (owner.prefix_chain.num_hashed_blocks, owner.prefix_chain.tail) == (0, None)
        # Uncached blocks go to the back of the free list in the table's order;
        # cached ones turn evictable tail first.
        free_part += [b for b in released if b not in self.entries]
        evictable += [b for b in reversed(released) if b in self.entries]
        assert self.alloc.evictable_block_ids() == evictable
        assert self.alloc.free_block_ids() == free_part + evictable

    # --------------------------------------------------------------- invariants
    @invariant()
    def structures_are_consistent(self) -> None:
        self.alloc.check_invariants(self.tables)
        for table, prefix_chain in zip(self.tables, self.prefix_chains):
            table.check_invariants()
            prefix_chain.check_invariants(table.num_full_blocks)
        counts = self.model_ref_counts()
        assert self.alloc.num_free_blocks == self.model_num_free()
        assert self.alloc.num_used_blocks == len(counts)
        cache = self.alloc
        if not cache.enable_prefix_caching:
            assert not self.entries and self.alloc.num_evictable_blocks == 0
            return
        assert cache.cached_block_ids() == sorted(self.entries)
        assert sorted(self.alloc.evictable_block_ids()) == sorted(b for b in self.entries if counts[b] == 0)
        assert (cache.num_queried_tokens, cache.num_hit_tokens) == (self.queried, self.hit)

    @invariant()
    def every_table_reads_back_its_own_tokens(self) -> None:
        flat_k = self.pool.key(0).reshape(-1)
        flat_v = self.pool.value(0).reshape(-1)
        for table, tokens, labels in zip(self.tables, self.tokens, self.expected):
            assert table.num_tokens == len(labels) == len(tokens)
            assert len(table.block_ids) == _ceil_div(len(labels), self.block_size)
            if labels:
                slots = torch.tensor(table.slots(0, table.num_tokens))
                assert flat_k[slots].tolist() == labels
                assert flat_v[slots].tolist() == [-x for x in labels]

    @invariant()
    def cached_blocks_never_change_and_match_their_holders(self) -> None:
        bs = self.block_size
        flat_k = self.pool.key(0).reshape(-1)
        for block_id, entry in self.entries.items():
            assert flat_k[block_id * bs : (block_id + 1) * bs].tolist() == entry.labels
        for table, tokens in zip(self.tables, self.tokens):
            for j, block_id in enumerate(table.block_ids):
                if block_id in self.entries:
                    assert self.entries[block_id].prefix == tuple(tokens[: (j + 1) * bs])

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        for table in self.tables:
            table.free()
        self.alloc.check_invariants([])
        # Every block is free or evictable, and nobody holds any.
        assert self.alloc.num_free_blocks == self.num_blocks
        assert self.alloc.num_used_blocks == 0
        assert sorted(self.alloc.free_block_ids()) == list(range(self.num_blocks))
        assert sorted(self.alloc.evictable_block_ids()) == sorted(self.entries)
        assert all(self.alloc.ref_count(b) == 0 for b in range(self.num_blocks))


MemoryMachine.TestCase.settings = settings(max_examples=examples(150), stateful_step_count=40)
TestMemoryMachine = MemoryMachine.TestCase
