"""A Hugging Face `LlamaConfig`-style dict from GGUF metadata, and the check
that the file's tensor shapes agree with it."""

from __future__ import annotations

from typing import Any

from paged_attention.model.gguf.reader import GGUFHeader

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# tokenizer.ggml.<key> -> HF config key of a special token id.
_TOKEN_ID_KEYS = (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("padding_token_id", "pad_token_id"),
    ("unknown_token_id", "unk_token_id"),
)


def gguf_config(header: GGUFHeader) -> dict[str, Any]:
    """HF `LlamaConfig`-style dict from GGUF metadata (+ tensor list for tying/vocab)."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")

    hidden = int(_require(md, arch, "embedding_length"))
    n_heads, n_kv, head_dim = _head_dims(md, arch, hidden)
    vocab = _vocab_size(header, arch)
    rope_theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(md, arch, "feed_forward_length")),
        "num_hidden_layers": int(_require(md, arch, "block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_require(md, arch, "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "max_position_embeddings": int(_require(md, arch, "context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "mlp_bias": False,
    }
    for gguf_key, hf_key in _TOKEN_ID_KEYS:
        if f"tokenizer.ggml.{gguf_key}" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    return config


def _require(md: dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    v = md.get(f"{arch}.{key}", default)
    if v is None:
        raise ValueError(f"GGUF metadata lacks {arch}.{key}")
    return v


def _head_dims(md: dict[str, Any], arch: str, hidden: int) -> tuple[int, int, int]:
    """(attention heads, KV heads, head size); rejects what a llama cannot hold."""
    n_heads = int(_require(md, arch, "attention.head_count"))
    n_kv = _require(md, arch, "attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (hybrid models) are not a llama
        raise ValueError(f"per-layer {arch}.attention.head_count_kv {n_kv} is not supported")
    # key_length is the true head size; rope.dimension_count may be partial rotary.
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // n_heads
    rot = md.get(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"partial rotary embedding ({rot} of {head_dim} dims) is not supported")
    return n_heads, int(n_kv), head_dim


def _vocab_size(header: GGUFHeader, arch: str) -> int | None:
    vocab = header.metadata.get(f"{arch}.vocab_size")
    embd = header.tensors.get("token_embd.weight")
    # Older files lack llama.vocab_size; the embedding's row count is the vocab.
    if vocab is None and embd is not None:
        vocab = embd.shape[0]
    return int(vocab) if vocab is not None else None


def check_shapes(header: GGUFHeader, config: dict[str, Any]) -> None:
    """Fail early, naming the tensor, if the file disagrees with its own metadata."""
    h, hd = config["hidden_size"], config["head_dim"]
    expect = {
        "token_embd.weight": (config["vocab_size"], h),
        "output.weight": (config["vocab_size"], h),
        "output_norm.weight": (h,),
    }
    per_layer = {
        "attn_q": (config["num_attention_heads"] * hd, h),
        "attn_k": (config["num_key_value_heads"] * hd, h),
        "attn_v": (config["num_key_value_heads"] * hd, h),
        "attn_output": (h, config["num_attention_heads"] * hd),
        "ffn_gate": (config["intermediate_size"], h),
        "ffn_up": (config["intermediate_size"], h),
        "ffn_down": (h, config["intermediate_size"]),
        "attn_norm": (h,),
        "ffn_norm": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        for k, shape in per_layer.items():
            expect[f"blk.{i}.{k}.weight"] = shape
    for name, shape in expect.items():
        info = header.tensors.get(name)
        if info is None:
            if name != "output.weight":
                raise ValueError(f"GGUF file lacks tensor {name!r}")
        elif info.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {info.shape}, expected {shape}")
