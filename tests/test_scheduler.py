"""Scheduler unit tests without a model (in the spirit of vLLM's tests/v1/core).

A scheduler, its requests and a tiny block pool (plus a host pool for swapping)
are built directly; `step` plays the engine's part after `schedule()`: it
advances each scheduled request's computed count, offers full blocks to the
prefix cache, appends a made-up token to requests whose tokens are all
computed, and finishes those that reached max_tokens. Every test asserts the
exact contents of each batch (requests in order, token counts, block ids,
slots, copy-on-write, swap-out and swap-in copies) and checks the scheduler's
and the pools' invariants after every step.

Every expected value below was derived by hand from scheduler.py's rules:
  * running requests first, in (priority, arrival) order, each getting what it
    owes within the token budget; a request whose next block cannot be had
    preempts the max of (priority, -num_computed_tokens, arrival) among the
    running requests not yet scheduled this step -- possibly itself;
  * no swap-in and no admission in a step that preempted;
  * swapped requests with work come back in rank order (stopping at the first
    that does not fit, with one block of slack), and nothing new is admitted
    while any of them has work left;
  * waiting requests are admitted in (priority, arrival) order while the head
    fits (no skipping past a head that does not fit, never preempting for it),
    a head longer than the remaining budget is admitted with a chunk;
  * a fresh pool hands out blocks 0, 1, 2, ...; freed blocks go to the back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from paged_attention import BlockAllocator
from paged_attention.core.request import Request, RequestStatus
from paged_attention.core.scheduler import ScheduledBatch, Scheduler
from paged_attention.core.swap import SwapManager

# ------------------------------------------------------------------ factories
# Every pool, request, fork and scheduler is built here, so API changes touch
# only this section.

_arrivals = itertools.count()


def make_pool(num_blocks: int, block_size: int = 4, *, caching: bool = False) -> BlockAllocator:
    return BlockAllocator(num_blocks, block_size, enable_prefix_caching=caching)


def make_scheduler(
    pool: BlockAllocator,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    host_blocks: int | None = None,
    mode: str = "recompute",
    cost_model=None,
    victim: str | None = None,
) -> Scheduler:
    """`victim`: a preemption victim order by name; None keeps the default."""
    extra = {} if victim is None else {"preemption_victim": victim}
    swapper = None
    if host_blocks is not None:
        host = BlockAllocator(host_blocks, pool.block_size, enable_prefix_caching=False)
        swapper = SwapManager(pool, host)
    return Scheduler(
        pool,
        max_num_seqs,
        max_num_batched_tokens,
        swapper=swapper,
        preemption_mode=mode,
        cost_model=cost_model,
        **extra,
    )


def make_request(
    pool: BlockAllocator, rid: str, prompt: int | list[int], max_tokens: int = 100, *, priority: int = 0
) -> Request:
    """`prompt`: the token ids, or a length (tokens made up from the id).
    Arrival order is creation order."""
    tokens = prompt if isinstance(prompt, list) else [1000 * ord(rid[0]) + i for i in range(prompt)]
    return Request.create(rid, tokens, pool, max_tokens, priority=priority, arrival_index=next(_arrivals))


def make_fork(sched: Scheduler, parent: Request, rid: str) -> Request:
    """A sample forked from `parent` sharing all its blocks (as the engine's
    _fork_request does), queued where the scheduler puts forks."""
    child = parent.fork(rid)
    sched.add_fork(child, parent)
    return child


def pool_of(req: Request) -> BlockAllocator:
    """The pool (device or host) that holds the request's blocks."""
    return req.block_table.pool


def cache_full_blocks(req: Request) -> None:
    """Offer newly full blocks to the prefix cache, as the engine does after a step."""
    pool_of(req).cache_full_blocks(req.block_table, req.prefix_chain, req.token_ids)


def cached_block_ids(pool: BlockAllocator) -> list[int]:
    return pool.cached_block_ids()


def blocks_of(req: Request) -> list[int]:
    return list(req.block_table.block_ids)


def host_of(sched: Scheduler) -> BlockAllocator:
    assert sched.swapper is not None
    return sched.swapper.host


def check(sched: Scheduler) -> None:
    sched.check_invariants()
    sched.allocator.check_invariants()
    if sched.swapper is not None:
        host_of(sched).check_invariants()


# --------------------------------------------------------------- the engine
def made_up_token(req: Request) -> int:
    return 7 + req.num_output_tokens


@dataclass
class Step:
    """One step's batch, as plain ids, captured before anything finished."""

    batch: ScheduledBatch
    scheduled: list[tuple[str, int]]
    blocks: dict[str, list[int]]  # each scheduled request's block ids
    slots: dict[str, list[int]]  # where each scheduled request's new tokens go
    copies: list[tuple[int, int]]
    preempted: list[str]
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    finished: list[str] = field(default_factory=list)


def step(sched: Scheduler, idle: tuple[str, ...] = ()) -> Step:
    """schedule(), then what the engine does after running the batch. Requests
    named in `idle` compute but do not sample (a beam waiting for its group's
    round: it is left with nothing to compute)."""
    batch = sched.schedule()
    assert len(batch.requests) == len(batch.num_new_tokens)
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert all(n > 0 for n in batch.num_new_tokens)
    s = Step(
        batch,
        scheduled=[(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)],
        blocks={r.request_id: blocks_of(r) for r in batch.requests},
        slots={
            r.request_id: r.block_table.slots(r.num_computed_tokens, r.num_computed_tokens + n)
            for r, n in zip(batch.requests, batch.num_new_tokens)
        },
        copies=[(c.src, c.dst) for c in batch.copies],
        preempted=[r.request_id for r in batch.preempted],
        swap_out=[(c.src, c.dst) for c in batch.swap_out],
        swap_in=[(c.src, c.dst) for c in batch.swap_in],
    )
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        cache_full_blocks(req)
    for req in batch.requests:
        if req.request_id in idle:
            continue
        if req.num_computed_tokens == req.num_tokens:  # prompt (or chunk) done: sample
            req.output_token_ids.append(made_up_token(req))
            if req.num_output_tokens >= req.max_tokens:
                sched.finish(req)
                s.finished.append(req.request_id)
    check(sched)
    return s


def expect(
    s: Step, scheduled, blocks, *, slots=None, copies=(), preempted=(), swap_out=(), swap_in=(), finished=()
) -> None:
    """The whole batch, exactly (slots only when given)."""
    assert s.scheduled == list(scheduled)
    assert s.blocks == blocks
    if slots is not None:
        assert s.slots == slots
    assert s.copies == list(copies)
    assert s.preempted == list(preempted)
    assert s.swap_out == list(swap_out)
    assert s.swap_in == list(swap_in)
    assert s.finished == list(finished)


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


# ------------------------------------------------------------------ admission
def test_admission_is_fcfs_and_capped_by_max_num_seqs():
    pool = make_pool(16)
    sched = make_scheduler(pool, max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = make_request(pool, "A", 5, 3), make_request(pool, "B", 3, 3), make_request(pool, "C", 4, 1)
    for r in (a, b, c):
        sched.add(r)
    check(sched)

    expect(
        step(sched),
        [("A", 5), ("B", 3)],
        {"A": [0, 1], "B": [2]},
        slots={"A": [0, 1, 2, 3, 4], "B": [8, 9, 10]},
    )
    assert ids(sched.running) == ["A", "B"] and ids(sched.waiting) == ["C"]
    # Two decodes fill max_num_seqs: C keeps waiting though blocks and budget abound.
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1], "B": [2]}, slots={"A": [5], "B": [11]})
    expect(
        step(sched),
        [("A", 1), ("B", 1)],
        {"A": [0, 1], "B": [2, 3]},
        slots={"A": [6], "B": [12]},
        finished=["A", "B"],
    )
    assert pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3]
    expect(step(sched), [("C", 4)], {"C": [4]}, slots={"C": [16, 17, 18, 19]}, finished=["C"])
    assert not sched.has_unfinished() and pool.num_free_blocks == 16
    assert a.output_token_ids == [7, 8, 9] and c.output_token_ids == [7]


def test_admission_under_the_token_budget_chunks_the_last_admitted_prompt():
    pool = make_pool(16)
    sched = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=10)
    for rid, n in (("A", 6), ("B", 6), ("C", 2)):
        sched.add(make_request(pool, rid, n))

    # A takes 6, B gets the 4 left (a chunk), C waits for the next step.
    expect(
        step(sched),
        [("A", 6), ("B", 4)],
        {"A": [0, 1], "B": [2]},
        slots={"A": [0, 1, 2, 3, 4, 5], "B": [8, 9, 10, 11]},
    )
    assert ids(sched.waiting) == ["C"]
    expect(
        step(sched),
        [("A", 1), ("B", 2), ("C", 2)],
        {"A": [0, 1], "B": [2, 3], "C": [4]},
        slots={"A": [6], "B": [12, 13], "C": [16, 17]},
    )
    # Only requests that computed their last token sampled one.
    assert [r.num_output_tokens for r in sched.running] == [2, 1, 1]


def test_an_empty_scheduler_returns_an_empty_batch():
    pool = make_pool(4)
    sched = make_scheduler(pool)
    expect(step(sched), [], {})
    assert sched.schedule().is_empty


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_num_seqs=0), dict(max_num_batched_tokens=0), dict(mode="sometimes"), dict(victim="oldest")],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_scheduler(make_pool(4), **kwargs)


# ------------------------------------------------------------ chunked prefill
def test_long_prompt_is_prefilled_in_chunks_and_holds_back_admission():
    pool = make_pool(8)
    sched = make_scheduler(pool, max_num_batched_tokens=4)
    a, b = make_request(pool, "A", 10), make_request(pool, "B", 2)
    sched.add(a)
    sched.add(b)

    expect(step(sched), [("A", 4)], {"A": [0]}, slots={"A": [0, 1, 2, 3]})
    assert a.num_computed_tokens == 4 and a.num_output_tokens == 0
    assert ids(sched.waiting) == ["B"]  # the budget is spent: B waits
    expect(step(sched), [("A", 4)], {"A": [0, 1]}, slots={"A": [4, 5, 6, 7]})
    assert a.num_output_tokens == 0 and ids(sched.waiting) == ["B"]
    # The last chunk (2 tokens) leaves 2 of the budget: B's whole prompt.
    expect(step(sched), [("A", 2), ("B", 2)], {"A": [0, 1, 2], "B": [3]}, slots={"A": [8, 9], "B": [12, 13]})
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1, 2], "B": [3]}, slots={"A": [10], "B": [14]})


def test_a_running_chunk_comes_before_a_later_running_request():
    """Running requests are served in rank order within the budget: an earlier
    request's prefill chunk can take the whole budget from a later decode."""
    pool = make_pool(8)
    sched = make_scheduler(pool, max_num_batched_tokens=4)
    b = make_request(pool, "B", 2)
    sched.add(b)
    expect(step(sched), [("B", 2)], {"B": [0]})
    a = make_request(pool, "A", 9, priority=-1)  # more important than B
    sched.add(a)
    # B runs first (it is running); A is admitted with what is left.
    expect(step(sched), [("B", 1), ("A", 3)], {"B": [0], "A": [1]}, slots={"B": [2], "A": [4, 5, 6]})
    assert ids(sched.running) == ["A", "B"]
    # Now A outranks B and its chunk takes the whole budget.
    expect(step(sched), [("A", 4)], {"A": [1, 2]}, slots={"A": [7, 8, 9, 10]})
    assert b.num_computed_tokens == 3 and b.num_tokens == 4
    expect(step(sched), [("A", 2), ("B", 1)], {"A": [1, 2, 3], "B": [0]}, slots={"A": [11, 12], "B": [3]})


# ------------------------------------------------------- recompute preemption
def test_recompute_preemption_frees_the_victim_and_requeues_it_with_its_tokens():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    a, b = make_request(pool, "A", 7, 4), make_request(pool, "B", 7, 10)
    sched.add(a)
    sched.add(b)

    expect(step(sched), [("A", 7), ("B", 7)], {"A": [0, 1], "B": [2, 3]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1], "B": [2, 3]}, slots={"A": [7], "B": [15]})
    # A needs a third block; both have 8 computed: the later arrival (B) goes.
    c = make_request(pool, "C", 1, 1)
    sched.add(c)
    s = step(sched)
    expect(s, [("A", 1)], {"A": [0, 1, 2]}, slots={"A": [8]}, preempted=["B"])
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert blocks_of(b) == [] and b.output_token_ids == [7, 8] and b.num_tokens == 9
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.num_recomputed_tokens == 8 and sched.num_swapped_out == 0
    assert ids(sched.waiting) == ["B", "C"]  # B kept its place ahead of C
    assert pool.free_block_ids() == [3]
    # B (9 tokens, 3 blocks) does not fit; C would, but does not jump the queue.
    expect(step(sched), [("A", 1)], {"A": [0, 1, 2]}, slots={"A": [9]}, finished=["A"])
    assert pool.free_block_ids() == [3, 0, 1, 2]
    # B recomputes its prompt and both outputs at once.
    expect(
        step(sched),
        [("B", 9), ("C", 1)],
        {"B": [3, 0, 1], "C": [2]},
        slots={"B": [12, 13, 14, 15, 0, 1, 2, 3, 4], "C": [8]},
        finished=["C"],
    )
    assert b.output_token_ids == [7, 8, 9]


def test_recompute_victim_is_the_unscheduled_request_with_least_work():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    a, b, c = make_request(pool, "A", 1), make_request(pool, "B", 8), make_request(pool, "C", 3)
    for r in (a, b, c):
        sched.add(r)
    expect(step(sched), [("A", 1), ("B", 8), ("C", 3)], {"A": [0], "B": [1, 2], "C": [3]})
    # B needs a block. A has done the least work (1 token) but is already
    # scheduled this step; of B (8) and C (3), C loses.
    expect(
        step(sched),
        [("A", 1), ("B", 1)],
        {"A": [0], "B": [1, 2, 3]},
        slots={"A": [1], "B": [12]},
        preempted=["C"],
    )
    assert c.status is RequestStatus.WAITING and c.num_tokens == 4
    # C's 4 tokens need a block and none is free.
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0], "B": [1, 2, 3]}, slots={"A": [2], "B": [13]})


@pytest.mark.parametrize("victim", [None, "lowest_priority_latest"])
def test_victim_order_least_work_preempts_itself_latest_arrival_does_not(victim):
    """By default work done outranks arrival: the earliest request, having
    computed less, preempts itself for a later one. vLLM's order (the latest
    arrival loses) keeps it."""
    pool = make_pool(3)
    sched = make_scheduler(pool, max_num_batched_tokens=100, victim=victim)
    a, b = make_request(pool, "A", 2), make_request(pool, "B", 6)
    sched.add(a)
    sched.add(b)
    expect(step(sched), [("A", 2), ("B", 6)], {"A": [0], "B": [1, 2]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0], "B": [1, 2]}, slots={"A": [2], "B": [10]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0], "B": [1, 2]}, slots={"A": [3], "B": [11]})
    # A (4 computed) needs a block; B has 8 computed and arrived later.
    if victim is None:
        expect(step(sched), [("B", 1)], {"B": [1, 2, 0]}, slots={"B": [0]}, preempted=["A"])
        assert a.status is RequestStatus.WAITING and a.num_tokens == 5
        assert sched.num_recomputed_tokens == 4
    else:
        expect(step(sched), [("A", 1)], {"A": [0, 1]}, slots={"A": [4]}, preempted=["B"])
        assert b.status is RequestStatus.WAITING and b.num_tokens == 9
        assert sched.num_recomputed_tokens == 8
        assert pool.free_block_ids() == [2]


def test_recompute_with_prefix_caching_recovers_the_victims_surviving_blocks():
    pool = make_pool(4, caching=True)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    a, b = make_request(pool, "A", 7, 4), make_request(pool, "B", 7, 10)
    sched.add(a)
    sched.add(b)
    expect(step(sched), [("A", 7), ("B", 7)], {"A": [0, 1], "B": [2, 3]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1], "B": [2, 3]})
    assert cached_block_ids(pool) == [0, 1, 2, 3]
    # B's freed blocks turn evictable tail first; A's new block evicts B's tail (3).
    expect(step(sched), [("A", 1)], {"A": [0, 1, 3]}, slots={"A": [12]}, preempted=["B"])
    assert pool.evictable_block_ids() == [2] and cached_block_ids(pool) == [0, 1, 2]
    # B (9 tokens) would revive block 2 and take 2 more: only 1 is allocatable.
    expect(step(sched), [("A", 1)], {"A": [0, 1, 3]}, slots={"A": [13]}, finished=["A"])
    assert pool.free_block_ids() == [3, 2, 1, 0]
    # B's first block is a hit: only tokens 4..8 are recomputed. Its second
    # new block evicts A's block 1 (least recently used after B's own 2).
    expect(step(sched), [("B", 5)], {"B": [2, 3, 1]}, slots={"B": [12, 13, 14, 15, 4]})
    assert (b.num_cached_tokens, b.num_computed_tokens, b.output_token_ids) == (4, 9, [7, 8, 9])
    assert pool.free_block_ids() == [0] and cached_block_ids(pool) == [0, 2, 3]
    assert sched.num_recomputed_tokens == 8  # counts what was dropped, not what was recomputed


def test_preempting_an_idle_request_ahead_does_not_skip_the_next_running_request():
    pool = make_pool(3)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    i, r1, r2 = make_request(pool, "I", 2), make_request(pool, "R1", 4), make_request(pool, "R2", 3)
    for r in (i, r1, r2):
        sched.add(r)
    # I is a beam that computed its token and now waits for its round: idle.
    expect(step(sched, idle=("I",)), [("I", 2), ("R1", 4), ("R2", 3)], {"I": [0], "R1": [1], "R2": [2]})
    # R1 needs a block; the idle I (least work, not scheduled) is the victim.
    # R2 has a token to compute, room in its block and budget: it must run too.
    s = step(sched, idle=("I",))
    assert s.preempted == ["I"]
    expect(s, [("R1", 1), ("R2", 1)], {"R1": [1, 0], "R2": [2]}, preempted=["I"])


# ------------------------------------------------------------ swap preemption
def test_swap_preemption_copies_to_the_host_and_back():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=8, mode="swap")
    host = host_of(sched)
    a, b = make_request(pool, "A", 7, 4), make_request(pool, "B", 7, 10)
    sched.add(a)
    sched.add(b)
    expect(step(sched), [("A", 7), ("B", 7)], {"A": [0, 1], "B": [2, 3]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1], "B": [2, 3]})

    # A needs a block: B (later arrival, same work) is swapped out, its device
    # blocks 2, 3 copied to host blocks 0, 1 before A writes into block 2.
    expect(
        step(sched),
        [("A", 1)],
        {"A": [0, 1, 2]},
        slots={"A": [8]},
        preempted=["B"],
        swap_out=[(2, 0), (3, 1)],
    )
    assert b.status is RequestStatus.SWAPPED and ids(sched.swapped) == ["B"]
    assert b.num_computed_tokens == 8 and b.num_tokens == 9  # nothing to recompute
    assert blocks_of(b) == [0, 1] and pool_of(b) is host
    assert host.num_free_blocks == 6 and pool.free_block_ids() == [3]
    assert (sched.num_preemptions, sched.num_swapped_out, sched.num_recomputed_tokens) == (1, 1, 0)

    # B needs its 2 blocks + 1 for its next token + 1 of slack: only 1 is free.
    # C would fit, but nothing new is admitted while swapped work waits.
    c = make_request(pool, "C", 1, 1)
    sched.add(c)
    expect(step(sched), [("A", 1)], {"A": [0, 1, 2]}, slots={"A": [9]}, finished=["A"])
    assert pool.free_block_ids() == [3, 0, 1, 2]

    # B comes back with one block of slack -- which C, no longer held back, takes.
    expect(
        step(sched),
        [("B", 1), ("C", 1)],
        {"B": [3, 0, 1], "C": [2]},
        slots={"B": [4], "C": [8]},
        swap_in=[(0, 3), (1, 0)],
        finished=["C"],
    )
    assert b.status is RequestStatus.RUNNING and pool_of(b) is pool
    assert host.num_free_blocks == 8 and not sched.swapped
    assert b.output_token_ids == [7, 8, 9]
    expect(step(sched), [("B", 1)], {"B": [3, 0, 1]}, slots={"B": [5]})


def test_swapped_requests_come_back_in_rank_order_not_swap_out_order():
    pool = make_pool(6)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=8, mode="swap")
    host = host_of(sched)
    h, x, y = make_request(pool, "H", 8, 7), make_request(pool, "X", 7), make_request(pool, "Y", 3)
    for r in (h, x, y):
        sched.add(r)
    expect(step(sched), [("H", 8), ("X", 7), ("Y", 3)], {"H": [0, 1], "X": [2, 3], "Y": [4]})
    expect(
        step(sched),
        [("H", 1), ("X", 1), ("Y", 1)],
        {"H": [0, 1, 5], "X": [2, 3], "Y": [4]},
        slots={"H": [20], "X": [15], "Y": [19]},
    )
    # X needs a block: Y (4 computed) has done less than X (8): Y goes first.
    expect(
        step(sched),
        [("H", 1), ("X", 1)],
        {"H": [0, 1, 5], "X": [2, 3, 4]},
        slots={"H": [21], "X": [16]},
        preempted=["Y"],
        swap_out=[(4, 0)],
    )
    # Y needs 1 + 1 + 1 (slack) blocks; none is free.
    expect(step(sched), [("H", 1), ("X", 1)], {"H": [0, 1, 5], "X": [2, 3, 4]})
    expect(step(sched), [("H", 1), ("X", 1)], {"H": [0, 1, 5], "X": [2, 3, 4]})
    # H (12 computed) needs a block; X (11) loses. Its partly filled last
    # block is copied too.
    expect(
        step(sched),
        [("H", 1)],
        {"H": [0, 1, 5, 2]},
        slots={"H": [8]},
        preempted=["X"],
        swap_out=[(2, 1), (3, 2), (4, 3)],
    )
    assert ids(sched.swapped) == ["X", "Y"]  # rank order, not swap-out order
    assert host.num_free_blocks == 4
    # X (first in rank) needs 3 + 0 + 1 blocks, 2 are free: it waits, and Y,
    # which would fit, does not overtake it.
    expect(step(sched), [("H", 1)], {"H": [0, 1, 5, 2]}, slots={"H": [9]}, finished=["H"])
    assert pool.free_block_ids() == [3, 4, 0, 1, 5, 2]
    expect(
        step(sched),
        [("X", 1), ("Y", 1)],
        {"X": [3, 4, 0], "Y": [1, 5]},
        slots={"X": [3], "Y": [20]},
        swap_in=[(1, 3), (2, 4), (3, 0), (0, 1)],
    )
    assert host.num_free_blocks == 8 and not sched.swapped
    assert (sched.num_preemptions, sched.num_swapped_out) == (2, 2)


def test_a_swapped_request_comes_back_only_with_a_block_of_slack():
    pool = make_pool(3)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=4, mode="swap")
    a, b, c = make_request(pool, "A", 1, 2), make_request(pool, "B", 4, 4), make_request(pool, "C", 3, 2)
    for r in (a, b, c):
        sched.add(r)
    expect(step(sched), [("A", 1), ("B", 4), ("C", 3)], {"A": [0], "B": [1], "C": [2]})
    # B needs a block: C (3 computed) loses to B (4); its half-filled block goes out.
    expect(
        step(sched),
        [("A", 1), ("B", 1)],
        {"A": [0], "B": [1, 2]},
        slots={"A": [1], "B": [8]},
        preempted=["C"],
        swap_out=[(2, 0)],
        finished=["A"],
    )
    assert pool.free_block_ids() == [0]
    # C's next token fits in its own block, so 1 block would do -- but it
    # comes back only with 1 more free, so it stays out.
    expect(step(sched), [("B", 1)], {"B": [1, 2]}, slots={"B": [9]})
    assert ids(sched.swapped) == ["C"]
    expect(step(sched), [("B", 1)], {"B": [1, 2]}, slots={"B": [10]}, finished=["B"])
    expect(step(sched), [("C", 1)], {"C": [0]}, slots={"C": [3]}, swap_in=[(0, 0)], finished=["C"])
    assert (pool.num_free_blocks, host_of(sched).num_free_blocks) == (3, 4)


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=1, mode="swap")
    a, b = make_request(pool, "A", 7), make_request(pool, "B", 7)
    sched.add(a)
    sched.add(b)
    expect(step(sched), [("A", 7), ("B", 7)], {"A": [0, 1], "B": [2, 3]})
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1], "B": [2, 3]})
    # B's 2 blocks do not fit in 1 host block.
    expect(step(sched), [("A", 1)], {"A": [0, 1, 2]}, preempted=["B"])
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert (sched.num_swapped_out, sched.num_recomputed_tokens) == (0, 8)
    assert host_of(sched).num_free_blocks == 1


class _StubCost:
    def __init__(self, swap: bool) -> None:
        self.swap = swap
        self.calls: list[tuple[int, int]] = []

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool:
        self.calls.append((num_blocks, num_tokens))
        return self.swap


@pytest.mark.parametrize("swap", [True, False])
def test_auto_mode_asks_the_cost_model_per_victim(swap):
    pool = make_pool(4)
    cost = _StubCost(swap)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=8, mode="auto", cost_model=cost)
    a, b = make_request(pool, "A", 7), make_request(pool, "B", 7)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    expect(
        step(sched), [("A", 1)], {"A": [0, 1, 2]}, preempted=["B"], swap_out=[(2, 0), (3, 1)] if swap else []
    )
    assert cost.calls == [(2, 8)]  # B's blocks to copy, B's computed tokens
    assert b.status is (RequestStatus.SWAPPED if swap else RequestStatus.WAITING)


# ----------------------------------------------------------------- priorities
def test_waiting_requests_are_admitted_by_priority_then_arrival():
    pool = make_pool(16)
    sched = make_scheduler(pool, max_num_seqs=3)
    for rid, prio in (("L1", 2), ("M", 1), ("H", 0), ("L2", 2)):
        sched.add(make_request(pool, rid, 1, priority=prio))
    assert ids(sched.waiting) == ["H", "M", "L1", "L2"]
    expect(step(sched), [("H", 1), ("M", 1), ("L1", 1)], {"H": [0], "M": [1], "L1": [2]})
    assert ids(sched.running) == ["H", "M", "L1"] and ids(sched.waiting) == ["L2"]


def test_a_higher_priority_request_never_preempts_to_get_admitted():
    pool = make_pool(3)
    sched = make_scheduler(pool)
    low = make_request(pool, "L", 5, 2, priority=1)
    sched.add(low)
    expect(step(sched), [("L", 5)], {"L": [0, 1]})
    high = make_request(pool, "H", 6, priority=0)
    sched.add(high)
    # H needs 2 blocks, 1 is free: it waits; L keeps running.
    expect(step(sched), [("L", 1)], {"L": [0, 1]}, finished=["L"])
    expect(step(sched), [("H", 6)], {"H": [2, 0]}, slots={"H": [8, 9, 10, 11, 0, 1]})


def test_running_low_priority_work_is_the_preemption_victim():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    low = make_request(pool, "L", 7, priority=1)
    sched.add(low)
    expect(step(sched), [("L", 7)], {"L": [0, 1]})
    high = make_request(pool, "H", 3, priority=0)
    sched.add(high)
    expect(step(sched), [("L", 1), ("H", 3)], {"L": [0, 1], "H": [2]})
    assert ids(sched.running) == ["H", "L"]  # H now goes first
    expect(step(sched), [("H", 1), ("L", 1)], {"H": [2], "L": [0, 1, 3]}, slots={"H": [11], "L": [12]})
    # H (4 computed) needs a block; L has done more (9) but ranks lower: L goes.
    expect(step(sched), [("H", 1)], {"H": [2, 0]}, slots={"H": [0]}, preempted=["L"])
    assert low.status is RequestStatus.WAITING and low.num_tokens == 10
    assert sched.num_recomputed_tokens == 9
    assert pool.free_block_ids() == [1, 3]


# ---------------------------------------------------------------------- abort
def test_abort_waiting_running_and_swapped_returns_every_block():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100, host_blocks=8, mode="swap")
    host = host_of(sched)
    a, b = make_request(pool, "A", 7), make_request(pool, "B", 7)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    expect(step(sched), [("A", 1)], {"A": [0, 1, 2]}, preempted=["B"], swap_out=[(2, 0), (3, 1)])
    c = make_request(pool, "C", 2)
    sched.add(c)
    assert (a.status, b.status, c.status) == (
        RequestStatus.RUNNING,
        RequestStatus.SWAPPED,
        RequestStatus.WAITING,
    )
    assert (pool.num_free_blocks, host.num_free_blocks) == (1, 6)

    sched.finish(b)  # swapped: its host blocks return
    check(sched)
    assert (pool.num_free_blocks, host.num_free_blocks) == (1, 8) and not sched.swapped
    sched.finish(c)  # waiting: holds nothing
    check(sched)
    assert pool.num_free_blocks == 1 and sched.num_waiting == 0
    sched.finish(a)  # running
    check(sched)
    assert (pool.num_free_blocks, host.num_free_blocks) == (4, 8)
    assert all(r.status is RequestStatus.FINISHED and blocks_of(r) == [] for r in (a, b, c))
    assert not sched.has_unfinished()
    expect(step(sched), [], {})


def test_abort_mid_prefill_returns_the_chunk_blocks():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=6)
    a, b = make_request(pool, "A", 7), make_request(pool, "B", 9)
    sched.add(a)
    sched.add(b)
    expect(step(sched), [("A", 6)], {"A": [0, 1]})
    expect(step(sched), [("A", 1), ("B", 5)], {"A": [0, 1], "B": [2, 3]})
    assert b.status is RequestStatus.RUNNING and b.num_computed_tokens == 5  # 5 of 9
    sched.finish(b)
    check(sched)
    assert pool.free_block_ids() == [2, 3] and ids(sched.running) == ["A"]
    expect(step(sched), [("A", 1)], {"A": [0, 1]}, slots={"A": [7]})
    sched.finish(a)
    check(sched)
    assert pool.num_free_blocks == 4 and not sched.has_unfinished()


def test_abort_of_a_request_requeued_for_recompute():
    pool = make_pool(4)
    sched = make_scheduler(pool, max_num_batched_tokens=100)
    a, b = make_request(pool, "A", 7), make_request(pool, "B", 7)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    expect(step(sched), [("A", 1)], {"A": [0, 1, 2]}, preempted=["B"])
    assert b.status is RequestStatus.WAITING
    sched.finish(b)
    check(sched)
    assert sched.num_waiting == 0 and pool.free_block_ids() == [3]
    sched.finish(a)
    check(sched)
    assert pool.num_free_blocks == 4 and not sched.has_unfinished()


def test_abort_of_a_waiting_fork_drops_its_shared_references():
    pool = make_pool(4)
    sched = make_scheduler(pool)
    p = make_request(pool, "P", 6)
    sched.add(p)
    expect(step(sched), [("P", 6)], {"P": [0, 1]})
    child = make_fork(sched, p, "P#1")
    assert child.status is RequestStatus.WAITING
    assert [pool.ref_count(b) for b in (0, 1)] == [2, 2] and pool.num_free_blocks == 2
    check(sched)
    sched.finish(child)
    check(sched)
    assert [pool.ref_count(b) for b in (0, 1)] == [1, 1] and pool.num_free_blocks == 2


# ------------------------------------------------------------- copy on write
def test_forked_sample_triggers_copy_on_write_of_the_shared_last_block():
    pool = make_pool(4)
    sched = make_scheduler(pool)
    p = make_request(pool, "P", 6)
    sched.add(p)
    expect(step(sched), [("P", 6)], {"P": [0, 1]})
    child = make_fork(sched, p, "P#1")
    # P writes token 6 into its shared, half-filled block 1: it copies it to
    # block 2 first; the fork then owns block 1 alone and writes in place.
    expect(
        step(sched),
        [("P", 1), ("P#1", 1)],
        {"P": [0, 2], "P#1": [0, 1]},
        slots={"P": [10], "P#1": [6]},
        copies=[(1, 2)],
    )
    assert [pool.ref_count(b) for b in range(4)] == [2, 1, 1, 0]
    assert child.num_computed_tokens == 7


# --------------------------------------------------------------- prefix cache
def test_prefix_cache_hit_on_admission_counts_as_computed_and_shares_blocks():
    pool = make_pool(8, caching=True)
    sched = make_scheduler(pool)
    prefix = list(range(100, 108))
    a = make_request(pool, "A", prefix + [200, 201], 3)
    sched.add(a)
    expect(step(sched), [("A", 10)], {"A": [0, 1, 2]})
    assert cached_block_ids(pool) == [0, 1]

    b = make_request(pool, "B", prefix + [300], 3)
    sched.add(b)
    # B reuses A's two full blocks: only its last token is computed.
    expect(step(sched), [("A", 1), ("B", 1)], {"A": [0, 1, 2], "B": [0, 1, 3]}, slots={"A": [10], "B": [12]})
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 9)
    assert [pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert pool.num_free_blocks == 4

    # The same 8-token prompt again: the last token is always computed, so only
    # the first block is a hit and the second is computed into a new block.
    c = make_request(pool, "C", list(prefix), 1)
    sched.add(c)
    expect(
        step(sched),
        [("A", 1), ("B", 1), ("C", 4)],
        {"A": [0, 1, 2], "B": [0, 1, 3], "C": [0, 4]},
        slots={"A": [11], "B": [13], "C": [16, 17, 18, 19]},
        finished=["A", "C"],
    )
    assert c.num_cached_tokens == 4
    # Finished: A's and C's references are gone; shared cached blocks stay in use by B.
    assert [pool.ref_count(i) for i in range(5)] == [1, 1, 0, 1, 0]
    sched.finish(b)
    check(sched)
    assert pool.num_free_blocks == 8 and pool.num_evictable_blocks == 3  # A's block 2 got cached


def test_prefix_cache_revives_evictable_blocks_on_admission():
    pool = make_pool(4, caching=True)
    sched = make_scheduler(pool)
    prompt = list(range(50, 59))  # 9 tokens: 2 full blocks + 1
    a = make_request(pool, "A", prompt, 1)
    sched.add(a)
    expect(step(sched), [("A", 9)], {"A": [0, 1, 2]}, finished=["A"])
    # Uncached block 2 is free; cached 1, 0 are evictable, tail first.
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.evictable_block_ids() == [1, 0]

    b = make_request(pool, "B", prompt, 1)
    sched.add(b)
    expect(step(sched), [("B", 1)], {"B": [0, 1, 3]}, slots={"B": [12]}, finished=["B"])
    assert b.num_cached_tokens == 8
    assert pool.free_block_ids() == [2, 3, 1, 0]
