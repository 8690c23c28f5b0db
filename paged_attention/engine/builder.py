"""Assemble an engine: resolve the model, load weights and tokenizer, size the
KV pool, and wire allocator, scheduler, runner and engine together."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from paged_attention.config import EngineConfig, parse_bytes
from paged_attention.core.block_pool import BlockPool
from paged_attention.core.scheduler import Scheduler
from paged_attention.core.swap import SwapManager
from paged_attention.engine.cuda_graphs import maybe_decode_graphs
from paged_attention.engine.host_malloc import release_free_memory
from paged_attention.engine.llm_engine import LLMEngine
from paged_attention.engine.model_runner import ModelRunner
from paged_attention.engine.preemption_cost import (
    PreemptionCostModel,
    measure_copy_bandwidth,
)
from paged_attention.engine.resolve import (
    Numerics,
    available_memory_bytes,
    quantized_numerics,
    resolve_device,
    resolve_dtype,
)
from paged_attention.kv_cache import KVCachePool
from paged_attention.model.config import ModelConfig
from paged_attention.tokenizer import Tokenizer

if TYPE_CHECKING:
    from paged_attention.distributed.executor import TPExecutor

logger = logging.getLogger("paged_attention")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STORIES260K = ASSETS / "stories260K"
DEFAULT_MODEL_ASSETS = ASSETS / "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    weights: Path  # a folder with safetensors, or a .gguf file
    tokenizer_dir: Path  # where config.json and the tokenizer files live
    # A bare .gguf (no config.json / tokenizer files beside it) carries both in
    # its metadata: None here means "read it from the GGUF".
    config_dir: Path | None = None
    tokenizer_gguf: str | None = None  # file name in tokenizer_dir to read the tokenizer from


def resolve_model(model: str | Path | None) -> ModelSource:
    """None -> the default SmolLM2 GGUF with its shipped config and tokenizer."""
    if model is None:
        from paged_attention.model.gguf import default_gguf_path

        return ModelSource(default_gguf_path(), DEFAULT_MODEL_ASSETS, DEFAULT_MODEL_ASSETS)
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass a model folder")
        folder = path.parent
        config_dir = folder if (folder / "config.json").is_file() else None
        has_tokenizer = any(folder.glob("tokenizer*.json")) or (folder / "tokenizer.model").is_file()
        return ModelSource(path, folder, config_dir, None if has_tokenizer else path.name)
    return ModelSource(path, path, path)


@dataclass(frozen=True)
class PoolPlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    max_model_len: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        return self.num_tokens / self.max_model_len


def plan_pool(
    config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> PoolPlan:
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    bs = config.block_size
    per_block = bs * KVCachePool.bytes_per_token_for(
        model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, dtype
    )
    blocks_per_seq = -(-max_model_len // bs)
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif config.kv_cache_memory is not None:
        num_blocks = parse_bytes(config.kv_cache_memory) // per_block
    else:
        available = available_memory_bytes(device)
        if device.type == "cuda":
            # Headroom for activations and captured graphs, which come later.
            budget = int(available * config.gpu_memory_utilization) - 2**30
        else:
            # Tensor-parallel ranks on one CPU share its RAM: each takes its part.
            budget = int(available * config.cpu_kv_memory_fraction) // config.tensor_parallel_size
        # No more than max_num_seqs full-length sequences could ever use.
        num_blocks = min(budget // per_block, config.max_num_seqs * blocks_per_seq)
    if num_blocks < blocks_per_seq:
        fits = num_blocks * bs
        raise ValueError(
            f"KV pool of {num_blocks} blocks ({fits} tokens) cannot hold one sequence of "
            f"max_model_len={max_model_len} tokens; set max_model_len <= {fits} or give the "
            f"pool at least {blocks_per_seq} blocks ({blocks_per_seq * per_block} bytes)"
        )
    return PoolPlan(num_blocks, bs, per_block, max_model_len)


def build_engine(model: str | Path | None, config: EngineConfig) -> LLMEngine:
    source = resolve_model(model)
    device = resolve_device(config.device)
    from paged_attention.model.quant.scheme import quantization_for_engine

    quantization = quantization_for_engine(
        config.quantization,
        weights=source.weights,
        device_type=device.type,
        dtype_option=config.dtype,
        tensor_parallel=config.tensor_parallel_size > 1,
    )
    numerics = quantized_numerics(config.dtype, resolve_dtype(config.dtype, device), quantization, device)
    torch.manual_seed(config.seed)
    if config.tensor_parallel_size == 1:
        engine = _assemble(source, config, device, numerics, None)
        if device.type == "cpu":
            release_free_memory()  # loading's freed temporaries: 31 MiB of a 390 MiB start
        return engine
    # Tensor parallel: the workers load their shards while this process (rank 0) loads its own.
    from paged_attention.distributed.driver import start_executor

    executor = start_executor(config, source.weights, source.config_dir, device, numerics)
    try:
        return _assemble(source, config, device, numerics, executor)
    except BaseException:
        executor.shutdown()
        raise


def _assemble(
    source: ModelSource,
    config: EngineConfig,
    device: torch.device,
    numerics: Numerics,
    executor: TPExecutor | None,
) -> LLMEngine:
    from paged_attention.model.loader import load_model

    tp = None if executor is None else executor.tp
    dtype, kv_dtype, quantization = numerics.dtype, numerics.kv_dtype, numerics.quantization
    net, model_config = load_model(
        source.weights,
        dtype=dtype,
        device=device,
        config=source.config_dir,
        tp=tp,
        quantization=quantization,
        attention_backend=config.attention_backend,
    )
    shard_config = net.config  # under tensor parallelism: this rank's heads (its pool's)
    tokenizer = Tokenizer.load(source.tokenizer_dir, gguf_file=source.tokenizer_gguf)
    plan = plan_pool(config, shard_config, kv_dtype, device)
    # On the CPU the pool is ordinary RAM whose pages become resident when first
    # written: handing freed blocks out again before never-used ones keeps the
    # process at the KV it actually needs (a 128-request server run grew to
    # 2.2-2.4 GiB in FIFO order). Cached prefix blocks are evictable, not
    # freed, so this order does not shorten their life.
    allocator = BlockPool(
        plan.num_blocks,
        plan.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        reuse_recent_first=device.type == "cpu",
    )
    kv_cache = KVCachePool(
        shard_config.num_layers,
        plan.num_blocks,
        plan.block_size,
        shard_config.num_kv_heads,
        shard_config.head_dim,
        kv_dtype,
        device,
    )
    logger.info(
        "KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB (%s); max_model_len %d, "
        "%.1f full-length sequences fit",
        plan.num_blocks,
        plan.block_size,
        plan.num_tokens,
        plan.num_blocks * plan.bytes_per_block / 2**20,
        kv_dtype,
        plan.max_model_len,
        plan.max_concurrency,
    )
    max_batched = config.max_num_batched_tokens or max(8192, plan.max_model_len)
    host_cache, swapper, cost_model = build_swap_space(
        config, plan, shard_config, kv_dtype, device, allocator, kv_cache, net
    )
    scheduler = Scheduler(
        allocator,
        config.max_num_seqs,
        max_batched,
        swapper=swapper,
        preemption_mode=config.preemption_mode,
        cost_model=cost_model,
        preemption_victim=config.preemption_victim,
    )
    runner: ModelRunner
    if executor is None:
        graphs = maybe_decode_graphs(
            net, kv_cache, net.attn_backend, config.max_num_seqs, plan.max_model_len, config.enforce_eager
        )
        runner = ModelRunner(net, kv_cache, host_cache, graphs)
    else:
        from paged_attention.distributed.driver import connect_driver

        runner = connect_driver(executor, net, kv_cache, host_cache)
    eos = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return LLMEngine(
        runner,
        kv_cache,
        allocator,
        scheduler,
        tokenizer,
        frozenset(eos),
        plan.max_model_len,
        model_config.vocab_size,
        seed=config.seed,
        cost_model=cost_model,
        record_step_stats=config.record_step_stats,
    )


def host_pool_blocks(swap_space_gib: float, plan: PoolPlan) -> int:
    """Blocks of the host pool: what `swap_space` GiB holds, but never more than
    the device pool's blocks, since only blocks on the device can be swapped
    out (and a shared block is swapped once). A few GiB for a small model would
    otherwise be hundreds of thousands of blocks no step could ever fill."""
    return min(int(swap_space_gib * 2**30) // plan.bytes_per_block, plan.num_blocks)


def build_swap_space(
    config: EngineConfig,
    plan: PoolPlan,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    allocator: BlockPool,
    kv_cache: KVCachePool,
    net: torch.nn.Module,
):
    """The host block pool for swapping (None when swap_space is 0 or preemption
    is recompute-only), with the cost model that prices swap against recompute."""
    host_blocks = host_pool_blocks(config.swap_space, plan)
    if host_blocks < 1 or config.preemption_mode == "recompute":
        return None, None, None
    # Pinned host memory lets CUDA copies run asynchronously; on the CPU both
    # pools are ordinary RAM and the same code path runs.
    host_cache = KVCachePool(
        model_config.num_layers,
        host_blocks,
        plan.block_size,
        model_config.num_kv_heads,
        model_config.head_dim,
        dtype,
        "cpu",
        pin_memory=device.type == "cuda",
    )
    swapper = SwapManager(
        allocator,
        BlockPool(host_blocks, plan.block_size, enable_prefix_caching=False, reuse_recent_first=True),
    )
    cost_model = PreemptionCostModel(
        bytes_per_block=plan.bytes_per_block,
        copy_bytes_per_s=measure_copy_bandwidth(kv_cache, host_cache),
    )
    logger.info(
        "swap space: %d host blocks, %.1f MiB (of %.1f GiB asked, capped at the device "
        "pool's %d blocks); measured copy %.2f GB/s",
        host_blocks,
        host_blocks * plan.bytes_per_block / 2**20,
        config.swap_space,
        plan.num_blocks,
        cost_model.copy_bytes_per_s / 1e9,
    )
    return host_cache, swapper, cost_model
