"""Continuous (iteration-level) batching under a token budget.

Every step:
  1. Running requests, most important first, each get the tokens they still
     owe (1 for a decode, the rest of a prompt chunk otherwise) within the
     token budget. When a request's next block cannot be had, the least
     valuable unscheduled running request (lowest priority, then least work
     done) is preempted by recompute: its blocks are freed and it goes back to
     the waiting queue, keeping its place.
  2. Waiting requests are admitted in (priority, arrival) order while blocks,
     `max_num_seqs` (sequences per step) and the budget allow. A prompt longer than what is left of
     the budget is prefilled in chunks over several steps.
Importance is (priority, arrival): lower values first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import CopyOnWrite
from paged_attention.core.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[CopyOnWrite] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


def _rank(req: Request) -> tuple[int, int]:
    return (req.priority, req.arrival_index)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._waiting: list[tuple[int, int, int, Request]] = []  # heap by rank, then entry order
        self._entries = itertools.count()
        self.running: list[Request] = []  # kept sorted by rank
        self.num_preemptions = 0

    # ----------------------------------------------------------------- queues
    def add(self, req: Request) -> None:
        assert req.status is RequestStatus.WAITING, f"{req.request_id} is {req.status}"
        heapq.heappush(self._waiting, (*_rank(req), next(self._entries), req))

    @property
    def waiting(self) -> list[Request]:
        return [entry[-1] for entry in sorted(self._waiting, key=lambda e: e[:3])]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running)

    def requests(self) -> Iterator[Request]:
        yield from self.running
        yield from (entry[-1] for entry in self._waiting)

    def finish(self, req: Request) -> None:
        """Remove a request (finished or aborted) wherever it is; free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self._waiting = [e for e in self._waiting if e[-1] is not req]
            heapq.heapify(self._waiting)
        req.block_table.free()
        req.status = RequestStatus.FINISHED

    # --------------------------------------------------------------- schedule
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0 and len(batch.requests) < self.max_num_seqs:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n == 0:  # a beam waiting for its group's round to complete
                i += 1
                continue
            appended = req.block_table.append_slots(n)
            while appended is None:
                victim = self._pick_victim(scheduled)
                self._preempt(victim, batch)
                if victim is req:
                    break
                appended = req.block_table.append_slots(n)
            if appended is None:
                continue  # req itself was preempted; running[i] is now the next one
            _, cow = appended
            if cow is not None:
                batch.copies.append(cow)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            scheduled.add(id(req))
            budget -= n
            i += 1

        if not batch.preempted:
            self._admit(batch, budget)
        assert len(batch.requests) <= self.max_num_seqs, "batch larger than max_num_seqs"
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self._waiting and budget > 0 and len(batch.requests) < self.max_num_seqs:
            req = self._waiting[0][-1]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            appended = req.block_table.append_slots(n)
            if appended is None:
                break  # no room: never preempt running work to admit new work
            if appended[1] is not None:  # a forked sample or beam writing its first token
                batch.copies.append(appended[1])
            heapq.heappop(self._waiting)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        self.running.sort(key=_rank)

    def _pick_victim(self, scheduled: set[int]) -> Request:
        candidates = [r for r in self.running if id(r) not in scheduled]
        assert candidates, "no running request left to preempt"
        # Lose the least: lowest priority (largest value) first, then least work done.
        return max(candidates, key=lambda r: (r.priority, -r.num_computed_tokens, r.arrival_index))

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        """Preempt by recompute: free the blocks, requeue keeping its place."""
        self.running.remove(req)
        req.block_table.free()
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        batch.preempted.append(req)
        self.add(req)

    def check_invariants(self) -> None:
        for req in self.running:
            assert req.status is RequestStatus.RUNNING, f"{req.request_id} in running is {req.status}"
            req.check_invariants()
        for *_, req in self._waiting:
            assert req.status is RequestStatus.WAITING, f"{req.request_id} in waiting is {req.status}"
            req.check_invariants()
        self.allocator.check_invariants([r.block_table for r in self.requests()])
