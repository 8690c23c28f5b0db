"""Process start to first token on the default model, warm and with empty caches.

    python scripts/startup_time.py [--repeats 3] [-- extra generate flags]

Runs `paged-attention generate "Once upon a time" --stream --max-tokens 8` as a
child process and times, from the spawn, the first byte it writes to stdout
(the first generated token) and its exit. "cold" gives every run a fresh, empty
cache folder (XDG_CACHE_HOME: no cached tokenizer backend, no compiled
artifacts); "warm" reuses one folder after a first run has filled it. The
operating system's page cache stays warm either way (dropping it needs root
and a quiet host), so "cold" here is a first run of the engine, not of the
machine. Prints the medians and writes results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from paged_attention.bench.report import write_json

COMMAND = [sys.executable, "-m", "paged_attention.entrypoints.cli", "generate", "Once upon a time"]


def one_run(cache_dir: str, extra: list[str]) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": cache_dir}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*COMMAND, "--stream", "--max-tokens", "8", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_token_s = time.perf_counter() - start
    proc.stdout.read()
    code = proc.wait()
    if code != 0 or not first:
        raise RuntimeError(f"generate exited {code} without output")
    return {"first_token_s": first_token_s, "exit_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default="results")
    parser.add_argument("extra", nargs="*", help="extra `generate` flags (after --)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as warm_dir:
        one_run(warm_dir, args.extra)  # fills the warm cache
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cold_dir:
                runs["cold"].append(one_run(cold_dir, args.extra))
            runs["warm"].append(one_run(warm_dir, args.extra))
    summary = {
        kind: {key: statistics.median(r[key] for r in rs) for key in ("first_token_s", "exit_s")}
        for kind, rs in runs.items()
    }
    for kind, s in summary.items():
        print(
            f"{kind}: first token {s['first_token_s']:.2f} s, exit {s['exit_s']:.2f} s (median of {args.repeats})"
        )
    write_json(args.output_dir, "startup", {"command": COMMAND, "runs": runs, "median": summary})


if __name__ == "__main__":
    main()
