"""From a request body to queued engine requests: parse, check what the
request asks for against the server's limits, tokenize, validate, then queue.

`prepare_*` run off the event loop (parsing and tokenizing a large body takes
CPU time); `submit` runs on it, checking the waiting queue and queueing in
one step. The cheap checks come first, so a request that asks for too much is
refused before its prompts are tokenized. Every refusal is a RequestError
naming the parameter, the value and the limit (with its flag)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from paged_attention.entrypoints.async_engine import EngineError, EngineShutdown, PromptInput, Submission
from paged_attention.entrypoints.context import ServerContext
from paged_attention.entrypoints.errors import engine_request_error
from paged_attention.entrypoints.guided_request import guided_decoding_params
from paged_attention.entrypoints.openai_protocol import (
    MAX_LOGPROBS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    build_sampling_params,
    parse_request,
    reject_unsupported,
)
from paged_attention.sampling_params import SamplingParams


@dataclass
class PreparedCompletion:
    req: CompletionRequest
    prompts: list[PromptInput]
    params: SamplingParams


@dataclass
class PreparedChat:
    req: ChatCompletionRequest
    prompt: PromptInput
    params: SamplingParams
    num_top: int | None  # top_logprobs when logprobs=true, else None


# ------------------------------------------------------------------ checks
def check_stop_strings(ctx: ServerContext, stop: str | list[str] | None) -> None:
    """Each step matches every stop string against new text and holds back
    the longest one's length of streamed text: bound both."""
    stops = [stop] if isinstance(stop, str) else stop or []
    limits = ctx.limits
    if len(stops) > limits.max_stop_strings:
        raise RequestError(
            f"stop has {len(stops)} strings; at most {limits.max_stop_strings} are allowed "
            f"(--max-stop-strings)",
            param="stop",
        )
    longest = max(stops, key=len, default="")
    if len(longest) > limits.max_stop_string_chars:
        raise RequestError(
            f"stop string {longest[:20]!r}... has {len(longest)} characters; at most "
            f"{limits.max_stop_string_chars} are allowed (--max-stop-string-chars)",
            param="stop",
        )


def check_prompt_logprobs(req: CompletionRequest) -> None:
    """vLLM's prompt_logprobs: a count like logprobs, not while streaming (as vLLM)."""
    k = req.prompt_logprobs
    if k is None:
        return
    if not 0 <= k <= MAX_LOGPROBS:
        raise RequestError(
            f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}", param="prompt_logprobs"
        )
    if req.stream:
        raise RequestError(
            "prompt_logprobs is not available with stream=true (use echo with logprobs to stream them)",
            param="prompt_logprobs",
        )


def check_amplification(ctx: ServerContext, num_prompts: int, params: SamplingParams) -> None:
    """What one request may queue: its prompts (each an engine request in the
    waiting queue) and the sequences they run (prompts x best_of)."""
    limits = ctx.limits
    if num_prompts > limits.max_prompts_per_request:
        raise RequestError(
            f"prompt has {num_prompts} prompts; at most {limits.max_prompts_per_request} are allowed "
            f"per request (--max-prompts-per-request)",
            param="prompt",
        )
    max_waiting = ctx.config.max_waiting
    if max_waiting is not None and num_prompts > max_waiting:
        raise RequestError(
            f"prompt has {num_prompts} prompts, more than the waiting queue holds (--max-waiting "
            f"{max_waiting}): send at most {max_waiting} per request",
            param="prompt",
        )
    best_of = params.best_of or params.n
    seqs = num_prompts * best_of
    if seqs > limits.max_seqs_per_request:
        param = "best_of" if best_of > params.n else "n"
        raise RequestError(
            f"this request asks for {seqs} sequences ({num_prompts} prompt(s) x {param} {best_of}); "
            f"at most {limits.max_seqs_per_request} are allowed per request (--max-seqs-per-request)",
            param=param,
        )


def check_prompt(
    ctx: ServerContext,
    prompt: PromptInput,
    params: SamplingParams,
    param: str,
    max_tokens_given: str | None,
) -> None:
    limit = ctx.engine.max_model_len
    num_tokens = len(prompt.token_ids)
    if num_tokens >= limit:  # before any per-token scan of a huge prompt
        raise RequestError(
            f"prompt has {num_tokens} tokens; max_model_len is {limit} "
            f"(the prompt must leave room for at least 1 generated token)",
            param=param,
            code="context_length_exceeded",
        )
    try:
        ctx.engine.validate_prompt(prompt.token_ids, params)
    except (TypeError, ValueError) as err:
        raise RequestError(str(err), param=param) from None
    if max_tokens_given and num_tokens + params.max_tokens > limit:
        raise RequestError(
            f"this model's maximum context length is {limit} tokens; the prompt has "
            f"{num_tokens} tokens and {max_tokens_given} asks for "
            f"{params.max_tokens} more ({num_tokens + params.max_tokens} > {limit}): "
            f"shorten the prompt or lower {max_tokens_given}",
            param=max_tokens_given,
            code="context_length_exceeded",
        )


# ----------------------------------------------------------------- prepare
def prepare_completion(ctx: ServerContext, body: bytes) -> PreparedCompletion:
    req: CompletionRequest = parse_request(CompletionRequest, body)
    ctx.check_model(req.model)
    reject_unsupported(req)
    if req.suffix:
        raise RequestError("suffix is not supported by this server", param="suffix")
    check_prompt_logprobs(req)
    if req.stream and req.best_of is not None and req.best_of != req.n:
        raise RequestError(f"best_of ({req.best_of}) must equal n ({req.n}) when streaming", param="best_of")
    check_stop_strings(ctx, req.stop)
    max_tokens = ctx.engine.max_model_len if req.max_tokens is None else req.max_tokens
    params = build_sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=req.logprobs,
        best_of=req.best_of,
        guided_decoding=guided_decoding_params(req),
    )
    # The engine computes the prompt's top N once for both uses: echo's
    # logprobs and vLLM's prompt_logprobs (each shows its own N).
    wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    if wanted:
        params = dataclasses.replace(params, prompt_logprobs=max(wanted))
    check_amplification(ctx, ctx.prompts.count(req.prompt), params)
    prompts = ctx.prompts.completion_prompts(req.prompt)
    for prompt in prompts:
        check_prompt(ctx, prompt, params, "prompt", None if req.max_tokens is None else "max_tokens")
    return PreparedCompletion(req, prompts, params)


def prepare_chat(ctx: ServerContext, body: bytes) -> PreparedChat:
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    ctx.check_model(req.model)
    reject_unsupported(req)
    if req.tools:
        raise RequestError("tools are not supported by this server", param="tools")
    if req.tool_choice not in (None, "none"):
        raise RequestError("tool_choice is not supported by this server", param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    check_stop_strings(ctx, req.stop)
    # n and best_of are checked before the (costly) template and tokenizing.
    check_amplification(ctx, 1, build_sampling_params(req, max_tokens=1, logprobs=None))
    prompt = ctx.prompts.chat_prompt(req)
    if req.max_completion_tokens is not None:
        limit_name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    elif req.max_tokens is not None:
        limit_name, max_tokens = "max_tokens", req.max_tokens
    else:  # OpenAI's default: as much as the context allows
        limit_name, max_tokens = None, max(1, ctx.engine.max_model_len - len(prompt.token_ids))
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=num_top,
        renames={"max_tokens": limit_name or "max_tokens", "logprobs": "top_logprobs"},
        guided_decoding=guided_decoding_params(req),
    )
    check_prompt(ctx, prompt, params, "messages", limit_name)
    return PreparedChat(req, prompt, params, num_top)


# ------------------------------------------------------------------ submit
def submit(
    ctx: ServerContext, prompts: list[PromptInput], params: SamplingParams, *, stream: bool, priority: int
) -> Submission:
    """Queue the request's prompts, or refuse: 503 when shutting down or the
    waiting queue has no room for them all (with Retry-After)."""
    err: EngineError
    if ctx.draining:
        err = EngineShutdown("the server is shutting down")
    else:
        try:
            return ctx.engine.submit(
                prompts,
                params,
                stream=stream,
                priority=priority,
                max_waiting=ctx.config.max_waiting,
                timeout_s=ctx.limits.request_timeout_s,
            )
        except EngineError as caught:
            err = caught
    refusal = engine_request_error(err, ctx.config.retry_after_s)
    ctx.metrics.observe_rejected(str(refusal.code))
    raise refusal
