"""Tensor-parallel workers as Ray actors (`distributed_executor_backend="ray"`;
`pip install 'paged-attention[ray]'`).

The same `Worker` as the multiprocessing executor, one actor per worker rank,
each pinned to its own bundle of a placement group (bundle 0 is reserved for
the driver, rank 0, which runs in the caller's process). Ray places the actors
and starts their processes; the ranks then talk through torch.distributed
exactly as with "mp", rendezvousing at a TCPStore on the driver's node. An
existing Ray session is used as it is; without one, `ray.init()` starts a
local one.

Health: each actor's step loop is one long-running Ray task; the driver checks
before every step that none has ended (an actor that dies ends it with an
error), and a collective with a dead or hung rank fails or times out as with
"mp". Shutdown kills the actors and removes the placement group.
"""

from __future__ import annotations

import contextlib
from typing import Any

from paged_attention.distributed.executor import TPExecutor, WorkerError
from paged_attention.distributed.worker import PoolSpec, Rendezvous, Worker, WorkerSpec


class RayWorker:
    """The actor: builds its `Worker` in `load`, joins in `setup`, then `run`s."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.worker: Worker | None = None

    def load(self) -> tuple[int, int]:
        import os

        self.worker = Worker(self.spec)
        return self.worker.weight_bytes, os.getpid()

    def setup(self, pools: PoolSpec, rendezvous: Rendezvous) -> None:
        assert self.worker is not None, "load first"
        self.worker.init_pools(pools)
        self.worker.connect(rendezvous)

    def run(self) -> None:
        assert self.worker is not None, "load first"
        self.worker.run()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray: pip install 'paged-attention[ray]'"
        ) from None
    return ray


class RayExecutor(TPExecutor):
    def _start_workers(self) -> None:
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init()
        self.host = ray.util.get_node_ip_address()
        gpu = self.specs[0].device == "cuda"
        bundles = [{"GPU": 1, "CPU": 1} if gpu else {"CPU": share.threads} for share in self.shares]
        self._pg = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=self.timeout_s)
        if not ready:
            raise WorkerError(
                f"Ray could not reserve {bundles} for {self.world_size} tensor-parallel ranks within "
                f"{self.timeout_s:g} s (cluster resources: {ray.cluster_resources()})"
            )
        actor = ray.remote(RayWorker)
        self._actors = [
            actor.options(
                num_cpus=bundles[spec.rank].get("CPU", 1),
                num_gpus=1 if gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=spec.rank
                ),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(spec.share.threads)}},
            ).remote(spec)
            for spec in self.specs
        ]
        self._pending = [a.load.remote() for a in self._actors]
        self._loops: list[Any] = []
        self._pids: list[int] = []

    def _wait_all(self, what: str, timeout_s: float) -> list[Any]:
        ray = _import_ray()
        try:
            results = ray.get(self._pending, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"tensor-parallel Ray workers were not {what} within {timeout_s:g} s") from None
        except ray.exceptions.RayError as err:
            raise WorkerError(f"a tensor-parallel Ray worker failed before it was {what}: {err}") from None
        if what == "loaded":
            self._pids = [pid for _, pid in results]
            return [weight_bytes for weight_bytes, _ in results]
        # Joined: each actor now runs its step loop until told to stop.
        self._loops = [a.run.remote() for a in self._actors]
        return results

    def _send_setup(self, pools: PoolSpec, rendezvous: Rendezvous) -> None:
        self._pending = [a.setup.remote(pools, rendezvous) for a in self._actors]

    def _dead(self) -> list[str]:
        if not self._loops:
            return []
        ray = _import_ray()
        ended, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0)
        dead = []
        for spec, pid, loop in zip(self.specs, self._pids, self._loops):
            if loop in ended:
                try:
                    ray.get(loop)
                    reason = "its step loop ended"
                except ray.exceptions.RayError as err:
                    reason = type(err).__name__
                dead.append(f"rank {spec.rank} (Ray actor, pid {pid}, {reason})")
        return dead

    def _stop_workers(self, grace_s: float) -> None:
        if not hasattr(self, "_actors"):
            return
        ray = _import_ray()
        from ray.util.placement_group import remove_placement_group

        if self._loops and grace_s > 0:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.wait(self._loops, num_returns=len(self._loops), timeout=grace_s)
        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self._pg)
        self._actors = []
        self._loops = []

    def worker_pids(self) -> list[int]:
        return list(self._pids)
