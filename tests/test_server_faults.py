"""Faults stay small. In the engine: a step that raises aborts (and frees) only
the requests it can be blamed on, and the others finish as if nothing had
happened. Over HTTP: those clients get an OpenAI-shaped error (JSON, or an
error event and [DONE]), everyone else is served, the engine thread's death
answers every waiting client, a hung step turns /health to 503, and
--request-timeout aborts a request and answers an error."""

from __future__ import annotations

import json

import httpx
import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from paged_attention.engine.llm_engine import StepError
from paged_attention.engine.request_state import RequestState
from paged_attention.entrypoints.limits import ServerLimits
from paged_attention.entrypoints.server import create_app
from tests.engine_utils import drain
from tests.server_utils import gate_steps, memory, serve_in_thread, wait_until

PROMPT = "Once upon a time"
OTHER = "The little dog"
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _llm(**kwargs) -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=16, **kwargs)


@pytest.fixture(scope="module")
def want() -> dict[str, str]:
    llm = _llm()
    return {p: llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].text for p in (PROMPT, OTHER)}


def _assert_pool_whole(llm: LLM) -> None:
    stats = llm.memory_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"], stats


# ------------------------------------------------------------------- engine
def test_a_failed_forward_pass_fails_its_batch_only(want):
    """One running sequence at a time: the forward pass fails while `a` runs
    and `b` waits; `a` is aborted (blocks freed), `b` then runs normally."""
    llm = _llm(max_num_seqs=1)
    engine = llm.engine
    a, b = llm.add_requests([PROMPT, OTHER], GREEDY)
    engine.step()  # a's prefill
    real_execute = engine.runner.execute

    def broken(batch):
        engine.runner.execute = real_execute
        raise RuntimeError("device fault")

    engine.runner.execute = broken
    with pytest.raises(StepError) as err:
        engine.step()
    assert list(err.value.failures) == [a] and "device fault" in str(err.value)
    assert err.value.outputs == []
    engine.check_invariants()
    assert engine.memory_stats()["num_waiting"] == 1 and not engine.abort(a)
    done = drain(engine)
    assert list(done) == [b] and done[b].outputs[0].text == want[OTHER]
    _assert_pool_whole(llm)


def test_a_fault_in_one_requests_own_processing_fails_it_alone(want, monkeypatch):
    """Both run in one batch; `b`'s detokenizing raises on its 3rd token:
    only `b` fails, `a`'s token of that step is kept and `a` ends as it
    would have."""
    llm = _llm()
    engine = llm.engine
    a, b = llm.add_requests([PROMPT, OTHER], SamplingParams(temperature=0, max_tokens=12), stream=False)
    real_append = RequestState.append_token

    def append_token(self, token_id, *args):
        if self.group.request_id == b and len(self.output_token_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return real_append(self, token_id, *args)

    monkeypatch.setattr(RequestState, "append_token", append_token)
    outputs: dict = {}
    with pytest.raises(StepError) as err:
        for _ in range(10):
            for out in engine.step():
                outputs[out.request_id] = out
    assert list(err.value.failures) == [b]
    assert isinstance(err.value.failures[b], UnicodeDecodeError)
    engine.check_invariants()
    assert engine.num_unfinished == 1  # a is intact
    outputs.update(drain(engine))
    assert list(outputs) == [a] and outputs[a].outputs[0].text == want[PROMPT]
    _assert_pool_whole(llm)


def test_memory_stats_report_the_host_swap_pool():
    llm = _llm(swap_space=0.001, preemption_mode="swap")
    stats = llm.memory_stats()
    assert stats["num_host_blocks"] > 0
    assert stats["num_host_used_blocks"] == stats["num_host_touched_blocks"] == 0
    off = _llm(preemption_mode="recompute").memory_stats()
    assert (off["num_host_blocks"], off["num_host_used_blocks"], off["num_host_touched_blocks"]) == (0, 0, 0)
