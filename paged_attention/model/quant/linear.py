"""`QuantLinear`: y = x W^T + b with W kept quantized (int4 in groups, or int8
per output channel or in groups of 32) and multiplied by the engine's C
kernels (`csrc/int4_gemv.c`, `csrc/quant_gemv.c`) or PyTorch's CPU
weight-only kernels.

A layer is filled a row block at a time (fused q|k|v and gate|up take three
and two checkpoint tensors), from float tensors or quantized records, and
settles its format once every row has arrived:

* int4 when the scheme asks for it and the kernel takes the shape; under
  "gguf" only if every block came as GGUF 4-bit data (exact), else int8;
* int8 in groups of 32 ("int8g") when every block came as GGUF Q8_0 data
  (exact), or quantized so under the "int8g" scheme (the int8 and int4
  schemes' LM head);
* int8 per output channel (the int8 scheme, and the fallback above);
* dense in the model dtype when neither kernel takes the shape, or when the
  layer must stay exact and row-readable (`exact_only`: a GGUF's LM head) and
  is not int8g.

Forward picks a path by the number of rows: a kernel below `dense_rows`,
else a dense matmul over weights dequantized on the spot into a scratch
buffer shared by the model's layers. int4 and int8g run the engine's C
kernels where they build (`native`): float32 sums over the exact scales, in
the activations' dtype (float32 or bfloat16), W read once per 8 rows.
Elsewhere, and for per-channel int8, PyTorch's kernels run in bfloat16 and
read W once per 4 rows. So at large batches (prompts, many decodes) the
dense matmul is faster; a weight read from memory costs 4-8x less than a
dense one, which is what decode at small batches is bound by. With
`scheme.dense_copy` the dense path multiplies a dense copy of W instead,
made once DENSE_COPY_AFTER calls have had DENSE_COPY_ROWS rows or more: a
server under load makes it within a few steps, while one user's occasional
prompt is served by dequantizing on the spot and never pays its memory. A
bfloat16 copy is kept in oneDNN's blocked layout where it can be
(`kernels.pack_bf16`), which spares every call a reorder of W.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from paged_attention import native
from paged_attention.model.quant import kernels
from paged_attention.model.quant.quantize import quantize_int4, quantize_int8, quantize_int8_groups
from paged_attention.model.quant.records import ChannelQuantized, GroupQuantized
from paged_attention.model.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

KINDS = ("int4", "int8g", "int8", "dense")
# Rows from which the dense path (dequantize W, then a dense matmul) replaces
# the kernel. Measured with `paged-attention bench quant-kernels` on SmolLM2
# shapes, one thread: see DENSE_ROWS_NOTE in bench/quant.py.
DENSE_ROWS = {"int4": 48, "int8": 16, "int8g": 16}
# With a dense copy at hand the dense path costs no dequantization and wins
# from fewer rows: SmolLM2 decode steps, one thread (bench decode-step), 8 rows
# 53 ms on the kernel vs 64 dense, 16 rows 91 vs 78. A copy packed for oneDNN
# (bfloat16) wins from 8: float32 activations, 8 seqs 31.8-32.5 ms on the
# kernels vs 27.6-28.5 dense, 12 seqs 48.2-48.9 vs 41.1-41.8; at 4 a tie.
DENSE_COPY_ROWS = 16
PACKED_COPY_ROWS = 8
DENSE_COPY_AFTER = 4
_NEVER = 1 << 62
# Largest weight slice the int8 dense path dequantizes at once (a 4 MiB bf16 block).
_CHUNK_ELEMENTS = 1 << 21


@dataclass
class Scratch:
    """Reusable buffers for the dense path, shared by every layer of a model
    (layers run one at a time). Reuse matters: a fresh multi-megabyte tensor
    per call is a fresh mmap, and its page faults cost more than the math."""

    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[key] = buf
        return buf[:numel]


Piece = torch.Tensor | GroupQuantized | ChannelQuantized


class QuantLinear(nn.Module):
    def __init__(
        self,
        out_features: int,
        in_features: int,
        scheme: QuantScheme,
        *,
        bias: bool,
        dtype: torch.dtype,
        scratch: Scratch,
        name: str = "",
        exact_only: bool = False,
    ) -> None:
        super().__init__()
        if not scheme.quantized:
            raise ValueError("QuantLinear needs a quantized scheme; dense layers use plain parameters")
        self.out_features = out_features
        self.in_features = in_features
        self.scheme = scheme
        self.dtype = dtype  # activations in and out
        # The dense path's matmul dtype: bfloat16 only where it runs natively,
        # under bfloat16 activations or where the scheme asks for it.
        bf16 = dtype == torch.bfloat16 or scheme.bf16_matmuls
        self.dense_dtype = torch.bfloat16 if bf16 and kernels.fast_bf16_matmul() else torch.float32
        self.scratch = scratch
        self.name = name
        # Int8 groups or dense, never requantized (a GGUF's LM head, which is
        # also the embedding, looked up by row).
        self.exact_only = exact_only
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.kind = "pending"
        self.exact = True  # every value is the checkpoint's own (no rounding at load)
        self.dense_rows = _NEVER
        self.native = False  # whether the engine's own C kernel serves the kernel path
        self._pieces: list[tuple[int, int, Piece]] = []
        self._calls_before_copy = 0
        self._rows_loaded = 0
        self._pack_copy = False  # the dense copy kept in oneDNN's layout (`kernels.pack_bf16`)
        self.copy_rows = DENSE_COPY_ROWS

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}, group={self.group_size}"

    @property
    def group_size(self) -> int | None:
        return self.scheme.group_size if self.kind == "int4" else None

    # ---------------------------------------------------------------- loading
    def load_rows(self, start: int, end: int, weight: Piece) -> None:
        """Rows [start, end) of W, as floats or a quantized record."""
        shape = tuple(weight.shape)
        if shape != (end - start, self.in_features):
            raise ValueError(f"{self.name}: rows {start}:{end} got shape {shape}")
        if self.kind != "pending":
            raise ValueError(f"{self.name}: weights already loaded")
        self._pieces.append((start, end, weight))
        self._rows_loaded += end - start
        if self._rows_loaded == self.out_features:
            self._settle()

    @property
    def loaded(self) -> bool:
        return self.kind != "pending"

    def _settle(self) -> None:
        pieces = sorted(self._pieces, key=lambda p: p[0])
        self._pieces = []
        n, k = self.out_features, self.in_features
        group = self.scheme.group_size
        all_groups = all(
            isinstance(p, GroupQuantized) and p.group_size == group and p.bits == 4 for _, _, p in pieces
        )
        all_int8_groups = all(
            isinstance(p, GroupQuantized) and p.bits == 8 and p.group_size == kernels.INT8_GROUP_SIZE
            for _, _, p in pieces
        )
        wants_int4 = self.scheme.method == "int4" or (self.scheme.method == "gguf" and all_groups)
        if all_int8_groups and self.scheme.method in ("gguf", "int8g"):
            groups8 = [p for _, _, p in pieces if isinstance(p, GroupQuantized)]
            self._set_int8_groups(
                torch.cat([r.values for r in groups8]), torch.cat([r.scales for r in groups8])
            )
        elif self.scheme.method == "int8g" and k % kernels.INT8_GROUP_SIZE == 0:
            groups8 = [quantize_int8_groups(_float(p)) for _, _, p in pieces]
            self.exact = False
            self._set_int8_groups(
                torch.cat([r.values for r in groups8]), torch.cat([r.scales for r in groups8])
            )
        elif self.exact_only:
            self.exact = all(isinstance(p, torch.Tensor) for _, _, p in pieces)
            self._set_dense(torch.cat([_float(p) for _, _, p in pieces]))
        elif wants_int4 and kernels.int4_supported(n, k, group):
            records = [
                p if isinstance(p, GroupQuantized) and p.group_size == group else _group(p, group)
                for _, _, p in pieces
            ]
            self.exact = all_groups
            self._set_int4(
                torch.cat([r.values for r in records]),
                torch.cat([r.scales for r in records]),
                torch.cat([r.offsets for r in records]),
            )
        elif kernels.int8_supported(k):
            records8 = [
                p if isinstance(p, ChannelQuantized) else quantize_int8(_float(p)) for _, _, p in pieces
            ]
            self.exact = all(isinstance(p, ChannelQuantized) for _, _, p in pieces)
            self._set_int8(torch.cat([r.values for r in records8]), torch.cat([r.scales for r in records8]))
        else:
            self.exact = all(isinstance(p, torch.Tensor) for _, _, p in pieces)
            self._set_dense(torch.cat([_float(p) for _, _, p in pieces]))
        # Large calls left before the dense copy is made (0: never), and the
        # rows from which a call is large (and the copy then serves).
        self._calls_before_copy = DENSE_COPY_AFTER if self.scheme.dense_copy and self.kind != "dense" else 0
        self._pack_copy = self.dense_dtype == torch.bfloat16 and kernels.bf16_packing()
        self.copy_rows = PACKED_COPY_ROWS if self._pack_copy else DENSE_COPY_ROWS

    def _set_int4(self, values: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
        self.kind = "int4"
        self.packed: torch.Tensor
        self.group_params: torch.Tensor
        self.register_buffer("packed", kernels.pack_int4(values), persistent=False)
        # The dense path unpacks the kernel's layout; without a known one the kernel runs always.
        self.dense_rows = DENSE_ROWS["int4"] if kernels.int4_pack_layout() is not None else _NEVER
        tile = kernels.native_int4_tile()
        self.native = (
            native.library_for(self.dtype, "cpu") is not None
            and tile is not None
            and self.out_features % tile == 0
        )
        # Scales and offsets as loaded (float16 or float32, exact), in the C
        # kernel's tiles: its and the dense path's. PyTorch's kernel wants them
        # in bfloat16: made on its first call, only where the C kernel cannot run.
        self.register_buffer(
            "group_params",
            kernels.int4_params(scales, offsets, tile if self.native and tile else self.out_features),
            persistent=False,
        )
        self._scales_and_zeros: torch.Tensor | None = None

    def _set_int8_groups(self, biased: torch.Tensor, scales: torch.Tensor) -> None:
        """From 8-bit records (values q + 128, offsets -128 s: GGUF Q8_0)."""
        n, k = self.out_features, self.in_features
        g = kernels.INT8_GROUP_SIZE
        self.kind = "int8g"
        self.group_values: torch.Tensor
        self.group_scales: torch.Tensor
        self.group_kernel_scales: torch.Tensor
        signed = (biased.to(torch.int16) - 128).to(torch.int8)
        # [G, N, 32]: each group's weights one contiguous matrix, as the kernel takes them.
        self.register_buffer(
            "group_values", signed.view(n, k // g, g).transpose(0, 1).contiguous(), persistent=False
        )
        self.register_buffer("group_scales", scales.float().contiguous(), persistent=False)  # [N, G]
        self.register_buffer(
            "group_kernel_scales", scales.t().to(kernels.KERNEL_DTYPE).contiguous(), persistent=False
        )
        self.dense_rows = DENSE_ROWS["int8g"]
        # The engine's C kernel at every kernel row count (float32 sums, a pass over W per 8 rows).
        self.native = native.library_for(self.dtype, "cpu") is not None

    def _set_int8(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.kind = "int8"
        self.values: torch.Tensor
        self.scales: torch.Tensor
        self.kernel_scales: torch.Tensor
        self.register_buffer("values", values.contiguous(), persistent=False)
        self.register_buffer("scales", scales.float(), persistent=False)
        self.register_buffer("kernel_scales", scales.to(kernels.KERNEL_DTYPE), persistent=False)
        self.dense_rows = DENSE_ROWS["int8"]

    def _set_dense(self, weight: torch.Tensor) -> None:
        self.kind = "dense"
        self.weight: torch.Tensor
        self.register_buffer("weight", weight.to(self.dtype).contiguous(), persistent=False)
        self.dense_rows = 0

    # ------------------------------------------------------------------- run
    def forward(self, x: torch.Tensor, dense_out: bool = False) -> torch.Tensor:
        """x W^T + b in the activations' dtype; with `dense_out`, the dense
        path's result stays in its matmul dtype (bfloat16 under float32
        activations), for a consumer that would round it there anyway."""
        if self._calls_before_copy and x.shape[0] >= self.copy_rows:
            self._calls_before_copy -= 1
            if not self._calls_before_copy:
                self._make_dense_copy()
        if x.shape[0] < self.dense_rows:
            y = self._kernel(x)
        elif self.kind == "dense":
            return F.linear(x, self.weight, self.bias)
        else:
            y = self._dense(x, dense_out)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype in native.DTYPE_CODES:
            if self.kind == "int4":
                return kernels.native_int4_mm(
                    x, self.packed, self.group_params, self.scheme.group_size, self.dtype
                )
            return kernels.native_int8_group_mm(x, self.group_values, self.group_scales, self.dtype)
        xk = x if x.dtype == kernels.KERNEL_DTYPE else x.to(kernels.KERNEL_DTYPE)
        if self.kind == "int4":
            if self._scales_and_zeros is None:
                self._scales_and_zeros = kernels.int4_scales_and_zeros(self.group_params)
            y = kernels.int4_mm(xk, self.packed, self.scheme.group_size, self._scales_and_zeros)
        elif self.kind == "int8g":
            y = kernels.int8_group_mm(xk, self.group_values, self.group_kernel_scales)
        else:
            y = kernels.int8_mm(xk, self.values, self.kernel_scales)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def _dense(self, x: torch.Tensor, dense_out: bool = False) -> torch.Tensor:
        y = self._dense_matmul(x if x.dtype == self.dense_dtype else x.to(self.dense_dtype))
        return y if dense_out or y.dtype == self.dtype else y.to(self.dtype)

    def _dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        copy = getattr(self, "dense_weight", None)
        if copy is not None:
            return kernels.packed_bf16_linear(x, copy) if copy.is_mkldnn else F.linear(x, copy)
        n, k = self.out_features, self.in_features
        if self.kind == "int8g":
            return self._matmul_by_row_chunks(x, lambda rows, w: w.copy_(self._group_rows(rows)))
        if self.kind == "int4":
            weight = self.scratch.get("weight", n * k, x.dtype)
            codes = self.scratch.get("codes", n * k, torch.uint8)
            wt = kernels.dequantize_int4_t(
                self.packed, self.group_params, n, k, self.scheme.group_size, codes, weight.view(k, n)
            )
            return torch.mm(x, wt)
        # int8 values are exact in bfloat16; the per-row scale moves to the output.
        return self._matmul_by_row_chunks(x, lambda rows, w: w.copy_(self.values[rows])).mul_(self.scales)

    def _make_dense_copy(self) -> None:
        self.dense_weight: torch.Tensor
        weight = self.dequantize().to(self.dense_dtype)
        if self._pack_copy:
            weight = kernels.pack_bf16(weight)
        self.register_buffer("dense_weight", weight, persistent=False)
        self.dense_rows = min(self.dense_rows, self.copy_rows)

    def _matmul_by_row_chunks(
        self, x: torch.Tensor, fill: Callable[[slice, torch.Tensor], object]
    ) -> torch.Tensor:
        """x W^T with W dequantized a row chunk at a time (`fill(rows, out)`
        writes rows of W into `out`) into one small scratch buffer: a large
        matrix (a vocabulary head) never needs a whole dense copy, and the
        chunk stays in cache."""
        n, k = self.out_features, self.in_features
        weight = self.scratch.get("weight", min(n * k, _CHUNK_ELEMENTS), x.dtype)
        chunk = max(1, min(n, _CHUNK_ELEMENTS // k))
        outs = []
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            w = weight[: (rows.stop - start) * k].view(rows.stop - start, k)
            fill(rows, w)
            outs.append(F.linear(x, w))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _group_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """float32 rows of a grouped int8 W: a range, or ids (an embedding lookup)."""
        values = self.group_values[:, rows].transpose(0, 1).float()  # [rows, G, 32]
        return values.mul_(self.group_scales[rows].unsqueeze(-1)).reshape(-1, self.in_features)

    # --------------------------------------------------------------- inspect
    def dequantize(self) -> torch.Tensor:
        """float32 W [N, K] with the values the kernel computes with."""
        if self.kind == "int4":
            n, k, g = self.out_features, self.in_features, self.scheme.group_size
            q = kernels.unpack_int4(self.packed, n, k).float().view(n, k // g, g)
            scales, offsets = kernels.int4_params_by_group(self.group_params)
            return q.mul_(scales.t().unsqueeze(-1)).add_(offsets.t().unsqueeze(-1)).view(n, k)
        if self.kind == "int8":
            return self.values.float() * self.kernel_scales.float().unsqueeze(-1)
        if self.kind == "int8g":
            return self._group_rows(slice(None))
        if self.kind == "dense":
            return self.weight.float()
        raise ValueError(f"{self.name}: weights not loaded yet")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W in the layer's dtype (a tied embedding's lookup)."""
        if self.kind == "int8":
            rows = F.embedding(ids, self.values).float().mul_(self.scales.float()[ids].unsqueeze(-1))
            return rows.to(self.dtype)
        if self.kind == "int8g":
            return self._group_rows(ids).to(self.dtype)
        if self.kind == "dense":
            return F.embedding(ids, self.weight)
        raise ValueError(
            f"{self.name}: an embedding lookup needs int8, int8g or dense weights, not {self.kind}"
        )

    def nbytes(self) -> int:
        """Bytes of the weight as stored (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _float(piece: Piece) -> torch.Tensor:
    return piece.dequantize() if isinstance(piece, (GroupQuantized, ChannelQuantized)) else piece.float()


def _group(piece: Piece, group_size: int) -> GroupQuantized:
    return quantize_int4(_float(piece), group_size)
