"""The Llama-family decoder (Llama, Mistral, Qwen2) over packed tokens and the
paged KV pool.

`forward` takes the new tokens of every sequence in the step packed into one
[T] vector (no batch dimension, no padding); `AttentionMetadata` says which
tokens belong to which sequence and where their K/V go in the pool. Projections
are fused at load time (q|k|v into one matrix, gate|up into one) so each layer
runs three matmuls plus attention, and RoPE is applied to q and k together as
one [T, Hq + Hkv, D] view of the fused projection's output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from paged_attention.attention.backend import AttentionBackend, select_attention_backend
from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.kv_cache import KVCachePool
from paged_attention.model.config import ModelConfig
from paged_attention.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary, empty_param

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
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = config.q_size + config.kv_size
        self.scale = config.head_dim**-0.5
        qkv_rows = config.q_size + 2 * config.kv_size
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
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        # q and k are adjacent columns, so one view rotates both at once.
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        layer = self.layer_idx
        k_pool, v_pool = kv_cache.key(layer), kv_cache.value(layer)
        self.backend.write_kv(k_pool, v_pool, k, v, meta)
        out = self.backend.attention(q, k_pool, v_pool, meta, self.scale)
        return F.linear(out.reshape(num_tokens, -1), self.o_weight, self.o_bias)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer_idx, dtype, device, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCachePool,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Residual adds are in place: x is this forward's own activation buffer.
        x.add_(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x.add_(self.mlp(self.post_attention_layernorm(x)))


class CausalLM(nn.Module):
    """A Llama-family causal LM. Build it with the target dtype and device
    (`CausalLM(config, dtype, device)`), then `load_weights` from HF-named tensors;
    the RoPE tables stay float32 whatever the dtype."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"dtype {dtype} is not supported; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
            )
        self.config = config
        self.dtype = dtype
        # One backend shared by every layer: it converts each step's metadata once.
        self.attn_backend = select_attention_backend(torch.device(device), attention_backend)
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device, self.attn_backend) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device=device,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

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
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden] from `forward`
        (the engine passes only each sequence's last token). The matmul runs in
        the model dtype, as HF's lm_head does."""
        return F.linear(hidden, self.lm_head_weight).float()

    # -------------------------------------------------------------- weights
    def _weight_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """HF tensor name -> (our parameter, first row, end row) it fills.
        Fused parameters are filled a row block at a time."""
        cfg = self.config
        targets: dict[str, tuple[torch.Tensor, int, int]] = {}

        def whole(name: str, param: torch.Tensor) -> None:
            targets[name] = (param, 0, param.shape[0])

        whole("model.embed_tokens.weight", self.embed_tokens)
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
            parts = {"weight": attn.qkv_weight, "bias": attn.qkv_bias}
            for kind, param in parts.items():
                if param is None:
                    continue
                targets[f"{prefix}self_attn.q_proj.{kind}"] = (param, 0, q)
                targets[f"{prefix}self_attn.k_proj.{kind}"] = (param, q, q + kv)
                targets[f"{prefix}self_attn.v_proj.{kind}"] = (param, q + kv, q + 2 * kv)
            whole(prefix + "self_attn.o_proj.weight", attn.o_weight)
            if attn.o_bias is not None:
                whole(prefix + "self_attn.o_proj.bias", attn.o_bias)
            for kind, param in {"weight": mlp.gate_up_weight, "bias": mlp.gate_up_bias}.items():
                if param is None:
                    continue
                targets[f"{prefix}mlp.gate_proj.{kind}"] = (param, 0, inter)
                targets[f"{prefix}mlp.up_proj.{kind}"] = (param, inter, 2 * inter)
            whole(prefix + "mlp.down_proj.weight", mlp.down_weight)
            if mlp.down_bias is not None:
                whole(prefix + "mlp.down_proj.bias", mlp.down_bias)
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from Hugging Face-named tensors (any float
        dtype; converted to the model's). Raises ValueError naming any
        unexpected, duplicated, misshapen or missing tensor."""
        targets = self._weight_targets()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
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
            param, start, end = target
            expected = (end - start, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            param[start:end].copy_(tensor)
            loaded.add(name)
        missing = sorted(targets.keys() - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"{len(missing)} tensors missing from the checkpoint: {shown}")
