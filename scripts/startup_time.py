"""Process start to first token on the default model, warm and with empty caches.

    python scripts/startup_time.py [--repeats 3]

Times `bench throughput`'s start-up probe (a fresh Python process that builds
`LLM()` and streams its first token; `throughput.time_to_first_token`).
"cold" gives every run a fresh, empty cache folder (XDG_CACHE_HOME: no cached
tokenizer backend); "warm" reuses one folder after a first run has filled it.
The operating system's page cache stays warm either way (dropping it needs
root and a quiet host), so "cold" here is a first run of the engine, not of
the machine. Prints the medians and writes results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from paged_attention.bench.report import write_json
from paged_attention.bench.throughput import time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default="results")
    args = parser.parse_args()

    def first_token_s(cache_dir: str) -> float:
        return time_to_first_token(None, env={**os.environ, "XDG_CACHE_HOME": cache_dir})

    runs: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as warm_dir:
        first_token_s(warm_dir)  # fills the warm cache
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cold_dir:
                runs["cold"].append(first_token_s(cold_dir))
            runs["warm"].append(first_token_s(warm_dir))
    median = {kind: statistics.median(times) for kind, times in runs.items()}
    for kind, seconds in median.items():
        print(f"{kind}: first token {seconds:.2f} s (median of {args.repeats})")
    write_json(args.output_dir, "startup", {"first_token_s": runs, "median_s": median})


if __name__ == "__main__":
    main()
