"""Every benchmark, then results/REPORT.md: `paged-attention bench all`.

    python scripts/run_benchmarks.py [--quick] [--only memory,capacity] [--output-dir results]

Arguments go to `bench all` unchanged; it runs every subcommand registered in
the `bench` group (see paged_attention/bench/all.py), in under 15 minutes on a
2-core CPU with the defaults.
"""

from __future__ import annotations

import sys

from paged_attention.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "all", *sys.argv[1:]]))
