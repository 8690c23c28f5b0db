"""GGUF 4-bit and 8-bit blocks -> `GroupQuantized` with groups of 32, exactly.

Q4_0 (w = (q - 8) d), Q4_1 (w = q d + m) and Q4_K (w = q (d sc_j) - dmin m_j
per 32-value sub-block j) are all "4-bit value times a group scale plus a group
offset", so they move into the int4 layer's format without rounding: every
scale and offset is a float16 value or a float16 value times a 6-bit integer,
exact in float32, and `GroupQuantized.dequantize` then performs the same
float32 operations as the reference dequantizer (`gguf/dequant.py`): equal
bit for bit, except that Q4_0's zeros come out +0.0 where the reference's
(8 - 8) * d is -0.0 for a negative d. Q8_0 (w = q d, q signed) becomes 8-bit
values q + 128 with offset -128 d: (q + 128) d - 128 d is q d exactly in
float32 (an 8-bit integer times a float16 scale needs 19 bits). Other types
(Q5_*, Q6_K, floats) have no exact form here: callers dequantize them.
"""

from __future__ import annotations

import numpy as np
import torch

from paged_attention.model.gguf.dequant import f16_field, nibbles, q4_k_scale_min
from paged_attention.model.gguf.ggml_types import Q4_0, Q4_1, Q4_K, Q8_0, QK_K, block_layout
from paged_attention.model.quant.records import GroupQuantized

GGUF_GROUP_SIZE = 32
REPACKABLE_TYPES = (Q4_0, Q4_1, Q4_K, Q8_0)


def repack_gguf(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> GroupQuantized:
    """Raw bytes (1-D uint8) of a 2-D tensor of a REPACKABLE_TYPES type ->
    GroupQuantized [rows, cols] in groups of 32.

    Raises:
        ValueError: another type, a non-matrix shape, or a byte count that does not match.
    """
    if ggml_type not in REPACKABLE_TYPES:
        raise ValueError(f"GGML type {ggml_type} has no exact grouped form (repackable: {REPACKABLE_TYPES})")
    if len(shape) != 2:
        raise ValueError(f"only matrices are repacked, got shape {shape}")
    rows, cols = shape
    block_elems, block_bytes = block_layout(ggml_type)
    if cols % block_elems or raw.size != rows * cols // block_elems * block_bytes:
        raise ValueError(f"{raw.size} bytes do not hold a {shape} tensor of GGML type {ggml_type}")
    blocks = raw.reshape(-1, block_bytes)
    bits = 4
    if ggml_type == Q8_0:
        bits = 8
        values = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales = f16_field(blocks[:, :2])
        offsets = scales * np.float32(-128.0)
    elif ggml_type == Q4_K:
        values, scales, offsets = _q4_k(blocks)
    else:
        has_min = ggml_type == Q4_1
        qs = blocks[:, 4:] if has_min else blocks[:, 2:]
        # Low nibbles hold values 0-15 of the block, high nibbles 16-31.
        values = nibbles(qs).reshape(-1, GGUF_GROUP_SIZE)
        scales = f16_field(blocks[:, :2])
        offsets = f16_field(blocks[:, 2:4]) if has_min else scales * np.float32(-8.0)
    groups = cols // GGUF_GROUP_SIZE
    return GroupQuantized(
        torch.from_numpy(values.reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, groups)),
        torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32).reshape(rows, groups)),
        GGUF_GROUP_SIZE,
        bits,
    )


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    sc, mn = q4_k_scale_min(blocks[:, 4:16])
    # The reference computes d * sc and dmin * mn in float32 and subtracts the
    # latter: the same products, negated (exact), give the same results.
    scales = f16_field(blocks[:, 0:2]) * sc.astype(np.float32)
    offsets = -(f16_field(blocks[:, 2:4]) * mn.astype(np.float32))
    # 32-byte chunk j holds sub-block 2j in its low nibbles, 2j+1 in its high ones.
    values = nibbles(blocks[:, 16:].reshape(n, QK_K // 64, 32)).reshape(n * QK_K // 32, 32)
    return values, scales, offsets
