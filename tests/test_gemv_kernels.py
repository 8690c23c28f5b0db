"""The C weight-only kernels (`csrc/int4_gemv.c`, `csrc/quant_gemv.c`'s int8
groups) on each instruction set they have a path for, whatever this machine's
build picks: AVX-512, AVX2 (the EPYCs some sessions and users run on) and the
portable loop. Each is built here from the sources and checked against
float64 over the dequantized weights."""

from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from paged_attention import native
from paged_attention.model.quant import kernels

SOURCES = [Path(native.__file__).parent / "csrc" / name for name in ("int4_gemv.c", "quant_gemv.c")]
X86 = platform.machine() in ("x86_64", "AMD64")
BUILDS = {
    "avx512": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mno-avx512f", "-mavx2", "-mfma", "-mf16c"],
    "portable": ["-march=x86-64"] if X86 else [],
}
NEEDS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma", "f16c"), "portable": ()}


def _cpu_has(flags: tuple[str, ...]) -> bool:
    words = set(native._cpu_flags().split())
    return all(flag in words for flag in flags)


@pytest.fixture(scope="module", params=sorted(BUILDS))
def library(request, tmp_path_factory) -> ctypes.CDLL:
    name = request.param
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    if not X86 and name != "portable":
        pytest.skip("x86 instruction sets")
    if not _cpu_has(NEEDS[name]):
        pytest.skip(f"this CPU lacks {NEEDS[name]}")
    target = tmp_path_factory.mktemp(name) / "gemv.so"
    flags = ["-O3", *BUILDS[name], "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(target), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    for fn in ("int4_tile_width", "int4_tile_gemv", "int8g_gemv"):
        getattr(lib, fn).argtypes = native.SIGNATURES[fn]
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _case(tile: int, n_tiles: int, k: int, group: int, half: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = tile * n_tiles
    values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offsets = -torch.rand(n, k // group, generator=g) * 0.1
    if half:  # as a Q4_1 file's float16 fields
        scales, offsets = scales.half().float(), offsets.half().float()
    params = kernels.int4_params(scales, offsets, tile)
    assert params.dtype == (torch.float16 if half else torch.float32)
    weight = values.double().view(n, -1, group) * scales.double().unsqueeze(-1)
    weight = (weight + offsets.double().unsqueeze(-1)).view(n, k)
    return kernels._pack_tiles(values, tile), params, weight


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "half"), [(32, True), (32, False), (128, False)])
def test_tile_gemv_equals_float64_over_the_dequantized_weights(library, x_dtype, group, half):
    tile = library.int4_tile_width()
    k = 256
    packed, params, weight = _case(tile, 3, k, group, half, seed=group + half)
    n = weight.shape[0]
    for m in (1, 3, 5, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(x_dtype)
        exact = x.double() @ weight.t()
        scale = x.double().abs() @ weight.abs().t()
        for y_dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)):
            y = torch.full((m, n), float("nan"), dtype=y_dtype)
            status = library.int4_tile_gemv(
                native.DTYPE_CODES[x_dtype],
                x.data_ptr(),
                packed.data_ptr(),
                tile,
                2 if half else 0,
                params.data_ptr(),
                native.DTYPE_CODES[y_dtype],
                y.data_ptr(),
                m,
                n,
                k,
                group,
                2,
            )
            assert status == 0
            err = (y.double() - exact).abs()
            assert torch.all(err <= rtol * (scale + exact.abs()) + 1e-6), (m, y_dtype, err.max().item())


def test_tile_gemv_refuses_what_it_cannot_compute(library):
    tile = library.int4_tile_width()
    packed, params, weight = _case(tile, 1, 64, 32, True, seed=0)
    x = torch.randn(9, 64)
    y = torch.empty(9, tile)

    def call(m: int, width: int, n: int, group: int) -> int:
        return library.int4_tile_gemv(
            0,
            x.data_ptr(),
            packed.data_ptr(),
            width,
            2,
            params.data_ptr(),
            0,
            y.data_ptr(),
            m,
            n,
            64,
            group,
            1,
        )

    assert call(9, tile, tile, 32) == -2  # more rows than a call takes
    assert call(1, tile, tile + 1, 32) == -2  # rows not whole tiles
    assert call(1, tile, tile, 48) == -2  # K not whole groups
    assert call(1, tile * 2, tile, 32) == -3  # packed for another tile width
    assert call(1, tile, tile, 32) == 0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int8_group_gemv_equals_float64_over_the_dequantized_weights(library, x_dtype):
    """int8 in groups of 32 (GGUF Q8_0), with a row count that leaves the last
    block of output rows partial."""
    n, k = 37, 96
    g = torch.Generator().manual_seed(7)
    values = torch.randint(-127, 128, (k // 32, n, 32), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4
    weight = (values.double().permute(1, 0, 2) * scales.double().unsqueeze(-1)).reshape(n, k)
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(x_dtype)
        exact = x.double() @ weight.t()
        scale = x.double().abs() @ weight.abs().t()
        for y_dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)):
            y = torch.full((m, n), float("nan"), dtype=y_dtype)
            status = library.int8g_gemv(
                native.DTYPE_CODES[x_dtype],
                x.data_ptr(),
                values.data_ptr(),
                scales.data_ptr(),
                native.DTYPE_CODES[y_dtype],
                y.data_ptr(),
                m,
                n,
                k,
                2,
            )
            assert status == 0
            err = (y.double() - exact).abs()
            assert torch.all(err <= rtol * (scale + exact.abs()) + 1e-6), (m, y_dtype, err.max().item())
    y = torch.empty(9, n)
    x = torch.randn(9, k)
    assert (
        library.int8g_gemv(0, x.data_ptr(), values.data_ptr(), scales.data_ptr(), 0, y.data_ptr(), 9, n, k, 1)
        == -2
    )
    assert (
        library.int8g_gemv(
            0, x.data_ptr(), values.data_ptr(), scales.data_ptr(), 0, y.data_ptr(), 1, n, 48, 1
        )
        == -2
    )
