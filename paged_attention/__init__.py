"""paged_attention: an LLM inference engine built around PagedAttention.

Low-level pieces (the seed API): `BlockAllocator`, `PagedKVCache`,
`PagedAttention`. The engine: `LLM`, `SamplingParams`. Whatever needs torch
(or transformers) is imported on first use, so that the command line can parse
its arguments, and answer --help, without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from paged_attention.engine.llm import LLM
    from paged_attention.kv_cache import KVCachePool
    from paged_attention.layer import PagedAttention, PagedKVCache

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

# Names imported on first use -> their module.
_LAZY = {
    "LLM": "paged_attention.engine.llm",
    "KVCachePool": "paged_attention.kv_cache",
    "PagedAttention": "paged_attention.layer",
    "PagedKVCache": "paged_attention.layer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paged_attention' has no attribute {name!r}")
