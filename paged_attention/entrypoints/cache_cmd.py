"""`paged-attention cache`: what the engine keeps on disk, and a way to clear it.

The cache folder (`$XDG_CACHE_HOME/paged_attention`, else
`~/.cache/paged_attention`) holds float32 conversions of GGUF files (written
only when a GGUF is loaded dense, `--quantization none`), tokenizer
backends (small JSON files that make start-up fast), transformers' tokenizers
built from GGUF files (`tokenizer-*.hf` folders, read back instead of
rebuilding them from the file) and the compiled CPU kernels (`kernels-*.so`,
one per machine and source version). Every entry can
be rebuilt: clearing only costs the next start its conversion or build time."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from paged_attention.config import default_cache_dir


def cache_entries(folder: Path) -> list[Path]:
    """The cache's files and folders (a saved tokenizer is a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() or p.is_dir())


def entry_bytes(entry: Path) -> int:
    if entry.is_dir():
        return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    return entry.stat().st_size


def cmd_cache(args: argparse.Namespace) -> int:
    folder = default_cache_dir()
    entries = cache_entries(folder)
    sizes = {entry: entry_bytes(entry) for entry in entries}
    total = sum(sizes.values())
    if args.action == "clear":
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        print(f"removed {len(entries)} entries ({total / 2**20:.1f} MiB) from {folder}")
        return 0
    for entry in entries:
        print(f"{sizes[entry] / 2**20:10.1f} MiB  {entry.name}{'/' if entry.is_dir() else ''}")
    print(f"{total / 2**20:10.1f} MiB in {len(entries)} entries in {folder}")
    return 0


def add_cache_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "cache",
        help="list or clear the on-disk cache (GGUF conversions, tokenizers, compiled kernels)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=["list", "clear"], default="list", help="default: list")
    p.set_defaults(func=cmd_cache)
    return p
