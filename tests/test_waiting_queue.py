"""The scheduler's waiting queue: rank order, entry order among equals, removal
from anywhere (lazily, with rebuilds), checked against a plain sorted list."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_attention.core.waiting_queue import WaitingQueue
from tests.profiles import examples


@dataclass(eq=False)
class Item:
    name: str
    priority: int = 0
    arrival: int = 0


def queue() -> WaitingQueue[Item]:
    return WaitingQueue(lambda item: (item.priority, item.arrival))


def test_rank_then_entry_order():
    q = queue()
    a, b, c, d = Item("a", 1, 0), Item("b", 0, 5), Item("c", 0, 5), Item("d", 0, 1)
    for item in (a, b, c, d):
        q.push(item)
    assert [i.name for i in q.ordered()] == ["d", "b", "c", "a"]  # b before c: entered first
    assert [q.pop().name for _ in range(4)] == ["d", "b", "c", "a"]
    assert not q and len(q) == 0


def test_remove_from_the_middle_and_the_top():
    q = queue()
    items = [Item(str(i), arrival=i) for i in range(5)]
    for item in items:
        q.push(item)
    q.remove(items[2])
    q.remove(items[0])
    q.check_invariants()
    assert items[2] not in q and items[1] in q
    assert q.peek() is items[1]
    assert [q.pop() for _ in range(3)] == [items[1], items[3], items[4]]


def test_removed_item_can_wait_again():
    q = queue()
    item = Item("x")
    q.push(item)
    q.remove(item)
    q.push(item)  # a request requeued for recompute
    q.check_invariants()
    assert q.pop() is item and not q


def test_double_remove_and_double_push_are_bugs():
    q = queue()
    item = Item("x")
    q.push(item)
    with pytest.raises(AssertionError, match="already waiting"):
        q.push(item)
    q.remove(item)
    with pytest.raises(AssertionError, match="not waiting"):
        q.remove(item)


def test_ten_thousand_aborts_leave_the_survivors_in_order():
    q = queue()
    items = [Item(str(i), priority=i % 3, arrival=i) for i in range(10_000)]
    for item in items:
        q.push(item)
    for item in items[::2]:  # every other request hangs up
        q.remove(item)
    q.check_invariants()
    survivors = sorted(items[1::2], key=lambda i: (i.priority, i.arrival))
    assert q.ordered() == survivors
    assert [q.pop() for _ in range(len(q))] == survivors


@settings(max_examples=examples(60))
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "pop", "remove"]), st.integers(0, 3), st.integers(0, 30)),
        max_size=80,
    )
)
def test_matches_a_sorted_list(ops):
    q = queue()
    model: list[tuple[int, int, int, Item]] = []
    entry = 0
    for op, priority, pick in ops:
        if op == "push":
            item = Item(f"i{entry}", priority, pick)
            q.push(item)
            model.append((priority, pick, entry, item))
            entry += 1
        elif model and op == "pop":
            model.sort(key=lambda e: e[:3])
            assert q.pop() is model.pop(0)[-1]
        elif model:
            victim = model.pop(pick % len(model))[-1]
            q.remove(victim)
        q.check_invariants()
        assert q.ordered() == [e[-1] for e in sorted(model, key=lambda e: e[:3])]
