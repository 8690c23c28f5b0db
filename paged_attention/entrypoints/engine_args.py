"""Command-line flags generated from the engine options (`EngineConfig`'s
fields): `--block-size` for `block_size`, `--[no-]enable-prefix-caching` for a
bool, with the field's default and help text. Every command that builds an
engine uses these, so an option added to `EngineConfig` reaches them all.
Imports no torch: the CLI parses its arguments before torch loads."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from dataclasses import Field
from typing import Any

from paged_attention.config import engine_options


def flag(name: str) -> str:
    """`block_size` -> `--block-size`."""
    return "--" + name.replace("_", "-")


def cli_options() -> list[Field]:
    return [f for f in engine_options() if f.metadata["cli"]]


def add_engine_args(
    parser: argparse.ArgumentParser,
    *,
    only: Collection[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    model: bool = True,
    title: str = "engine",
) -> argparse._ArgumentGroup:
    """Add `--model` (when `model`) and a flag per engine option (those named
    in `only`, else all) to a group of `parser`; `defaults` overrides an
    option's default for this command (a benchmark's own sizes)."""
    options = cli_options()
    names = {f.name for f in options}
    for name in [*(only or ()), *(defaults or ())]:
        if name not in names:
            raise ValueError(f"{name!r} is not an engine option with a flag; flags: {sorted(names)}")
    group = parser.add_argument_group(title)
    if model:
        group.add_argument(
            "--model", default=None, help="model folder or .gguf file (default: SmolLM2-135M-Instruct)"
        )
    for f in options:
        if only is not None and f.name not in only:
            continue
        default = (defaults or {}).get(f.name, f.default)
        meta = f.metadata
        help_text = meta["help"] if default is None else f"{meta['help']} (default: %(default)s)"
        if isinstance(f.default, bool):
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        parse = meta["type"] or (type(f.default) if f.default is not None else str)
        group.add_argument(
            flag(f.name),
            type=parse,
            default=default,
            choices=meta["choices"],
            metavar=meta["metavar"],
            help=help_text,
        )
    return group


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options `args` carries (those its parser added), as `LLM` keywords."""
    return {f.name: getattr(args, f.name) for f in cli_options() if hasattr(args, f.name)}


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The same options as command-line flags, to start another command (a
    server) with them: `--model` when set, then every option `args` carries."""
    out = [] if getattr(args, "model", None) is None else ["--model", args.model]
    for name, value in engine_kwargs(args).items():
        if isinstance(value, bool):  # an on/off option: --name or --no-name
            out.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif value is not None:
            out += [flag(name), str(value)]
    return out
