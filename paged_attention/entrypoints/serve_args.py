"""The `serve` command's arguments. Kept apart from the server module so that
building the CLI's parser imports neither FastAPI nor torch; the server loads
only when `serve` runs."""

from __future__ import annotations

import argparse

from paged_attention.config import API_KEY_ENV
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.entrypoints.limits import add_limit_args


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """`serve` subcommand (on `sub`, an argparse subparsers action)."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve the model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health and Prometheus /metrics.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1, /docs and /debug (default: ${API_KEY_ENV}, "
        "which keeps the key out of the process list; else off)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="without an API key, Host header names answered besides localhost, 127.0.0.1, [::1] and "
        "the bound address (comma-separated; '*': any). Blocks DNS rebinding",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: the folder name)"
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="answer 503 + Retry-After once this many requests wait (default: no limit)",
    )
    add_limit_args(p)
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="engines behind the endpoint, each with its own model copy and KV pool; a request goes "
        "to the one caching its prompt's prefix, else the least loaded (default 1)",
    )
    p.add_argument("--chat-template", default=None, help="Jinja chat template: a file or the template text")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (info adds an access log)",
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from paged_attention.entrypoints import server

    return server.cmd_serve(args)
