"""GGML tensor types: the ids this package has kernels for and the block layout
(elements and bytes per quantization block) of every type."""

from __future__ import annotations

QK_K = 256  # super-block size of the k-quants

# ggml_type ids (ggml.h enum ggml_type) for which `dequant` has kernels.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30

# ggml_type -> (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES.
_BLOCK_LAYOUT: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 2 + 16),
    Q4_1: (32, 2 + 2 + 16),
    Q8_0: (32, 2 + 32),
    Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}


def block_layout(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of `ggml_type`.

    Raises:
        ValueError: gguf-py does not know the type either.
    """
    if ggml_type in _BLOCK_LAYOUT:
        return _BLOCK_LAYOUT[ggml_type]
    import gguf  # only for types without a kernel here

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGML tensor type {ggml_type}") from None


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int, name: str) -> int:
    """Bytes a tensor of `shape` (torch order) takes in `ggml_type`.

    Raises:
        ValueError: the innermost dim is not a whole number of blocks.
    """
    block_elems, block_bytes = block_layout(ggml_type)
    inner = shape[-1] if shape else 1
    if inner % block_elems:
        raise ValueError(
            f"tensor {name!r}: innermost dim {inner} is not a multiple of the block size {block_elems}"
        )
    n = 1
    for d in shape:
        n *= d
    return n // block_elems * block_bytes
