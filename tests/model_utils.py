"""Helpers for model tests: tiny random Hugging Face models saved to disk, and a
runner that drives our model through the paged KV cache the way the engine does."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.kv_cache import KVCachePool
from paged_attention.model import CausalLM

HF_CLASSES: dict[str, tuple[type, type]] = {
    "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "MistralForCausalLM": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}

SMALL_CONFIG: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}


def build_hf_model(
    architecture: str, folder: Path, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    """A small seeded HF model with every weight random (norm weights and biases
    too, which HF initialises to constants that would hide loading mistakes),
    saved as safetensors to `folder`. Returns it in eval mode, float32, eager
    attention (the plain reference implementation)."""
    config_cls, model_cls = HF_CLASSES[architecture]
    config = config_cls(**{**SMALL_CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return model


def hf_logits(model: transformers.PreTrainedModel, tokens: Sequence[int]) -> torch.Tensor:
    """float32 logits [len(tokens), vocab] of one sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].float()


class PagedRunner:
    """Runs our model step by step over the paged pool. Blocks are handed out in
    a shuffled order, so a sequence's blocks are scattered through the pool."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int = 48,
        block_size: int = 4,
        seed: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.allocator = BlockAllocator(num_blocks, block_size)
        # Freeing every block in a random order makes the FIFO free list random.
        ids = self.allocator.allocate_many(num_blocks)
        assert ids is not None
        random.Random(seed).shuffle(ids)
        for block_id in ids:
            self.allocator.free(block_id)
        self.pool = KVCachePool(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=kv_dtype or model.dtype,
        )
        self.tables: dict[int, BlockTable] = {}

    def step(self, chunks: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """One forward over the new tokens of several sequences, packed. Returns,
        per chunk, float32 logits [len(tokens), vocab] of every new token."""
        tables, computed, query_lens, ids, positions = [], [], [], [], []
        for seq_id, tokens in chunks:
            table = self.tables.setdefault(seq_id, BlockTable(self.allocator))
            start = table.num_tokens
            appended = table.append_slots(len(tokens))
            assert appended is not None, "test pool too small"
            tables.append(table.block_ids)
            computed.append(start)
            query_lens.append(len(tokens))
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
        meta = AttentionMetadata.build(
            tables, computed, query_lens, self.allocator.block_size, self.allocator.num_blocks
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.pool, meta)
        logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))
