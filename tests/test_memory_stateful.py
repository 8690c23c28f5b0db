"""Stateful test of the memory manager: random sequences of new table /
append / fork / copy-on-write / free over a small pool.

Alongside the real objects the machine keeps a model: the token labels each
table should hold, in order. Every token's label is written into a tiny real
KVCachePool (1 layer, 1 head, dim 1) at the slot the table hands out, and
copy-on-write copies go through `copy_blocks`, so after every step each table's
tokens must read back exactly its own labels: a write into a shared block, a
lost copy or a block handed to two owners would show up as a wrong label.
Expected block counts, copies, and the allocator's FIFO order are predicted
from the model, not read back from the code under test.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable, CopyOnWrite
from paged_attention.kv_cache import KVCachePool


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class MemoryMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 10))
    def setup(self, block_size: int, num_blocks: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.pool = KVCachePool(1, num_blocks, block_size, 1, 1, dtype=torch.float64)
        self.tables: list[BlockTable] = []
        self.expected: list[list[float]] = []  # the model: each table's token labels
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

    def do_append(self, i: int, n: int) -> None:
        table = self.tables[i]
        old_ids, old_tokens = list(table.block_ids), table.num_tokens
        assert old_tokens == len(self.expected[i])
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
        taken = free_before[:needed]  # FIFO: blocks come off the front of the free list
        if copy:
            assert cow == CopyOnWrite(src=old_ids[-1], dst=taken[0])
            assert table.block_ids == old_ids[:-1] + taken
            self.pool.copy_blocks([cow])
        else:
            assert cow is None
            assert table.block_ids == old_ids + taken
        assert self.alloc.free_block_ids() == free_before[needed:]
        assert table.num_tokens == old_tokens + n
        bs = self.block_size
        assert slots == [table.block_ids[t // bs] * bs + t % bs for t in range(old_tokens, old_tokens + n)]
        self.write_labels(i, slots)

    # -------------------------------------------------------------------- rules
    @rule(n=st.integers(0, 12))
    def new_table(self, n: int) -> None:
        self.tables.append(BlockTable(self.alloc))
        self.expected.append([])
        self.do_append(len(self.tables) - 1, n)

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6), n=st.integers(0, 9))
    def append(self, pick: int, n: int) -> None:
        self.do_append(pick % len(self.tables), n)

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def fork(self, pick: int) -> None:
        i = pick % len(self.tables)
        parent = self.tables[i]
        counts = self.model_ref_counts()
        free_before = self.alloc.free_block_ids()
        child = parent.fork()
        assert child.block_ids == parent.block_ids
        assert child.num_tokens == parent.num_tokens
        assert self.alloc.free_block_ids() == free_before
        for b in set(parent.block_ids):
            assert self.alloc.ref_count(b) == counts[b] + parent.block_ids.count(b)
        self.tables.append(child)
        self.expected.append(list(self.expected[i]))

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
        self.pool.copy_blocks([cow])

    @precondition(lambda self: self.tables)
    @rule(pick=st.integers(0, 10**6))
    def free_table(self, pick: int) -> None:
        i = pick % len(self.tables)
        table = self.tables.pop(i)
        self.expected.pop(i)
        others = self.model_ref_counts()  # holders left after this table goes
        free_before = self.alloc.free_block_ids()
        # Freed blocks go to the back of the queue, in the table's order.
        released = [b for b in table.block_ids if others[b] == 0]
        table.free()
        assert table.block_ids == [] and table.num_tokens == 0
        assert self.alloc.free_block_ids() == free_before + released

    # --------------------------------------------------------------- invariants
    @invariant()
    def structures_are_consistent(self) -> None:
        self.alloc.check_invariants(self.tables)
        for table in self.tables:
            table.check_invariants()
        assert self.alloc.num_free_blocks == self.model_num_free()
        assert self.alloc.num_used_blocks == len(self.model_ref_counts())

    @invariant()
    def every_table_reads_back_its_own_tokens(self) -> None:
        flat_k = self.pool.key(0).reshape(-1)
        flat_v = self.pool.value(0).reshape(-1)
        for table, labels in zip(self.tables, self.expected):
            assert table.num_tokens == len(labels)
            assert len(table.block_ids) == _ceil_div(len(labels), self.block_size)
            if labels:
                slots = torch.tensor(table.slots(0, table.num_tokens))
                assert flat_k[slots].tolist() == labels
                assert flat_v[slots].tolist() == [-x for x in labels]

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        for table in self.tables:
            table.free()
        self.alloc.check_invariants([])
        assert self.alloc.num_free_blocks == self.num_blocks
        assert sorted(self.alloc.free_block_ids()) == list(range(self.num_blocks))
        assert all(self.alloc.ref_count(b) == 0 for b in range(self.num_blocks))


MemoryMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryMachine = MemoryMachine.TestCase
