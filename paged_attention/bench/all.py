"""`bench all`: every registered benchmark subcommand, then results/REPORT.md.

It runs whatever subcommands the `bench` group has (except itself and
`report`), so benchmarks added later (sharing, preemption) join without a
change here. Each one runs with its own defaults plus the few arguments in
`_all_args`, which keep the whole suite within 15 minutes on a 2-core machine,
and with one torch intra-op thread (`--threads`): on 2 cores shared with
other work, two threads made engine steps ~6x slower (bench/monitor.py);
each run is wrapped in a MemoryMonitor, and a failure is recorded and the rest
still run (the command then exits non-zero).

    paged-attention bench all [--quick] [--output-dir results]
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path

from paged_attention.bench.monitor import (
    MemoryMonitor,
    environment,
    format_monitor,
    torch_threads,
)
from paged_attention.bench.report import build_report, format_table, write_json

SKIP = {"all", "report"}


# Arguments `bench all` adds to a subcommand's defaults (not with --quick), as
# (option, value or None for a flag); an option the subcommand does not have is
# left out. They keep the suite within 15 minutes on a 2-core machine:
#   throughput: its full default (2 models x 2 dtypes x 128 requests, each also
#     through transformers) took 17 minutes alone for the bfloat16 half with 64
#     requests here, so `all` runs bfloat16 with 16 requests;
#   serve: the tiny shipped model and 40 requests instead of SmolLM2 and 100;
#   preemption: one run per starved configuration instead of a median of 3;
#   quant-kernels: one timed repeat (24 s instead of about a minute);
#   quant-accuracy: no load-time runs in fresh processes (2.6 minutes);
#   decode-step: batches 1 and 64, 10 steps each.
# `bench NAME` on its own still runs its full defaults.
def _all_args() -> dict[str, list[tuple[str, str | None]]]:
    from paged_attention.engine.builder import STORIES260K

    return {
        "memory": [("--draw", None)],
        "throughput": [("--dtypes", "bfloat16"), ("--num-requests", "16")],
        "serve": [("--model", str(STORIES260K)), ("--num-requests", "40")],
        "preemption": [("--repeats", "1")],
        "quant-kernels": [("--repeats", "1")],
        "quant-accuracy": [("--skip-load", None)],
        "decode-step": [("--batch-sizes", "1,64"), ("--steps", "10")],
    }


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def benchmark_argv(name: str, parser: argparse.ArgumentParser, output_dir: str, quick: bool) -> list[str]:
    argv: list[str] = []
    if not quick:
        for option, value in _all_args().get(name, []):
            if _has_option(parser, option):
                argv += [option] if value is None else [option, value]
    if quick and _has_option(parser, "--quick"):
        argv.append("--quick")
    if _has_option(parser, "--output-dir"):
        argv += ["--output-dir", output_dir]
    return argv


def run_all(
    bench_sub, output_dir: str, quick: bool = False, only: list[str] | None = None, threads: int | None = 1
) -> dict:
    """Run the subcommands registered on `bench_sub` (an argparse subparsers
    action) with `threads` torch intra-op threads (subcommands with a --threads
    option of their own set it themselves); returns the summary for all.json."""
    names = [n for n in bench_sub.choices if n not in SKIP and (only is None or n in only)]
    runs = []
    for name in names:
        parser = bench_sub.choices[name]
        argv = benchmark_argv(name, parser, output_dir, quick)
        print(f"\n=== bench {name} {' '.join(argv)}", flush=True)
        sub_args = parser.parse_args(argv)
        start = time.perf_counter()
        error = None
        with torch_threads(threads), MemoryMonitor() as monitor:
            try:
                sub_args.func(sub_args)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                traceback.print_exc()
        elapsed = time.perf_counter() - start
        gc.collect()  # drop the finished benchmark's models before the next one
        summary = monitor.summary()
        print(
            f"bench {name}: {'FAILED ' + error if error else 'ok'} in {elapsed:.1f} s; {format_monitor(summary)}",
            flush=True,
        )
        runs.append(
            {"benchmark": name, "argv": argv, "elapsed_s": elapsed, "error": error, "monitor": summary}
        )
    return {
        "benchmark": "all",
        "quick": quick,
        "torch_threads": threads,
        "runs": runs,
        "total_s": sum(r["elapsed_s"] for r in runs),
        "environment": environment(),
    }


def main(args) -> int:
    only = args.only.split(",") if args.only else None
    threads = args.threads if args.threads > 0 else None
    result = run_all(args.bench_subparsers, args.output_dir, quick=args.quick, only=only, threads=threads)
    print()
    print(
        format_table(
            ["benchmark", "status", "seconds", "peak RSS (MiB)"],
            [
                [
                    r["benchmark"],
                    "FAILED" if r["error"] else "ok",
                    f"{r['elapsed_s']:.1f}",
                    f"{r['monitor']['rss_peak_mib']:.0f}",
                ]
                for r in result["runs"]
            ],
        )
    )
    print(f"total {result['total_s']:.1f} s")
    print(f"wrote {write_json(args.output_dir, 'all', result)}")
    print(f"wrote {build_report(Path(args.output_dir))}")
    return 1 if any(r["error"] for r in result["runs"]) else 0


def add_parser(sub) -> None:
    p = sub.add_parser("all", help="every benchmark, then results/REPORT.md")
    p.add_argument("--quick", action="store_true", help="every benchmark in its --quick mode")
    p.add_argument("--only", default=None, help="comma list of benchmarks to run (default: all registered)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every benchmark (default 1, see bench/monitor.py; 0: torch's default)",
    )
    p.add_argument("--output-dir", default="results")
    # The subparsers action itself, so `all` sees every benchmark registered,
    # including those registered after it.
    p.set_defaults(func=main, bench_subparsers=sub)
