"""Attention over the paged KV pool: per-step metadata and the PyTorch reference."""

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.reference import check_head_counts, paged_attention

__all__ = ["AttentionMetadata", "check_head_counts", "paged_attention"]
