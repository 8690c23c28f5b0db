"""Pick the attention implementation for a device: the Triton kernels on CUDA
when triton imports; on the CPU the C decode kernel of `cpu_kernel` when it
builds; else the PyTorch ops of `torch_attention` (also the tests' oracle).

Both backends expose the same two callables, each taking the step's metadata:

    write_kv(k_pool, v_pool, k [T, Hkv, D], v, meta) -> None  (at meta.slot_mapping)
    attention(q [T, Hq, D], k_pool, v_pool, meta, scale) -> [T, Hq, D]

The kernels need the step's block tables and lengths as device tensors
(`KernelMetadata`). Those are built once per step, on the first layer's call,
and kept for the later layers: the backend remembers the last metadata object
it converted (by identity, holding a reference, so a recycled id() cannot
alias). One backend instance must therefore be shared by all layers of a
model. CUDA graphs `pin` static buffers for the metadata they capture with.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention
from paged_attention.config import ATTENTION_BACKENDS
from paged_attention.kv_cache import write_kv as torch_write_kv

WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], None]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
# (qkv, cos, sin, k_pool, v_pool, meta, scale, num_heads) -> out [B, Hq * D] or None
DecodeLayer = Callable[..., torch.Tensor | None]

# Stands in for the SM count when the kernels run in Triton's CPU interpreter
# (tests): small, so split-K still gets exercised.
INTERPRETER_NUM_SMS = 4


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # "torch", "cpu" or "triton"
    write_kv: WriteKV
    attention: AttentionFn
    # Triton only: bind static kernel metadata to a metadata object (CUDA graphs).
    pin: Callable[[AttentionMetadata, KernelMetadata], None] | None = None
    # CPU kernel only: RoPE, KV write and attention of a decode-only step in one
    # call, from the fused projection (`cpu_kernel.decode_layer`; None: not this step).
    decode_layer: DecodeLayer | None = None


@dataclass(frozen=True)
class KernelMetadata:
    """The step's batch layout as the kernels read it."""

    block_tables: torch.Tensor  # [B, max_blocks] int32; rows padded with block 0
    context_lens: torch.Tensor  # [B] int32
    query_start: torch.Tensor  # [B + 1] int32
    max_query_len: int
    # None under CUDA graphs: the grid (split count) must not depend on it there.
    max_context_len: int | None


def build_kernel_metadata(meta: AttentionMetadata, device: torch.device) -> KernelMetadata:
    """One host tensor, one copy to the device (pinned and asynchronous on CUDA)."""
    batch = meta.num_seqs
    width = max((len(t) for t in meta.block_tables), default=0)
    width = max(width, 1)  # keep a real row stride even for an empty batch
    host = torch.zeros(batch * width + 2 * batch + 1, dtype=torch.int32)
    tables = host[: batch * width].view(batch, width)  # [B, W]
    for i, table in enumerate(meta.block_tables):
        if table:
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    host[batch * width : batch * width + batch] = torch.tensor(meta.context_lens, dtype=torch.int32)
    host[batch * width + batch :] = torch.tensor(meta.query_start, dtype=torch.int32)
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    return KernelMetadata(
        block_tables=dev[: batch * width].view(batch, width),
        context_lens=dev[batch * width : batch * width + batch],
        query_start=dev[batch * width + batch :],
        max_query_len=max(meta.query_lens, default=0),
        max_context_len=max(meta.context_lens, default=0),
    )


class TritonAttention:
    """The Triton kernels behind the backend interface, plus the per-step
    metadata conversion."""

    def __init__(self, device: torch.device) -> None:
        from paged_attention.attention import triton_kernels

        self.kernels = triton_kernels
        self.device = device
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            self.num_sms = INTERPRETER_NUM_SMS
        self._last: tuple[AttentionMetadata, KernelMetadata] | None = None

    def kernel_metadata(self, meta: AttentionMetadata) -> KernelMetadata:
        if self._last is None or self._last[0] is not meta:
            self._last = (meta, build_kernel_metadata(meta, self.device))
        return self._last[1]

    def pin(self, meta: AttentionMetadata, kernel_meta: KernelMetadata) -> None:
        """Use `kernel_meta` (static buffers) whenever `meta` comes by: for
        CUDA-graph capture, whose kernels must read fixed addresses."""
        self._last = (meta, kernel_meta)

    def write_kv(
        self,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        self.kernels.write_kv(k_pool, v_pool, k, v, meta.slot_mapping)

    def attention(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, _ = q.shape
        num_kv_heads = k_pool.shape[1]
        check_head_counts(num_heads, num_kv_heads)
        km = self.kernel_metadata(meta)
        if km.max_query_len == 1 and num_tokens == meta.num_seqs:
            splits = self.kernels.decode_num_splits(
                meta.num_seqs, num_kv_heads, self.num_sms, km.max_context_len
            )
            return self.kernels.decode_attention(
                q, k_pool, v_pool, km.block_tables, km.context_lens, scale, splits
            )
        return self.kernels.prefill_attention(
            q, k_pool, v_pool, km.block_tables, km.context_lens, km.query_start, scale
        )

    def backend(self) -> AttentionBackend:
        return AttentionBackend("triton", self.write_kv, self.attention, self.pin)


def triton_available() -> bool:
    """triton is importable and can run here: a CUDA device, or its CPU
    interpreter (TRITON_INTERPRET=1, used by the tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401  (imported to find out whether it can be)
    except Exception:  # a broken install (missing driver libraries) counts as absent
        return False
    return True


def _torch_write_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    torch_write_kv(k_pool, v_pool, k, v, meta.slot_mapping, meta.write_rows(k_pool.shape[1]))


def torch_backend() -> AttentionBackend:
    return AttentionBackend("torch", _torch_write_kv, paged_attention)


def cpu_backend() -> AttentionBackend | None:
    """The C decode kernel with PyTorch's prompt path, or None where it cannot be built."""
    from paged_attention.attention.cpu_kernel import cpu_paged_attention, decode_layer, load_kernel

    kernel = load_kernel()
    if kernel is None:
        return None
    return AttentionBackend(
        "cpu",
        _torch_write_kv,
        functools.partial(cpu_paged_attention, kernel),
        decode_layer=functools.partial(decode_layer, kernel),
    )


def select_attention_backend(device: torch.device | str, kind: str = "auto") -> AttentionBackend:
    """`kind`: "auto" (Triton on CUDA when triton imports; on the CPU the C
    kernel when it builds; else PyTorch), "torch", "cpu" or "triton" (these
    two raise if they cannot run on `device`). Call once per model and share
    the result among its layers."""
    device = torch.device(device)
    if kind not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {kind!r}; use one of {', '.join(map(repr, ATTENTION_BACKENDS))}"
        )
    if kind == "torch":
        return torch_backend()
    if kind == "cpu" or (kind == "auto" and device.type == "cpu"):
        backend = cpu_backend() if device.type == "cpu" else None
        if backend is not None:
            return backend
        if kind == "cpu":
            raise ValueError(
                f"the cpu attention backend cannot run on {device}: it needs a CPU device and a C "
                "compiler (cc or gcc) to build its kernel; see the log for the build error"
            )
        return torch_backend()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    # Device first: importing triton costs a second or two, never paid on the CPU path.
    runnable = (device.type == "cuda" or (interpreted and device.type == "cpu")) and triton_available()
    if kind == "triton":
        if not runnable:
            raise ValueError(
                f"the triton attention backend cannot run on {device}: it needs triton "
                "(pip install 'paged-attention[gpu]') and a CUDA device, or TRITON_INTERPRET=1 on the CPU"
            )
        return TritonAttention(device).backend()
    # auto: never pick the interpreter by itself, it is for tests only.
    if device.type == "cuda" and runnable:
        return TritonAttention(device).backend()
    return torch_backend()
