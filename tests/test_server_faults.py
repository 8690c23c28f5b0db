"""Faults stay small. In the engine: a step that raises aborts (and frees) only
the requests it can be blamed on, and the others finish as if nothing had
happened. Over HTTP: those clients get an OpenAI-shaped error (JSON, or an
error event and [DONE]), everyone else is served, the engine thread's death
answers every waiting client, a hung step turns /health to 503, and
--request-timeout aborts a request and answers an error."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from paged_attention.engine.llm_engine import StepError
from paged_attention.engine.request_state import RequestState
from paged_attention.entrypoints.limits import ServerLimits
from paged_attention.entrypoints.server import create_app
from tests.engine_utils import drain
from tests.server_utils import error_of, gate_steps, memory, metric_value, post, serve_in_thread, wait_until

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


# --------------------------------------------------------------------- HTTP
LONG = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def _served(llm: LLM, **app_kwargs):
    return serve_in_thread(create_app(llm, served_model_name="m", warm_up=False, **app_kwargs))


def _open_stream(url: str, body: dict) -> tuple[httpx.Client, Iterator[str]]:
    """A streaming request whose first event has arrived (it is running), and its remaining lines."""
    http = httpx.Client(base_url=url, timeout=60)
    response = http.send(
        http.build_request("POST", "/v1/completions", json={**body, "stream": True}), stream=True
    )
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(line for line in lines if line).startswith("data: {")
    return http, lines


def _rest_of_stream(lines: Iterator[str]) -> list[str]:
    return [line for line in lines if line]


def _error_event(events: list[str]) -> dict:
    """The stream's end: an OpenAI-shaped error event, then [DONE]."""
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()))
    thread.start()
    return thread, result


def test_a_failed_step_fails_its_stream_and_spares_the_waiting_request(want):
    """One running slot: `a` streams, `b` waits. The forward pass fails once:
    a's stream ends with an error event and [DONE], b is answered in full."""
    llm = _llm(max_num_seqs=1)
    steps = gate_steps(llm)
    with _served(llm) as url:
        http, stream = _open_stream(url, LONG)
        steps.clear()
        b_thread, b = _in_thread(
            lambda: post(url, "/v1/completions", json.dumps({"prompt": OTHER, **_greedy()}))
        )
        wait_until(lambda: metric_value(url, "paged_attention_num_requests_waiting") == 1)
        real_execute = llm.engine.runner.execute

        def broken(batch):
            llm.engine.runner.execute = real_execute
            raise RuntimeError("device fault")

        llm.engine.runner.execute = broken
        steps.set()
        error = _error_event(_rest_of_stream(stream))
        http.close()
        assert error["type"] == "internal_server_error" and "device fault" in error["message"]
        b_thread.join(60)
        assert b["value"].status_code == 200 and b["value"].json()["choices"][0]["text"] == want[OTHER]
        assert metric_value(url, "paged_attention_num_failed_requests_total") == 1
        wait_until(lambda: memory(url)["num_free_blocks"] == memory(url)["num_blocks"])


def _greedy() -> dict:
    return {"temperature": 0, "max_tokens": GREEDY.max_tokens}


def test_a_fault_in_one_request_fails_only_that_request_over_http(want, monkeypatch):
    real_append = RequestState.append_token

    def append_token(self, token_id, *args):
        if self.group.prompt == OTHER and len(self.output_token_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return real_append(self, token_id, *args)

    monkeypatch.setattr(RequestState, "append_token", append_token)
    llm = _llm()
    steps = gate_steps(llm)
    with _served(llm) as url:
        steps.clear()  # both join the same batches
        good, good_result = _in_thread(
            lambda: post(url, "/v1/completions", json.dumps({"prompt": PROMPT, **_greedy()}))
        )
        bad, bad_result = _in_thread(
            lambda: post(url, "/v1/completions", json.dumps({"prompt": OTHER, **_greedy()}))
        )
        wait_until(lambda: metric_value(url, "paged_attention_num_requests_waiting") == 2)
        steps.set()
        good.join(60)
        bad.join(60)
        assert good_result["value"].json()["choices"][0]["text"] == want[PROMPT]
        message = error_of(bad_result["value"], 500)
        assert "engine step failed: UnicodeDecodeError" in message
        wait_until(lambda: memory(url)["num_free_blocks"] == memory(url)["num_blocks"])


class _Fatal(BaseException):
    """Not an Exception: what `except Exception` would let kill the thread."""


def test_the_engine_threads_death_answers_every_waiting_client():
    llm = _llm(max_num_seqs=1)
    steps = gate_steps(llm)
    with _served(llm) as url:
        http, stream = _open_stream(url, LONG)
        steps.clear()
        waiting, waiting_result = _in_thread(
            lambda: post(url, "/v1/completions", json.dumps({"prompt": OTHER}))
        )
        wait_until(lambda: metric_value(url, "paged_attention_num_requests_waiting") == 1)

        def fatal(batch):
            raise _Fatal("simulated interpreter-level failure")

        llm.engine.runner.execute = fatal
        steps.set()
        error = _error_event(_rest_of_stream(stream))
        http.close()
        assert "engine thread died: _Fatal: simulated" in error["message"]
        waiting.join(60)
        assert "engine thread died" in error_of(waiting_result["value"], 503)
        health = httpx.get(f"{url}/health", timeout=30)
        assert "the engine is not running: _Fatal" in error_of(health, 503)
        refused = post(url, "/v1/completions", json.dumps({"prompt": PROMPT}))
        assert "engine thread died" in error_of(refused, 503)


def test_a_dead_engine_such_as_a_lost_worker_answers_503_not_a_retry_loop():
    """EngineDeadError (what a dead or hung tensor-parallel worker raises) is not
    blamed on one batch: the engine stops, every client in flight gets a 503,
    and so does every later request."""
    from paged_attention.engine.errors import EngineDeadError

    llm = _llm(max_num_seqs=1)
    steps = gate_steps(llm)
    with _served(llm) as url:
        steps.clear()
        waiting, waiting_result = _in_thread(
            lambda: post(url, "/v1/completions", json.dumps({"prompt": OTHER}))
        )
        wait_until(lambda: metric_value(url, "paged_attention_num_requests_waiting") == 1)
        calls = []

        def lost_worker(batch):
            calls.append(batch)
            raise EngineDeadError("tensor-parallel rank 1 (pid 4242) died: SIGKILL")

        llm.engine.runner.execute = lost_worker
        steps.set()
        waiting.join(60)
        assert "rank 1 (pid 4242) died" in error_of(waiting_result["value"], 503)
        assert len(calls) == 1  # no step after the first: the engine stopped
        refused = post(url, "/v1/completions", json.dumps({"prompt": PROMPT}))
        assert "engine thread died: EngineDeadError" in error_of(refused, 503)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503


def test_health_turns_503_while_a_step_hangs_and_recovers():
    llm = _llm()
    steps = gate_steps(llm)
    with _served(llm, limits=ServerLimits(health_stall_timeout_s=0.3)) as url:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        steps.clear()  # the next step hangs
        thread, result = _in_thread(lambda: post(url, "/v1/completions", json.dumps({"prompt": PROMPT})))
        stalled = wait_until(lambda: (r := httpx.get(f"{url}/health", timeout=30)).status_code == 503 and r)
        assert "no progress" in error_of(stalled, 503)
        assert "(limit --health-stall-timeout 0.3 s)" in stalled.json()["error"]["message"]
        steps.set()
        thread.join(60)
        assert result["value"].status_code == 200
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}


def test_request_timeout_aborts_and_answers_an_error():
    llm = _llm()
    steps = gate_steps(llm)
    with _served(llm, limits=ServerLimits(request_timeout_s=0.5)) as url:
        steps.clear()  # nothing can finish
        try:
            late = post(url, "/v1/completions", json.dumps({"prompt": PROMPT}))
            assert "within the server's request timeout (0.5 s); it was aborted" in error_of(late, 504)
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={"prompt": PROMPT, "stream": True}, timeout=60
            ) as r:
                events = [line for line in r.iter_lines() if line]
            assert _error_event(events)["code"] == "request_timeout"
        finally:
            steps.set()
        wait_until(lambda: memory(url)["num_aborted"] == 2)
        wait_until(lambda: memory(url)["num_free_blocks"] == memory(url)["num_blocks"])
