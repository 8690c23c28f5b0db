"""The "cpu" attention backend: decode queries attended by a small C kernel
(`paged_attention/csrc/paged_decode.c`) that reads K and V straight from the block pool, and
prompt chunks by the PyTorch path.

Why C: on a CPU, decode attention over the pool is bound by memory traffic.
The PyTorch path gathers each sequence's K blocks into a padded copy before
its batched matmul, so K crosses memory three times (read, write, read), and
at one sequence its dozen small ops per layer are mostly dispatch overhead.
The kernel reads each K and V row once, in one call per layer.

The kernel is compiled at first use with the engine's other C kernels
(`paged_attention/native.py`). Without a compiler, or if the build fails,
`load_kernel` returns None and the backend is the PyTorch one ("auto" picks
"torch"; asking for "cpu" raises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from paged_attention import native
from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention, prefill_into

# The kernel serves every decode batch. In isolation PyTorch's path (gather +
# an AMX batched matmul) was up to 20% faster on large bfloat16 batches (64
# sequences x 300 tokens), and the whole one-thread 64-sequence step 3% faster;
# but a served workload (128 requests, 16 at a time, this server and its
# load generator on 2 cores) gave 148 tok/s with the kernel against 116 with
# that split (two threads), 124 against 111 pinned to one core: one parallel
# region per layer, dynamically scheduled, suffers less from a busy core than
# a dozen statically split operators.


@dataclass(frozen=True)
class DecodeKernel:
    fn: Any  # the library's paged_decode_attention (a ctypes function)
    layer: Any  # its paged_decode_layer: RoPE, KV write and attention in one call


def load_kernel() -> DecodeKernel | None:
    """The compiled kernel (`native.load_library`), or None where it cannot be built."""
    lib = native.load_library()
    return None if lib is None else DecodeKernel(lib.paged_decode_attention, lib.paged_decode_layer)


def kernel_runs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (else the PyTorch path runs)."""
    return native.takes_pools(q, k_pool, v_pool)


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
        native.DTYPE_CODES[q.dtype],
        native.DTYPE_CODES[k_pool.dtype],
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
    native.check(status, "paged_decode_attention")


def cpu_paged_attention(
    kernel: DecodeKernel,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`torch_attention.paged_attention`'s contract, decode rows by the kernel."""
    if not kernel_runs(q, k_pool, v_pool):
        return paged_attention(q, k_pool, v_pool, meta, scale)
    num_tokens = q.shape[0]
    check_head_counts(q.shape[1], k_pool.shape[1])
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} tokens, metadata {meta.num_tokens}"
    out = torch.empty_like(q)
    if meta.decode_tables.rows.numel():
        decode_attention(kernel, q, k_pool, v_pool, meta, scale, out)
    prefill_into(q, k_pool, v_pool, meta, scale, out)
    return out


def decode_layer(
    kernel: DecodeKernel,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_heads: int,
) -> torch.Tensor | None:
    """A decode-only step's attention from the fused projection qkv [B, (Hq +
    2 Hkv) D] and RoPE's cos/sin ([B, 1, D] from `RotaryEmbedding.cos_sin`):
    rotates q and k, writes the new K/V at `meta.slot_mapping` and attends, in
    one kernel call. Returns [B, Hq * D], or None where this path does not
    apply (prompt tokens in the step, other dtypes or layouts): the caller
    runs the separate steps."""
    tables = meta.decode_tables
    batch = qkv.shape[0]
    dtype = qkv.dtype
    if (
        tables.rows.numel() != batch
        or not kernel_runs(qkv, k_pool, v_pool)
        or cos.dtype != dtype
        or not (cos.is_contiguous() and sin.is_contiguous())
    ):
        return None
    num_kv_heads, block_size, head_dim = k_pool.shape[1:]
    check_head_counts(num_heads, num_kv_heads)
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim, (
        f"qkv has {qkv.shape[1]} columns, expected ({num_heads} + 2 x {num_kv_heads}) x {head_dim}"
    )
    out = torch.empty(batch, num_heads * head_dim, dtype=dtype)
    status = kernel.layer(
        native.DTYPE_CODES[dtype],
        native.DTYPE_CODES[k_pool.dtype],
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        meta.slot_mapping.data_ptr(),
        tables.block_tables.data_ptr(),
        tables.block_tables.shape[1],
        tables.context_lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        num_kv_heads,
        block_size,
        head_dim,
        scale,
        torch.get_num_threads(),
    )
    native.check(status, "paged_decode_layer")
    return out
