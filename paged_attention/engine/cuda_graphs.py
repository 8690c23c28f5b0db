"""Decode steps replayed from CUDA graphs.

UNTESTED ON A GPU. Written against `ModelRunner` and the Triton attention
backend on a machine without one; only the CPU-side logic (sizes, padding,
when graphs apply) is covered by tests. `benchmarks/gpu_bench.py` is the first
thing to run on a GPU (its end-to-end section runs the engine with and
without `enforce_eager`).

Why: a decode step of a small model is a few hundred small kernels, and
launching them from Python costs more than running them. A graph captured
once per padded batch size replays them all with one launch.

How: decode-only steps of up to `max(capture sizes)` sequences are padded to
the next capture size. Every tensor the graph reads lives in a static buffer
that `run` fills before each replay: token ids, positions, slots, block tables,
context lengths. Padding rows get slot -1 (the Triton write kernel skips it)
and context length 0 (the decode kernel outputs zeros), so they touch no
real cache block. A size is captured lazily, the first time a step needs it,
so start-up pays nothing and sizes never used are never captured. The split
count of the decode kernel is fixed per size (it depends on the batch size
only, never on context lengths, which change between replays). Prefill and
mixed steps always run eagerly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from paged_attention.attention.backend import AttentionBackend, KernelMetadata
from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.kv_cache import KVCachePool

# vLLM's choice: fine steps where batches are small and padding would cost
# most, coarser above, capped where eager launch overhead no longer dominates.
MAX_CAPTURE_SIZE = 256


def capture_sizes(max_num_seqs: int, largest: int = MAX_CAPTURE_SIZE) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every 16, up to min(max_num_seqs, largest)."""
    cap = min(max_num_seqs, largest)
    base = [1, 2, 4, 8, *range(16, largest + 1, 16)]
    return sorted({s for s in base if s <= cap} | {cap})


def padded_size(sizes: list[int], num_seqs: int) -> int | None:
    """The smallest capture size >= num_seqs (sizes ascending), or None."""
    at = bisect.bisect_left(sizes, num_seqs)
    return sizes[at] if at < len(sizes) else None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [size, hidden]: the graph's output buffer
    meta: AttentionMetadata  # kept alive: it holds the static slot_mapping view


class DecodeCudaGraphs:
    """Replays decode steps from CUDA graphs; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCachePool,
        backend: AttentionBackend,
        max_num_seqs: int,
        max_model_len: int,
        sizes: list[int] | None = None,
    ) -> None:
        if backend.pin is None:
            raise ValueError(f"CUDA graphs need the triton attention backend, not {backend.name!r}")
        if kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA KV pool, not {kv_cache.device}")
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        device, biggest = kv_cache.device, self.sizes[-1]
        self.device = device
        self.input_ids = torch.zeros(biggest, dtype=torch.long, device=device)
        self.positions = torch.zeros(biggest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((biggest,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(biggest, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(biggest, dtype=torch.int32, device=device)
        self.query_start = torch.arange(biggest + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._pool: Any = None  # one memory pool shared by every captured size (an opaque handle)

    # ---------------------------------------------------------------- policy
    def padded_size(self, num_seqs: int) -> int | None:
        """The capture size a batch of num_seqs pads to, or None (too big)."""
        return padded_size(self.sizes, num_seqs)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.num_seqs > 0
            and meta.is_decode_only
            and self.padded_size(meta.num_seqs) is not None
            and max(len(t) for t in meta.block_tables) <= self.max_blocks
        )

    # ------------------------------------------------------------------- run
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's final hidden states [B, hidden] for a decode step that
        `can_run`. The result is a view of the graph's output buffer: valid
        until the next `run`."""
        size = self.padded_size(meta.num_seqs)
        assert size is not None and meta.is_decode_only, "run() needs a step that can_run()"
        self._stage(input_ids, positions, meta, size)
        captured = self._graphs.get(size)
        if captured is None:
            captured = self._capture(size)
        captured.graph.replay()
        return captured.hidden[: meta.num_seqs]

    def _stage(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int
    ) -> None:
        n = meta.num_seqs
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        # Padding rows: write nothing, attend to nothing. Earlier, larger steps
        # may have left real values there.
        self.slot_mapping[n:size].fill_(-1)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        width = max(len(t) for t in meta.block_tables)
        host = torch.zeros(n, width + 1, dtype=torch.int32)  # [n, table | context length]
        for i, table in enumerate(meta.block_tables):
            host[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        host[:, width] = torch.tensor(meta.context_lens, dtype=torch.int32)
        staged = host.pin_memory().to(self.device, non_blocking=True)
        # Only the first `width` columns: entries past a row's context are never read.
        self.block_tables[:n, :width].copy_(staged[:, :width])
        self.context_lens[:n].copy_(staged[:, width])
        self.context_lens[n:size].zero_()

    def _capture(self, size: int) -> _Captured:
        meta = AttentionMetadata(
            query_lens=[1] * size,
            context_lens=[0] * size,  # unused: the kernels read context_lens below
            query_start=list(range(size + 1)),
            context_start=[0] * (size + 1),
            slot_mapping=self.slot_mapping[:size],
            context_slots=torch.empty(0, dtype=torch.long, device=self.device),
            block_size=self.kv_cache.block_size,
            block_tables=[[] for _ in range(size)],
        )
        assert self.backend.pin is not None
        self.backend.pin(
            meta,
            KernelMetadata(
                block_tables=self.block_tables[:size],
                context_lens=self.context_lens[:size],
                query_start=self.query_start[: size + 1],
                max_query_len=1,
                max_context_len=None,  # split count from the batch size alone
            ),
        )
        args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
        # Warm up on a side stream (as torch.cuda.graphs asks): compiles the
        # Triton kernels and lets cuBLAS choose algorithms outside the capture.
        # The buffers already hold this step's inputs, so the warm-up writes the
        # same K/V the replay will: harmless.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.model(*args)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.model(*args)
        self._pool = graph.pool()
        captured = _Captured(graph, hidden, meta)
        self._graphs[size] = captured
        return captured


def maybe_decode_graphs(
    model: torch.nn.Module,
    kv_cache: KVCachePool,
    backend: AttentionBackend,
    max_num_seqs: int,
    max_model_len: int,
    enforce_eager: bool,
) -> DecodeCudaGraphs | None:
    """Graphs where they can run (a CUDA pool and the Triton backend) and are
    wanted (`enforce_eager=False`); None means every step runs eagerly."""
    if enforce_eager or kv_cache.device.type != "cuda" or backend.pin is None:
        return None
    return DecodeCudaGraphs(model, kv_cache, backend, max_num_seqs, max_model_len)
