"""Denormals flush to zero on every thread of the model's OpenMP pool, and the
setting is restored after the block."""

from __future__ import annotations

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
