"""Run a server app on loopback for tests: uvicorn in a background thread on a
free port, always shut down (engine thread included) on exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class Served:
    url: str
    steps: threading.Event  # cleared: the engine thread holds before its next step


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


@contextmanager
def serve_in_thread(app, startup_timeout: float = 60.0, graceful_timeout: float = 5.0) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) of `app` served by uvicorn.
    On exit, requests still open after `graceful_timeout` s are cancelled."""
    import uvicorn

    from paged_attention.entrypoints.server import bind_socket

    # Bind first (port 0: the OS picks a free port) so there is no race for the port.
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=graceful_timeout))
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
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


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
