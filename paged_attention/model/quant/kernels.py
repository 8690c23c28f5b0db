"""The weight-only kernels a `QuantLinear` multiplies with, and the layouts
they expect: the engine's C kernels (at the end of this module; float32 sums
over exact scales) where they build, PyTorch's CPU kernels elsewhere.

* int4: `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`
  computes x @ W^T with W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n], g = k // group,
  from 4-bit q packed by `aten._convert_weight_to_int4pack_for_cpu` and
  scales_and_zeros [K // group, N, 2] in x's dtype.
* int8: `aten._weight_int8pack_mm(x, q, s)` computes x @ (q * s[:, None])^T
  from int8 q [N, K] and scales [N] in x's dtype. Weights in groups of 32
  along K (GGUF Q8_0) run it once per group (`int8_group_mm`), summing the
  groups' products in float32.

On x86 both are vectorised (AVX2 and AVX-512) only for bfloat16 activations;
float32 ones take a scalar loop, measured 10-60x slower than a dense float32
matmul. So every call to them runs in bfloat16 (`KERNEL_DTYPE`) and casts at
the edges. Both kernels dequantize their weights once per 4 activation rows, so
at many rows a dense matmul over weights dequantized on the spot wins: the
`dequantize_*_t` functions write W^T into caller-owned scratch buffers for
that path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from paged_attention import native

KERNEL_DTYPE = torch.bfloat16
# The int8 kernel loads activations with aligned 32-byte AVX loads (a
# misaligned row crashes the process), so rows must start on 32-byte
# boundaries: K a multiple of 16 and a freshly allocated (64-byte aligned) x.
INT8_K_MULTIPLE = 16
# Q8_0's block: one scale per 32 inputs.
INT8_GROUP_SIZE = 32
_ALIGN = 64
# The int4 kernel's output tiles are 16, 32, 48 or 64 rows of W.
INT4_N_MULTIPLE = 16


@dataclass(frozen=True)
class Int4PackLayout:
    """How `_convert_weight_to_int4pack_for_cpu` arranges W [N, K] in its
    [N, K / 2] bytes: in tiles of `block_n` rows, each stored k-major
    ([K, block_n / 2] bytes); a byte holds rows d and d + block_n / 2 of its
    tile (`split`) or rows 2d and 2d + 1 (pairs), low nibble first. A last,
    partial tile is always in pairs. (The tile depends on the CPU: 64 rows
    with AVX-512, 32 with AVX2.)"""

    block_n: int
    split: bool


def _unpack_t(packed: torch.Tensor, n: int, k: int, layout: Int4PackLayout, out: torch.Tensor) -> None:
    """q^T [K, N] (uint8, 0..15) of `packed` into `out`."""
    bn = layout.block_n
    full = n // bn * bn
    flat = packed.view(-1)
    if full:
        tiles = flat[: full * k // 2].view(full // bn, k, bn // 2).permute(1, 0, 2)
        dst = out[:, :full].view(k, full // bn, bn)
        if layout.split:
            torch.bitwise_and(tiles, 15, out=dst[:, :, : bn // 2])
            torch.bitwise_right_shift(tiles, 4, out=dst[:, :, bn // 2 :])
        else:
            pairs = dst.view(k, full // bn, bn // 2, 2)
            torch.bitwise_and(tiles, 15, out=pairs[..., 0])
            torch.bitwise_right_shift(tiles, 4, out=pairs[..., 1])
    if full < n:
        tail = flat[full * k // 2 :].view(k, (n - full) // 2)
        pairs = out[:, full:].view(k, (n - full) // 2, 2)
        torch.bitwise_and(tail, 15, out=pairs[..., 0])
        torch.bitwise_right_shift(tail, 4, out=pairs[..., 1])


@functools.cache
def int4_pack_layout() -> Int4PackLayout | None:
    """The packing this process's kernel uses, found by packing a probe matrix
    and recognising it (None if no known layout matches: then the int4 layer
    runs the kernel at every batch size)."""
    n, k = 64 * 2 + 32 + 16, 32
    values = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    out = torch.empty(k, n, dtype=torch.uint8)
    for block_n in (64, 32, 16):
        for split in (True, False):
            layout = Int4PackLayout(block_n, split)
            _unpack_t(packed, n, k, layout, out)
            if torch.equal(out.t().to(torch.int32), values):
                return layout
    return None


def int4_supported(n: int, k: int, group_size: int) -> bool:
    return n % INT4_N_MULTIPLE == 0 and k % group_size == 0


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 values [N, K] in 0..15 -> the kernel's packed uint8 [N, K / 2].

    Whole tiles are packed here with uint8 ops, 3x faster than the op (which
    takes int32 values, 4 bytes each); the op packs partial tiles, and
    everything when the layout is not one this module knows."""
    n, k = values.shape
    layout = int4_pack_layout()
    full = n // layout.block_n * layout.block_n if layout is not None and layout.split else 0
    if full == n:
        assert layout is not None
        return _pack_tiles(values, layout.block_n)
    tail = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[full:].to(torch.int32).contiguous(), 1)
    if not full:
        return tail
    assert layout is not None
    return torch.cat((_pack_tiles(values[:full], layout.block_n).view(-1), tail.view(-1))).view(n, k // 2)


def _pack_tiles(values: torch.Tensor, block_n: int) -> torch.Tensor:
    """Whole `split` tiles: byte (tile, k, d) = row d | row d + block_n / 2 << 4."""
    n, k = values.shape
    tiles = values.view(n // block_n, block_n, k)
    half = block_n // 2
    packed = tiles[:, :half].bitwise_or(tiles[:, half:].bitwise_left_shift(4))
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


def int4_params(scales: torch.Tensor, offsets: torch.Tensor, tile: int) -> torch.Tensor:
    """float32 scales and offsets [N, G] -> one tensor [N / tile, G, 2, tile]
    (each tile of rows its groups' scales then offsets: what the C kernel
    reads, in order), float16 where every value is exact in it (a GGUF's
    Q4_0/Q4_1 fields: 4 fewer bytes to read per 32 weights), else float32
    (Q4_K's and AWQ/GPTQ's products, scales computed at load)."""
    n, groups = scales.shape
    assert n % tile == 0, f"{n} rows are not whole tiles of {tile}"
    params = torch.stack((scales, offsets)).float().view(2, n // tile, tile, groups).permute(1, 3, 0, 2)
    params = params.contiguous()
    half = params.half()
    return half if torch.equal(half.float(), params) else params


def int4_params_by_group(params: torch.Tensor) -> torch.Tensor:
    """`int4_params`'s tensor -> float32 scales and offsets [2, G, N]."""
    tiles, groups, _, tile = params.shape
    return params.float().permute(2, 1, 0, 3).reshape(2, groups, tiles * tile)


def int4_scales_and_zeros(params: torch.Tensor) -> torch.Tensor:
    """`int4_params`'s tensor -> PyTorch's kernel's [G, N, 2] (s, m + 8 s) in
    KERNEL_DTYPE, for w = (q - 8) s + z."""
    scales, offsets = int4_params_by_group(params)
    return torch.stack((scales, offsets + 8.0 * scales), dim=-1).contiguous().to(KERNEL_DTYPE)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The kernel's packed bytes -> uint8 values [N, K] (the inverse of `pack_int4`)."""
    layout = int4_pack_layout()
    if layout is None:
        raise RuntimeError("this PyTorch build packs int4 weights in a layout this module does not know")
    out = torch.empty(k, n, dtype=torch.uint8)
    _unpack_t(packed, n, k, layout, out)
    return out.t().contiguous()


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (KERNEL_DTYPE) @ W^T -> [M, N] in KERNEL_DTYPE."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


# Elements of W^T dequantized in float32 at once (256 KiB: stays in cache;
# SmolLM2 gate|up 1.5 ms a pass, one thread, vs 1.4 ms rounding thrice).
_DEQUANT_CHUNK = 1 << 16


def dequantize_int4_t(
    packed: torch.Tensor,
    params: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    codes: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """W^T [K, N] = q s + m (`params` as `int4_params` makes them),
    written into `out` ([K, N], the matmul dtype) through `codes` (uint8
    scratch of N * K)."""
    layout = int4_pack_layout()
    assert layout is not None, "dense int4 path without a known pack layout"
    bn = layout.block_n
    full = n // bn * bn if layout.split else 0
    if full:
        # Nibbles into contiguous scratch first (fast), then one converting
        # copy per half into W^T's strided columns: cheaper than writing
        # strided uint8 and converting afterwards.
        tiles = packed.view(-1)[: full * k // 2].view(full // bn, k, bn // 2)
        lo = codes[: full * k // 2].view(full // bn, k, bn // 2)
        hi = codes[full * k // 2 : full * k].view(full // bn, k, bn // 2)
        torch.bitwise_and(tiles, 15, out=lo)
        torch.bitwise_right_shift(tiles, 4, out=hi)
        dst = out[:, :full].view(k, full // bn, bn)
        dst[:, :, : bn // 2].copy_(lo.permute(1, 0, 2))
        dst[:, :, bn // 2 :].copy_(hi.permute(1, 0, 2))
    if full < n:
        rest = codes[full * k :].view(k, n - full)
        _unpack_t(packed.view(-1)[full * k // 2 :].view(n - full, k // 2), n - full, k, layout, rest)
        out[:, full:].copy_(rest)
    scales, offsets = int4_params_by_group(params)
    grouped = out.view(k // group_size, group_size, n)
    if out.dtype == torch.float32:
        torch.addcmul(offsets.unsqueeze(1), grouped, scales.unsqueeze(1), out=grouped)
        return out
    # q s + m in float32, rounded once: in bfloat16 the rounded scales and
    # sums (three roundings) cost 1.4% top-1 agreement on the default model.
    step = max(1, _DEQUANT_CHUNK // (group_size * n))
    for g in range(0, k // group_size, step):
        rows = grouped[g : g + step]
        rows.copy_(torch.addcmul(offsets[g : g + step, None], rows.float(), scales[g : g + step, None]))
    return out


@functools.cache
def fast_bf16_matmul() -> bool:
    """Whether dense bfloat16 matmuls run natively (AVX512-BF16/AMX); without,
    oneDNN emulates them, measured 5-50x slower than float32 on AVX2."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# oneDNN's bfloat16 matmul reorders W into its blocked layout on every call; W
# reordered once (as inductor's weight freezing does) skips that work and the
# memory traffic: SmolLM2 shapes, one thread, 1.3-1.9x faster from 1 to 512
# rows, bit for bit the same result. The hint is the row count oneDNN tunes for.
_PACK_ROWS_HINT = 64


@functools.cache
def bf16_packing() -> bool:
    """Whether W can be kept in oneDNN's blocked layout (`pack_bf16`)."""
    return (
        fast_bf16_matmul()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] bfloat16 as an opaque oneDNN tensor for `packed_bf16_linear`
    (same bytes; it has no storage to view, index or copy from)."""
    assert weight.dtype == torch.bfloat16 and weight.dim() == 2, (weight.dtype, tuple(weight.shape))
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS_HINT)


def packed_bf16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 @ W^T for W packed by `pack_bf16`: F.linear's result."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def int8_supported(k: int) -> bool:
    return k % INT8_K_MULTIPLE == 0


def int8_mm(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (KERNEL_DTYPE) @ (values * scales[:, None])^T -> [M, N] in KERNEL_DTYPE."""
    if not x.is_contiguous() or x.data_ptr() % _ALIGN:
        x = x.clone(memory_format=torch.contiguous_format)
    return torch.ops.aten._weight_int8pack_mm(x, values, scales)


def int8_group_mm(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (KERNEL_DTYPE) @ W^T -> float32 [M, N], with W in groups of
    INT8_GROUP_SIZE inputs: values int8 [G, N, 32], scales [G, N] (KERNEL_DTYPE),
    W[n, 32 g + j] = values[g, n, j] * scales[g, n].

    One kernel call per group over that group's columns of x, copied once
    into a [G, M, 32] buffer so each group's rows start aligned. Measured on
    a 49152 x 576 head, one row: 2.9 ms against 3.6 for a dense bfloat16
    matmul, and exact to the file's values where a per-row int8 copy (1.6 ms)
    would requantize them."""
    groups, n, g = values.shape
    m = x.shape[0]
    assert x.shape[1] == groups * g, f"x has {x.shape[1]} inputs, weights {groups * g}"
    xg = x.view(m, groups, g).transpose(0, 1).contiguous()  # fresh, so 64-byte aligned
    out = torch.zeros(m, n, dtype=torch.float32)
    for i in range(groups):
        out.add_(torch.ops.aten._weight_int8pack_mm(xg[i], values[i], scales[i]))
    return out


# ------------------------------------------------- the engine's own C kernels
# Activation rows per call of `int8g_gemv` (MAX_ROWS in csrc/quant_gemv.c).
# Measured on SmolLM2's head, one thread, against `int8_group_mm`: 1 row 3.4
# vs 5.0 ms, 2 rows 4.8 vs 7.9, 8 rows 13.4 vs 24.7.
NATIVE_MAX_ROWS = 8


def native_int8_group_mm(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W^T -> [M, N] in `out_dtype`, W in
    groups of 32 as `int8_group_mm` takes it but with float32 scales [N, G]:
    float32 sums, a pass over W per NATIVE_MAX_ROWS rows."""
    lib = native.load_library()
    assert lib is not None, "native_int8_group_mm without the C library"
    x = x.contiguous()
    m, k = x.shape
    n = values.shape[1]
    y = torch.empty(m, n, dtype=out_dtype)
    for r in range(0, m, NATIVE_MAX_ROWS):
        status = lib.int8g_gemv(
            native.DTYPE_CODES[x.dtype],
            x[r].data_ptr(),
            values.data_ptr(),
            scales.data_ptr(),
            native.DTYPE_CODES[out_dtype],
            y[r].data_ptr(),
            min(NATIVE_MAX_ROWS, m - r),
            n,
            k,
            torch.get_num_threads(),
        )
        native.check(status, "int8g_gemv")
    return y


# Activation rows per call of `int4_tile_gemv` (INT4_MAX_ROWS in csrc/int4_gemv.c).
INT4_NATIVE_ROWS_PER_CALL = 8
_SCALE_CODES = {torch.float32: 0, torch.float16: 2}


def scale_code(params: torch.Tensor) -> int:
    """The C kernel's code for the dtype of `int4_params`'s tensor."""
    return _SCALE_CODES[params.dtype]


def native_int4_tile() -> int | None:
    """The tile width (rows of W) the C int4 kernel reads, when it can read
    this PyTorch's packing (its split tiles of the same width), else None."""
    lib = native.load_library()
    layout = int4_pack_layout()
    if lib is None or layout is None or not layout.split or layout.block_n != lib.int4_tile_width():
        return None
    return layout.block_n


def native_int4_mm(
    x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, group_size: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W^T -> [M, N] in `out_dtype`, W as
    `pack_int4` packs it with `params` from `int4_params` (tiles of
    `native_int4_tile()` rows): float32 sums over float32 scales, the
    dequantized weights' own values. W is read once per
    INT4_NATIVE_ROWS_PER_CALL rows."""
    lib = native.load_library()
    assert lib is not None, "native_int4_mm without the C library"
    x = x.contiguous()
    m, k = x.shape
    tiles, _, _, tile = params.shape
    n = tiles * tile
    y = torch.empty(m, n, dtype=out_dtype)
    step = INT4_NATIVE_ROWS_PER_CALL
    for r in range(0, m, step):
        status = lib.int4_tile_gemv(
            native.DTYPE_CODES[x.dtype],
            x[r].data_ptr(),
            packed.data_ptr(),
            tile,
            scale_code(params),
            params.data_ptr(),
            native.DTYPE_CODES[out_dtype],
            y[r].data_ptr(),
            min(step, m - r),
            n,
            k,
            group_size,
            torch.get_num_threads(),
        )
        native.check(status, "int4_tile_gemv")
    return y
