"""Rank 0 of a tensor-parallel engine: the model runner that sends each step
to the workers before running its own shard, and the builder's entry points
(start the executor; connect it once the pool is planned).

The driver runs in the engine's process. It owns the one scheduler and the one
BlockPool, samples from the gathered logits, and is the only rank that sees
requests: the workers see block ids and token ids, one `StepInput` a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from paged_attention.distributed.executor import TPExecutor, make_executor
from paged_attention.distributed.sharding import check_tensor_parallel
from paged_attention.distributed.worker import CoreShare, PoolSpec, WorkerInfo, WorkerSpec
from paged_attention.engine.model_runner import ModelRunner, StepInput
from paged_attention.kv_cache import KVCachePool

if TYPE_CHECKING:
    from paged_attention.config import EngineConfig
    from paged_attention.engine.resolve import Numerics
    from paged_attention.model.llama import CausalLM

# Embedding and LM head split by vocabulary (each rank ~1/N of them, one more
# all-reduce for the embedding and a gather of the logits), or replicated
# (False: every rank holds both whole; no collective for either, and only the
# driver computes logits). `bench` in this package measures both.
SHARD_VOCAB = True


class TPDriverRunner(ModelRunner):
    """A `ModelRunner` whose every step also runs on the workers."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCachePool,
        host_cache: KVCachePool | None,
        executor: TPExecutor,
    ) -> None:
        super().__init__(model, kv_cache, host_cache, None)  # no CUDA graphs under TP
        self.executor = executor

    def execute_step(self, step: StepInput) -> torch.Tensor:
        return self.executor.execute(step, lambda: self._run_local(step))

    def _run_local(self, step: StepInput) -> torch.Tensor:
        tp = self.executor.tp
        tp.in_step = True
        try:
            return super().execute_step(step)
        finally:
            tp.in_step = False

    def shutdown(self) -> None:
        self.executor.shutdown()

    def worker_info(self) -> list[WorkerInfo]:
        """Ranks 1..N-1: their heads, pools, weight bytes, steps run and traffic."""
        return self.executor.call("info")


def start_executor(
    config: EngineConfig,
    weights: Path,
    config_path: Path | None,
    device: torch.device,
    numerics: Numerics,
) -> TPExecutor:
    """Start the workers of a `config.tensor_parallel_size`-rank group: they
    load their shards (in `numerics`, as the caller resolved them) while the
    caller loads rank 0's."""
    scheme = numerics.quantization
    if weights.suffix == ".gguf" and not scheme.quantized:
        # Convert the GGUF once, here, so that every rank reads slices of the
        # float32 cache instead of each dequantizing the whole file.
        from paged_attention.model.gguf import load_gguf

        load_gguf(weights)
    size = config.tensor_parallel_size
    _check_split(weights, config_path, size)

    def spec(rank: int, share: CoreShare) -> WorkerSpec:
        return WorkerSpec(
            rank=rank,
            world_size=size,
            weights=str(weights),
            config_path=None if config_path is None else str(config_path),
            dtype=numerics.dtype,
            kv_dtype=numerics.kv_dtype,
            device=device.type,
            share=share,
            shard_vocab=SHARD_VOCAB,
            quantization=scheme,
            attention_backend=config.attention_backend,
        )

    executor = make_executor(config.distributed_executor_backend, size, spec, shard_vocab=SHARD_VOCAB)
    executor.start()
    return executor


def _check_split(weights: Path, config_path: Path | None, size: int) -> None:
    """Refuse a split the model cannot take before any worker starts (a bare
    GGUF, whose config is in its metadata, is checked when it loads)."""
    from paged_attention.model.config import ModelConfig
    from paged_attention.model.loader import CONFIG_FILE, read_json

    folder = weights if weights.is_dir() else weights.parent
    candidates = [] if config_path is None else [config_path, config_path / CONFIG_FILE]
    found = next((p for p in [*candidates, folder / CONFIG_FILE] if p.is_file()), None)
    if found is not None:
        check_tensor_parallel(ModelConfig.from_hf_config(read_json(found)), size)


def connect_driver(
    executor: TPExecutor,
    model: CausalLM,
    kv_cache: KVCachePool,
    host_cache: KVCachePool | None,
) -> TPDriverRunner:
    """Once the driver's pool is planned: wait for the workers' shards, give
    them the pool plan (same block ids, their own heads), join the group."""
    executor.wait_loaded()
    pools = PoolSpec(
        kv_cache.num_blocks, kv_cache.block_size, 0 if host_cache is None else host_cache.num_blocks
    )
    executor.connect(pools, kv_cache.device)
    return TPDriverRunner(model, kv_cache, host_cache, executor)
