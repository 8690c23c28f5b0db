"""Random-weight Llama folders (safetensors plus the shipped stories260K
tokenizer) for benchmarks and GPU runs that need a model of a given shape but
not its trained weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from paged_attention.engine.builder import STORIES260K


def random_llama_folder(
    folder: Path,
    config: dict[str, Any],
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a Llama with transformers' random initialisation from `seed` to
    `folder`, once (a folder that already holds model.safetensors is kept).
    `device` is where the weights are initialised (a GPU takes seconds for 1B
    parameters, a CPU minutes); `dtype` is what they are saved as (default:
    float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config))
    if dtype is not None:
        model.to(dtype)
    model.cpu().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES260K / name, folder / name)
    return folder
