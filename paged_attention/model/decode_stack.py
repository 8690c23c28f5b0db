"""A decode step through all decoder layers in one C call (`csrc/decode_stack.c`).

Where it runs: a CPU model whose every projection is an int4 `QuantLinear`
on the engine's C kernel (a GGUF's Q4_0/Q4_1/Q4_K model, AWQ/GPTQ, int4),
without tensor parallelism, on a decode-only step of fewer than
`MAX_BATCH` sequences. It calls the kernels the layers call, in their order,
so its tokens are the layer-by-layer path's wherever the layers run the int4
kernel too (tested bit for bit); it saves the Python between them, which at
one sequence on two threads was a third of the step. (From 16 rows on, a
layer with a dense copy multiplies that instead: the stack keeps the kernel
up to MAX_BATCH, where it is faster.) Anything else returns None from
`DecodeStack.build` or `run`, and the model runs its layers one by one.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from paged_attention import native
from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.kv_cache import KVCachePool
from paged_attention.model.quant import QuantLinear, kernels

# Fewer sequences than this. Measured on SmolLM2 Q4_1, two threads, 64-token
# prompts and outputs: 16 sequences 594 tok/s against 477 through the layers
# (which multiply a dense bfloat16 copy from 16 rows on), 24 equal (632), 32
# 647 against 767: from there the weights' reads are shared by enough rows
# that the dense matmul's speed wins.
MAX_BATCH = 24
# Per layer, the int64 fields `decode_stack` reads (its enum): the two norm
# weights, the layer's K and V pools, then per projection its packed values,
# params, bias (0: none) and scale dtype.
PROJECTIONS = ("qkv", "o", "gate_up", "down")
LAYER_FIELDS = 4 + 4 * len(PROJECTIONS)


@dataclass
class DecodeStack:
    fn: Any  # the library's decode_stack (a ctypes function)
    # int64 [layers x LAYER_FIELDS], pools filled per KV cache (a ctypes array,
    # not a tensor: one made under inference mode could not be updated outside it)
    weights: ctypes.Array[ctypes.c_int64]
    num_layers: int
    dtype: torch.dtype
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    tile: int
    group: int
    eps: float
    scale: float
    _bound: weakref.ref[KVCachePool] | None = None  # the KV cache whose pools `weights` holds

    @classmethod
    def build(cls, model: Any) -> DecodeStack | None:
        """The stack for `model` (a CausalLM), or None where it does not apply."""
        lib = native.library_for(model.dtype, model.norm.weight.device)
        tile = kernels.native_int4_tile()
        if lib is None or tile is None or model.tp is not None or model.attn_backend.decode_layer is None:
            return None
        rows = []
        groups: set[int] = set()
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(_runs_int4(p) for p in projections):
                return None
            groups.update(p.scheme.group_size for p in projections)
            fields = [
                layer.input_layernorm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(),
                0,
                0,  # K and V pools: `_bind`
            ]
            for p in projections:
                bias = 0 if p.bias is None else p.bias.data_ptr()
                params = p.group_params
                fields += [p.packed.data_ptr(), params.data_ptr(), bias, kernels.scale_code(params)]
            rows.append(fields)
        if len(groups) != 1:
            return None
        assert lib.decode_stack_layer_fields() == LAYER_FIELDS, "decode_stack.c reads another layout"
        cfg = model.config
        norm = model.layers[0].input_layernorm
        return cls(
            fn=lib.decode_stack,
            weights=(ctypes.c_int64 * (len(rows) * LAYER_FIELDS))(*(v for row in rows for v in row)),
            num_layers=len(rows),
            dtype=model.dtype,
            hidden=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            tile=tile,
            group=groups.pop(),
            eps=norm.eps,
            scale=model.layers[0].self_attn.scale,
        )

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCachePool,
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        """The last layer's MLP output (not yet added to x, as the layers
        return it), with x updated in place; None where this step is not one
        the stack takes (prompt tokens, too many sequences, other layouts)."""
        batch = x.shape[0]
        tables = meta.decode_tables
        if (
            batch >= MAX_BATCH
            or tables.rows.numel() != batch
            or x.dtype != self.dtype
            or cos.dtype != self.dtype
            or not native.takes(x, cos, sin)
            or not native.takes(kv_cache.key(0), kv_cache.value(0))
        ):
            return None
        if self._bound is None or self._bound() is not kv_cache:
            self._bind(kv_cache)
        pending = torch.empty_like(x)
        status = self.fn(
            native.DTYPE_CODES[self.dtype],
            native.DTYPE_CODES[kv_cache.dtype],
            x.data_ptr(),
            ctypes.addressof(self.weights),
            self.num_layers,
            cos.data_ptr(),
            sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            tables.block_tables.data_ptr(),
            tables.block_tables.shape[1],
            tables.context_lens.data_ptr(),
            pending.data_ptr(),
            batch,
            self.hidden,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate,
            kv_cache.block_size,
            self.tile,
            self.group,
            self.eps,
            self.scale,
            torch.get_num_threads(),
        )
        native.check(status, "decode_stack")
        return pending

    def _bind(self, kv_cache: KVCachePool) -> None:
        for i in range(self.num_layers):
            self.weights[i * LAYER_FIELDS + 2] = kv_cache.key(i).data_ptr()
            self.weights[i * LAYER_FIELDS + 3] = kv_cache.value(i).data_ptr()
        self._bound = weakref.ref(kv_cache)


def _runs_int4(p: QuantLinear | None) -> bool:
    """An int4 layer on the C kernel."""
    return p is not None and p.kind == "int4" and p.native
