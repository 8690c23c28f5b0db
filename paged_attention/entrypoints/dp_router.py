"""Data-parallel replicas behind one OpenAI endpoint (`serve --data-parallel-size N`).

N engines, each with its own copy of the model and its own KV pool, each driven
by its own `AsyncEngine` thread in this process (the forward passes run in
torch, outside the GIL). `DataParallelEngine` stands in for one AsyncEngine in
the server and sends each request to one replica, chosen by `PrefixRouter`:

1. the replica that already holds the longest cached full-block prefix of the
   request's prompts (`BlockPool.lookup` on each replica's pool; plus the
   prefixes of requests it was sent that may not be cached yet, so a burst
   sharing a new system prompt lands together), unless that replica has
   `max_imbalance` more requests in flight than the least loaded one;
2. else the least loaded replica (running + waiting + not yet admitted),
   ties taken in turn.

Reading another thread's pool: `lookup` only reads dicts (atomic under the GIL)
and a stale answer only makes a routing choice worse, never a result wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from paged_attention.core.prefix_cache import hash_block

if TYPE_CHECKING:
    from paged_attention.engine.llm import LLM
    from paged_attention.engine.llm_engine import LLMEngine
    from paged_attention.entrypoints.async_engine import AsyncEngine, EngineLoad, FinishHook

T = TypeVar("T")
# A request sent to a replica counts as cached there (before its blocks are)
# for this many of its most recent block hashes per replica.
RECENT_BLOCKS = 8192


class PrefixLookup(Protocol):
    block_size: int

    def lookup(self, token_ids: Sequence[int]) -> list[int]: ...


@dataclass(frozen=True)
class Route:
    replica: int
    cached_blocks: int  # the prompts' full blocks the replica holds (or was just sent)
    by_prefix: bool  # chosen for its cache, not its load


class PrefixRouter:
    """Chooses a replica per request; counts its choices (`routed`, `by_prefix`)."""

    def __init__(self, pools: Sequence[PrefixLookup], *, max_imbalance: int = 16) -> None:
        if not pools:
            raise ValueError("a router needs at least 1 replica, got 0")
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.pools = list(pools)
        self.max_imbalance = max_imbalance
        self.routed = [0] * len(pools)
        self.by_prefix = [0] * len(pools)
        self._recent: list[OrderedDict[int, None]] = [OrderedDict() for _ in pools]
        self._turn = 0

    def choose(self, prompts: Sequence[Sequence[int]], loads: Sequence[int]) -> Route:
        """The replica for a request with these prompts, given each replica's load."""
        n = len(self.pools)
        if len(loads) != n:
            raise ValueError(f"got {len(loads)} loads for {n} replicas")
        chains = [self._chain(p) for p in prompts]
        cached = [sum(self._cached_blocks(i, p, c) for p, c in zip(prompts, chains)) for i in range(n)]
        least = min(range(n), key=lambda i: (loads[i], (i - self._turn) % n))
        best = max(range(n), key=lambda i: (cached[i], -loads[i], -((i - self._turn) % n)))
        by_prefix = cached[best] > 0 and loads[best] - loads[least] <= self.max_imbalance
        choice = best if by_prefix else least
        if not by_prefix:
            self._turn = (choice + 1) % n
        self.routed[choice] += 1
        self.by_prefix[choice] += by_prefix
        recent = self._recent[choice]
        for chain in chains:
            for h in chain:
                recent[h] = None
                recent.move_to_end(h)
        while len(recent) > RECENT_BLOCKS:
            recent.popitem(last=False)
        return Route(choice, cached[choice], by_prefix)

    def _chain(self, prompt: Sequence[int]) -> list[int]:
        """Hashes of the prompt's full blocks (the last token always left out,
        as `BlockPool.lookup` does), chained as the pools chain them."""
        bs = self.pools[0].block_size
        out: list[int] = []
        parent: int | None = None
        for b in range((len(prompt) - 1) // bs):
            parent = hash_block(parent, tuple(prompt[b * bs : (b + 1) * bs]))
            out.append(parent)
        return out

    def _cached_blocks(self, replica: int, prompt: Sequence[int], chain: list[int]) -> int:
        try:
            in_pool = len(self.pools[replica].lookup(prompt))
        except RuntimeError:  # the engine thread resized a dict mid-read: ask again next time
            in_pool = 0
        recent = self._recent[replica]
        sent = next((i for i, h in enumerate(chain) if h not in recent), len(chain))
        return max(in_pool, sent)


# ------------------------------------------------------------------ merging
_SAME = ("block_size", "bytes_per_block")
_MEAN = ("prefix_cache_hit_rate",)


def merge_memory_stats(stats: Sequence[Mapping[str, int | float]]) -> dict[str, int | float]:
    """One `memory_stats()` for all replicas: counts summed, KV usage over the
    summed pools, sizes per block kept, hit rates averaged."""
    merged: dict[str, int | float] = {}
    for key in stats[0]:
        values = [s[key] for s in stats if key in s]
        if key in _SAME:
            merged[key] = values[0]
        elif key in _MEAN:
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = sum(values)
    if merged.get("num_blocks"):
        merged["kv_cache_usage"] = merged.get("num_used_blocks", 0) / merged["num_blocks"]
    merged["num_replicas"] = len(stats)
    return merged


def merge_loads(loads: Sequence[EngineLoad]) -> EngineLoad:
    """One EngineLoad for all replicas (every count summed)."""
    sums: dict[str, Any] = {"memory": merge_memory_stats([load.memory for load in loads])}
    for f in dataclasses.fields(loads[0]):
        if f.name != "memory":
            sums[f.name] = sum(getattr(load, f.name) for load in loads)
    return dataclasses.replace(loads[0], **sums)


def _busy(load: EngineLoad) -> int:
    return load.num_running + load.num_waiting


# ------------------------------------------------------------------ the engine
class DataParallelEngine:
    """N `AsyncEngine`s as one: the server's engine when it serves replicas.
    A request (all its prompts) goes to the replica `router` picks."""

    def __init__(self, engines: Sequence[AsyncEngine], router: PrefixRouter) -> None:
        if len(engines) != len(router.pools):
            raise ValueError(f"got {len(engines)} engines for a router over {len(router.pools)} pools")
        self.engines = list(engines)
        self.router = router
        self.max_model_len = engines[0].max_model_len
        self.vocab_size = engines[0].vocab_size

    @classmethod
    def from_llms(
        cls, llms: Sequence[LLM], *, on_finished: FinishHook | None = None, max_imbalance: int = 16
    ) -> DataParallelEngine:
        from paged_attention.entrypoints.async_engine import AsyncEngine

        engines = [AsyncEngine(llm.engine, on_finished=on_finished) for llm in llms]
        router = PrefixRouter([llm.engine.allocator for llm in llms], max_imbalance=max_imbalance)
        return cls(engines, router)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def stop(self) -> None:
        await asyncio.gather(*(engine.stop() for engine in self.engines))

    @property
    def is_running(self) -> bool:
        return all(engine.is_running for engine in self.engines)

    @property
    def died(self) -> BaseException | None:
        return next((e.died for e in self.engines if e.died is not None), None)

    def stalled_for(self) -> float:
        return max(engine.stalled_for() for engine in self.engines)

    # ------------------------------------------------------------- requests
    def validate_prompt(self, prompt_token_ids: list[int], params: Any) -> None:
        self.engines[0].validate_prompt(prompt_token_ids, params)

    def route(self, prompts: Sequence[Any]) -> Route:
        loads = [_busy(engine.load()) for engine in self.engines]
        return self.router.choose([p.token_ids for p in prompts], loads)

    def submit(self, prompts: Sequence[Any], params: Any, **options: Any) -> Any:
        """The chosen replica's `submit` (its Submission aborts on that replica).
        `max_waiting` is then that replica's limit."""
        return self.engines[self.route(prompts).replica].submit(prompts, params, **options)

    def fail_all(self, error: Any) -> int:
        return sum(engine.fail_all(error) for engine in self.engines)

    async def call(self, fn: Callable[[LLMEngine], T]) -> Any:
        """fn on every replica's engine thread. Memory stats (dicts) come back
        merged; anything else as replica 0's result."""
        results = await asyncio.gather(*(engine.call(fn) for engine in self.engines))
        if all(isinstance(r, Mapping) for r in results):
            return merge_memory_stats(results)
        return results[0]

    def load(self) -> EngineLoad:
        return merge_loads([engine.load() for engine in self.engines])


def build_replicas(model: str | None, options: Mapping[str, Any], size: int) -> list[LLM]:
    """`size` engines with the same options. Without a pool size on the CPU,
    replicas share its RAM: each takes 1/size of the KV share one would."""
    from paged_attention.config import EngineConfig
    from paged_attention.engine.llm import LLM

    if size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {size}")
    options = dict(options)
    if size > 1 and options.get("num_kv_blocks") is None and options.get("kv_cache_memory") is None:
        share = options.get("cpu_kv_memory_fraction", EngineConfig.cpu_kv_memory_fraction)
        options["cpu_kv_memory_fraction"] = share / size
    replicas: list[LLM] = []
    try:
        for _ in range(size):
            replicas.append(LLM(model, **options))
    except BaseException:
        for llm in replicas:
            llm.shutdown()
        raise
    return replicas
