"""Run a server app on loopback for tests: uvicorn in a background thread on a
free port, always shut down (engine thread included) on exit; and helpers to
post raw bodies and read OpenAI-shaped errors."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class Served:
    url: str
    steps: threading.Event  # cleared: the engine thread holds before its next step
    app: Any = None  # the app served (its ServerContext is app.state.ctx)


def gate_steps(llm) -> threading.Event:
    """Make `llm`'s engine step only while the returned event is set, so a test
    can keep requests running (unfinished) for as long as it needs, however
    fast the model runs on the machine."""
    steps = threading.Event()
    steps.set()
    step = llm.engine.step

    def gated_step():
        steps.wait()
        return step()

    llm.engine.step = gated_step
    return steps


@dataclass
class RunningServer:
    """A server app on loopback, run by uvicorn (as `serve` runs it: the same
    limits, header deadline and graceful shutdown) in a background thread."""

    url: str
    server: object  # lifecycle.GracefulServer
    thread: threading.Thread
    sock: socket.socket

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def begin_shutdown(self) -> None:
        """What SIGTERM does: stop accepting, drain, then end what remains."""
        self.server.should_exit = True  # type: ignore[attr-defined]

    def stop(self, timeout: float = 60.0) -> None:
        self.begin_shutdown()
        self.thread.join(timeout)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"


def start_server(app, startup_timeout: float = 60.0) -> RunningServer:
    from paged_attention.entrypoints.lifecycle import make_server
    from paged_attention.entrypoints.server import bind_socket

    # Bind first (port 0: the OS picks a free port) so there is no race for the port.
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, log_level="error")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as err:  # surface start-up failures to the test
            errors.append(err)

    thread = threading.Thread(target=run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"server failed to start: {errors[:1]}")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            sock.close()
            raise RuntimeError("server did not start in time")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread, sock)


class StepBudget:
    """Lets `llm`'s engine take exactly as many steps as a test allows: a step
    waits for budget (none at first). For states that must not depend on how
    fast the model runs: after `allow(6)`, a 6-token request has finished and
    the one queued behind it has not begun."""

    def __init__(self, llm) -> None:
        self._cond = threading.Condition()
        self._left: float = 0
        step = llm.engine.step

        def budgeted_step():
            with self._cond:
                self._cond.wait_for(lambda: self._left > 0)
                self._left -= 1
            return step()

        llm.engine.step = budgeted_step

    def allow(self, steps: float) -> None:
        with self._cond:
            self._left += steps
            self._cond.notify_all()

    def unlimited(self) -> None:
        self.allow(float("inf"))


@contextmanager
def serve_in_thread(app, startup_timeout: float = 60.0) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) of `app`; shuts it down on
    exit (requests still open after the app's --shutdown-timeout end with an
    error)."""
    running = start_server(app, startup_timeout)
    try:
        yield running.url
    finally:
        running.stop()


def raw_connection(base_url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), timeout=60)


def post(base_url: str, path: str, content: str | bytes, headers: dict | None = None) -> httpx.Response:
    """POST a raw body as JSON (the Content-Type a client sends; without an
    API key the server refuses any other)."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{base_url}{path}", content=content, headers=sent, timeout=60)


def error_of(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The message of an OpenAI-shaped error answer with this status and param."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error["message"]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll until predicate() is truthy (returns it); fails after `timeout`.
    For state that settles asynchronously (an abort reaching the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def memory(base_url: str, headers: dict | None = None) -> dict:
    return httpx.get(f"{base_url}/debug/memory", headers=headers, timeout=30).json()


def metric_value(base_url: str, name: str, labels: dict | None = None) -> float:
    """One sample's value from /metrics (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    raise KeyError(f"metric {name} {labels or ''} not in /metrics")
