"""Engine options, each defined once as a field of `EngineConfig` (default and
help text together), validated on construction.

`LLM(model, **options)` takes these fields as keywords, and the command line
generates its engine flags from them (`entrypoints/engine_args.py`). This
module does not import torch, so the CLI can parse arguments (and answer
--help) before torch loads; `engine/resolve.py` turns "auto" into a concrete
device, dtype and memory size."""

from __future__ import annotations

import difflib
import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paged_attention.core.scheduler import PREEMPTION_MODES, PREEMPTION_VICTIMS

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
# dtype names the engine accepts -> the torch attribute they name.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


# Weight formats (`quantization`): auto, none (dense float weights), gguf (a
# GGUF file's 4-bit blocks kept as they are), int8 (per output channel), int4
# (groups of 32 along the input; -gN picks another group size), and awq/gptq
# (Hugging Face checkpoints already packed in those formats, loaded as int4).
QUANTIZATION_CHOICES = (
    "auto",
    "none",
    "gguf",
    "int8",
    "int4",
    "int4-g32",
    "int4-g64",
    "int4-g128",
    "awq",
    "gptq",
)


# How tensor-parallel workers start (`distributed/executor.py`).
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")

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


def option(
    default: Any,
    help: str,
    *,
    type: Any = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """An engine option: a dataclass field whose metadata carries what the
    command line needs. `type` parses a flag's text (default: the default's
    type, else str); `cli=False` keeps an option off the command line."""
    return field(
        default=default,
        metadata={"help": help, "type": type, "choices": choices, "metavar": metavar, "cli": cli},
    )


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked for; `None` means "derive it"."""

    block_size: int = option(16, "tokens per KV block (a power of two)")
    num_kv_blocks: int | None = option(
        None, "KV pool size in blocks (default: from --kv-cache-memory, else from free memory)", type=int
    )
    kv_cache_memory: int | str | None = option(
        None, "KV pool budget, e.g. 2GiB (default: a share of free memory)", metavar="SIZE"
    )
    max_num_seqs: int = option(256, "most sequences running at once")
    max_num_batched_tokens: int | None = option(
        None, "token budget per step (default: max(8192, max_model_len))", type=int
    )
    max_model_len: int | None = option(
        None, "longest prompt + output in tokens (default: the model's max positions)", type=int
    )
    dtype: str | torch.dtype = option(
        "auto",
        "activation, weight and KV dtype: auto (bfloat16 where fast, else float32 on the CPU, "
        "but quantized weights compute in float32 with a bfloat16 KV pool and prompt matmuls "
        "where bfloat16 is fast; bfloat16 or float16 on CUDA), float32, bfloat16 or float16",
        choices=("auto", *DTYPE_NAMES),
        metavar="DTYPE",
    )
    device: str | torch.device = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    seed: int = option(0, "engine seed (sampling without a per-request seed)")
    swap_space: float = option(4.0, "GiB of host memory for swapped-out blocks; 0 disables swapping")
    preemption_mode: str = option(
        "auto",
        "how to free blocks under memory pressure: swap to host memory, recompute "
        "later, or auto (per victim, whichever the measured costs say is cheaper)",
        choices=PREEMPTION_MODES,
    )
    preemption_victim: str = option(
        "lowest_priority_least_computed",
        "which running request to preempt first, lowest priority "
        "first either way: the least computed (loses the least work) or the latest arrival "
        "(vLLM's order)",
        choices=PREEMPTION_VICTIMS,
    )
    enforce_eager: bool = option(False, "CUDA: never capture or replay decode CUDA graphs")
    attention_backend: str = option(
        "auto",
        "attention implementation: auto (Triton kernels on CUDA; on the CPU the C decode kernel, "
        "built at first use, else PyTorch ops), torch (PyTorch attention ops; the C norm and "
        "head kernels still run where they build), cpu, triton",
        choices=ATTENTION_BACKENDS,
    )
    enable_prefix_caching: bool = option(True, "reuse cached full KV blocks of earlier prompts")
    tensor_parallel_size: int = option(
        1,
        "ranks to split the model over, Megatron-style (attention heads and MLP rows; one "
        "all-reduce after each attention and MLP block); each rank holds its own KV heads",
    )
    distributed_executor_backend: str = option(
        "mp",
        "with tensor_parallel_size > 1, how the worker ranks start: mp (processes on this "
        "machine) or ray (Ray actors; pip install paged-attention[ray])",
        choices=DISTRIBUTED_EXECUTOR_BACKENDS,
    )
    cpu_kv_memory_fraction: float = option(
        0.25,
        "CPU, without a pool size: the largest share of available RAM the KV pool takes "
        "(and never more than max_num_seqs full-length sequences need)",
    )
    gpu_memory_utilization: float = option(
        0.9, "CUDA, without a pool size: the share of free device memory the engine may use"
    )
    quantization: str | None = option(
        "auto",
        "weight format of the linear layers: auto (gguf for a GGUF file on the CPU unless "
        "float32/float16 is asked for, the checkpoint's own awq/gptq, else none), none (dense, "
        "in --dtype), gguf (keep the file's 4-bit blocks), int8 (per output channel), int4 "
        "(groups of 32; int4-g64, int4-g128 for larger groups), awq/gptq (a checkpoint packed "
        "by AutoAWQ/AutoGPTQ, detected from its quantization_config)",
        choices=QUANTIZATION_CHOICES,
        metavar="FORMAT",
    )
    record_step_stats: bool = option(
        False,
        "keep one StepStats record per engine step in LLMEngine.step_stats (token counts "
        "and timings; grows with every step, so for benchmarks and tests)",
        cli=False,
    )

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
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use 'auto' or one of {sorted(DTYPE_NAMES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; use one of {', '.join(QUANTIZATION_CHOICES)}"
            )
        if not self.swap_space >= 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        for name, allowed in (
            ("preemption_mode", PREEMPTION_MODES),
            ("preemption_victim", PREEMPTION_VICTIMS),
            ("attention_backend", ATTENTION_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "record_step_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("cpu_kv_memory_fraction", "gpu_memory_utilization"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {DISTRIBUTED_EXECUTOR_BACKENDS}, "
                f"got {self.distributed_executor_backend!r}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any], caller: str = "EngineConfig") -> EngineConfig:
        """Build from keyword options, naming any unknown one (and the nearest
        real option) in a TypeError, as Python does for a bad keyword."""
        names = engine_option_names()
        for name in options:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; the options are {', '.join(names)}"
                raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
        return cls(**options)


def engine_options() -> tuple[Field, ...]:
    """Every engine option, in definition order."""
    return fields(EngineConfig)


def engine_option_names() -> tuple[str, ...]:
    return tuple(f.name for f in engine_options())


def describe_options() -> str:
    """One line per option (name, default, help): the `LLM` docstring's list."""
    lines = []
    for f in engine_options():
        default = "required" if f.default is MISSING else repr(f.default)
        lines += textwrap.wrap(
            f"{f.name} = {default}: {f.metadata['help']}",
            width=88,
            initial_indent="    ",
            subsequent_indent="        ",
        )
    return "\n".join(lines)
