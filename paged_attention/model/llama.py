"""The Llama-family decoder (Llama, Mistral, Qwen2) over packed tokens and the
paged KV pool.

`forward` takes the new tokens of every sequence in the step packed into one
[T] vector (no batch dimension, no padding); `AttentionMetadata` says which
tokens belong to which sequence and where their K/V go in the pool. Projections
are fused at load time (q|k|v into one matrix, gate|up into one) so each layer
runs three matmuls plus attention, and RoPE is applied to q and k together as
one [T, Hq + Hkv, D] view of the fused projection's output.

With a quantized scheme (`model/quant/`) the four projections of every layer
are `QuantLinear`s (int4 or int8 weights, filled from the same HF-named
tensors or from quantized records). The LM head is int8 per row under
int8/int4 and the file's own Q8_0 (int8 in groups) under gguf (see
`CausalLM.__init__`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from paged_attention import native
from paged_attention.attention.backend import AttentionBackend, select_attention_backend
from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.kv_cache import KVCachePool
from paged_attention.model.config import ModelConfig
from paged_attention.model.decode_stack import MAX_BATCH, DecodeStack
from paged_attention.model.layers import (
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    empty_param,
    rotate_rows_,
)
from paged_attention.model.quant import NONE, QuantizedTensor, QuantLinear, QuantScheme, Scratch
from paged_attention.model.quant.records import ChannelQuantized, GroupQuantized

if TYPE_CHECKING:
    from paged_attention.distributed.parallel_state import ParallelContext

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# Checkpoint tensors that carry no weights: old Llama checkpoints saved RoPE's
# inverse frequencies, which are recomputed from the config.
_IGNORED_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq",)


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: AttentionBackend,
        scheme: QuantScheme = NONE,
        scratch: Scratch | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = config.q_size + config.kv_size
        self.scale = config.head_dim**-0.5
        self._kernels: Any = native.library_for(dtype, device)  # RoPE of prompt rows in C
        qkv_rows = config.q_size + 2 * config.kv_size
        # Quantized: the projections are QuantLinears; dense: plain parameters.
        self.qkv_proj: QuantLinear | None = None
        self.o_proj: QuantLinear | None = None
        if scheme.quantized:
            assert scratch is not None, "quantized layers share a Scratch"
            name = f"model.layers.{layer_idx}.self_attn"
            self.qkv_proj = QuantLinear(
                qkv_rows,
                config.hidden_size,
                scheme,
                bias=config.qkv_bias,
                dtype=dtype,
                scratch=scratch,
                name=f"{name}.qkv_proj",
            )
            self.o_proj = QuantLinear(
                config.hidden_size,
                config.q_size,
                scheme,
                bias=config.o_proj_bias,
                dtype=dtype,
                scratch=scratch,
                name=f"{name}.o_proj",
            )
            return
        self.qkv_weight = empty_param(qkv_rows, config.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = empty_param(qkv_rows, dtype=dtype, device=device) if config.qkv_bias else None
        self.o_weight = empty_param(config.hidden_size, config.q_size, dtype=dtype, device=device)
        self.o_bias = (
            empty_param(config.hidden_size, dtype=dtype, device=device) if config.o_proj_bias else None
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCachePool,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = (
            F.linear(x, self.qkv_weight, self.qkv_bias) if self.qkv_proj is None else self.qkv_proj.forward(x)
        )
        layer = self.layer_idx
        k_pool, v_pool = kv_cache.key(layer), kv_cache.value(layer)
        fused = self.backend.decode_layer
        out = (
            None if fused is None else fused(qkv, cos, sin, k_pool, v_pool, meta, self.scale, self.num_heads)
        )
        if out is not None:  # a decode step in one kernel call (RoPE, KV write, attention)
            return (
                F.linear(out, self.o_weight, self.o_bias) if self.o_proj is None else self.o_proj.forward(out)
            )
        # q and k are adjacent columns, so one view rotates both at once.
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if not rotate_rows_(self._kernels, qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos, sin):
            qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        self.backend.write_kv(k_pool, v_pool, k, v, meta)
        out = self.backend.attention(q, k_pool, v_pool, meta, self.scale).reshape(num_tokens, -1)
        return F.linear(out, self.o_weight, self.o_bias) if self.o_proj is None else self.o_proj.forward(out)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: AttentionBackend,
        scheme: QuantScheme = NONE,
        scratch: Scratch | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp  # tensor parallel: o_proj and down_proj give partial sums
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer_idx, dtype, device, backend, scheme, scratch)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
            dtype,
            device,
            scheme,
            scratch,
            name=f"model.layers.{layer_idx}.mlp",
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCachePool,
        meta: AttentionMetadata,
        pending: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Updates the residual stream x in place and returns this layer's MLP
        output, *not yet added*: the next norm adds it as it normalises (one
        pass instead of two). `pending` is the previous layer's, added here first."""
        # Submodules are called through .forward: nn.Module.__call__ (hooks,
        # none here) cost ~1 ms of a 14 ms one-token step over 270 calls.
        attn = self.self_attn.forward(self.input_layernorm.add_forward(x, pending), cos, sin, kv_cache, meta)
        h = self.post_attention_layernorm.add_forward(
            x, attn if self.tp is None else self.tp.all_reduce(attn)
        )
        mlp = self.mlp.forward(h)
        return mlp if self.tp is None else self.tp.all_reduce(mlp)


class CausalLM(nn.Module):
    """A Llama-family causal LM. Build it with the target dtype and device
    (`CausalLM(config, dtype, device)`), then `load_weights` from HF-named tensors;
    the RoPE tables stay float32 whatever the dtype.

    `quantization` (a `QuantScheme`) stores the projections quantized; `dtype`
    is then the activations' dtype. `quantize_head` (the default for every
    quantized format) keeps the LM head quantized as well, and a tied
    embedding then looks its rows up in it: under int8/int4 as int8 per row;
    under gguf as the file has it, a Q8_0 head as int8 in groups of 32
    (exact; per-row int8 cost the default model 1.1 points of top-1
    agreement with float32), any other type dense."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: str = "auto",
        quantization: QuantScheme = NONE,
        quantize_head: bool | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"dtype {dtype} is not supported; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
            )
        # Tensor parallel: this rank's heads, MLP rows and vocabulary rows
        # (distributed/sharding.py); `vocab_size` stays the whole model's.
        self.tp = tp
        self.vocab_size = config.vocab_size
        if tp is not None:
            config = tp.layout(config).local_config()
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        scratch = Scratch() if quantization.quantized else None
        # One backend shared by every layer: it converts each step's metadata once.
        self.attn_backend = select_attention_backend(torch.device(device), attention_backend)
        if quantize_head is None:  # under tensor parallelism the vocabulary-split head is dense
            # An AWQ/GPTQ checkpoint's head is float: it stays dense, as stored.
            quantize_head = tp is None and quantization.quantized and not quantization.source
        self.head: QuantLinear | None = None
        if quantize_head:
            # gguf: the file's own head, Q8_0 as int8 in groups, else dense (never
            # requantized); int8/int4: int8 in groups of 32, as llama.cpp keeps
            # its heads at 8 bits (per row, the head alone cost the default
            # model 2 points of top-1 agreement; bench quant-accuracy).
            gguf = quantization.method == "gguf"
            self.head = QuantLinear(
                config.vocab_size,
                config.hidden_size,
                quantization if gguf else QuantScheme("int8g"),
                bias=False,
                dtype=dtype,
                scratch=scratch or Scratch(),
                name="lm_head",
                exact_only=gguf,
            )
        # None: a tied embedding read from the quantized head.
        self.embed_tokens: nn.Parameter | None = (
            None
            if self.head is not None and config.tie_word_embeddings
            else empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device, self.attn_backend, quantization, scratch, tp)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        # Decode steps of a few sequences through all layers in one C call
        # (`decode_stack.py`), set up at the first step after the weights load.
        self.use_decode_stack = True
        self._decode_stack: DecodeStack | None = None
        self._decode_stack_built = False
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device=device,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings or self.head is not None
            else empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The dense head's weight (a quantized head has `head.dequantize()`)."""
        if self.head is not None:
            raise ValueError("the LM head is quantized; read model.head.dequantize()")
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        assert weight is not None
        return weight

    def quant_layers(self) -> list[QuantLinear]:
        return [m for m in self.modules() if isinstance(m, QuantLinear)]

    def weight_bytes(self) -> int:
        """Bytes the weights take as stored (parameters and quantized buffers)."""
        params = sum(p.numel() * p.element_size() for p in self.parameters())
        return params + sum(layer.nbytes() for layer in self.quant_layers())

    @torch.no_grad()
    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) of every weight, as this model computes
        with it (quantized layers dequantized): what `load_weights` takes, so a
        dense model can be built over a quantized one's values."""
        dequantized: dict[int, torch.Tensor] = {}
        for name, (dest, start, end) in self._weight_targets().items():
            if isinstance(dest, QuantLinear):
                full = dequantized.setdefault(id(dest), dest.dequantize())
                yield name, full[start:end]
            else:
                yield name, dest[start:end].float()

    # ------------------------------------------------------------------ run
    # no_grad rather than inference_mode: inference tensors refuse in-place
    # updates outside inference mode, which would trip callers (a sampler
    # scaling logits in place) for no speed gain on these small ops.
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCachePool,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of the packed new tokens
        (`input_ids`, `positions`: long [T]); writes their K/V into `kv_cache`
        at `meta.slot_mapping`."""
        assert input_ids.dim() == 1 and positions.shape == input_ids.shape, (
            f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
            "must be matching 1-D packed tokens"
        )
        assert input_ids.shape[0] == meta.num_tokens, (
            f"{input_ids.shape[0]} tokens but metadata describes {meta.num_tokens}"
        )
        cfg = self.config
        assert (kv_cache.num_layers, kv_cache.num_kv_heads, kv_cache.head_dim) == (
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
        ), (
            f"KV pool is (layers, kv heads, head_dim) = "
            f"{(kv_cache.num_layers, kv_cache.num_kv_heads, kv_cache.head_dim)}, model needs "
            f"{(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)}"
        )
        if self.embed_tokens is not None:
            embed = F.embedding if self.tp is None else self.tp.embed
            x = embed(input_ids, self.embed_tokens)
        else:
            assert self.head is not None
            x = self.head.embed(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if not self._decode_stack_built:
            self._decode_stack = DecodeStack.build(self)
            self._decode_stack_built = True
        stack = self._decode_stack if self.use_decode_stack else None
        # Each layer's MLP output, added to x by the next norm.
        pending = None if stack is None else stack.run(x, cos, sin, kv_cache, meta)
        if pending is None:
            for layer in self.layers:
                pending = layer.forward(x, cos, sin, kv_cache, meta, pending)
        return self.norm.add_forward(x, pending)

    def decode_stack_serves(self, num_seqs: int) -> bool:
        """Whether a decode-only step of `num_seqs` sequences runs as one C call
        (`decode_stack.py`; built at the first forward)."""
        return self.use_decode_stack and self._decode_stack is not None and num_seqs < MAX_BATCH

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden] from `forward`
        (the engine passes only each sequence's last token). The matmul runs in
        the model dtype, as HF's lm_head does."""
        if self.head is not None:
            return self.head(hidden).float()
        if self.tp is not None:
            return self.tp.lm_head(hidden, self.lm_head_weight, self.vocab_size).float()
        return F.linear(hidden, self.lm_head_weight).float()

    # -------------------------------------------------------------- weights
    def _weight_targets(self) -> dict[str, tuple[torch.Tensor | QuantLinear, int, int]]:
        """HF tensor name -> (our parameter or quantized layer, first row, end
        row) it fills. Fused targets are filled a row block at a time."""
        cfg = self.config
        targets: dict[str, tuple[torch.Tensor | QuantLinear, int, int]] = {}

        def whole(name: str, target: torch.Tensor | QuantLinear) -> None:
            rows = target.out_features if isinstance(target, QuantLinear) else target.shape[0]
            targets[name] = (target, 0, rows)

        if self.embed_tokens is not None:
            whole("model.embed_tokens.weight", self.embed_tokens)
        if self.head is not None:
            whole("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", self.head)
        whole("model.norm.weight", self.norm.weight)
        if self.lm_head is not None:
            whole("lm_head.weight", self.lm_head)
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            whole(prefix + "input_layernorm.weight", layer.input_layernorm.weight)
            whole(prefix + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
            qkv: dict[str, torch.Tensor | QuantLinear | None]
            o: dict[str, torch.Tensor | QuantLinear | None]
            gate_up: dict[str, torch.Tensor | QuantLinear | None]
            down: dict[str, torch.Tensor | QuantLinear | None]
            if attn.qkv_proj is not None and attn.o_proj is not None:
                qkv = {"weight": attn.qkv_proj, "bias": attn.qkv_proj.bias}
                o = {"weight": attn.o_proj, "bias": attn.o_proj.bias}
            else:
                qkv = {"weight": attn.qkv_weight, "bias": attn.qkv_bias}
                o = {"weight": attn.o_weight, "bias": attn.o_bias}
            if mlp.gate_up_proj is not None and mlp.down_proj is not None:
                gate_up = {"weight": mlp.gate_up_proj, "bias": mlp.gate_up_proj.bias}
                down = {"weight": mlp.down_proj, "bias": mlp.down_proj.bias}
            else:
                gate_up = {"weight": mlp.gate_up_weight, "bias": mlp.gate_up_bias}
                down = {"weight": mlp.down_weight, "bias": mlp.down_bias}
            for kind, target in qkv.items():
                if target is None:
                    continue
                targets[f"{prefix}self_attn.q_proj.{kind}"] = (target, 0, q)
                targets[f"{prefix}self_attn.k_proj.{kind}"] = (target, q, q + kv)
                targets[f"{prefix}self_attn.v_proj.{kind}"] = (target, q + kv, q + 2 * kv)
            for kind, target in gate_up.items():
                if target is None:
                    continue
                targets[f"{prefix}mlp.gate_proj.{kind}"] = (target, 0, inter)
                targets[f"{prefix}mlp.up_proj.{kind}"] = (target, inter, 2 * inter)
            for kind, target in o.items():
                if target is not None:
                    whole(f"{prefix}self_attn.o_proj.{kind}", target)
            for kind, target in down.items():
                if target is not None:
                    whole(f"{prefix}mlp.down_proj.{kind}", target)
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Fill every parameter from Hugging Face-named tensors (any float
        dtype; converted to the model's) or quantized records (GGUF blocks
        repacked; dequantized where they fill a dense parameter). Raises
        ValueError naming any unexpected, duplicated, misshapen or missing tensor."""
        targets = self._weight_targets()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                # Tied: the head *is* the embedding, as in HF, whatever copy was saved.
                continue
            target = targets.get(name)
            if target is None:
                raise ValueError(
                    f"unexpected tensor {name!r} in the checkpoint: no such weight in a "
                    f"{self.config.architecture} with {self.config.num_layers} layers"
                )
            if name in loaded:
                raise ValueError(f"tensor {name!r} appears twice in the checkpoint")
            dest, start, end = target
            trailing = (dest.in_features,) if isinstance(dest, QuantLinear) else tuple(dest.shape[1:])
            expected = (end - start, *trailing)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            if isinstance(dest, QuantLinear):
                dest.load_rows(start, end, tensor)
            elif isinstance(tensor, (GroupQuantized, ChannelQuantized)):
                dest[start:end].copy_(tensor.dequantize())
            else:
                dest[start:end].copy_(tensor)
            loaded.add(name)
        missing = sorted(targets.keys() - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"{len(missing)} tensors missing from the checkpoint: {shown}")
        self._decode_stack_built = False  # its pointers are to the weights it finds then
        layers = self.quant_layers()
        if layers:
            kinds: dict[str, int] = {}
            for layer in layers:
                assert layer.loaded, f"{layer.name}: rows missing after a complete checkpoint"
                label = layer.kind + ("" if layer.exact else " (requantized)") * (layer.kind != "dense")
                kinds[label] = kinds.get(label, 0) + 1
            logger.info(
                "%s weights: %s; %.1f MiB in all",
                self.quantization.name,
                ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                self.weight_bytes() / 2**20,
            )
