"""OpenAI-compatible HTTP server: `paged-attention serve`.

    paged-attention serve --model paged_attention/assets/stories260K --chat-template tpl.jinja
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "Once upon a time", "max_tokens": 32}'

`create_app(llm, ...)` builds a FastAPI app around an `LLM`; the app owns the
engine (through an `AsyncEngine` thread) from startup to shutdown. Routes:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or
server-sent events), GET /health, GET /metrics (Prometheus), GET /debug/memory,
GET /docs and /openapi.json. Every error is answered in OpenAI's shape
{"error": {message, type, param, code}}.

The parts, one job each: `context.py` (what routes share), `guards.py` (API
key, Host and Content-Type checks), `body_limit.py` (body size and read
time), `admission.py` (request checks, tokenizing off the event loop, the
waiting-queue limit), `handlers.py` (routes and streams), `errors.py`
(OpenAI-shaped errors), `lifecycle.py` (uvicorn's connection limits, header
deadline, graceful shutdown), `limits.py` (every limit and its flag).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import ipaddress
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from paged_attention.config import API_KEY_ENV
from paged_attention.engine.host_malloc import release_free_memory
from paged_attention.entrypoints.async_engine import AsyncEngine
from paged_attention.entrypoints.body_limit import BodyLimitMiddleware
from paged_attention.entrypoints.context import LOOPBACK_HOSTS, ServerConfig, ServerContext
from paged_attention.entrypoints.dp_router import DataParallelEngine, build_replicas
from paged_attention.entrypoints.errors import install_error_handlers
from paged_attention.entrypoints.guards import guarded, host_name
from paged_attention.entrypoints.handlers import Handlers
from paged_attention.entrypoints.limits import ServerLimits, limits_from_args
from paged_attention.entrypoints.metrics import ServerMetrics
from paged_attention.entrypoints.openai_protocol import TokenText
from paged_attention.entrypoints.prompts import PromptBuilder
from paged_attention.entrypoints.tokenize_routes import TokenizeRoutes
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from paged_attention.engine.llm import LLM
    from paged_attention.engine.llm_engine import LLMEngine


# ------------------------------------------------------------------ factory
def _warm_up(prompt_token_ids: list[int], engine: LLMEngine) -> None:
    """Runs on the engine thread (first-call costs are per thread there)."""
    request_id = engine.add_request(
        prompt_token_ids, SamplingParams(temperature=0, max_tokens=2), request_id="warm-up"
    )
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.abort(request_id)  # no-op once finished; frees its blocks otherwise
    if engine.kv_cache.device.type == "cpu":
        release_free_memory()  # what start-up freed, in every thread's heap


def create_app(
    llm: LLM,
    *,
    served_model_name: str = "default",
    api_key: str | None = None,
    max_waiting: int | None = None,
    chat_template: str | None = None,
    warm_up: bool = True,
    limits: ServerLimits | None = None,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    replicas: Sequence[LLM] = (),
) -> FastAPI:
    """An app serving `llm`. From the app's startup to its shutdown the engine
    belongs to the app's engine thread: do not call llm.generate meanwhile.
    `chat_template` (template text) overrides the tokenizer's. `warm_up` runs
    one tiny generation on the engine thread before serving, so the first
    client does not pay first-call costs (seconds on CPU). `limits`: what one
    client may ask (default ServerLimits()). `allowed_hosts`: the Host names
    accepted without an API key (None: any). `replicas`: more engines like
    `llm`, served with it as data-parallel replicas (entrypoints/dp_router.py).
    Serve it with `lifecycle.make_server(app)`."""
    # Imported here, not at module level: fastapi costs ~1 s to import, and the
    # CLI imports this module for `add_parser` on every command.
    from fastapi import FastAPI
    from fastapi.openapi.docs import get_swagger_ui_html

    hosts = None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts)
    config = ServerConfig(served_model_name, api_key, max_waiting, limits=limits or ServerLimits(),
                          allowed_hosts=hosts)  # fmt: skip
    # The engine thread decodes with the tokenizer while requests are tokenized
    # on the preparation thread; HF tokenizers are not safe to share across
    # threads. The engine's own Tokenizer, copied (its AutoTokenizer is loaded
    # on the copy only if a chat template or token strings are asked for).
    tokenizer = copy.deepcopy(llm.engine.tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    # The collector reads the engine's load at scrape time; `engine` is bound below.
    metrics = ServerMetrics(lambda: engine.load(), served_model_name)
    engine = (
        AsyncEngine(llm.engine, on_finished=metrics.observe_finished)
        if not replicas
        else DataParallelEngine.from_llms([llm, *replicas], on_finished=metrics.observe_finished)
    )
    prompts = PromptBuilder(tokenizer, engine.max_model_len)
    ctx = ServerContext(config, engine, prompts, metrics, TokenText(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            if warm_up:
                await engine.call(functools.partial(_warm_up, tokenizer.encode("Hello")))
            yield
        finally:
            await engine.stop()

    # FastAPI's own /docs and /openapi.json would skip the API's rule: ours follow it.
    app = FastAPI(title="paged-attention", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=config.limits.max_request_bytes,
        read_timeout_s=config.limits.body_read_timeout_s,
    )  # fmt: skip
    handlers = Handlers(ctx)

    async def openapi(_: Request) -> Response:
        return JSONResponse(app.openapi())

    async def docs(_: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="paged-attention")

    # Plain routes (endpoint(request) -> Response): each handler parses its own
    # body strictly (openai_protocol.parse_request) and answers errors in
    # OpenAI's shape, so FastAPI's parameter injection is not wanted here.
    for path, endpoint, method in (
        ("/v1/models", handlers.models, "GET"),
        ("/v1/completions", handlers.completions, "POST"),
        ("/v1/chat/completions", handlers.chat, "POST"),
        ("/debug/memory", handlers.debug_memory, "GET"),
        ("/openapi.json", openapi, "GET"),
        ("/docs", docs, "GET"),
        *TokenizeRoutes(ctx).routes(),  # /tokenize, /detokenize, /version
    ):
        app.add_route(path, guarded(config, endpoint), methods=[method])
    # Health checks and Prometheus scrapers usually carry no key.
    app.add_route("/health", handlers.health, methods=["GET"])
    app.add_route("/metrics", handlers.metrics, methods=["GET"])
    return app


# ---------------------------------------------------------------------- CLI
def read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the template text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def bind_socket(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only
    # on sockets that say they are TCP, and with Nagle on, every response written
    # as headers + body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def default_model_name(model: str | None) -> str:
    return "SmolLM2-135M-Instruct" if model is None else Path(model).name or str(model)


def resolve_api_key(flag: str | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """--api-key, else $PAGED_ATTENTION_API_KEY (preferred: a flag shows in `ps`), else none."""
    return flag or environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host_name(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def allowed_hosts_for(bind_host: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """Host header names accepted without an API key: the loopback names, the
    bound address (unless a wildcard: clients never send 0.0.0.0), and `extra`
    (--allowed-hosts); '*' among them turns the check off."""
    names = {host_name(h) for h in extra if h.strip()}
    if "*" in names:
        return None
    bound = host_name(bind_host)
    wildcard = bound in ("0.0.0.0", "::", "")
    return frozenset(LOOPBACK_HOSTS | names | (set() if wildcard else {bound}))


def exposure_warning(bind_host: str, api_key: str | None, hosts: frozenset[str] | None) -> str | None:
    """What to tell someone serving beyond this machine without a key."""
    if api_key is not None or is_loopback(bind_host):
        return None
    names = "any" if hosts is None else ", ".join(sorted(hosts))
    return (
        f"warning: listening on {bind_host} without an API key: anyone who can reach it may use this "
        f"server. Set ${API_KEY_ENV} to require one. Without a key only these Host names are "
        f"answered: {names} (--allowed-hosts adds more)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from paged_attention.entrypoints.engine_args import engine_kwargs
    from paged_attention.entrypoints.lifecycle import make_server

    if args.max_waiting is not None and args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    limits = limits_from_args(args)
    chat_template = read_chat_template(args.chat_template)
    api_key = resolve_api_key(args.api_key)
    hosts = allowed_hosts_for(args.host, args.allowed_hosts.split(",") if args.allowed_hosts else ())
    llm, *replicas = build_replicas(args.model, engine_kwargs(args), args.data_parallel_size)
    name = args.served_model_name or default_model_name(args.model)
    app = create_app(
        llm,
        served_model_name=name,
        api_key=api_key,
        max_waiting=args.max_waiting,
        chat_template=chat_template,
        limits=limits,
        allowed_hosts=hosts,
        replicas=replicas,
    )
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    stats = llm.memory_stats()
    pool_tokens = stats["num_blocks"] * stats["block_size"]
    print(
        f"KV pool: {stats['num_blocks']} blocks x {stats['block_size']} tokens = {pool_tokens} tokens "
        f"({stats['num_blocks'] * stats['bytes_per_block'] / 2**20:.1f} MiB); "
        f"max_model_len {llm.engine.max_model_len}",
        flush=True,
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {name!r} at http://{shown}:{port}/v1 (API key {'required' if api_key else 'off'})",
        flush=True,
    )
    warning = exposure_warning(args.host, api_key, hosts)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    server = make_server(app, log_level=args.log_level, access_log=args.log_level == "info")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    finally:
        sock.close()
    print("server stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m paged_attention.entrypoints.server ...` (the same as `paged-attention serve`)."""
    from paged_attention.entrypoints.serve_args import add_serve_parser

    parser = argparse.ArgumentParser(prog="paged-attention-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
