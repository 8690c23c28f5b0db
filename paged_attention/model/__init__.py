"""Llama-family models (Llama, Mistral, Qwen2) over the paged KV pool, and
their loading from Hugging Face folders (safetensors) or GGUF files."""

from paged_attention.model.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    RopeScaling,
)
from paged_attention.model.llama import CausalLM
from paged_attention.model.loader import ModelFiles, find_model_files, load_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelConfig",
    "ModelFiles",
    "RopeScaling",
    "find_model_files",
    "load_model",
]
