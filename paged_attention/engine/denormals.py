"""Flush float32 denormals to zero on every thread that runs the model.

Softmax tails and small weights produce denormals, and x86 handles them in
microcode: decode steps measured 14x slower with them. `torch.set_flush_denormal`
sets the flush-to-zero / denormals-are-zero bits of the *calling* thread's
MXCSR register only, and PyTorch's OpenMP worker threads keep their own. Set
on the main thread alone, a two-thread step still ran its workers' share at
microcode speed: a denormal multiply took 17 ms on two threads against 1.8 ms
on one. So the flag is also set inside one OpenMP parallel region, which runs
on every thread of the pool PyTorch uses (GNU OpenMP, found in the process's
loaded libraries). Where that runtime is not found, only the calling thread
flushes, as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_Body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
Callback = Any  # an instance of _Body (ctypes' function types are not static types)


@functools.cache
def _gomp_parallel() -> Callable[[Callback, int], None] | None:
    """`GOMP_parallel` of the libgomp this process loaded (PyTorch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    except OSError:
        return None
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(path).GOMP_parallel
    except (OSError, AttributeError):
        return None
    fn.argtypes = [_Body, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None

    def run(body: Callback, num_threads: int) -> None:
        fn(body, None, num_threads, 0)  # ctypes releases the GIL; each thread takes it in `body`

    return run


@functools.cache
def _bodies() -> dict[bool, Callback]:
    """One C callback per setting, kept alive for the process's lifetime."""
    return {flag: _Body(lambda _data, flag=flag: torch.set_flush_denormal(flag)) for flag in (True, False)}


def set_flush_denormal_all_threads(enabled: bool) -> bool:
    """Set the flag on this thread and every OpenMP worker. Returns False when
    only this thread could be reached."""
    torch.set_flush_denormal(enabled)
    parallel = _gomp_parallel()
    if parallel is None or torch.get_num_threads() <= 1:
        return parallel is not None
    parallel(_bodies()[enabled], torch.get_num_threads())
    return True


@contextmanager
def flush_denormals(enabled: bool) -> Iterator[None]:
    """Flush denormals on every model thread while the block runs. The flag is
    CPU state other code in the process shares, so it is restored (to
    PyTorch's default, off) afterwards rather than left on."""
    if not enabled:
        yield
        return
    set_flush_denormal_all_threads(True)
    try:
        yield
    finally:
        set_flush_denormal_all_threads(False)
