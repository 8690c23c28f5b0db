"""`ModelConfig`: the parts of a Hugging Face `config.json` the engine needs.

One frozen record for the Llama family (Llama, Mistral, Qwen2), which differ
only in biases, defaults and RoPE settings. Both spellings of RoPE settings are
read: transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`,
older configs write `rope_theta` next to a `rope_scaling` dict (whose type key
was once `type`, later `rope_type`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paged_attention.attention.torch_attention import check_head_counts

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)
# Configs written by converters (GGUF metadata, hand-made configs) may carry
# only `model_type`; this maps it to the architecture it implies.
_MODEL_TYPE_TO_ARCHITECTURE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# transformers' per-architecture defaults for keys a config.json may omit.
_DEFAULT_MAX_POSITIONS: dict[str, int] = {
    "LlamaForCausalLM": 2048,
    "MistralForCausalLM": 131072,
    "Qwen2ForCausalLM": 32768,
}
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `linear` uses only `factor`; `llama3` uses all."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None  # None: plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_head_counts(self.num_heads, self.num_kv_heads)
        # RoPE rotates pairs (x[i], x[i + head_dim/2]).
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face `config.json` dict."""
        architecture = _architecture(hf)
        num_heads = _int(hf, "num_attention_heads")
        num_kv_heads = _int(hf, "num_key_value_heads", default=num_heads)
        hidden_size = _int(hf, "hidden_size")
        # Mistral configs may say `head_dim: null`; transformers then falls
        # back to hidden // heads, as it does when the key is absent.
        head_dim = hf.get("head_dim") or hidden_size // num_heads
        rope_theta, rope_scaling = _parse_rope(hf)
        if architecture == "Qwen2ForCausalLM":
            # Qwen2 always has q/k/v biases and never o_proj / MLP biases.
            qkv_bias, o_proj_bias, mlp_bias = True, False, False
        elif architecture == "LlamaForCausalLM":
            attention_bias = bool(hf.get("attention_bias", False))
            qkv_bias, o_proj_bias = attention_bias, attention_bias
            mlp_bias = bool(hf.get("mlp_bias", False))
        else:
            qkv_bias, o_proj_bias, mlp_bias = False, False, False
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; only 'silu'")
        eos = hf.get("eos_token_id")
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, (list, tuple)):
            eos_ids = tuple(int(e) for e in eos)
        else:
            eos_ids = (int(eos),)
        bos = hf.get("bos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_int(hf, "intermediate_size"),
            num_layers=_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_int(
                hf, "max_position_embeddings", default=_DEFAULT_MAX_POSITIONS[architecture]
            ),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=mlp_bias,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )


def _architecture(hf: Mapping[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    if architectures:
        name = architectures[0]
    elif hf.get("model_type") in _MODEL_TYPE_TO_ARCHITECTURE:
        name = _MODEL_TYPE_TO_ARCHITECTURE[hf["model_type"]]
    else:
        name = str(hf.get("model_type"))
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def _int(hf: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json lacks required key {key!r}")
        return default
    return int(value)


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either the transformers-5 or the older layout,
    with transformers' precedence: values inside the dict win over top-level keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported; only 1.0")
    if rope_type == "default":
        return theta, None
    if params.get("factor") is None:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    factor = float(params["factor"])
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if params.get(k) is None]
    if missing:
        raise ValueError(f"rope type 'llama3' needs {', '.join(missing)}")
    # transformers' order: a top-level key (Phi3-style configs) beats the one in
    # the dict, and max_position_embeddings stands in when neither is given.
    original = (
        hf.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or hf.get("max_position_embeddings")
    )
    if original is None:
        raise ValueError("rope type 'llama3' needs original_max_position_embeddings")
    return theta, RopeScaling(
        "llama3",
        factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )
