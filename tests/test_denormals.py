"""Denormals flush to zero on every thread of the model's OpenMP pool, and the
setting is restored after the block."""

from __future__ import annotations

import pytest
import torch

from paged_attention.engine.denormals import flush_denormals

DENORMAL = 1e-40  # below float32's smallest normal, 1.18e-38


def _survivors(x: torch.Tensor) -> int:
    """Denormal inputs that survive a multiply: with denormals-are-zero set on
    the thread that computed a chunk, its results are 0."""
    return int(torch.count_nonzero(x * 1.0))


def test_every_thread_flushes_inside_the_block_and_none_after():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # large enough that the multiply is split over both threads
    try:
        x = torch.full((1 << 20,), DENORMAL)
        assert _survivors(x) == x.numel()
        with flush_denormals(True):
            assert _survivors(x) == 0  # the worker thread's half too
        assert _survivors(x) == x.numel()
        with flush_denormals(False):
            assert _survivors(x) == x.numel()
    finally:
        torch.set_num_threads(previous)


def test_freed_large_tensors_reuse_heap_pages():
    """After `keep_freed_memory` (the CPU model runner calls it), a layer's
    large activations (here 48, 24 and 9 MiB, as an 8,192-token prompt chunk
    makes them) land on pages the heap already holds: filling them faults in
    a fraction of their 20,736 pages per layer (glibc's default mmaps each
    afresh: ~16,000 faults per layer measured)."""
    import resource
    import sys

    from paged_attention.engine.host_malloc import keep_freed_memory

    if not sys.platform.startswith("linux") or not keep_freed_memory():
        pytest.skip("needs glibc's mallopt")

    def layer() -> torch.Tensor:
        gate_up = torch.empty(48 << 19, dtype=torch.bfloat16).fill_(1.0)
        hidden = torch.empty(24 << 19, dtype=torch.bfloat16).fill_(1.0)
        del gate_up
        out = torch.empty(9 << 19, dtype=torch.bfloat16).fill_(1.0)
        del hidden
        return out

    x = layer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = layer()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    assert x.numel() and faults < 4000, f"{faults:.0f} page faults per layer"


def test_release_free_memory_returns_heap_holes():
    """Freed blocks between blocks still in use stay resident under
    `keep_freed_memory`; `release_free_memory` (called once an engine is
    built on the CPU) hands their pages back."""
    import sys

    from paged_attention.engine.host_malloc import keep_freed_memory, release_free_memory

    if not sys.platform.startswith("linux") or not keep_freed_memory():
        pytest.skip("needs glibc's mallopt")

    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    chunks = [torch.ones(1 << 18) for _ in range(96)]  # 96 x 1 MiB, float32
    keep = chunks[1::2]  # the odd ones stay: the even ones become holes
    del chunks
    before = rss_mib()
    assert release_free_memory()
    assert before - rss_mib() >= 32, f"RSS {before:.0f} -> {rss_mib():.0f} MiB"
    assert all(bool(t[0] == 1) for t in keep)
