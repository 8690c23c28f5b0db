"""Dequantize raw GGUF tensor bytes to float32, bit-identical to gguf-py.

The kernels perform the same float32 operations in the same order as
`gguf.quants.dequantize` (what transformers uses), so results match it and
therefore transformers bit for bit; types without a kernel here fall back to it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from paged_attention.model.gguf.ggml_types import (
    BF16,
    F16,
    F32,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
    Q8_0,
    QK_K,
    block_layout,
)


def f16_field(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32, reading the bytes as a little-endian float16."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) uint8 -> (..., 2, k): low nibbles first, then high nibbles (ggml order)."""
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


# The kernels compute what gguf-py computes, with the same float32 roundings:
# int->float conversions of small integers are exact, and each multiply/add is
# its own rounding step, in gguf-py's order. They differ in working in place on
# the one float32 buffer that becomes the output (first-touching fresh memory
# costs as much as the arithmetic) and in not splitting tensors into 16-row
# groups. numpy, not torch: torch's intra-op thread pool turns the ~1,000
# small ops of a model load into as many OpenMP fork/joins, and when other
# processes share the cores its spinning workers make a load 5-30x slower;
# numpy runs each op on the calling thread.


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= f16_field(blocks[:, :2])
    return out


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    out = nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32).astype(np.float32)
    out -= 8
    out *= f16_field(blocks[:, :2])
    return out


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    out = nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32).astype(np.float32)
    out *= f16_field(blocks[:, :2])
    out += f16_field(blocks[:, 2:4])
    return out


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 12 bytes hold eight 6-bit scales and eight 6-bit mins (ggml get_scale_min_k4):
    # bytes 0-3 / 4-7 hold the low 6 bits of scales / mins 0-3, bytes 8-11 hold
    # the low 4 bits of scales / mins 4-7 and the top 2 bits come from bytes 0-7.
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), axis=-1)
    mn = np.concatenate((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), axis=-1)
    return sc, mn


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = q4_k_scale_min(blocks[:, 4:16])
    d = (f16_field(blocks[:, 0:2]) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (f16_field(blocks[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
    # Each 32-byte chunk holds sub-block 2j in its low nibbles, 2j+1 in its high ones.
    out = nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    out *= d
    out -= dm
    return out.reshape(n, QK_K)


_Q6_K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = (f16_field(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    # Low 4 bits: 64-byte chunk j holds values 64j..64j+31 in its low nibbles and
    # 64j+32..64j+63 in its high ones; high 2 bits: 32-byte chunk j holds four
    # 32-value runs at bit offsets 0, 2, 4, 6.
    q = nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    q |= ((qh.reshape(n, 2, 1, 32) >> _Q6_K_SHIFTS) & 0x03).reshape(n, 8, 32) << 4
    out = q.reshape(n, 16, 16).astype(np.float32)
    out -= 32
    out *= d
    return out.reshape(n, QK_K)


_BLOCK_KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    Q8_0: _dequant_q8_0,
    Q4_0: _dequant_q4_0,
    Q4_1: _dequant_q4_1,
    Q4_K: _dequant_q4_k,
    Q6_K: _dequant_q6_k,
}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (1-D uint8) -> float32 tensor of `shape` (torch order).

    Bit-identical to `gguf.quants.dequantize` for every type (same float32 ops in
    the same order); types without a kernel here are delegated to it.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw must be a 1-D uint8 tensor, got {raw.dtype} of shape {tuple(raw.shape)}")
    return torch.from_numpy(dequantize_array(raw.numpy(), ggml_type, tuple(shape)))


def dequantize_array(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """`dequantize` on numpy: raw bytes (1-D uint8) -> float32 array of `shape`.

    F32 tensors are a view of `raw`, not a copy.
    """
    block_elems, block_bytes = block_layout(ggml_type)
    numel = 1
    for dim in shape:
        numel *= dim
    if numel % block_elems or raw.size != numel // block_elems * block_bytes:
        raise ValueError(f"{raw.size} bytes do not hold a tensor of shape {shape} in GGML type {ggml_type}")
    if ggml_type == F32:
        out = raw.view(np.float32)
    elif ggml_type == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif ggml_type == BF16:
        # bf16 is the top half of an f32: widen exactly, as gguf-py does.
        out = (raw.view(np.int16).astype(np.int32) << 16).view(np.float32)
    elif ggml_type in _BLOCK_KERNELS:
        out = _BLOCK_KERNELS[ggml_type](raw.reshape(-1, block_bytes))
    else:
        import gguf

        qtype = gguf.GGMLQuantizationType(ggml_type)  # valid: block_layout accepted it
        try:
            out = gguf.quants.dequantize(raw.reshape(-1, block_bytes), qtype)
        except NotImplementedError:
            raise ValueError(f"cannot dequantize GGML type {qtype.name}") from None
        out = np.ascontiguousarray(out, dtype=np.float32)
    return out.reshape(shape)
