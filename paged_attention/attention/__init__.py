"""Attention over the paged KV pool: per-step metadata, the PyTorch implementation
(`torch_attention`), the Triton kernels and the choice between them (`backend`)."""

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import check_head_counts, paged_attention

__all__ = ["AttentionMetadata", "check_head_counts", "paged_attention"]
