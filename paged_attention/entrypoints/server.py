"""OpenAI-compatible HTTP server: `paged-attention serve`.

    paged-attention serve --model paged_attention/assets/stories260K --chat-template tpl.jinja
    curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32}'

`create_app(llm, ...)` builds a FastAPI app around an `LLM`; the app owns the
engine (through an `AsyncEngine` thread) from startup to shutdown. Routes:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or
server-sent events), GET /health, GET /metrics (Prometheus), GET /debug/memory.
Every error is answered in OpenAI's shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from paged_attention.config import API_KEY_ENV
from paged_attention.entrypoints.async_engine import (
    AsyncEngine,
    ChoiceUpdate,
    EngineError,
    PromptInput,
    generate_choices,
)
from paged_attention.entrypoints.guided_request import guided_decoding_params
from paged_attention.entrypoints.metrics import ServerMetrics
from paged_attention.entrypoints.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestError,
    TokenText,
    UsageInfo,
    build_sampling_params,
    chat_logprobs,
    completion_logprobs,
    describe_validation_error,
    parse_request,
    reject_unsupported,
)
from paged_attention.entrypoints.tokenize_routes import TokenizeRoutes
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from paged_attention.engine.llm import LLM
    from paged_attention.engine.llm_engine import LLMEngine


# ------------------------------------------------------------------- config
@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int | None = None  # 503 once this many requests wait; None: no limit
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (or unset for no limit), got {self.max_waiting}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string when given")


# ------------------------------------------------------------- app context
@dataclass
class ServerContext:
    """Everything one app's routes share (no module-level state)."""

    config: ServerConfig
    engine: AsyncEngine
    tokenizer: Any  # the server's own copy: the engine thread decodes with the original
    metrics: ServerMetrics
    token_text: TokenText
    started: float = field(default_factory=time.time)

    # --- checks ---------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise RequestError(
                f"the model {model!r} does not exist; this server serves "
                f"{self.config.served_model_name!r}",
                status=404, param="model", code="model_not_found",
            )

    def check_capacity(self) -> None:
        """503 while `max_waiting` requests already wait for a running slot."""
        limit = self.config.max_waiting
        if limit is None:
            return
        waiting = self.engine.load().num_waiting
        if waiting >= limit:
            raise RequestError(
                f"the server is overloaded: {waiting} requests are waiting (limit {limit}); "
                f"retry in {self.config.retry_after_s} s",
                status=503, type="server_overloaded", code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )

    def check_prompt(self, prompt: PromptInput, params: SamplingParams, param: str,
                     max_tokens_given: str | None) -> None:
        limit = self.engine.max_model_len
        try:
            self.engine.validate_prompt(prompt.token_ids, params)
        except ValueError as err:
            code = "context_length_exceeded" if len(prompt.token_ids) >= limit else None
            raise RequestError(str(err), param=param, code=code) from None
        if max_tokens_given and len(prompt.token_ids) + params.max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has "
                f"{len(prompt.token_ids)} tokens and {max_tokens_given} asks for "
                f"{params.max_tokens} more ({len(prompt.token_ids) + params.max_tokens} > {limit}): "
                f"shorten the prompt or lower {max_tokens_given}",
                param=max_tokens_given, code="context_length_exceeded",
            )

    # --- prompts --------------------------------------------------------
    def completion_prompts(self, prompt: str | list) -> list[PromptInput]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                if not item:
                    raise RequestError("prompt is empty: give at least one character", param="prompt")
                prompts.append(PromptInput(self.tokenizer.encode(item), item))
            else:
                if not item:
                    raise RequestError("prompt token-id list is empty", param="prompt")
                prompts.append(PromptInput(list(item), None))
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> PromptInput:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "this model has no chat template: start the server with --chat-template FILE, "
                "or use /v1/completions", param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own raise_exception, or a jinja error
            raise RequestError(f"the chat template rejected these messages: {err}", param="messages") from None
        # The template already holds any special tokens: do not add BOS again.
        return PromptInput(self.tokenizer.encode(text, add_special_tokens=False), text)

    def prompt_text(self, prompt: PromptInput) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt.text


def _usage(prompts: Sequence[PromptInput], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _sse_error(err: Exception) -> str:
    """An error after the stream started (status 200 already sent): as an event."""
    if isinstance(err, ValueError):  # the engine refused the request's input
        info = ErrorInfo(message=str(err), type="invalid_request_error", code=400)
    else:
        info = ErrorInfo(message=str(err), type="internal_server_error", code=500)
    return _sse(ErrorResponse(error=info))


async def _collect(updates: AsyncIterator[ChoiceUpdate]) -> dict[int, ChoiceUpdate]:
    finals: dict[int, ChoiceUpdate] = {}
    async with contextlib.aclosing(updates):
        async for update in updates:
            finals[update.index] = update
    return finals


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (which aborts its engine requests and frees
    their blocks) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=499)  # nobody will read it
    finally:
        for t in (task, watcher):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# ---------------------------------------------------------------- handlers
class _Handlers:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        ctx = self.ctx
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        ctx.check_model(req.model)
        reject_unsupported(req)
        if req.suffix:
            raise RequestError("suffix is not supported by this server", param="suffix")
        if req.echo and req.logprobs is not None:
            raise RequestError(
                "echo with logprobs is not supported: prompt log-probs are not computed",
                param="echo",
            )
        if req.stream and req.best_of is not None and req.best_of != req.n:
            raise RequestError(
                f"best_of ({req.best_of}) must equal n ({req.n}) when streaming", param="best_of"
            )
        prompts = ctx.completion_prompts(req.prompt)
        max_tokens = ctx.engine.max_model_len if req.max_tokens is None else req.max_tokens
        params = build_sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, best_of=req.best_of,
                                       guided_decoding=guided_decoding_params(req))
        for prompt in prompts:
            ctx.check_prompt(prompt, params, "prompt", None if req.max_tokens is None else "max_tokens")
        ctx.check_capacity()
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return _event_stream(self._stream_completion(req, prompts, params, response_id, created))
        return await _unless_disconnected(
            request, self._full_completion(req, prompts, params, response_id, created)
        )

    async def _full_completion(self, req: CompletionRequest, prompts: list[PromptInput], params: SamplingParams,
                               response_id: str, created: int) -> Response:
        ctx = self.ctx
        finals = await _collect(generate_choices(ctx.engine, prompts, params, stream=False, priority=req.priority))
        choices = []
        for index in sorted(finals):
            update = finals[index]
            out = update.output
            prefix = ctx.prompt_text(prompts[update.prompt_index]) if req.echo else ""
            choices.append(CompletionChoice(
                index=index, text=prefix + out.text,
                logprobs=completion_logprobs(out, ctx.token_text, 0) if req.logprobs is not None else None,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            ))
        completion_tokens = sum(len(u.output.token_ids) for u in finals.values())
        body = CompletionResponse(
            id=response_id, created=created, model=ctx.config.served_model_name, choices=choices,
            usage=_usage(prompts, completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _stream_completion(self, req: CompletionRequest, prompts: list[PromptInput], params: SamplingParams,
                                 response_id: str, created: int) -> AsyncIterator[str]:
        ctx = self.ctx
        model = ctx.config.served_model_name
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        completion_tokens = 0
        updates = generate_choices(ctx.engine, prompts, params, stream=True, priority=req.priority)
        try:
            async for update in updates:
                out, index = update.output, update.index
                text = out.text
                if index not in offsets:  # this choice's first chunk
                    offsets[index] = 0
                    if req.echo:
                        text = ctx.prompt_text(prompts[update.prompt_index]) + text
                if not text and not update.finished:
                    continue  # nothing to show yet (held back for a possible stop string)
                logprobs = None
                if req.logprobs is not None:
                    skip = sent_tokens.get(index, 0)
                    logprobs = completion_logprobs(out, ctx.token_text, offsets[index], skip)
                    sent_tokens[index] = len(out.token_ids)
                offsets[index] += len(text)
                if update.finished:
                    completion_tokens += len(out.token_ids)
                chunk = CompletionChunk(
                    id=response_id, created=created, model=model,
                    choices=[CompletionChoice(
                        index=index, text=text, logprobs=logprobs,
                        finish_reason=out.finish_reason if update.finished else None,
                        stop_reason=out.stop_reason if update.finished else None,
                    )],
                )
                yield _sse(chunk)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(CompletionChunk(
                    id=response_id, created=created, model=model, choices=[],
                    usage=_usage(prompts, completion_tokens),
                ))
        except (EngineError, ValueError) as err:
            yield _sse_error(err)
        finally:
            await updates.aclose()  # aborts whatever still runs (client gone)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------- chat
    async def chat(self, request: Request) -> Response:
        ctx = self.ctx
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await request.body())
        ctx.check_model(req.model)
        reject_unsupported(req)
        if req.tools:
            raise RequestError("tools are not supported by this server", param="tools")
        if req.tool_choice not in (None, "none"):
            raise RequestError("tool_choice is not supported by this server", param="tool_choice")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = ctx.chat_prompt(req)
        if req.max_completion_tokens is not None:
            limit_name, max_tokens = "max_completion_tokens", req.max_completion_tokens
        elif req.max_tokens is not None:
            limit_name, max_tokens = "max_tokens", req.max_tokens
        else:  # OpenAI's default: as much as the context allows
            limit_name, max_tokens = None, max(1, ctx.engine.max_model_len - len(prompt.token_ids))
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        params = build_sampling_params(
            req, max_tokens=max_tokens, logprobs=num_top,
            renames={"max_tokens": limit_name or "max_tokens", "logprobs": "top_logprobs"},
            guided_decoding=guided_decoding_params(req),
        )
        ctx.check_prompt(prompt, params, "messages", limit_name)
        ctx.check_capacity()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return _event_stream(self._stream_chat(req, prompt, params, num_top, response_id, created))
        return await _unless_disconnected(
            request, self._full_chat(req, prompt, params, num_top, response_id, created)
        )

    async def _full_chat(self, req: ChatCompletionRequest, prompt: PromptInput, params: SamplingParams,
                         num_top: int | None, response_id: str, created: int) -> Response:
        ctx = self.ctx
        finals = await _collect(generate_choices(ctx.engine, [prompt], params, stream=False, priority=req.priority))
        choices = [
            ChatChoice(
                index=index,
                message=ChatResponseMessage(content=finals[index].output.text),
                logprobs=chat_logprobs(finals[index].output, ctx.token_text, num_top) if num_top is not None else None,
                finish_reason=finals[index].output.finish_reason,
                stop_reason=finals[index].output.stop_reason,
            )
            for index in sorted(finals)
        ]
        completion_tokens = sum(len(u.output.token_ids) for u in finals.values())
        body = ChatCompletionResponse(
            id=response_id, created=created, model=ctx.config.served_model_name, choices=choices,
            usage=_usage([prompt], completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _stream_chat(self, req: ChatCompletionRequest, prompt: PromptInput, params: SamplingParams,
                           num_top: int | None, response_id: str, created: int) -> AsyncIterator[str]:
        ctx = self.ctx
        model = ctx.config.served_model_name

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(ChatCompletionChunk(id=response_id, created=created, model=model,
                                            choices=choices, usage=usage))

        sent_tokens: dict[int, int] = {}
        completion_tokens = 0
        updates = generate_choices(ctx.engine, [prompt], params, stream=True, priority=req.priority)
        try:
            # OpenAI opens every choice with the role and empty content.
            for index in range(params.n):
                yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
            async for update in updates:
                out, index = update.output, update.index
                if not out.text and not update.finished:
                    continue
                logprobs = None
                if num_top is not None:
                    logprobs = chat_logprobs(out, ctx.token_text, num_top, sent_tokens.get(index, 0))
                    sent_tokens[index] = len(out.token_ids)
                if update.finished:
                    completion_tokens += len(out.token_ids)
                yield chunk([ChatStreamChoice(
                    index=index, delta=ChatDelta(content=out.text), logprobs=logprobs,
                    finish_reason=out.finish_reason if update.finished else None,
                )])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], _usage([prompt], completion_tokens))
        except (EngineError, ValueError) as err:
            yield _sse_error(err)
        finally:
            await updates.aclose()  # aborts whatever still runs (client gone)
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- others
    async def models(self, _: Request) -> Response:
        ctx = self.ctx
        return JSONResponse(ModelList(data=[ModelCard(
            id=ctx.config.served_model_name, created=int(ctx.started),
            max_model_len=ctx.engine.max_model_len,
        )]).model_dump())

    async def health(self, _: Request) -> Response:
        if not self.ctx.engine.is_running:
            raise RequestError("the engine is not running", status=503, type="server_error")
        return JSONResponse({"status": "ok"})

    async def metrics(self, _: Request) -> Response:
        body, content_type = self.ctx.metrics.render()
        return Response(body, media_type=content_type)

    async def debug_memory(self, _: Request) -> Response:
        """memory_stats() read on the engine thread between steps (exact), plus
        what the server side has queued."""
        stats = dict(await self.ctx.engine.call(lambda engine: engine.memory_stats()))
        load = self.ctx.engine.load()
        stats["num_pending"] = load.num_pending
        stats["num_aborted"] = load.num_aborted
        return JSONResponse(stats)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response
    ends. Starlette cancels the sending task when the client disconnects but
    leaves the generator to the garbage collector; closing it here aborts the
    engine requests (freeing their blocks) at once."""

    def __init__(self, body: AsyncGenerator[str, None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()


def _event_stream(body: AsyncGenerator[str, None]) -> StreamingResponse:
    return _EventStream(body)


# ---------------------------------------------------------------- errors
def _error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return _error_response(err)


async def _validation_error(_: Request, err: Exception) -> JSONResponse:
    # FastAPI answers 422; OpenAI's API (and its clients) expect 400.
    message, param = describe_validation_error(list(err.errors()))  # type: ignore[attr-defined]
    return _error_response(RequestError(message, param=param))


async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return _error_response(RequestError(str(err.detail), status=err.status_code, type=kind,
                                        headers=getattr(err, "headers", None)))


async def _value_error(_: Request, err: ValueError) -> JSONResponse:
    # The engine's own input checks (the server validates first, so rare).
    return _error_response(RequestError(str(err)))


async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
    return _error_response(RequestError(str(err), status=500, type="internal_server_error"))


async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    return _error_response(RequestError(
        f"internal server error: {type(err).__name__}: {err}", status=500, type="internal_server_error",
    ))


def _install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(Exception, _unexpected)


Endpoint = Callable[[Request], Awaitable[Response]]


def _require_api_key(config: ServerConfig, endpoint: Endpoint) -> Endpoint:
    """`endpoint`, answering 401 unless the request carries the server's key."""
    if config.api_key is None:
        return endpoint

    async def checked(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(
                "missing API key: send 'Authorization: Bearer <key>'",
                status=401, type="authentication_error", code="invalid_api_key",
            )
        if not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise RequestError("invalid API key", status=401, type="authentication_error",
                               code="invalid_api_key")
        return await endpoint(request)
    return checked


# ------------------------------------------------------------------ factory
def _warm_up(prompt_token_ids: list[int], engine: LLMEngine) -> None:
    """Runs on the engine thread (first-call costs are per thread there)."""
    request_id = engine.add_request(prompt_token_ids, SamplingParams(temperature=0, max_tokens=2),
                                    request_id="warm-up")
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.abort(request_id)  # no-op once finished; frees its blocks otherwise


def create_app(
    llm: LLM,
    *,
    served_model_name: str = "default",
    api_key: str | None = None,
    max_waiting: int | None = None,
    chat_template: str | None = None,
    warm_up: bool = True,
) -> FastAPI:
    """An app serving `llm`. From the app's startup to its shutdown the engine
    belongs to the app's engine thread: do not call llm.generate meanwhile.
    `chat_template` (template text) overrides the tokenizer's. `warm_up` runs
    one tiny generation on the engine thread before serving, so the first
    client does not pay first-call costs (seconds on CPU)."""
    # Imported here, not at module level: fastapi costs ~1 s to import, and the
    # CLI imports this module for `add_parser` on every command.
    from fastapi import FastAPI

    config = ServerConfig(served_model_name, api_key, max_waiting)
    # The engine thread decodes with the tokenizer while requests are tokenized
    # on the event loop; HF tokenizers are not safe to share across threads.
    tokenizer = copy.deepcopy(llm.get_tokenizer())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    # The collector reads the engine's load at scrape time; `engine` is bound below.
    metrics = ServerMetrics(lambda: engine.load(), served_model_name)
    engine = AsyncEngine(llm.engine, on_finished=metrics.observe_finished)
    ctx = ServerContext(config, engine, tokenizer, metrics, TokenText(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            if warm_up:
                await engine.call(functools.partial(_warm_up, tokenizer.encode("Hello")))
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="paged-attention", lifespan=lifespan)
    app.state.ctx = ctx
    _install_error_handlers(app)
    handlers = _Handlers(ctx)
    # Plain routes (endpoint(request) -> Response): each handler parses its own
    # body strictly (openai_protocol.parse_request) and answers errors in
    # OpenAI's shape, so FastAPI's parameter injection is not wanted here.
    for path, endpoint, method in (
        ("/v1/models", handlers.models, "GET"),
        ("/v1/completions", handlers.completions, "POST"),
        ("/v1/chat/completions", handlers.chat, "POST"),
        ("/debug/memory", handlers.debug_memory, "GET"),
        *TokenizeRoutes(ctx).routes(),  # /tokenize, /detokenize, /version
    ):
        app.add_route(path, _require_api_key(config, endpoint), methods=[method])
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from paged_attention.engine.llm import LLM
    from paged_attention.entrypoints.engine_args import engine_kwargs

    if args.max_waiting is not None and args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    chat_template = read_chat_template(args.chat_template)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    llm = LLM(args.model, **engine_kwargs(args))
    name = args.served_model_name or default_model_name(args.model)
    app = create_app(llm, served_model_name=name, api_key=api_key, max_waiting=args.max_waiting,
                     chat_template=chat_template)
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
    print(f"serving {name!r} at http://{shown}:{port}/v1 (API key {'required' if api_key else 'off'})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=args.log_level == "info",
    ))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
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
