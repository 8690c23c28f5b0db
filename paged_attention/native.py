"""The engine's C kernels for the CPU (`csrc/*.c`: decode attention over the
block pool, a quantized matrix-vector product, residual add + RMSNorm,
SwiGLU, RoPE),
compiled at first use and loaded with ctypes.

Built with the system's C compiler (`cc -O3 -march=native -fopenmp`, about
two seconds) into the cache folder, one file per (sources, compiler, CPU
flags), so a warm start only loads it. Its OpenMP runtime resolves to the
libgomp PyTorch already loaded (same soname): one thread pool, not two.
Without a compiler, or if the build fails, `load_library` returns None (with
a warning) and every caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from paged_attention.config import default_cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(_CSRC.glob("*.c")))
HEADERS = tuple(sorted(_CSRC.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")

# The tensor dtypes the kernels take, as their `dtype` arguments (csrc/bf16.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_I64, _PTR, _INT, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# Each exported function's argument types (all return int: 0, or an error code).
SIGNATURES: dict[str, list[type]] = {
    # dtype, kv_dtype, q, k_pool, v_pool, tables, table_width, ctx_lens, q_rows, out,
    # batch, hq, hkv, block_size, head_dim, scale, threads
    "paged_decode_attention": [_INT, _INT, *[_PTR] * 4, _I64, _PTR, _PTR, _PTR, *[_I64] * 5, _FLOAT, _INT],
    # dtype, kv_dtype, qkv, cos, sin, k_pool, v_pool, slots, tables, table_width, ctx_lens,
    # out, batch, hq, hkv, block_size, head_dim, scale, threads
    "paged_decode_layer": [_INT, _INT, *[_PTR] * 7, _I64, _PTR, _PTR, *[_I64] * 5, _FLOAT, _INT],
    # dtype, x, residual (or NULL), weight, y, rows, dim, eps, threads
    "add_rms_norm": [_INT, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _FLOAT, _INT],
    # dtype, gate_up, its row stride, out, rows, intermediate size, threads
    "swiglu": [_INT, _PTR, _I64, _PTR, _I64, _I64, _INT],
    # dtype, x, its row stride, cos, sin, tokens, heads, head_dim, threads
    "rotary_inplace": [_INT, _PTR, _I64, _PTR, _PTR, *[_I64] * 3, _INT],
    # x_dtype, x, values, scales, y_dtype, y, m, n, k, threads
    "int8g_gemv": [_INT, _PTR, _PTR, _PTR, _INT, _PTR, *[_I64] * 3, _INT],
    # logits, rows, vocab, ids, lse, threads
    "greedy_lse": [_PTR, _I64, _I64, _PTR, _PTR, _INT],
    "int4_tile_width": [],
    "decode_stack_layer_fields": [],
    # x_dtype, x, packed, tile, scale_dtype, params, y_dtype, y, m, n, k, group, threads
    "int4_tile_gemv": [_INT, _PTR, _PTR, _I64, _INT, _PTR, _INT, _PTR, *[_I64] * 4, _INT],
    # dtype, kv_dtype, x, layers, num_layers, cos, sin, slots, tables, table_width, ctx_lens,
    # pending, batch, hidden, hq, hkv, head_dim, inter, block_size, tile, group, eps, scale, threads
    "decode_stack": [
        _INT,
        _INT,
        _PTR,
        _PTR,
        _I64,
        *[_PTR] * 4,
        _I64,
        _PTR,
        _PTR,
        *[_I64] * 9,
        _FLOAT,
        _FLOAT,
        _INT,
    ],
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path(compiler: str) -> Path:
    """Where the built library lives: one file per (sources, compiler, CPU)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(" ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    return default_cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the CPU kernels (once per machine) into %s", target)
    # Built beside the target and renamed: a concurrent start never loads half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
        subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if this machine has none yet; None
    (with a warning) where they cannot be built."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler (cc/gcc) found: the CPU kernels fall back to PyTorch")
        return None
    try:
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("the CPU kernels did not build (%s): falling back to PyTorch", detail.strip())
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def library_for(dtype: torch.dtype, device: torch.device | str) -> ctypes.CDLL | None:
    """The kernels where a layer of this dtype and device can use them (a CPU
    and a dtype in DTYPE_CODES, and a library that builds), else None: the
    caller keeps its PyTorch ops."""
    if torch.device(device).type != "cpu" or dtype not in DTYPE_CODES:
        return None
    return load_library()


def takes(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to a kernel as they are: on the CPU, one
    dtype the kernels take, contiguous."""
    dtype = tensors[0].dtype
    return dtype in DTYPE_CODES and all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    )


def takes_pools(x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """`takes` for activations `x` over a KV pool, whose dtype may differ from
    theirs (float32 activations over a bfloat16 pool)."""
    return takes(x) and takes(k_pool, v_pool)


def check(status: int, name: str) -> None:
    """Raise for a kernel's non-zero return code."""
    if status == -1:
        raise MemoryError(f"{name}: the C kernel could not allocate its scratch buffers")
    if status:
        raise ValueError(f"{name}: the C kernel refused its arguments (code {status})")
