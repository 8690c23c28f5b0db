"""The "cpu" attention backend: decode queries attended by a small C kernel
(`csrc/paged_decode.c`) that reads K and V straight from the block pool, and
prompt chunks by the PyTorch path.

Why C: on a CPU, decode attention over the pool is bound by memory traffic.
The PyTorch path gathers each sequence's K blocks into a padded copy before
its batched matmul, so K crosses memory three times (read, write, read), and
at one sequence its dozen small ops per layer are mostly dispatch overhead.
The kernel reads each K and V row once, in one call per layer.

The kernel is compiled at first use with the system's C compiler (`cc -O3
-march=native -fopenmp`, about a second) into the cache folder, keyed by its
source, the compiler and this CPU's flags, and loaded with ctypes. Its OpenMP
runtime resolves to the libgomp PyTorch already loaded (one thread pool).
Without a compiler, or if the build fails, `load_kernel` returns None and the
backend is the PyTorch one ("auto" picks "torch"; asking for "cpu" raises).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention, prefill_into
from paged_attention.config import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# In bfloat16 on a CPU with AMX, PyTorch's gather + batched matmul (an AMX
# matmul) overtakes the kernel beyond about this many context tokens in the
# step's decode batch (attention over SmolLM2's 9/3 heads, one and two
# threads: 16 seqs x 300 tokens 0.96-1.04x, 64 x 300 0.79x, 1 x 1000 1.3-1.5x).
# In float32 the kernel was faster at every size measured (1.1-2.7x).
BF16_MAX_CONTEXT_TOKENS = 4096


@dataclass(frozen=True)
class DecodeKernel:
    fn: Any  # a ctypes function (its type is private to ctypes)
    path: Path


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path(compiler: str) -> Path:
    """Where the built kernel lives: one file per (source, compiler, CPU)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    return default_cache_dir() / f"paged_decode-{key}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the CPU attention kernel (once per machine) into %s", target)
    # Built beside the target and renamed: a concurrent start never loads half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, check=True
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_kernel() -> DecodeKernel | None:
    """The compiled kernel, building it if this machine has none yet; None
    (with a warning) where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler (cc/gcc) found: CPU attention uses the PyTorch path")
        return None
    try:
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("the CPU attention kernel did not build (%s): using the PyTorch path", detail.strip())
        return None
    fn = lib.paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    fn.argtypes += [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return DecodeKernel(fn, path)


def kernel_runs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (else the PyTorch path runs)."""
    return (
        q.device.type == "cpu"
        and q.dtype in _DTYPE_CODES
        and k_pool.dtype == q.dtype
        and v_pool.dtype == q.dtype
        and q.is_contiguous()
        and k_pool.is_contiguous()
        and v_pool.is_contiguous()
    )


def decode_attention(
    kernel: DecodeKernel,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Attention of the step's decode queries, written into their rows of `out`."""
    tables = meta.decode_tables
    _, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_pool.shape[1], k_pool.shape[2]
    status = kernel.fn(
        _DTYPE_CODES[q.dtype],
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        tables.block_tables.data_ptr(),
        tables.block_tables.shape[1],
        tables.context_lens.data_ptr(),
        tables.rows.data_ptr(),
        out.data_ptr(),
        tables.rows.numel(),
        num_heads,
        num_kv_heads,
        block_size,
        head_dim,
        scale,
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("the CPU attention kernel could not allocate its scratch buffers")


def cpu_paged_attention(
    kernel: DecodeKernel,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`torch_attention.paged_attention`'s contract, decode rows by the kernel
    where it is the faster of the two (`BF16_MAX_CONTEXT_TOKENS`)."""
    large = q.dtype == torch.bfloat16 and meta.decode_tables.num_context_tokens > BF16_MAX_CONTEXT_TOKENS
    if large or not kernel_runs(q, k_pool, v_pool):
        return paged_attention(q, k_pool, v_pool, meta, scale)
    num_tokens = q.shape[0]
    check_head_counts(q.shape[1], k_pool.shape[1])
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} tokens, metadata {meta.num_tokens}"
    out = torch.empty_like(q)
    if meta.decode_tables.rows.numel():
        decode_attention(kernel, q, k_pool, v_pool, meta, scale, out)
    prefill_into(q, k_pool, v_pool, meta, scale, out)
    return out
