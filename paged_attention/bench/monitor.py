"""Process memory sampled in a background thread while a benchmark runs, and
the run environment every benchmark records next to its figures.

    with MemoryMonitor() as monitor:
        ...  # the benchmark
    print(format_monitor(monitor.summary()))

Resident set size comes from psutil (the `bench` extra); CUDA memory from
`torch.cuda.memory_allocated` / `memory_reserved` when a GPU is present. The
sampler is a daemon thread that wakes every `interval_s`, so peaks shorter than
the interval can be missed: the summary also reads psutil's own high-water mark
(`ru_maxrss`-style peak, where the platform has one) and CUDA's
`max_memory_allocated`, which see everything.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

# torch is imported where used: the CLI imports this module to build its parser.
MIB = 2**20


@dataclass(frozen=True)
class MemorySample:
    t_s: float  # seconds since the monitor started
    rss_bytes: int
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None


@dataclass
class MemoryMonitor:
    """Samples RSS (and CUDA memory) every `interval_s` between enter and exit."""

    interval_s: float = 0.05
    samples: list[MemorySample] = field(default_factory=list)

    def __post_init__(self) -> None:
        import psutil  # the bench extra; imported here so the CLI loads without it
        import torch

        self._process = psutil.Process(os.getpid())
        self._cuda = torch.cuda.is_available()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> MemoryMonitor:
        self._t0 = time.perf_counter()
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # the end state, even for runs shorter than one interval

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        cuda_alloc = cuda_reserved = None
        if self._cuda:
            import torch

            cuda_alloc = int(torch.cuda.memory_allocated())
            cuda_reserved = int(torch.cuda.memory_reserved())
        self.samples.append(
            MemorySample(
                time.perf_counter() - self._t0,
                int(self._process.memory_info().rss),
                cuda_alloc,
                cuda_reserved,
            )
        )

    def summary(self) -> dict:
        """Start, peak and end RSS in MiB, plus CUDA peaks when there is a GPU."""
        if not self.samples:
            raise RuntimeError("the monitor has not run: use it as a context manager")
        rss = [s.rss_bytes for s in self.samples]
        out: dict = {
            "interval_s": self.interval_s,
            "num_samples": len(self.samples),
            "duration_s": self.samples[-1].t_s,
            "rss_start_mib": rss[0] / MIB,
            "rss_peak_mib": max(rss) / MIB,
            "rss_end_mib": rss[-1] / MIB,
            # The process's lifetime high-water mark (KiB on Linux): covers spikes
            # between samples, and everything before the monitor started.
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda": None,
        }
        if self._cuda:
            import torch

            out["cuda"] = {
                "device": torch.cuda.get_device_name(),
                "peak_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                "peak_reserved_mib": torch.cuda.max_memory_reserved() / MIB,
                "sampled_peak_allocated_mib": max(s.cuda_allocated_bytes or 0 for s in self.samples) / MIB,
            }
        return out

    def timeline(self, max_points: int = 200) -> list[dict]:
        """The samples, thinned to at most `max_points`, for JSON and plots."""
        step = max(1, len(self.samples) // max_points)
        return [asdict(s) for s in self.samples[::step]]


def format_monitor(summary: dict) -> str:
    """One line for a benchmark's output."""
    line = (
        f"process RSS {summary['rss_start_mib']:.0f} MiB at start, peak {summary['rss_peak_mib']:.0f} MiB, "
        f"{summary['rss_end_mib']:.0f} MiB at end ({summary['num_samples']} samples every "
        f"{1000 * summary['interval_s']:.0f} ms over {summary['duration_s']:.1f} s)"
    )
    cuda = summary.get("cuda")
    if cuda:
        line += (
            f"; CUDA {cuda['device']}: peak allocated {cuda['peak_allocated_mib']:.0f} MiB, "
            f"reserved {cuda['peak_reserved_mib']:.0f} MiB"
        )
    else:
        line += "; CUDA: not available"
    return line


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with `num_threads` intra-op threads, then restore the previous count.

    The benchmarks default to 1: on a 2-core machine shared with other work,
    a tiny decode SDPA call measured 0.05 ms with one thread and 1-3 ms with
    two (the threads wait on each other for a time slice), so two threads
    made whole engine steps about 6x slower. None leaves PyTorch's setting alone."""
    if num_threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The CPU features that decide which kernels are fast: AVX2-only machines run
# bf16 emulated (slowly); AVX-512 BF16 and AMX run it natively.
CPU_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags() -> list[str]:
    """The CPU flags of interest the CPU has (from /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS_OF_INTEREST if flag in have]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What the figures were measured on (every benchmark's JSON carries it and
    `describe` prints it beside the figures)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # Other processes' load: on a shared machine it moves wall-clock figures.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe(env: dict) -> str:
    """One line: the CPU, its flags of interest, threads and load."""
    flags = " ".join(env.get("cpu_flags") or []) or "none of " + "/".join(CPU_FLAGS_OF_INTEREST[:3])
    return (
        f"machine: {env.get('processor')}; flags: {flags}; {env.get('cpu_count')} cores, "
        f"{env.get('torch_threads')} torch threads, load {env.get('load_average_1m')}; "
        f"torch {env.get('torch')}" + (f"; cuda: {env['cuda']}" if env.get("cuda") else "")
    )
