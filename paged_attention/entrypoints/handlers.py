"""The routes: each reads its body (bounded by body_limit.py), prepares it off
the event loop (admission.py), queues it, and answers JSON or server-sent
events. Leaving early (client gone, error, timeout) always aborts the
request's engine requests, which frees their blocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from paged_attention.entrypoints.admission import (
    PreparedChat,
    PreparedCompletion,
    prepare_chat,
    prepare_completion,
    submit,
)
from paged_attention.entrypoints.async_engine import ChoiceUpdate, PromptInput, Submission
from paged_attention.entrypoints.context import ServerContext
from paged_attention.entrypoints.errors import sse_error
from paged_attention.entrypoints.logprobs import (
    join_logprobs,
    prompt_logprobs_for_echo,
    prompt_pieces,
    vllm_prompt_logprobs,
)
from paged_attention.entrypoints.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptLogprob,
    RequestError,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)

logger = logging.getLogger("paged_attention.server")

DONE = "data: [DONE]\n\n"


def _usage(prompts: Sequence[PromptInput], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _collect(submission: Submission) -> dict[int, ChoiceUpdate]:
    finals: dict[int, ChoiceUpdate] = {}
    updates = submission.choices()
    async with contextlib.aclosing(updates):
        async for update in updates:
            finals[update.index] = update
    return finals


@dataclass
class _PromptParts:
    """One prompt's log-probs as a completion choice shows them."""

    echo: CompletionLogprobs | None  # the echoed prompt's part of `logprobs`
    vllm: list[dict[int, PromptLogprob] | None] | None  # vLLM's `prompt_logprobs`


def _prompt_parts(
    ctx: ServerContext,
    prepared: PreparedCompletion,
    prompt_log_probs: dict[int, list[dict[int, float] | None] | None],
) -> dict[int, _PromptParts]:
    """Per prompt index, from the engine's prompt log-probs; decodes the
    prompt token by token, so it runs off the event loop."""
    req, computed_top = prepared.req, prepared.params.prompt_logprobs
    assert computed_top is not None
    parts = {}
    for prompt_index, entries in prompt_log_probs.items():
        prompt = prepared.prompts[prompt_index]
        if entries is None:
            raise RuntimeError("the engine returned no prompt log-probs for a request that asked for them")
        text = ctx.prompts.text(prompt)
        pieces, offsets = prompt_pieces(ctx.tokenizer, prompt.token_ids, text)
        echo = None
        if req.echo and req.logprobs is not None:
            echo = prompt_logprobs_for_echo(
                prompt.token_ids, entries, pieces, offsets, ctx.token_text, req.logprobs
            )
        vllm = None
        if req.prompt_logprobs is not None:
            vllm = vllm_prompt_logprobs(
                prompt.token_ids, entries, pieces, ctx.token_text, req.prompt_logprobs, computed_top
            )
        parts[prompt_index] = _PromptParts(echo, vllm)
    return parts


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(
    request: Request, submission: Submission, work: Awaitable[Response]
) -> Response:
    """Run `work`, cancelling it if the client hangs up first; the submission
    is aborted either way once it is no longer needed."""
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
        submission.abort()


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, and whose engine
    requests are always aborted, when the response ends. Starlette cancels
    the sending task when the client disconnects but leaves the generator to
    the garbage collector (and a generator that never started runs no
    `finally`); aborting here frees the blocks at once."""

    def __init__(self, body: AsyncGenerator[str, None], submission: Submission) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._submission = submission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                self._submission.abort()
                await self._body.aclose()


async def _events(submission: Submission, chunks: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """A stream's events, then [DONE]; an error after the 200 is an error
    event (OpenAI's shape) before the [DONE], never a cut connection."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as err:
        if not isinstance(err, RequestError):
            logger.warning("stream ended by %s: %s", type(err).__name__, err)
        yield sse_error(err)
    finally:
        submission.abort()  # whatever still runs (client gone, error)
    yield DONE


class Handlers:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        ctx = self.ctx
        prepared = await ctx.off_loop(prepare_completion, ctx, await request.body())
        req = prepared.req
        submission = submit(ctx, prepared.prompts, prepared.params, stream=req.stream, priority=req.priority)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            chunks = self._stream_completion(prepared, submission, response_id, created)
            return _EventStream(_events(submission, chunks), submission)
        return await _unless_disconnected(
            request, submission, self._full_completion(prepared, submission, response_id, created)
        )

    async def _full_completion(
        self, prepared: PreparedCompletion, submission: Submission, response_id: str, created: int
    ) -> Response:
        ctx, req, prompts = self.ctx, prepared.req, prepared.prompts
        finals = await _collect(submission)
        parts: dict[int, _PromptParts] = {}
        if prepared.params.prompt_logprobs is not None:
            by_prompt = {u.prompt_index: u.prompt_logprobs for u in finals.values()}
            parts = await ctx.off_loop(_prompt_parts, ctx, prepared, by_prompt)
        choices = []
        for index in sorted(finals):
            update = finals[index]
            out = update.output
            part = parts.get(update.prompt_index)
            prefix = ctx.prompts.text(prompts[update.prompt_index]) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(out, ctx.token_text, len(prefix))
                if part is not None and part.echo is not None:
                    logprobs = join_logprobs(part.echo, logprobs)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=prefix + out.text,
                    logprobs=logprobs,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                    prompt_logprobs=part.vllm if part is not None else None,
                )
            )
        completion_tokens = sum(len(u.output.token_ids) for u in finals.values())
        body = CompletionResponse(
            id=response_id,
            created=created,
            model=ctx.config.served_model_name,
            choices=choices,
            usage=_usage(prompts, completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _stream_completion(
        self, prepared: PreparedCompletion, submission: Submission, response_id: str, created: int
    ) -> AsyncGenerator[str, None]:
        ctx, req, prompts = self.ctx, prepared.req, prepared.prompts
        model = ctx.config.served_model_name
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        echo_parts: dict[int, CompletionLogprobs | None] = {}  # per prompt index
        completion_tokens = 0
        async for update in submission.choices():
            out, index = update.output, update.index
            prefix = ""
            echo_part = None
            if index not in offsets:  # this choice's first chunk: the echo goes there (vLLM's order)
                offsets[index] = 0
                if req.echo:
                    prefix = ctx.prompts.text(prompts[update.prompt_index])
                if req.echo and req.logprobs is not None:
                    if update.prompt_index not in echo_parts:
                        by_prompt = {update.prompt_index: update.prompt_logprobs}
                        parts = await ctx.off_loop(_prompt_parts, ctx, prepared, by_prompt)
                        echo_parts[update.prompt_index] = parts[update.prompt_index].echo
                    echo_part = echo_parts[update.prompt_index]
            text = prefix + out.text
            if not text and not update.finished and echo_part is None:
                continue  # nothing to show yet (held back for a possible stop string)
            logprobs = None
            if req.logprobs is not None:
                skip = sent_tokens.get(index, 0)
                logprobs = completion_logprobs(out, ctx.token_text, offsets[index] + len(prefix), skip)
                if echo_part is not None:
                    logprobs = join_logprobs(echo_part, logprobs)
                sent_tokens[index] = len(out.token_ids)
            offsets[index] += len(text)
            if update.finished:
                completion_tokens += len(out.token_ids)
            choice = CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=out.finish_reason if update.finished else None,
                stop_reason=out.stop_reason if update.finished else None,
            )
            yield _sse(CompletionChunk(id=response_id, created=created, model=model, choices=[choice]))
        if req.stream_options and req.stream_options.include_usage:
            usage = _usage(prompts, completion_tokens)
            yield _sse(CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage))

    # ------------------------------------------------------------------- chat
    async def chat(self, request: Request) -> Response:
        ctx = self.ctx
        prepared = await ctx.off_loop(prepare_chat, ctx, await request.body())
        req = prepared.req
        submission = submit(ctx, [prepared.prompt], prepared.params, stream=req.stream, priority=req.priority)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            chunks = self._stream_chat(prepared, submission, response_id, created)
            return _EventStream(_events(submission, chunks), submission)
        return await _unless_disconnected(
            request, submission, self._full_chat(prepared, submission, response_id, created)
        )

    async def _full_chat(
        self, prepared: PreparedChat, submission: Submission, response_id: str, created: int
    ) -> Response:
        ctx, num_top = self.ctx, prepared.num_top
        finals = await _collect(submission)
        choices = []
        for index in sorted(finals):
            out = finals[index].output
            choices.append(
                ChatChoice(
                    index=index,
                    message=ChatResponseMessage(content=out.text),
                    logprobs=chat_logprobs(out, ctx.token_text, num_top) if num_top is not None else None,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                )
            )
        completion_tokens = sum(len(u.output.token_ids) for u in finals.values())
        body = ChatCompletionResponse(
            id=response_id,
            created=created,
            model=ctx.config.served_model_name,
            choices=choices,
            usage=_usage([prepared.prompt], completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _stream_chat(
        self, prepared: PreparedChat, submission: Submission, response_id: str, created: int
    ) -> AsyncGenerator[str, None]:
        ctx, req, num_top = self.ctx, prepared.req, prepared.num_top
        model = ctx.config.served_model_name

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=response_id, created=created, model=model, choices=choices, usage=usage
                )
            )

        sent_tokens: dict[int, int] = {}
        completion_tokens = 0
        # OpenAI opens every choice with the role and empty content.
        for index in range(prepared.params.n):
            yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        async for update in submission.choices():
            out, index = update.output, update.index
            if not out.text and not update.finished:
                continue
            logprobs = None
            if num_top is not None:
                logprobs = chat_logprobs(out, ctx.token_text, num_top, sent_tokens.get(index, 0))
                sent_tokens[index] = len(out.token_ids)
            if update.finished:
                completion_tokens += len(out.token_ids)
            choice = ChatStreamChoice(
                index=index,
                delta=ChatDelta(content=out.text),
                logprobs=logprobs,
                finish_reason=out.finish_reason if update.finished else None,
            )
            yield chunk([choice])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], _usage([prepared.prompt], completion_tokens))

    # ---------------------------------------------------------------- others
    async def models(self, _: Request) -> Response:
        ctx = self.ctx
        card = ModelCard(
            id=ctx.config.served_model_name, created=int(ctx.started), max_model_len=ctx.engine.max_model_len
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def health(self, _: Request) -> Response:
        """200 while the engine serves; 503 while shutting down, once the
        engine thread is gone, or when it has made no progress for
        --health-stall-timeout with work queued (a hung step)."""
        ctx = self.ctx
        engine = ctx.engine
        if ctx.draining:
            raise RequestError("the server is shutting down", status=503, type="server_error")
        if not engine.is_running:
            died = engine.died
            reason = f": {type(died).__name__}: {died}" if died is not None else ""
            raise RequestError(f"the engine is not running{reason}", status=503, type="server_error")
        stalled = engine.stalled_for()
        limit = ctx.limits.health_stall_timeout_s
        if stalled > limit:
            raise RequestError(
                f"the engine has made no progress for {stalled:.1f} s with work queued "
                f"(limit --health-stall-timeout {limit:g} s)",
                status=503,
                type="server_error",
                code="engine_stalled",
            )
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
        stats["num_failed"] = load.num_failed
        return JSONResponse(stats)
