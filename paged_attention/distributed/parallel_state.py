"""One rank's view of its tensor-parallel group: rank, size, the process groups,
and the few collectives the model and the step loop need, each counted (calls,
bytes, seconds) so a benchmark can split a step into compute and communication.

The groups are standalone torch.distributed backends built on a TCPStore the
driver hosts, not the process-wide default group: two engines (or a test's
engines one after another) in one process never collide. On the CPU one gloo
group carries everything; on CUDA the model's all-reduce and gather run on an
NCCL group (UNTESTED here: this machine has no GPUs) and the step metadata on gloo.

Timeouts: the driver's groups time out after `timeout_s` (a hung or dead worker
becomes an error, not a hang); a worker's wait for the next step has no useful
bound (an idle server sends none), so its groups use a very long timeout and a
worker notices a dead driver by its closed connection instead.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from paged_attention.distributed.sharding import TPLayout

if TYPE_CHECKING:
    from paged_attention.model.config import ModelConfig

# A worker's collectives wait this long: in practice, for as long as the driver lives.
WORKER_WAIT = timedelta(days=30)


@dataclass
class CommStats:
    """What one rank sent through collectives. Bytes are payloads (a tensor's
    size), not wire traffic: a ring all-reduce moves 2 (N-1)/N of that per rank."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_reduce_s: float = 0.0
    broadcast_calls: int = 0
    broadcast_bytes: int = 0
    broadcast_s: float = 0.0
    gather_calls: int = 0
    gather_bytes: int = 0
    gather_s: float = 0.0

    def copy(self) -> CommStats:
        return dataclasses.replace(self)

    def minus(self, before: CommStats) -> CommStats:
        return CommStats(
            **{f.name: getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)}
        )

    @property
    def total_bytes(self) -> int:
        return self.all_reduce_bytes + self.broadcast_bytes + self.gather_bytes

    @property
    def total_s(self) -> float:
        return self.all_reduce_s + self.broadcast_s + self.gather_s


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ParallelContext:
    """Rank `rank` of a tensor-parallel group of `size` ranks (rank 0 is the
    driver: it schedules, samples and sends each step to the others)."""

    def __init__(self, rank: int, size: int, *, shard_vocab: bool = True) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank}")
        self.rank = rank
        self.size = size
        self.shard_vocab = shard_vocab  # embedding and LM head split by vocabulary, else replicated
        self.stats = CommStats()
        self._cpu_group: Any = None  # gloo: step metadata and (on the CPU) everything
        self._device_group: Any = None  # the model's collectives
        self._device = torch.device("cpu")
        # Collectives happen only inside a step every rank runs; the driver
        # sets this around its own part (workers are always in one).
        self.in_step = not self.is_driver

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def connected(self) -> bool:
        return self._cpu_group is not None

    def layout(self, config: ModelConfig) -> TPLayout:
        return TPLayout(config, self.size, self.rank, self.shard_vocab)

    # ------------------------------------------------------------- lifecycle
    def connect(self, store: dist.Store, device: torch.device, timeout_s: float) -> None:
        """Join the group (a collective: every rank calls it). `timeout_s`
        bounds the driver's waits; workers wait as long as the driver lives."""
        timeout = timedelta(seconds=timeout_s) if self.is_driver else WORKER_WAIT
        self._device = device
        self._cpu_group = dist.ProcessGroupGloo(
            dist.PrefixStore("tp/gloo/", store), self.rank, self.size, timeout
        )
        if device.type == "cuda":
            nccl: Any = dist.ProcessGroupNCCL  # only in CUDA builds of torch
            self._device_group = nccl(
                dist.PrefixStore("tp/nccl/", store), self.rank, self.size, nccl.Options()
            )
        else:
            self._device_group = self._cpu_group

    def close(self) -> None:
        self._cpu_group = self._device_group = None

    # ----------------------------------------------------- model collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        began = time.perf_counter()
        self._device_group.allreduce([t]).wait()
        self.stats.all_reduce_calls += 1
        self.stats.all_reduce_bytes += _bytes(t)
        self.stats.all_reduce_s += time.perf_counter() - began
        return t

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Embedding lookup with `weight` this rank's rows: with a vocabulary
        split, each rank looks up the ids it owns (zeros for the others) and
        one all-reduce assembles the rows (exact: one term is non-zero)."""
        if not self.shard_vocab:
            return F.embedding(ids, weight)
        local = ids - self.rank * weight.shape[0]
        outside = (local < 0) | (local >= weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(x)

    def lm_head(self, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits [N, vocab_size] on the driver (an empty [0, vocab_size] on
        workers): each rank's vocabulary slice, gathered; or, with a replicated
        head, the driver's product alone (workers skip it)."""
        if not self.shard_vocab:
            return F.linear(hidden, weight) if self.is_driver else hidden.new_empty((0, vocab_size))
        if not self.in_step:
            # The workers are waiting for a step, not for this gather.
            raise ValueError(
                "logits outside a step (prompt_logprobs) are not supported with tensor_parallel_size > 1"
            )
        local = F.linear(hidden, weight).contiguous()
        began = time.perf_counter()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.is_driver:
            parts = [torch.empty_like(local) for _ in range(self.size)]
            self._device_group.gather([parts], [local], opts).wait()
            logits = torch.cat(parts, dim=1)[:, :vocab_size]
        else:
            self._device_group.gather([], [local], opts).wait()
            logits = hidden.new_empty((0, vocab_size))
        self.stats.gather_calls += 1
        self.stats.gather_bytes += _bytes(local)
        self.stats.gather_s += time.perf_counter() - began
        return logits

    # ------------------------------------------------------ step metadata
    def broadcast_object(self, obj: Any = None) -> Any:
        """The driver's `obj` on every rank (pickled: a length, then the bytes)."""
        began = time.perf_counter()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if self.is_driver:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            length = torch.tensor([len(data)], dtype=torch.int64)
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._cpu_group.broadcast([length], opts).wait()
        if not self.is_driver:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._cpu_group.broadcast([payload], opts).wait()
        if not self.is_driver:
            obj = pickle.loads(payload.numpy().tobytes())
        self.stats.broadcast_calls += 1
        self.stats.broadcast_bytes += 8 + payload.numel()
        self.stats.broadcast_s += time.perf_counter() - began
        return obj

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on the driver (None on workers).
        Only for rare control calls: two all-gathers (lengths, then the
        pickled objects padded to the longest)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        length = torch.tensor([len(data)], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._cpu_group.allgather([lengths], [length]).wait()
        longest = max(int(n.item()) for n in lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        self._cpu_group.allgather([parts], [mine]).wait()
        if not self.is_driver:
            return None
        return [pickle.loads(p[: int(n.item())].numpy().tobytes()) for p, n in zip(parts, lengths)]
