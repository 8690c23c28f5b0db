"""The scheduler's waiting queue: requests in (rank, entry) order, removable in O(log n).

A binary heap keyed by the request's rank (priority, arrival) and then by entry
order. Removing a request from the middle (an abort, a requeue) only marks its
entry dead; dead entries are dropped when they reach the top, and the heap is
rebuilt once they outnumber the live ones. So a removal costs O(log n)
amortized, never a rebuild of the whole heap per call: thousands of aborts in a
long queue stay cheap.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    def __init__(self, rank: Callable[[T], tuple[int, int]]) -> None:
        self._rank = rank
        # Entries are [priority, arrival, entry number, item or None when removed]:
        # the unique entry number settles every comparison before the item.
        self._heap: list[list] = []
        self._live: dict[int, list] = {}  # id(item) -> its entry
        self._entries = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, item: T) -> bool:
        return id(item) in self._live

    def __iter__(self) -> Iterator[T]:
        """Every waiting item, in no particular order."""
        return (entry[-1] for entry in self._live.values())

    def push(self, item: T) -> None:
        assert id(item) not in self._live, f"{item!r} is already waiting"
        entry = [*self._rank(item), next(self._entries), item]
        self._live[id(item)] = entry
        heapq.heappush(self._heap, entry)

    def peek(self) -> T:
        """The most important waiting item (the queue must not be empty)."""
        assert self._live, "peek at an empty waiting queue"
        self._drop_dead_top()
        return self._heap[0][-1]

    def pop(self) -> T:
        item = self.peek()
        heapq.heappop(self._heap)
        del self._live[id(item)]
        return item

    def remove(self, item: T) -> None:
        entry = self._live.pop(id(item), None)
        assert entry is not None, f"{item!r} is not waiting"
        entry[-1] = None
        if len(self._heap) > 2 * len(self._live) + 16:  # mostly dead: rebuild, O(1) amortized
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def ordered(self) -> list[T]:
        """Waiting items, most important first (O(n log n): for inspection)."""
        return [entry[-1] for entry in sorted(self._live.values(), key=lambda e: e[:3])]

    def _drop_dead_top(self) -> None:
        while self._heap[0][-1] is None:
            heapq.heappop(self._heap)

    def check_invariants(self) -> None:
        live_in_heap = [e for e in self._heap if e[-1] is not None]
        assert len(live_in_heap) == len(self._live), (
            f"waiting heap holds {len(live_in_heap)} live entries, index {len(self._live)}"
        )
        for entry in live_in_heap:
            assert self._live.get(id(entry[-1])) is entry, f"entry {entry[:3]} is not indexed"
