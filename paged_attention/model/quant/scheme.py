"""Which weight format a model loads in: the `quantization` option resolved
against the checkpoint, the device and the dtype asked for. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from paged_attention.config import QUANTIZATION_CHOICES

# Group sizes the CPU int4 kernel takes (it walks K one group at a time).
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 32
# Pre-quantized checkpoint formats whose loaders are still to come; they will
# fill the same int4 layer (packed 4-bit values, per-group scales and zeros).
RESERVED_METHODS = ("awq", "gptq")


@dataclass(frozen=True)
class QuantScheme:
    """A resolved weight format. `method` is "none" (dense float weights),
    "gguf" (a GGUF file's Q4_0/Q4_1/Q4_K blocks kept exactly, as int4 in groups
    of 32), "int8" (per output channel) or "int4" (groups of `group_size`
    along the input dimension)."""

    method: str
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    # Also keep a dense copy of each quantized weight (the values the kernel
    # computes with) for large batches: prompts and many decodes are
    # compute-bound, and dequantizing W on every call cost them more than the
    # quantized read saves (SmolLM2, 64 sequences: 246 ms a step against 160
    # dense). Small batches still read only the quantized bytes.
    dense_copy: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("none", "gguf", "int8", "int4"):
            raise ValueError(f"unknown quantization method {self.method!r}; use none, gguf, int8 or int4")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    @property
    def name(self) -> str:
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


def resolve_quantization(
    value: str | None, *, is_gguf: bool, device_type: str, float_dtype_requested: bool
) -> QuantScheme:
    """The scheme `value` names for this checkpoint and device.

    "auto" (or None) keeps a GGUF file's 4-bit blocks on the CPU, with a dense
    copy for large batches (fast at every batch size, at the dense copy's
    memory), and loads everything else dense. An explicit "gguf" keeps the
    4-bit blocks alone (the smallest memory; large batches dequantize). It stays dense when float32/float16 numerics were
    asked for (`float_dtype_requested`): the CPU kernels multiply in bfloat16,
    so they cannot honour that request. Other devices have no kernels here.

    Raises:
        ValueError: an unknown value; a reserved one (awq, gptq); gguf for a
            non-GGUF checkpoint; a quantized format on a device other than the CPU.
    """
    parse_quantization(value)
    if value in (None, "auto"):
        if is_gguf and device_type == "cpu" and not float_dtype_requested:
            return QuantScheme("gguf", dense_copy=True)
        return NONE
    assert value is not None
    if value in RESERVED_METHODS:
        raise ValueError(
            f"quantization {value!r} is reserved for pre-quantized checkpoints and has no loader yet; "
            "use int4 or int8 to quantize a float checkpoint at load"
        )
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
    option asks for float32/float16 numerics; tensor parallelism shards
    quantized weights as it does dense ones (`tensor_parallel` is kept for
    callers and changes nothing)."""
    float_requested = str(dtype_option) not in ("auto", "bfloat16", "bf16", "torch.bfloat16")
    return resolve_quantization(
        value,
        is_gguf=str(weights).lower().endswith(".gguf"),
        device_type=device_type,
        float_dtype_requested=float_requested,
    )
