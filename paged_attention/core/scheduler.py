"""Continuous (iteration-level) batching under a token budget.

Every step:
  1. Running requests, most important first, each get the tokens they still
     owe (1 for a decode, the rest of a prompt chunk otherwise) within the
     token budget. When a request's next block cannot be had, the least
     valuable unscheduled running request (lowest priority, then least work
     done, or another of VICTIM_ORDERS) is preempted by recompute: its blocks
     are freed and it goes back to the waiting queue, keeping its place.
  2. Waiting requests are admitted in (priority, arrival) order while blocks,
     `max_num_seqs` (sequences per step) and the budget allow. A prompt longer than what is left of
     the budget is prefilled in chunks over several steps.
Importance is (priority, arrival): lower values first.

A step never comes back empty while work remains. A beam that has computed its
token for the round waits, idle, for its siblings; when a sibling cannot come
back (swapped or requeued) for want of blocks that idle beams hold, idle
requests are preempted, least valuable first, until it fits (`_unblock`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import CopyOnWrite
from paged_attention.core.request import Request, RequestStatus
from paged_attention.core.swap import BlockCopy, SwapManager
from paged_attention.core.waiting_queue import WaitingQueue

PREEMPTION_MODES = ("swap", "recompute", "auto")


class CostModel(Protocol):
    """Decides, per victim, whether swapping beats recomputing."""

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool: ...


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[CopyOnWrite] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swap_out: list[BlockCopy] = field(default_factory=list)  # device -> host, done first
    swap_in: list[BlockCopy] = field(default_factory=list)  # host -> device

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


def _rank(req: Request) -> tuple[int, int]:
    return (req.priority, req.arrival_index)


def _loss(req: Request) -> tuple[int, int, int]:
    """Order of preemption victims (the max goes first): lowest priority (largest
    value), then least work done, then latest arrival."""
    return (req.priority, -req.num_computed_tokens, req.arrival_index)


def _latest(req: Request) -> tuple[int, int]:
    """vLLM's victim order: lowest priority, then latest arrival."""
    return (req.priority, req.arrival_index)


# Victim orders by name (`EngineConfig.preemption_victim`); the max goes first.
VICTIM_ORDERS: dict[str, Callable[[Request], tuple[int, ...]]] = {
    "lowest_priority_least_computed": _loss,
    "lowest_priority_latest": _latest,
}
PREEMPTION_VICTIMS = tuple(VICTIM_ORDERS)


def _has_work(req: Request) -> bool:
    """Tokens left to compute (a beam that has reported its round has none)."""
    return req.num_computed_tokens < req.num_tokens


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        swapper: SwapManager | None = None,
        preemption_mode: str = "recompute",
        cost_model: CostModel | None = None,
        preemption_victim: str = "lowest_priority_least_computed",
    ) -> None:
        if preemption_victim not in VICTIM_ORDERS:
            raise ValueError(
                f"preemption_victim must be one of {PREEMPTION_VICTIMS}, got {preemption_victim!r}"
            )
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        if preemption_mode == "auto" and swapper is not None:
            assert cost_model is not None, "auto preemption needs a cost model"
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._waiting: WaitingQueue[Request] = WaitingQueue(_rank)
        self.running: list[Request] = []  # kept sorted by rank
        self.swapped: list[Request] = []  # KV on the host; kept sorted by rank
        self.swapper = swapper
        self.preemption_mode = preemption_mode if swapper is not None else "recompute"
        self.cost_model = cost_model
        self._victim_order = VICTIM_ORDERS[preemption_victim]
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_recomputed_tokens = 0

    # ----------------------------------------------------------------- queues
    def add(self, req: Request) -> None:
        assert req.status is RequestStatus.WAITING, f"{req.request_id} is {req.status}"
        self._waiting.push(req)

    def add_fork(self, child: Request, parent: Request) -> None:
        """Queue a sequence forked from `parent` (sharing its blocks) where its
        blocks are: with the swapped requests when the parent is on the host,
        else waiting (its KV is in place; it waits only for a slot in a batch)."""
        if parent.status is RequestStatus.SWAPPED:
            assert child.block_table.pool is parent.block_table.pool, "fork left its pool"
            child.status = RequestStatus.SWAPPED
            self.swapped.append(child)
            self.swapped.sort(key=_rank)
            return
        self.add(child)

    @property
    def waiting(self) -> list[Request]:
        return self._waiting.ordered()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running or self.swapped)

    def requests(self) -> Iterator[Request]:
        yield from self.running
        yield from self._waiting
        yield from self.swapped

    def _remove_waiting(self, req: Request) -> None:
        self._waiting.remove(req)

    def finish(self, req: Request) -> None:
        """Remove a request (finished or aborted) wherever it is; free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.SWAPPED:
            self.swapped.remove(req)
        elif req.status is RequestStatus.WAITING:
            self._remove_waiting(req)
        req.free_blocks()
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
                if self.running.index(victim) < i:  # an idle beam ahead: keep the cursor on req
                    i -= 1
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
            budget = self._swap_in(batch, budget)
            if not any(_has_work(r) for r in self.swapped):  # swapped work resumes before new work
                self._admit(batch, budget)
        if batch.is_empty and self.has_unfinished():
            self._unblock(batch)
        assert len(batch.requests) <= self.max_num_seqs, "batch larger than max_num_seqs"
        assert not batch.is_empty or not self.has_unfinished(), "no progress with work left"
        return batch

    def _unblock(self, batch: ScheduledBatch) -> None:
        """Nothing could run, so every running request is idle (a beam whose
        round waits for siblings) and what would complete a round is swapped or
        waiting without room. Free room for the most important such request,
        preempting idle requests least valuable first, until it runs."""
        # Nothing was swapped in this step (what is swapped in is scheduled), so
        # no victim below has a swap-in copy pending that its swap-out would precede.
        budget = self.max_num_batched_tokens
        target = next((r for r in self.swapped if _has_work(r)), None)
        assert target is not None or self._waiting, "work left, but nothing needs computing"
        while True:
            if target is not None:
                if self._swap_in_one(target, batch, budget, margin=0):
                    return
            else:
                self._admit(batch, budget)
                if not batch.is_empty:
                    return
            if self.running:
                self._preempt(self._pick_victim(set()), batch)
                continue
            # Last resort: forks waiting with their KV in place hold blocks too;
            # requeue one (not the head we are trying to admit) for recompute.
            head = None if target is not None else self._waiting.peek()
            holders = [r for r in self._waiting if r.block_table.block_ids and r is not head]
            stuck = target if target is not None else head
            assert stuck is not None, "a blocked admission has a target or a head"
            assert holders, f"the pool cannot hold request {stuck.request_id} alone"
            victim = max(holders, key=self._victim_order)
            self._remove_waiting(victim)
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self._requeue_for_recompute(victim)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self._waiting and budget > 0 and len(batch.requests) < self.max_num_seqs:
            req = self._waiting.peek()
            # An empty table first reuses the longest cached full-block prefix.
            admitted = req.block_table.admit(
                req.token_ids(0, req.num_tokens), budget, req.prefix_chain, use_cache=req.use_prefix_cache
            )
            if admitted is None:
                break  # no room: never preempt running work to admit new work
            if admitted.cow is not None:  # a forked sample or beam writing its first token
                batch.copies.append(admitted.cow)
            req.num_computed_tokens += admitted.num_cached_tokens
            req.num_cached_tokens = max(req.num_cached_tokens, admitted.num_cached_tokens)
            n = admitted.num_new_tokens
            self._waiting.pop()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        self.running.sort(key=_rank)

    def _swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        """Resume swapped requests that have tokens to compute, in rank order.
        An idle beam stays on the host until its round completes: coming back
        with nothing to do would only hold blocks its siblings need."""
        assert self.swapper is not None or not self.swapped, "swapped requests without a swapper"
        for req in [r for r in self.swapped if _has_work(r)]:
            if budget <= 0 or len(batch.requests) >= self.max_num_seqs:
                break
            # One block of slack, so a resumed request does not preempt at once.
            n = self._swap_in_one(req, batch, budget, margin=1)
            if not n:
                break
            budget -= n
        return budget

    def _swap_in_one(self, req: Request, batch: ScheduledBatch, budget: int, margin: int) -> int:
        """Bring `req` back to the device and schedule its next tokens, if its
        blocks, the blocks those tokens need and `margin` more are free.
        Returns how many tokens it scheduled (0: no room, nothing done)."""
        assert self.swapper is not None and req.status is RequestStatus.SWAPPED and _has_work(req)
        table = req.block_table
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        assert n > 0, f"no token budget to resume {req.request_id}"
        needed = self.swapper.blocks_to_swap_in(table) + table.blocks_needed(n) + margin
        if not self.allocator.can_allocate(needed):
            return 0
        batch.swap_in += self.swapper.swap_in(table)
        self.swapped.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self.running.sort(key=_rank)
        appended = table.append_slots(n)
        assert appended is not None, "room was checked before swapping in"
        if appended[1] is not None:
            batch.copies.append(appended[1])
        batch.requests.append(req)
        batch.num_new_tokens.append(n)
        return n

    def _pick_victim(self, scheduled: set[int]) -> Request:
        candidates = [r for r in self.running if id(r) not in scheduled]
        assert candidates, "no running request left to preempt"
        return max(candidates, key=self._victim_order)

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        """Swap the victim's blocks to the host, or free them for recompute and
        requeue it keeping its place, whichever the mode (or cost) says."""
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(req)
        if self._should_swap(req):
            assert self.swapper is not None
            batch.swap_out += self.swapper.swap_out(req.block_table)
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
            self.swapped.sort(key=_rank)
            self.num_swapped_out += 1
            return
        self._requeue_for_recompute(req)

    def _requeue_for_recompute(self, req: Request) -> None:
        self.num_recomputed_tokens += req.num_computed_tokens
        req.free_blocks()
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.add(req)

    def _should_swap(self, req: Request) -> bool:
        if self.swapper is None or self.preemption_mode == "recompute":
            return False
        if not self.swapper.can_swap_out(req.block_table):
            return False  # host pool full: recompute is the only way
        if self.preemption_mode == "swap":
            return True
        assert self.cost_model is not None
        return self.cost_model.prefers_swap(
            self.swapper.blocks_to_swap_out(req.block_table), req.num_computed_tokens
        )

    def check_invariants(self) -> None:
        for req in self.running:
            assert req.status is RequestStatus.RUNNING, f"{req.request_id} in running is {req.status}"
            req.check_invariants()
        self._waiting.check_invariants()
        for req in self._waiting:
            assert req.status is RequestStatus.WAITING, f"{req.request_id} in waiting is {req.status}"
            req.check_invariants()
        for req in self.swapped:
            assert req.status is RequestStatus.SWAPPED, f"{req.request_id} in swapped is {req.status}"
            assert self.swapper is not None and req.block_table.pool is self.swapper.host, (
                f"swapped request {req.request_id} holds device blocks"
            )
            req.check_invariants()
        on_device = [r.block_table for r in self.requests() if r.status is not RequestStatus.SWAPPED]
        self.allocator.check_invariants(on_device)
        if self.swapper is not None:
            self.swapper.host.check_invariants([r.block_table for r in self.swapped])
