"""Scheduling under memory pressure: swap and recompute preemption, the cost
choice, chunked prefill, priorities, aborts. Outputs never depend on any of it."""

from __future__ import annotations

import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.core.request import RequestStatus
from paged_attention.core.swap import SwapManager
from paged_attention.engine.builder import STORIES260K
from tests.engine_utils import drive

PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat and",
    "Lily and Tom went to the park. They saw a big",
    "A dog",
    "One day, a little bird",
    "Sam had a red ball. He",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def tight_llm(mode: str, **kw) -> LLM:
    """A pool of 40 blocks of 4 tokens: the six prompts cannot all stay."""
    kwargs = dict(
        dtype="float32",
        num_kv_blocks=40,
        block_size=4,
        max_model_len=128,
        preemption_mode=mode,
        swap_space=0.01,
    )
    kwargs.update(kw)
    return LLM(str(STORIES260K), **kwargs)


@pytest.fixture(scope="module")
def reference():
    roomy = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=512, block_size=16)
    mixed = _mixed_params()
    outs = roomy.generate(PROMPTS, mixed, use_tqdm=False)
    assert roomy.memory_stats()["num_preemptions"] == 0
    return [[o.token_ids for o in r.outputs] for r in outs]


def _mixed_params() -> list[SamplingParams]:
    sample_n = SamplingParams(n=2, seed=5, max_tokens=30, ignore_eos=True)
    beams = SamplingParams(use_beam_search=True, best_of=3, n=3, max_tokens=20)
    return [GREEDY, sample_n, GREEDY, beams, GREEDY, GREEDY]


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_outputs_are_identical_under_pressure(reference, mode):
    llm = tight_llm(mode)
    outs = drive(llm, PROMPTS, _mixed_params())  # invariants (host pool too) after every step
    stats = llm.memory_stats()
    assert stats["num_preemptions"] > 0
    if mode == "swap":
        assert stats["num_swapped_out"] == stats["num_preemptions"]
    if mode == "recompute":
        assert stats["num_swapped_out"] == 0 and stats["num_recomputed_tokens"] > 0
    assert [[o.token_ids for o in r.outputs] for r in outs] == reference
    assert stats["num_free_blocks"] == stats["num_blocks"]
    swapper = llm.engine.scheduler.swapper
    if swapper is not None:
        assert swapper.host.num_free_blocks == swapper.host.num_blocks


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_groups_that_cannot_all_fit_still_finish(mode):
    """Six width-3 beam searches in 20 blocks of 4 tokens. A beam that has
    reported its round waits, idle, holding blocks; a sibling that was swapped
    out or requeued then cannot come back, and nothing can run. (This hung
    before the scheduler learnt to preempt idle beams for it.) The outputs
    still equal a run with room for everything."""
    beams = SamplingParams(use_beam_search=True, best_of=3, n=3, max_tokens=20)
    roomy = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=512, block_size=16)
    expected = [[o.token_ids for o in r.outputs] for r in roomy.generate(PROMPTS, beams, use_tqdm=False)]
    llm = tight_llm(mode, num_kv_blocks=20, max_model_len=64)
    scheduler = llm.engine.scheduler
    unblocked: list[int] = []
    unblock = scheduler._unblock
    scheduler._unblock = lambda batch: (unblocked.append(len(scheduler.running)), unblock(batch))[1]
    outs = drive(llm, PROMPTS, beams, max_steps=2000)
    assert unblocked, "the run never reached the state this test is about"
    assert [[o.token_ids for o in r.outputs] for r in outs] == expected
    stats = llm.memory_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_auto_follows_the_cost_model():
    llm = tight_llm("auto")
    model = llm.engine.cost_model
    model.copy_bytes_per_s, model.prefill_tokens_per_s = 1e15, 1.0  # copying is free
    drive(llm, PROMPTS, GREEDY)
    swapped_when_cheap = llm.memory_stats()["num_swapped_out"]
    llm2 = tight_llm("auto")
    model2 = llm2.engine.cost_model
    model2.copy_bytes_per_s, model2.prefill_tokens_per_s = 1.0, 1e15  # recompute is free
    drive(llm2, PROMPTS, GREEDY)
    assert swapped_when_cheap > 0 and llm2.memory_stats()["num_swapped_out"] == 0
    assert llm2.memory_stats()["num_recomputed_tokens"] > 0


def test_swap_space_zero_disables_swapping():
    llm = tight_llm("swap", swap_space=0)
    assert llm.engine.scheduler.swapper is None
    drive(llm, PROMPTS, GREEDY)
    assert llm.memory_stats()["num_swapped_out"] == 0


@pytest.mark.parametrize("block_size", [1, 16])
def test_chunked_prefill_gives_the_same_tokens(block_size):
    prompt = "Lily and Tom went to the park. They saw a big dog and a small cat. The dog"
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    whole = LLM(
        str(STORIES260K),
        dtype="float32",
        block_size=block_size,
        num_kv_blocks=1024 // block_size,
        max_model_len=256,
    )
    want = whole.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    chunked = LLM(
        str(STORIES260K),
        dtype="float32",
        block_size=block_size,
        num_kv_blocks=1024 // block_size,
        max_model_len=256,
        max_num_batched_tokens=7,
    )
    engine = chunked.engine
    (rid,) = chunked.add_requests(prompt, params)
    steps_with_prefill = 0
    while engine.has_unfinished():
        req = next(iter(engine.scheduler.requests()))
        if req.num_computed_tokens < req.num_prompt_tokens:
            steps_with_prefill += 1
        outs = engine.step()
        engine.check_invariants()
    assert steps_with_prefill >= 3  # the prompt really was split
    assert outs[0].outputs[0].token_ids == want


def test_decodes_go_first_so_a_long_prompt_never_stalls_them():
    llm = LLM(
        str(STORIES260K),
        dtype="float32",
        num_kv_blocks=128,
        block_size=16,
        max_model_len=512,
        max_num_batched_tokens=16,
    )
    engine = llm.engine
    llm.add_requests("Once upon a time", SamplingParams(temperature=0, max_tokens=30))
    engine.step()
    long_prompt = {"prompt_token_ids": [1] + [300, 301, 302, 303] * 60}
    llm.add_requests(long_prompt, SamplingParams(temperature=0, max_tokens=2))
    short = next(r for r in engine.scheduler.running)
    before = short.num_output_tokens
    for _ in range(5):  # the 241-token prompt needs 16 steps at 16 tokens each
        engine.step()
        engine.check_invariants()
    assert short.num_output_tokens == before + 5  # one token every step


def test_priorities_and_no_starvation():
    llm = LLM(
        str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=128, max_num_seqs=2
    )
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    low, high = llm.add_requests(["A dog", "A cat"], params, priority=[5, 0])
    finished: list[str] = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step()]
    assert finished.index(high) < finished.index(low)
    # A stream of short requests does not starve one long one of equal priority.
    (long_id,) = llm.add_requests(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    )
    finished = []
    for i in range(40):
        llm.add_requests(f"Tom {i}", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        finished += [o.request_id for o in engine.step()]
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step()]
    assert long_id in finished


@pytest.mark.parametrize("where", [RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED])
def test_abort_frees_blocks_wherever_the_request_is(where):
    llm = tight_llm("swap")
    engine = llm.engine
    ids = llm.add_requests(PROMPTS, GREEDY)
    target = None
    for _ in range(200):
        target = next((r for r in engine.scheduler.requests() if r.status is where), None)
        if target is not None:
            break
        engine.step()
        engine.check_invariants()
    assert target is not None, f"never saw a request {where.value}"
    assert engine.abort(target.request_id.split("#")[0])
    engine.check_invariants()
    assert all(r is not target for r in engine.scheduler.requests())
    for rid in ids:
        engine.abort(rid)
    swapper = engine.scheduler.swapper
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert swapper.host.num_free_blocks == swapper.host.num_blocks


def test_a_request_that_can_never_fit_fails_clearly_and_the_rest_finish():
    llm = tight_llm("auto", max_model_len=64)
    engine = llm.engine
    ok = llm.add_requests(PROMPTS[:3], GREEDY)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.add_requests({"prompt_token_ids": [1] * 100}, GREEDY)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step()})
    assert set(done) == set(ok)


def test_shared_blocks_are_swapped_once_and_stay_shared():
    device, host = BlockAllocator(16, 4), BlockAllocator(16, 4)
    swap = SwapManager(device, host)
    parent = BlockTable(device)
    parent.append_slots(10)  # blocks 0, 1 full, block 2 partly filled
    child = parent.fork()
    out1 = swap.swap_out(parent)
    assert [(c.src, c.dst) for c in out1] == [(0, 0), (1, 1), (2, 2)]
    out2 = swap.swap_out(child)
    assert [(c.src, c.dst) for c in out2] == [(2, 3)]  # full blocks reuse the host copies
    assert child.block_ids[:2] == parent.block_ids[:2] and host.ref_count(0) == 2
    assert device.num_free_blocks == 16
    back1 = swap.swap_in(parent)
    back2 = swap.swap_in(child)
    assert len(back1) == 3 and len(back2) == 1  # shared again on the device
    assert child.block_ids[:2] == parent.block_ids[:2]
    assert device.ref_count(parent.block_ids[0]) == 2
    device.check_invariants([parent, child])
    host.check_invariants([])
    parent.free()
    child.free()
    assert device.num_free_blocks == 16 and host.num_free_blocks == 16
