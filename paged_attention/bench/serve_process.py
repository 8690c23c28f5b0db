"""A server under test as a subprocess: started on a free port with a given
thread count (and optionally pinned to one core with `taskset`), ready once
GET /health answers 200, its resident memory read with psutil, and always
stopped (SIGINT, then kill) on exit. Used for this engine's server and for
llama-server alike, so both are started, watched and measured the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

MIB = 2**20


@dataclass(frozen=True)
class Placement:
    """Where a server runs: `threads` compute threads, on `core` alone when set."""

    threads: int
    core: int | None = None

    def prefix(self) -> list[str]:
        """The command prefix that pins a process to `core` (taskset keeps the pid: it execs)."""
        if self.core is None:
            return []
        if shutil.which("taskset") is None:
            raise ValueError("--pin-core needs `taskset` (util-linux), which is not on PATH")
        return ["taskset", "-c", str(self.core)]

    def thread_env(self) -> dict[str, str]:
        """torch (and its OpenMP/MKL pools) read these at start-up."""
        n = str(self.threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def our_server_command(serve_args: Sequence[str], port: int, host: str = "127.0.0.1") -> list[str]:
    """`paged-attention serve ARGS` (as `python -m`, so this interpreter runs it)."""
    return [
        sys.executable,
        "-m",
        "paged_attention.entrypoints.server",
        *serve_args,
        "--host",
        host,
        "--port",
        str(port),
    ]


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass
class ServerProcess:
    """A started server: its URL, pid and the tail of its output."""

    url: str
    process: subprocess.Popen
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float | None:
        """Resident set size now; None once the process is gone."""
        import psutil

        try:
            return psutil.Process(self.pid).memory_info().rss / MIB
        except psutil.Error:
            return None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])


@contextmanager
def server_process(
    command: Sequence[str],
    port: int,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 600.0,
    host: str = "127.0.0.1",
) -> Iterator[ServerProcess]:
    """Run `command` (which must listen on `port`) and yield it once /health
    answers 200; raises ServerExited (or RuntimeError on a timeout) with its
    last output if it does not get there."""
    import httpx

    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **(env or {})},
    )
    server = ServerProcess(f"http://{host}:{port}", proc)

    def drain() -> None:  # keep reading so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            server.log.append(line.rstrip())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                reader.join(5)
                raise ServerExited(
                    f"{command[0]} exited with {proc.returncode} before it was ready:\n{server.log_tail()}",
                    proc.returncode,
                )
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{command[0]} not ready after {startup_timeout:g} s:\n{server.log_tail()}"
                )
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)


class RssSampler:
    """The peak resident set size of a process, sampled every `interval_s` on a
    daemon thread while the `with` block runs (peaks between samples are missed)."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.1) -> None:
        self._server = server
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.peak_mib: float | None = None

    def _sample(self) -> None:
        rss = self._server.rss_mib()
        if rss is not None and (self.peak_mib is None or rss > self.peak_mib):
            self.peak_mib = rss

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def client_off_core(core: int | None) -> Iterator[None]:
    """While a server is pinned to `core`, keep this (client) process on the
    other cores so the load generator does not take the server's time slices;
    the previous affinity comes back afterwards. No-op where unsupported."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    others = before - {core}
    if others:
        os.sched_setaffinity(0, others)
    try:
        yield
    finally:
        if others:
            os.sched_setaffinity(0, before)
