"""Swap or recompute? Each preemption is priced with measured speeds.

Swapping a victim costs its blocks' bytes copied out and back in at the
measured device<->host copy bandwidth; recomputing costs its computed tokens
at the measured prefill speed. Both speeds are measured at start-up and the
prefill speed is then learned from real prefill-heavy steps (an exponential
moving average), so the choice follows the machine and the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from paged_attention.core.swap import BlockCopy
from paged_attention.kv_cache import KVCachePool, copy_between_pools


@dataclass
class PreemptionCostModel:
    bytes_per_block: int
    copy_bytes_per_s: float
    prefill_tokens_per_s: float
    smoothing: float = 0.2  # weight of each new prefill observation

    def swap_seconds(self, num_blocks: int) -> float:
        return 2 * num_blocks * self.bytes_per_block / self.copy_bytes_per_s  # out, then back in

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool:
        return self.swap_seconds(num_blocks) < self.recompute_seconds(num_tokens)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """Learn from a step that was mostly prefill."""
        if seconds <= 0 or num_tokens <= 0:
            return
        speed = num_tokens / seconds
        self.prefill_tokens_per_s += self.smoothing * (speed - self.prefill_tokens_per_s)

    def observe_copy(self, num_bytes: int, seconds: float) -> None:
        if seconds <= 0 or num_bytes <= 0:
            return
        speed = num_bytes / seconds
        self.copy_bytes_per_s += self.smoothing * (speed - self.copy_bytes_per_s)


def measure_copy_bandwidth(device_pool: KVCachePool, host_pool: KVCachePool, repeats: int = 3) -> float:
    """Bytes per second for a round of device->host block copies."""
    n = max(1, min(8, device_pool.num_blocks, host_pool.num_blocks))
    copies = [BlockCopy(i, i) for i in range(n)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy_between_pools(device_pool, host_pool, copies)
        if device_pool.device.type == "cuda":
            torch.cuda.synchronize(device_pool.device)
        best = min(best, time.perf_counter() - start)
    return n * device_pool.bytes_per_block / max(best, 1e-9)


@torch.inference_mode()
def measure_prefill_speed(model: torch.nn.Module, kv_cache: KVCachePool, num_tokens: int = 128) -> float:
    """Tokens per second of one prompt's prefill, run on free blocks at start-up
    (the second of two runs, so one-time set-up is not counted)."""
    from paged_attention.attention.metadata import AttentionMetadata
    from paged_attention.engine.model_runner import flush_denormals

    bs = kv_cache.block_size
    num_tokens = max(1, min(num_tokens, kv_cache.num_blocks * bs))
    blocks = list(range(-(-num_tokens // bs)))
    meta = AttentionMetadata.build([blocks], [0], [num_tokens], bs, kv_cache.num_blocks, kv_cache.device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=kv_cache.device)
    positions = torch.arange(num_tokens, device=kv_cache.device)
    seconds = float("inf")
    with flush_denormals(kv_cache.device.type == "cpu"):
        for _ in range(2):
            start = time.perf_counter()
            model(ids, positions, kv_cache, meta)
            if kv_cache.device.type == "cuda":
                torch.cuda.synchronize(kv_cache.device)
            seconds = time.perf_counter() - start
    return num_tokens / max(seconds, 1e-9)
