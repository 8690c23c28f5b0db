"""Which weight format a model loads in: the `quantization` option resolved
against the checkpoint, the device and the dtype asked for. Imports no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paged_attention.config import DTYPE_NAMES, QUANTIZATION_CHOICES

# Group sizes the CPU int4 kernel takes (it walks K one group at a time).
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 32
# Pre-quantized Hugging Face checkpoint formats (`hf_formats.py`): their packed
# 4-bit values, per-group scales and zeros fill the int4 layer exactly.
CHECKPOINT_METHODS = ("awq", "gptq")


@dataclass(frozen=True)
class QuantScheme:
    """A resolved weight format. `method` is "none" (dense float weights),
    "gguf" (a GGUF file's Q4_0/Q4_1/Q4_K blocks kept exactly, as int4 in groups
    of 32), "int8" (per output channel), "int4" (groups of `group_size`
    along the input dimension) or "int8g" (int8 in groups of 32, GGUF's Q8_0:
    the LM head of the int8 and int4 schemes; not a user option)."""

    method: str
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    # Also keep a dense copy of each quantized weight (the values the kernel
    # computes with) for large batches: prompts and many decodes are
    # compute-bound, and dequantizing W on every call cost them more than the
    # quantized read saves (SmolLM2, 64 sequences: 246 ms a step against 160
    # dense). Small batches still read only the quantized bytes.
    dense_copy: bool = False
    # The dense path multiplies in bfloat16 under float32 activations too
    # (where the CPU runs bfloat16 matmuls natively): dtype "auto" on a
    # quantized model, whose decode then computes in float32 at the cost of
    # bfloat16 only for prompts and large batches (`engine/resolve.py`).
    bf16_matmuls: bool = False
    # "awq" or "gptq": int4 records read from a pre-quantized checkpoint
    # (method "int4", the checkpoint's group size; the LM head stays dense).
    source: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("none", "gguf", "int8", "int4", "int8g"):
            raise ValueError(f"unknown quantization method {self.method!r}; use none, gguf, int8 or int4")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.source and (self.source not in CHECKPOINT_METHODS or self.method != "int4"):
            raise ValueError(f"source {self.source!r} needs method int4 and one of {CHECKPOINT_METHODS}")

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    @property
    def name(self) -> str:
        if self.source:
            return self.source
        if self.method == "int4" and self.group_size != DEFAULT_INT4_GROUP_SIZE:
            return f"int4-g{self.group_size}"
        return self.method


NONE = QuantScheme("none")


def parse_quantization(value: str | None) -> str | None:
    """Check an option value; returns it (None and "auto" stay as they are).

    Raises:
        ValueError: naming the value and the choices.
    """
    if value is not None and value not in QUANTIZATION_CHOICES:
        raise ValueError(f"unknown quantization {value!r}; use one of {', '.join(QUANTIZATION_CHOICES)}")
    return value


def checkpoint_quantization(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `quantization_config` of an HF config.json dict when its
    `quant_method` is awq or gptq, else None."""
    if not config:
        return None
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and str(qcfg.get("quant_method", "")).lower() in CHECKPOINT_METHODS:
        return qcfg
    return None


def checkpoint_scheme(qcfg: dict[str, Any]) -> QuantScheme:
    """The int4 scheme an AWQ/GPTQ `quantization_config` loads into.

    Raises:
        ValueError: a variant without an exact int4 form here (bits other than 4,
            a group size the kernel does not take, AWQ other than GEMM with zero
            points, GPTQ's v2 checkpoint format).
    """
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quant_method {method!r} is not one of {CHECKPOINT_METHODS}")
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    group = qcfg.get("group_size", qcfg.get("q_group_size"))
    if bits != 4:
        raise ValueError(f"{method} checkpoint with bits={bits}: only 4-bit weights load")
    if group not in INT4_GROUP_SIZES:
        raise ValueError(
            f"{method} checkpoint with group_size={group}: the int4 kernel takes {INT4_GROUP_SIZES}"
        )
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq checkpoint version {version!r}: only the GEMM packing loads")
        if not qcfg.get("zero_point", True):
            raise ValueError("awq checkpoint without zero points (zero_point=false) does not load")
    else:
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise ValueError(f"gptq checkpoint_format {fmt!r}: only the v1 'gptq' format loads")
    return QuantScheme("int4", group, source=method)


def resolve_quantization(
    value: str | None,
    *,
    is_gguf: bool,
    device_type: str,
    float16_requested: bool,
    checkpoint: dict[str, Any] | None = None,
) -> QuantScheme:
    """The scheme `value` names for this checkpoint and device.

    "auto" (or None) keeps a GGUF file's 4-bit blocks on the CPU, with a dense
    copy for large batches (fast at every batch size, at the dense copy's
    memory), and loads everything else dense. An explicit "gguf" keeps the
    4-bit blocks alone (the smallest memory; large batches dequantize).
    "auto" stays dense when float16 numerics were asked for
    (`float16_requested`): the engine's kernels take float32 and bfloat16
    activations, and PyTorch's would cast float16 ones to bfloat16. Other
    devices have no kernels here.
    An AWQ/GPTQ checkpoint (`checkpoint`: its `quantization_config`) loads
    into int4 under "auto" (or its own method named) on the CPU, and dense
    (dequantized) where "auto" stays dense or "none" is asked for.

    Raises:
        ValueError: an unknown value; awq or gptq for a checkpoint of another
            method (naming both); gguf for a non-GGUF checkpoint; a quantized
            format on a device other than the CPU.
    """
    parse_quantization(value)
    method = str(checkpoint.get("quant_method", "")).lower() if checkpoint is not None else "none"
    if value in (None, "auto"):
        if checkpoint is not None and device_type == "cpu" and not float16_requested:
            return checkpoint_scheme(checkpoint)
        if is_gguf and device_type == "cpu" and not float16_requested:
            return QuantScheme("gguf", dense_copy=True)
        return NONE
    assert value is not None
    if value in CHECKPOINT_METHODS:
        if value != method:
            raise ValueError(
                f"quantization {value!r} is reserved for pre-quantized {value} checkpoints, and this "
                f"checkpoint's quantization_config names {method!r}; use quantization='auto'"
            )
        if device_type != "cpu":
            raise ValueError(
                f"quantization {value!r} runs on the CPU only (device {device_type!r}); use quantization='none'"
            )
        assert checkpoint is not None
        return checkpoint_scheme(checkpoint)
    if value == "none":
        return NONE
    if device_type != "cpu":
        raise ValueError(
            f"quantization {value!r} runs on the CPU only (device {device_type!r}); use quantization='none'"
        )
    if value == "gguf":
        if not is_gguf:
            raise ValueError("quantization 'gguf' needs a .gguf model file; use int4 or int8 for this model")
        return QuantScheme("gguf")
    if value == "int8":
        return QuantScheme("int8")
    group = int(value.split("-g")[1]) if "-g" in value else DEFAULT_INT4_GROUP_SIZE
    return QuantScheme("int4", group)


def quantization_for_engine(
    value: str | None, *, weights: object, device_type: str, dtype_option: object, tensor_parallel: bool
) -> QuantScheme:
    """The engine's `quantization` option resolved for its model file
    (`weights`: a .gguf file or a folder). "auto" stays dense when the dtype
    option asks for float16; tensor parallelism shards
    quantized weights as it does dense ones (`tensor_parallel` is kept for
    callers and changes nothing)."""
    name = str(dtype_option).removeprefix("torch.")
    float16 = DTYPE_NAMES.get(name, name) == "float16"
    is_gguf = str(weights).lower().endswith(".gguf")
    return resolve_quantization(
        value,
        is_gguf=is_gguf,
        device_type=device_type,
        float16_requested=float16,
        checkpoint=None if is_gguf else _folder_checkpoint_quantization(weights),
    )


def _folder_checkpoint_quantization(weights: object) -> dict[str, Any] | None:
    """The AWQ/GPTQ quantization_config of a model folder's config.json, if any."""
    config = Path(str(weights)).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # the loader reports a bad config.json
    return checkpoint_quantization(data if isinstance(data, dict) else None)
