"""Engine settings: one dataclass, validated on construction, plus the resolvers
that turn "auto" into a concrete device, dtype and KV pool size."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float": torch.float32}


# The environment variable the HTTP server reads its API key from.
API_KEY_ENV = "PAGED_ATTENTION_API_KEY"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/paged_attention`, else `~/.cache/paged_attention` (read at call time)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paged_attention"


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512 MB', '1.5g' or a plain integer -> bytes."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"memory size must be >= 1 byte, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; use bytes or e.g. '2GiB', '512MB'")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"memory size must be >= 1 byte, got {value!r}")
    return size


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 where the hardware runs it fast (CUDA with bf16, CPUs with
    AVX512-BF16/AMX: measured 4-6x faster matmuls than float32), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def available_memory_bytes(device: torch.device) -> int:
    """Free device memory now (CUDA) or MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked for; `None` means "derive it"."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(8192, max_model_len)
    max_model_len: int | None = None  # default: the model's max positions
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    seed: int = 0
    swap_space: float = 4.0  # GiB of host memory for swapped-out blocks; 0 disables swapping
    preemption_mode: str = "auto"  # "swap" | "recompute" | "auto" (cheaper by measured cost)
    enforce_eager: bool = False  # CUDA: never replay captured decode graphs
    enable_prefix_caching: bool = True  # reuse cached full blocks of earlier prompts
    # On the CPU, without an explicit size, the pool takes at most this share of
    # available RAM (and no more than max_num_seqs full-length sequences need).
    cpu_kv_memory_fraction: float = 0.25
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        from paged_attention.core.block_allocator import validate_block_size

        validate_block_size(self.block_size)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not self.swap_space >= 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.preemption_mode not in ("swap", "recompute", "auto"):
            raise ValueError(
                f"preemption_mode must be 'swap', 'recompute' or 'auto', got {self.preemption_mode!r}"
            )
        for name in ("cpu_kv_memory_fraction", "gpu_memory_utilization"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
