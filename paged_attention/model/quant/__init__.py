"""Quantized weights that stay quantized: linear layers whose weights are
int4 (groups along the input) or int8 (per output channel), multiplied by
PyTorch's CPU weight-only kernels.

Modules: `scheme` (the `quantization` option resolved), `records` (the
quantized tensors readers hand to layers), `quantize` (float -> int8/int4 at
load), `gguf_repack` (GGUF Q4_0/Q4_1/Q4_K blocks -> int4 records, exactly),
`kernels` (the torch ops and their layouts), `linear` (`QuantLinear`).
"""

from paged_attention.model.quant.linear import QuantLinear, Scratch
from paged_attention.model.quant.quantize import quantize_int4, quantize_int8, quantize_int8_groups
from paged_attention.model.quant.records import ChannelQuantized, GroupQuantized, QuantizedTensor
from paged_attention.model.quant.scheme import (
    INT4_GROUP_SIZES,
    NONE,
    QuantScheme,
    parse_quantization,
    resolve_quantization,
)

__all__ = [
    "INT4_GROUP_SIZES",
    "NONE",
    "ChannelQuantized",
    "GroupQuantized",
    "QuantLinear",
    "QuantScheme",
    "QuantizedTensor",
    "Scratch",
    "parse_quantization",
    "quantize_int4",
    "quantize_int8",
    "quantize_int8_groups",
    "resolve_quantization",
]
