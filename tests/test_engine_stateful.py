"""Random mixes of requests (plain, n > 1, beam search, shared prefixes),
aborts and preemption, driven step by step through a tiny engine; every
invariant is checked after every step and the pool is whole at the end.

The machine explores; it does not promise that a draw hits preemption. The
mixes that must preempt (both modes, with n > 1 and beams) are driven on
purpose in test_preemption.py."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from tests.engine_utils import drain
from tests.profiles import examples


def tiny_llm() -> LLM:
    """A fresh engine per example (stories260K loads in milliseconds), so no
    example can leave state behind for the next."""
    return LLM(
        str(STORIES260K),
        dtype="float32",
        num_kv_blocks=24,
        block_size=4,
        max_model_len=96,
        max_num_seqs=6,
        max_num_batched_tokens=48,
    )


MAX_DRAIN_STEPS = 20_000
SYSTEM = [1, 450, 300, 270, 281, 262, 311, 290, 333]  # a shared prefix of 9 tokens


class EngineMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.llm = tiny_llm()
        self.engine = self.llm.engine
        self.live: list[str] = []
        self.outputs: dict[str, object] = {}

    @rule(
        kind=st.sampled_from(["greedy", "sample_n", "beam"]),
        shared=st.booleans(),
        tail=st.lists(st.integers(3, 511), min_size=1, max_size=14),
        max_tokens=st.integers(1, 12),
        width=st.integers(2, 3),
    )
    def add(self, kind: str, shared: bool, tail: list[int], max_tokens: int, width: int) -> None:
        prompt = (SYSTEM if shared else [1]) + tail
        if kind == "greedy":
            params = SamplingParams(temperature=0, max_tokens=max_tokens)
        elif kind == "sample_n":
            params = SamplingParams(n=width, seed=len(tail), max_tokens=max_tokens)
        else:
            params = SamplingParams(use_beam_search=True, best_of=width, n=width, max_tokens=max_tokens)
        (rid,) = self.llm.add_requests({"prompt_token_ids": prompt}, params)
        self.live.append(rid)

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(count=st.integers(1, 4))
    def step(self, count: int) -> None:
        for _ in range(count):
            for out in self.engine.step():
                assert out.finished
                self.outputs[out.request_id] = out
                self.live.remove(out.request_id)
            self.engine.check_invariants()

    @precondition(lambda self: bool(self.live))
    @rule(pick=st.integers(0, 100))
    def abort(self, pick: int) -> None:
        rid = self.live.pop(pick % len(self.live))
        assert self.engine.abort(rid)
        self.engine.check_invariants()

    @invariant()
    def consistent(self) -> None:
        self.engine.check_invariants()

    def teardown(self) -> None:
        # Each live request needs at most (prompt + max_tokens) steps even when
        # recomputed after every preemption; far more means the engine is stuck.
        self.outputs.update(drain(self.engine, MAX_DRAIN_STEPS))
        alloc = self.engine.allocator
        assert alloc.num_free_blocks == alloc.num_blocks, "blocks leaked"
        for out in self.outputs.values():
            params_n = len(out.outputs)
            assert params_n >= 1 and all(o.finish_reason in {"stop", "length"} for o in out.outputs)


EngineMachine.TestCase.settings = settings(max_examples=examples(25), stateful_step_count=30)
test_engine_state_machine = pytest.mark.slow(EngineMachine.TestCase)
