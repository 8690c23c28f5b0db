"""paged_attention: an LLM inference engine built around PagedAttention.

Low-level pieces (the original project's API): `BlockAllocator`, `PagedKVCache`,
`PagedAttention`. The engine: `LLM`, `SamplingParams`. `LLM` is imported lazily
so that the memory pieces load without transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.kv_cache import KVCachePool
from paged_attention.layer import PagedAttention, PagedKVCache
from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.engine.llm import LLM

__all__ = [
    "BlockAllocator",
    "BlockTable",
    "CompletionOutput",
    "KVCachePool",
    "LLM",
    "PagedAttention",
    "PagedKVCache",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from paged_attention.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'paged_attention' has no attribute {name!r}")
