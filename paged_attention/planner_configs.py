"""The planner's built-in tables: model shapes (the numbers from each model's
published config.json) and device memory sizes. No download: a model not in
the table is read from a local config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v

    @property
    def num_params(self) -> int:
        """Parameters of a Llama-style decoder: embeddings (and an untied LM
        head), attention q/k/v/o, the gated MLP (3 matrices), two RMSNorms per
        layer and a final one."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * per_layer + h

    @classmethod
    def from_config(cls, path: str | Path) -> ModelSpec:
        """From a Hugging Face config.json (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ValueError(f"no config.json at {str(path)!r}")
        c = json.loads(path.read_text())
        heads = c["num_attention_heads"]
        return cls(
            name=str(path.parent.name or path),
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", False)) or c.get("model_type") == "qwen2",
        )


# From each model's config.json on the Hugging Face Hub (meta-llama/Llama-2-*-hf,
# meta-llama/Meta-Llama-3-*, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B,
# HuggingFaceTB/SmolLM2-*). Parameter counts these give: Llama-2-7B 6.74B,
# 13B 13.02B, 70B 68.98B; Llama-3-8B 8.03B, 70B 70.55B; Mistral-7B 7.24B;
# Qwen2.5-7B 7.62B; SmolLM2-135M 134.5M, 1.7B 1.71B.
MODELS: dict[str, ModelSpec] = {
    m.name.lower(): m
    for m in (
        ModelSpec("Llama-2-7B", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
        ModelSpec("Llama-2-13B", 40, 5120, 40, 40, 128, 13824, 32000, 4096),
        ModelSpec("Llama-2-70B", 80, 8192, 64, 8, 128, 28672, 32000, 4096),
        ModelSpec("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
        ModelSpec("Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256, 8192),
        ModelSpec("Mistral-7B", 32, 4096, 32, 8, 128, 14336, 32000, 32768),
        ModelSpec("Qwen2.5-7B", 28, 3584, 28, 4, 128, 18944, 152064, 32768, qkv_bias=True),
        ModelSpec("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152, 8192, tie_word_embeddings=True),
        ModelSpec("SmolLM2-1.7B", 24, 2048, 32, 32, 64, 8192, 49152, 8192, tie_word_embeddings=True),
    )
}

# Device memory by its marketed size, taken as GiB (the HBM/GDDR stacks are
# binary-sized). The driver and CUDA context take a few hundred MiB of it;
# the planner's --gpu-memory-utilization (0.9, vLLM's default) leaves room for those.
GIB = 2**30
GPUS: dict[str, int] = {
    "v100-32gb": 32 * GIB,
    "a100-40gb": 40 * GIB,
    "a100-80gb": 80 * GIB,
    "h100-80gb": 80 * GIB,
    "rtx-4090": 24 * GIB,
}

DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "int8": 1,
    "fp8": 1,
    "int4": 0.5,
}


def lookup_model(name: str) -> ModelSpec:
    """A built-in name (case-insensitive) or a path to a config.json / model folder."""
    spec = MODELS.get(name.lower())
    if spec is not None:
        return spec
    path = Path(name).expanduser()
    if path.exists():
        return ModelSpec.from_config(path)
    known = ", ".join(m.name for m in MODELS.values())
    raise ValueError(f"unknown model {name!r}: use one of {known}, or a path to a config.json")
