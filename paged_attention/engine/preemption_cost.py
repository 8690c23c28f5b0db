"""Swap or recompute? Each preemption is priced with measured speeds.

Swapping a victim costs its blocks' bytes copied out and back in at the
measured device<->host copy bandwidth; recomputing costs its computed tokens
at the measured prefill speed. The copy bandwidth is measured at start-up (a
few block copies, milliseconds); the prefill speed is learned from the engine's
own steps (an exponential moving average over prompt-heavy steps), starting
with the first step, which is always a prefill and always precedes any
preemption. So start-up runs no calibration forward pass, and the choice
follows the machine and the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from paged_attention.core.swap import BlockCopy
from paged_attention.kv_cache import KVCachePool, copy_between_pools

# Steps with fewer new tokens than this are mostly decode: their speed says
# little about a prefill's, so after the first observation they are not learned.
MIN_PREFILL_TOKENS = 64


@dataclass
class PreemptionCostModel:
    bytes_per_block: int
    copy_bytes_per_s: float
    prefill_tokens_per_s: float | None = None  # None until the first step is seen
    smoothing: float = 0.2  # weight of each new prefill observation

    def swap_seconds(self, num_blocks: int) -> float:
        return 2 * num_blocks * self.bytes_per_block / self.copy_bytes_per_s  # out, then back in

    def recompute_seconds(self, num_tokens: int) -> float:
        assert self.prefill_tokens_per_s is not None, "no step observed yet: nothing can be preempted"
        return num_tokens / self.prefill_tokens_per_s

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool:
        return self.swap_seconds(num_blocks) < self.recompute_seconds(num_tokens)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Learn the prefill speed from a step that computed `num_tokens` tokens:
        any first step (a prefill; short ones make recompute look dear, which
        later steps correct), then only prompt-heavy ones."""
        if seconds <= 0 or num_tokens <= 0:
            return
        speed = num_tokens / seconds
        if self.prefill_tokens_per_s is None:
            self.prefill_tokens_per_s = speed
        elif num_tokens >= MIN_PREFILL_TOKENS:
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
