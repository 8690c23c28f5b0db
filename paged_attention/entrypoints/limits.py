"""What one client may ask of the server and how long it may take: every limit
of `paged-attention serve` in one record, each field with its flag's help.

Kept free of FastAPI and pydantic imports: the CLI builds its parser from
these fields on every command. The checks that apply them live with the code
that meets the request (`admission.py`, `body_limit.py`, `lifecycle.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MIB = 2**20


def _limit(default: Any, help: str, *, optional: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "optional": optional})


@dataclass(frozen=True)
class ServerLimits:
    # Request size and amplification: what one request may queue.
    max_request_bytes: int = _limit(
        4 * MIB, "largest request body in bytes, checked before it is parsed (413 above it)"
    )
    max_prompts_per_request: int = _limit(
        64, "prompts in one /v1/completions request (each is one engine request in the queue)"
    )
    max_seqs_per_request: int = _limit(
        256, "sequences one request may run: prompts x best_of (x n), like vLLM's max_num_seqs"
    )
    max_stop_strings: int = _limit(16, "stop strings per request")
    max_stop_string_chars: int = _limit(256, "characters in one stop string")
    # Time: slow clients, stuck work, shutdown.
    header_read_timeout_s: float = _limit(
        10.0, "seconds a connection may take to send a request's headers before it is closed"
    )
    body_read_timeout_s: float = _limit(30.0, "seconds a request may take to send its body (408 after)")
    keep_alive_timeout_s: float = _limit(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = _limit(
        1024, "open connections and requests at once; beyond it uvicorn answers 503 at once"
    )
    request_timeout_s: float | None = _limit(
        None, "abort a request still running after this many seconds and answer 504", optional=True
    )
    health_stall_timeout_s: float = _limit(
        60.0, "/health answers 503 when the engine has made no progress for this long with work queued"
    )
    shutdown_timeout_s: float = _limit(
        20.0, "on SIGTERM/SIGINT, seconds in-flight requests get to finish before they end with an error"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["optional"]:
                continue
            if f.type == "int":
                ok, bound = isinstance(value, int) and not isinstance(value, bool) and value >= 1, ">= 1"
            else:  # seconds; a shutdown timeout of 0 ends the remaining requests at once
                zero_ok = f.name == "shutdown_timeout_s"
                real = (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                )
                ok = real and (value >= 0 if zero_ok else value > 0)
                bound = ">= 0" if zero_ok else "> 0"
            if not ok:
                raise ValueError(f"{flag(f.name)} must be {bound}, got {value!r}")

    def replace(self, **changes: Any) -> ServerLimits:
        return dataclasses.replace(self, **changes)


def flag(name: str) -> str:
    """The command-line flag of a ServerLimits field: header_read_timeout_s -> --header-read-timeout."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits", "what one client may ask of the server, and for how long")
    for f in dataclasses.fields(ServerLimits):
        kind = int if f.type == "int" else float
        default: Any = f.default
        if default is None:
            shown = "none"
        elif f.name == "max_request_bytes":
            shown = f"{default / MIB:g} MiB"
        else:
            shown = f"{default:g}"
        group.add_argument(
            flag(f.name),
            dest=f.name,
            type=kind,
            default=default,
            metavar="BYTES" if f.name == "max_request_bytes" else "N" if kind is int else "SECONDS",
            help=f"{f.metadata['help']} (default {shown})",
        )


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
