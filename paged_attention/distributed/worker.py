"""One tensor-parallel worker rank (1..N-1): its model shard, its KV pool (its
own KV heads, the driver's block ids), and the loop that runs every step the
driver broadcasts. The multiprocessing and Ray executors run the same `Worker`.

A worker keeps no scheduling state: the driver's one scheduler and BlockPool
decide everything, and each step arrives as a `StepInput` (token ids,
positions, block tables, copy-on-write and swap copies) that the worker runs
on its shard exactly as the driver runs it on its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from paged_attention.distributed.parallel_state import CommStats, ParallelContext
from paged_attention.distributed.sharding import parameter_bytes
from paged_attention.engine.model_runner import ModelRunner, StepInput
from paged_attention.kv_cache import KVCachePool
from paged_attention.model.config import ModelConfig
from paged_attention.model.quant.scheme import NONE, QuantScheme

logger = logging.getLogger("paged_attention.distributed")


# ------------------------------------------------------------------ threads
@dataclass(frozen=True)
class CoreShare:
    """The CPU cores a rank is bound to and the torch threads it runs."""

    cores: tuple[int, ...]  # empty: not bound (no sched_setaffinity here)
    threads: int


def split_cores(world_size: int) -> list[CoreShare]:
    """Give each of `world_size` ranks its own cores, so N ranks do not
    oversubscribe the machine: with C usable cores, rank r gets C // N of them.
    With fewer cores than ranks, every rank runs one thread on all of them."""
    if not hasattr(os, "sched_getaffinity"):
        count = os.cpu_count() or 1
        return [CoreShare((), max(1, count // world_size))] * world_size
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world_size:
        return [CoreShare(tuple(cores), 1)] * world_size
    per = len(cores) // world_size
    return [CoreShare(tuple(cores[r * per : (r + 1) * per]), per) for r in range(world_size)]


def bind_threads(share: CoreShare, *, restore: bool = False) -> CoreShare:
    """Bind this process to `share` (cores, torch threads); returns what it
    had before, so the driver can `restore` it when the engine shuts down."""
    before = CoreShare(
        tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (),
        torch.get_num_threads(),
    )
    if share.cores and hasattr(os, "sched_setaffinity"):
        # Binding narrows to the cores this process may use (another machine,
        # under Ray, may not have them all); restoring widens back.
        usable = set(share.cores) if restore else set(share.cores) & set(os.sched_getaffinity(0))
        if usable:
            os.sched_setaffinity(0, usable)
    torch.set_num_threads(share.threads)
    return before


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard (picklable: it crosses processes)."""

    rank: int
    world_size: int
    weights: str  # a model folder or .gguf file
    config_path: str | None  # the config.json (folder) the driver loads with
    dtype: torch.dtype
    device: str  # "cpu" or "cuda" (rank r uses cuda:r)
    share: CoreShare
    shard_vocab: bool = True
    quantization: QuantScheme = NONE  # resolved by the driver, as rank 0 loads
    attention_backend: str = "auto"
    kv_dtype: torch.dtype | None = None  # the KV pools' (None: `dtype`)


@dataclass(frozen=True)
class PoolSpec:
    """The driver's pool plan: every rank's pool has the same block ids."""

    num_blocks: int
    block_size: int
    host_blocks: int  # 0: no swap space


@dataclass(frozen=True)
class Rendezvous:
    """Where the driver's TCPStore listens, and the driver's timeout."""

    host: str
    port: int
    timeout_s: float


@dataclass(frozen=True)
class WorkerCall:
    """A control message broadcast in place of a step: `stop`, or a method
    whose result every rank returns to the driver (`info`)."""

    method: str


@dataclass(frozen=True)
class WorkerInfo:
    """One rank's shard, pool and counters, as `TPExecutor.call("info")` returns them."""

    rank: int
    pid: int
    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    intermediate_size: int
    vocab_rows: int
    weight_bytes: int
    num_blocks: int
    host_blocks: int
    kv_pool_bytes: int
    steps: int
    threads: int
    cores: tuple[int, ...]
    comm: CommStats = field(default_factory=CommStats)


def worker_device(device: str, rank: int) -> torch.device:
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(device)


# ------------------------------------------------------------------- worker
class Worker:
    """Build the shard at construction; then `init_pools`, `connect`, `run`."""

    def __init__(self, spec: WorkerSpec) -> None:
        from paged_attention.model.loader import load_model

        bind_threads(spec.share)
        self.spec = spec
        self.tp = ParallelContext(spec.rank, spec.world_size, shard_vocab=spec.shard_vocab)
        self.device = worker_device(spec.device, spec.rank)
        # The whole model's config; self.model.config is this rank's shard.
        self.model_config: ModelConfig
        self.model, self.model_config = load_model(
            spec.weights,
            dtype=spec.dtype,
            device=self.device,
            config=spec.config_path,
            tp=self.tp,
            quantization=spec.quantization,
            attention_backend=spec.attention_backend,
        )
        self.weight_bytes = parameter_bytes(self.model)
        self.runner: ModelRunner | None = None
        self.steps = 0

    def init_pools(self, pools: PoolSpec) -> None:
        cfg = self.model.config  # this rank's heads
        kv = KVCachePool(
            cfg.num_layers, pools.num_blocks, pools.block_size, cfg.num_kv_heads, cfg.head_dim,
            self.spec.kv_dtype or self.spec.dtype, self.device,
        )  # fmt: skip
        host = None
        if pools.host_blocks:
            host = KVCachePool(
                cfg.num_layers, pools.host_blocks, pools.block_size, cfg.num_kv_heads, cfg.head_dim,
                self.spec.kv_dtype or self.spec.dtype, "cpu", pin_memory=self.device.type == "cuda",
            )  # fmt: skip
        self.runner = ModelRunner(self.model, kv, host)

    def connect(self, rendezvous: Rendezvous) -> None:
        store = dist.TCPStore(
            rendezvous.host,
            rendezvous.port,
            self.spec.world_size,
            is_master=False,
            timeout=timedelta(seconds=rendezvous.timeout_s),
        )
        self.tp.connect(store, self.device, rendezvous.timeout_s)

    def run(self) -> None:
        """Run the driver's steps until it broadcasts `stop`. A collective
        error (the driver died) propagates: the worker then exits."""
        assert self.runner is not None, "init_pools first"
        while True:
            message = self.tp.broadcast_object()
            if isinstance(message, StepInput):
                self.runner.execute_step(message)
                self.steps += 1
            elif message.method == "stop":
                break
            else:
                self.tp.gather_object(getattr(self, message.method)())
        self.tp.close()

    def info(self) -> WorkerInfo:
        assert self.runner is not None, "init_pools first"
        layout = self.tp.layout(self.model_config)
        cfg = self.model.config
        host = self.runner.host_cache
        return WorkerInfo(
            rank=self.spec.rank,
            pid=os.getpid(),
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            kv_head_start=layout.kv_head_start,
            intermediate_size=cfg.intermediate_size,
            vocab_rows=cfg.vocab_size,
            weight_bytes=self.weight_bytes,
            num_blocks=self.runner.kv_cache.num_blocks,
            host_blocks=0 if host is None else host.num_blocks,
            kv_pool_bytes=self.runner.kv_cache.total_bytes,
            steps=self.steps,
            threads=torch.get_num_threads(),
            cores=tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (),
            comm=self.tp.stats.copy(),
        )


# ------------------------------------------------------ multiprocessing entry
def _exit_with_parent(parent: int) -> None:
    """A worker whose driver is gone (killed: no stop message, maybe no
    closed socket yet) exits instead of lingering."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def run_mp_worker(spec: WorkerSpec, conn: Any, parent: int) -> None:
    """The multiprocessing executor's target: build, report over `conn`,
    take the pool plan and rendezvous, connect, then run steps."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        worker = Worker(spec)
        conn.send(("loaded", worker.weight_bytes))
        pools, rendezvous = conn.recv()
        worker.init_pools(pools)
        worker.connect(rendezvous)
        conn.send(("ready", None))
    except BaseException:  # report it: the driver is waiting on this pipe
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        return
    try:
        worker.run()
    except Exception as err:  # the driver went away mid-collective: nothing to report to
        logger.debug("worker %d stops: %s", spec.rank, err)
        os._exit(1)
