"""Shutdown is clean: on SIGTERM/SIGINT the server stops accepting, lets the
requests in flight finish within --shutdown-timeout, ends each remaining one
with an OpenAI-shaped error event and [DONE], frees every block, says
"server stopped" and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.limits import ServerLimits
from paged_attention.entrypoints.server import create_app
from tests.server_utils import StepBudget, start_server, wait_until

PROMPT = "Once upon a time"
OTHER = "The little dog"


def _llm(**kwargs) -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=16, **kwargs)


def _stream(http: httpx.Client, body: dict) -> Iterator[str]:
    """Open a stream (its 200 has arrived: the request is queued) and return its events."""
    response = http.send(
        http.build_request("POST", "/v1/completions", json={**body, "stream": True}), stream=True
    )
    assert response.status_code == 200
    return (line for line in response.iter_lines() if line)


def _connects(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return False
    return True


def test_shutdown_finishes_requests_in_flight_and_ends_the_rest_with_an_error():
    """One running slot and an exact step budget: the 6-token request finishes
    during the drain; the one queued behind it cannot, and when the shutdown
    timeout passes its stream ends with an error event and [DONE]."""
    llm = _llm(max_num_seqs=1)
    budget = StepBudget(llm)
    app = create_app(llm, served_model_name="m", warm_up=False, limits=ServerLimits(shutdown_timeout_s=1))
    running = start_server(app)
    try:
        with (
            httpx.Client(base_url=running.url, timeout=60) as first,
            httpx.Client(base_url=running.url, timeout=60) as second,
        ):
            short = _stream(first, {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "temperature": 0})
            long = _stream(second, {"prompt": OTHER, "max_tokens": 480, "ignore_eos": True, "temperature": 0})
            running.begin_shutdown()
            wait_until(lambda: not _connects(running.url))  # no longer accepting
            budget.allow(6)  # exactly the short request's tokens
            short_events = list(short)
            long_events = list(long)
        budget.unlimited()
        running.thread.join(60)
        assert not running.thread.is_alive()
    finally:
        budget.unlimited()
        running.stop()

    want = _llm().generate(
        PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0), use_tqdm=False
    )
    assert short_events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in short_events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want[0].outputs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    assert long_events[-1] == "data: [DONE]"
    error = json.loads(long_events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_shutting_down"
    assert "did not finish within --shutdown-timeout 1 s" in error["message"]
    stats = llm.memory_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.engine.has_unfinished()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_serve_command_cleanly(sig):
    """The real command in a subprocess, --shutdown-timeout 0: on the signal
    every open stream ends with an error event and [DONE] (the two queued
    behind a 480-token request cannot have finished), "server stopped" is
    printed and the exit status is 0."""
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "paged_attention.entrypoints.server", "--model", str(STORIES260K),
            "--port", "0", "--dtype", "float32", "--num-kv-blocks", "64", "--max-num-seqs", "1",
            "--shutdown-timeout", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the KV pool
        url = proc.stdout.readline().split(" at ")[1].split("/v1")[0]
        body = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}
        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(3)]
        streams = [_stream(http, body) for http in clients]
        assert next(streams[0]).startswith("data: {")  # the first is running
        proc.send_signal(sig)
        ends = [list(stream) for stream in streams]
        for http in clients:
            http.close()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("server stopped"), out
    for events in ends:
        assert events[-1] == "data: [DONE]"
    errors = [json.loads(e[-2].removeprefix("data: "))["error"] for e in ends if "error" in e[-2]]
    assert len(errors) >= 2 and all(e["code"] == "shutting_down" for e in errors)
