"""The driver's side of a tensor-parallel group: start worker ranks 1..N-1,
connect this process (rank 0) with them, send each step, watch their health,
and stop them.

`TPExecutor` holds what every backend shares: the rendezvous (a TCPStore this
process hosts), the step broadcast, control calls, failure handling and
shutdown. `MPExecutor` (`distributed_executor_backend="mp"`, the default)
starts the workers as spawned processes on this machine; `RayExecutor`
(`ray_executor.py`) as Ray actors.

Failure: a worker that dies makes the driver's next collective fail at once
(its socket closes); one that hangs makes it time out after
`worker_timeout_s()` (env PAGED_ATTENTION_WORKER_TIMEOUT, default 60 s). Either
way the executor stops every worker and raises `WorkerError` naming the rank,
its pid and exit status; the engine is then unusable and every later step
raises the same error (the server answers 503). No code path waits on a
worker without a bound, and shutdown (explicit, at garbage collection or at
interpreter exit) leaves no worker process behind.

Workers are spawned (never forked: the parent's OpenMP and CUDA state do not
survive a fork) and run only this package's code: the caller's main script is
not re-run in them, so `LLM(..., tensor_parallel_size=2)` works at the top
level of a script, from stdin or in a notebook.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from paged_attention.distributed.parallel_state import ParallelContext
from paged_attention.distributed.worker import (
    CoreShare,
    PoolSpec,
    Rendezvous,
    WorkerCall,
    WorkerSpec,
    bind_threads,
    run_mp_worker,
    split_cores,
)
from paged_attention.engine.errors import EngineDeadError

logger = logging.getLogger("paged_attention.distributed")

TIMEOUT_ENV = "PAGED_ATTENTION_WORKER_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
# Loading a shard can take minutes for a large model; a worker that dies while
# loading is noticed at once (its process sentinel), only a hang waits this long.
LOAD_TIMEOUT_S = 1800.0
STOP_GRACE_S = 5.0


class WorkerError(EngineDeadError):
    """A tensor-parallel worker died, hung or failed: the engine cannot go on."""


def worker_timeout_s() -> float:
    """How long the driver waits on a worker in any collective."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def describe_exit(pid: int | None, exitcode: int | None) -> str:
    if exitcode is None:
        return f"pid {pid}, still running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"pid {pid}, killed by {signal.Signals(-exitcode).name}"
    return f"pid {pid}, exit code {exitcode}"


@contextlib.contextmanager
def _spawn_without_main() -> Iterator[None]:
    """While a worker is spawned, hide the main module's origin from
    multiprocessing, which would otherwise re-run the caller's script in the
    worker (needing an `if __name__ == "__main__":` guard, and failing for
    stdin or `python -c`). The worker's target lives in this package."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable while a child process is spawned (it inherits it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class TPExecutor:
    """Rank 0 of a group of `world_size` ranks. Lifecycle, as the builder
    drives it: `start()` (workers begin loading their shards while this
    process loads its own), `wait_loaded()`, `connect(pools, device)`, then
    `execute(step, run_local)` once per step, and `shutdown()`."""

    host = "127.0.0.1"

    def __init__(
        self,
        world_size: int,
        spec: Callable[[int, CoreShare], WorkerSpec],
        *,
        shard_vocab: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        if world_size < 2:
            raise ValueError(f"a tensor-parallel executor needs >= 2 ranks, got {world_size}")
        self.world_size = world_size
        self.timeout_s = worker_timeout_s() if timeout_s is None else timeout_s
        self.tp = ParallelContext(0, world_size, shard_vocab=shard_vocab)
        self.shares = split_cores(world_size)
        self.specs = [spec(rank, self.shares[rank]) for rank in range(1, world_size)]
        self.worker_weight_bytes: list[int] = []
        self._store: Any = None
        self._restore_threads: weakref.finalize | None = None
        self._error: WorkerError | None = None
        self._closed = False

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        try:
            self._start_workers()  # before binding this process: children inherit its affinity
        except BaseException:
            self.shutdown()
            raise
        before = bind_threads(self.shares[0])
        # Restored at shutdown, or when the executor is collected without one.
        self._restore_threads = weakref.finalize(self, bind_threads, before, restore=True)

    def wait_loaded(self) -> list[int]:
        """Each worker's weight bytes, once all have loaded their shards."""
        try:
            self.worker_weight_bytes = [int(b) for b in self._wait_all("loaded", LOAD_TIMEOUT_S)]
        except BaseException as err:
            raise self._fail(err) from err
        return self.worker_weight_bytes

    def connect(self, pools: PoolSpec, device: torch.device) -> None:
        """Give every worker the pool plan, and join the process group."""
        try:
            self._store = dist.TCPStore(
                self.host,
                0,
                self.world_size,
                is_master=True,
                timeout=timedelta(seconds=self.timeout_s),
                wait_for_workers=False,
            )
            self._send_setup(pools, Rendezvous(self.host, self._store.port, self.timeout_s))
            self.tp.connect(self._store, device, self.timeout_s)
            self._wait_all("ready", self.timeout_s)
        except BaseException as err:
            raise self._fail(err) from err

    def shutdown(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker (asked to stop, then killed after `grace_s`) and
        restore this process's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.tp.connected and self._error is None:
            try:
                self.tp.broadcast_object(WorkerCall("stop"))
            except Exception as err:  # a worker gone already: the force below handles it
                logger.warning("stopping tensor-parallel workers: %s", err)
        self.tp.close()
        self._stop_workers(grace_s)
        self._store = None
        if self._restore_threads is not None:
            self._restore_threads()  # runs once

    # ----------------------------------------------------------------- steps
    def execute(self, step: Any, run_local: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Broadcast `step` to the workers, then run this rank's part."""
        self._check_usable()
        try:
            self.tp.broadcast_object(step)
            return run_local()
        except Exception as err:
            raise self._fail(err) from err
        except BaseException as err:  # Ctrl-C mid-step: the ranks are out of step for good
            self._fail(err)
            raise

    def call(self, method: str) -> list[Any]:
        """`method`'s result from every worker (ranks 1..N-1), e.g. "info"."""
        self._check_usable()
        try:
            self.tp.broadcast_object(WorkerCall(method))
            results = self.tp.gather_object(None)
        except Exception as err:
            raise self._fail(err) from err
        assert results is not None
        return results[1:]

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise WorkerError("the tensor-parallel engine has been shut down")
        dead = self._dead()
        if dead:
            raise self._fail(None)

    def _fail(self, err: BaseException | None) -> WorkerError:
        """Name what went wrong, stop every worker, and remember the error."""
        if self._error is not None:
            return self._error
        timed_out = err is not None and "Timed out" in str(err)
        deadline = time.monotonic() + (0.0 if timed_out else 1.0)
        dead = self._dead()
        while not dead and time.monotonic() < deadline:  # a killed worker may still be exiting
            time.sleep(0.02)
            dead = self._dead()
        if isinstance(err, WorkerError):
            message = str(err)
        elif dead:
            message = f"tensor-parallel worker {'; '.join(dead)} died"
        elif timed_out:
            message = (
                f"a tensor-parallel worker did not answer within {self.timeout_s:g} s "
                f"(hung? set {TIMEOUT_ENV} to wait longer)"
            )
        else:
            message = f"tensor-parallel step failed: {type(err).__name__}: {err}"
        self._error = WorkerError(message + "; the engine has stopped its workers and cannot continue")
        logger.error("%s", self._error)
        self.tp.close()  # the group is out of step: never use it again
        self.shutdown(grace_s=0.0)
        return self._error

    # -------------------------------------------------------- backend hooks
    def _start_workers(self) -> None:
        raise NotImplementedError

    def _wait_all(self, what: str, timeout_s: float) -> list[Any]:
        """Each worker's payload for message `what` ("loaded", "ready")."""
        raise NotImplementedError

    def _send_setup(self, pools: PoolSpec, rendezvous: Rendezvous) -> None:
        raise NotImplementedError

    def _dead(self) -> list[str]:
        """'rank R (pid P, exit ...)' for each worker that is gone."""
        raise NotImplementedError

    def _stop_workers(self, grace_s: float) -> None:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError


def _kill(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Finalizer: no worker outlives its executor (garbage collection, exit)."""
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=STOP_GRACE_S)


class MPExecutor(TPExecutor):
    """Workers as spawned processes on this machine, one per rank, each bound
    to its share of the cores (OMP_NUM_THREADS, torch threads, affinity)."""

    def _start_workers(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        for spec in self.specs:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=run_mp_worker,
                args=(spec, child_end, os.getpid()),
                name=f"paged-attention-tp{spec.rank}",
                daemon=True,
            )
            with _env("OMP_NUM_THREADS", str(spec.share.threads)), _spawn_without_main():
                proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        self._finalizer = weakref.finalize(self, _kill, list(self._procs))

    def _wait_all(self, what: str, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        results = []
        for spec, proc, conn in zip(self.specs, self._procs, self._conns):
            ready = multiprocessing.connection.wait(
                [conn, proc.sentinel], timeout=deadline - time.monotonic()
            )
            if conn in ready:
                kind, payload = conn.recv()
                if kind == "error":
                    raise WorkerError(f"tensor-parallel worker rank {spec.rank} failed:\n{payload}")
                assert kind == what, f"worker rank {spec.rank} sent {kind!r}, expected {what!r}"
                results.append(payload)
            elif proc.sentinel in ready:
                proc.join(timeout=1.0)  # reap it, for its exit code
                raise WorkerError(
                    f"tensor-parallel worker rank {spec.rank} "
                    f"({describe_exit(proc.pid, proc.exitcode)}) died before it was {what}"
                )
            else:
                raise WorkerError(
                    f"tensor-parallel worker rank {spec.rank} (pid {proc.pid}) was not {what} "
                    f"within {timeout_s:g} s"
                )
        return results

    def _send_setup(self, pools: PoolSpec, rendezvous: Rendezvous) -> None:
        for conn in self._conns:
            conn.send((pools, rendezvous))

    def _dead(self) -> list[str]:
        return [
            f"rank {spec.rank} ({describe_exit(proc.pid, proc.exitcode)})"
            for spec, proc in zip(self.specs, getattr(self, "_procs", []))
            if not proc.is_alive()
        ]

    def _stop_workers(self, grace_s: float) -> None:
        procs = getattr(self, "_procs", [])
        deadline = time.monotonic() + grace_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=STOP_GRACE_S)
        for conn in getattr(self, "_conns", []):
            conn.close()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in getattr(self, "_procs", []) if p.pid is not None]


def make_executor(
    backend: str,
    world_size: int,
    spec: Callable[[int, CoreShare], WorkerSpec],
    *,
    shard_vocab: bool = True,
) -> TPExecutor:
    if backend == "mp":
        return MPExecutor(world_size, spec, shard_vocab=shard_vocab)
    if backend == "ray":
        from paged_attention.distributed.ray_executor import RayExecutor

        return RayExecutor(world_size, spec, shard_vocab=shard_vocab)
    raise ValueError(f"distributed_executor_backend must be mp or ray, got {backend!r}")
