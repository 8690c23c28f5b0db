"""OpenAI's HTTP API: pydantic models for requests, responses, stream chunks
and errors in OpenAI's field names and shapes, and the translation between
them and the engine's types (SamplingParams in, CompletionOutput log-probs out).

Requests are parsed strictly (`strict=True`, `extra="forbid"`): "5" is not an
int and an unknown or misspelt field is an error rather than silently ignored,
so a client learns at once that a parameter had no effect (OpenAI itself
answers "Unrecognized request argument"). Fields OpenAI defines but this
engine cannot honour (penalties, logit_bias, suffix, tools) are accepted at
their neutral values and rejected with a clear message otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from paged_attention.guided import GuidedDecodingParams
from paged_attention.outputs import CompletionOutput
from paged_attention.sampling_params import SamplingParams

# Guards against one HTTP request asking for unbounded work.
MAX_N = 128
MAX_LOGPROBS = 20

# ----------------------------------------------------------------- requests


# defer_build: schemas are built on first use rather than at import, which
# keeps `import` (done by the CLI for every command) ~0.2 s cheaper.
class _Model(BaseModel):
    model_config = ConfigDict(defer_build=True)


class _Strict(_Model):
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions in vLLM's names (the openai client sends them via extra_body).
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    # Structured output (entrypoints/guided_request.py reads these).
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for legacy completions
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    # vLLM's: the prompt's log-probs (top N per token), returned on each choice.
    prompt_logprobs: int | None = None


class TextContentPart(_Model):
    model_config = ConfigDict(extra="ignore", strict=True, defer_build=True)
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    # Clients echo back assistant messages with extra keys (refusal, annotations,
    # tool_calls=None...): ignore those rather than fail the next turn.
    model_config = ConfigDict(extra="ignore", strict=True, defer_build=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# ---------------------------------------------------------------- responses


class UsageInfo(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "paged-attention"
    max_model_len: int | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(_Model):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(_Model):
    """One token of vLLM's `prompt_logprobs`; rank is 1-based in the whole
    vocabulary, None where unknown (a prompt token outside the top N)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's shape: per prompt token (null for the first), token id -> its log-prob.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Model):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# The legacy completions stream reuses the response shape with object
# "text_completion", as OpenAI does.
CompletionChunk = CompletionResponse


# ------------------------------------------------------------------- errors


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# What a union-typed field accepts, for one readable message instead of one
# pydantic error per union member.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
    "tool_choice": "a string or an object",
}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member's name into `loc` ('str', 'list[int]',
    'TextContentPart'); request field names are lower snake_case."""
    return isinstance(part, str) and (
        "[" in part or "-" in part or part[:1].isupper() or part in {"str", "int", "float", "bool"}
    )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for the first problem in a pydantic error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    kind = first.get("type", "")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return f"request body is not valid JSON: {detail}", None
    if not loc:
        return f"request body must be a JSON object, got {_short(first.get('input'))}", None
    path = [p for p in loc if not _is_union_tag(p)]
    param = ".".join(str(p) for p in path) if path else str(loc[0])
    field = next((p for p in reversed(path) if isinstance(p, str)), str(loc[0]))
    if kind == "extra_forbidden":
        return f"unrecognized request argument {param!r}: this server does not support it", param
    if kind == "missing":
        return f"{param} is required", param
    union_failed = (
        sum(
            1
            for e in errors
            if [p for p in e.get("loc", ()) if p != "body" and not _is_union_tag(p)][:1] == path[:1]
        )
        > 1
    )
    if union_failed and field in _EXPECTED:
        return f"{param} must be {_EXPECTED[field]}, got {_short(first.get('input'))}", param
    msg = first.get("msg", "invalid value")
    return f"{param}: {msg[:1].lower() + msg[1:]}, got {_short(first.get('input'))}", param


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a raw JSON body; raises RequestError (400) naming the field."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as err:
        message, param = describe_validation_error(err.errors(include_url=False))
        raise RequestError(message, param=param) from None


class RequestError(Exception):
    """An error answered in OpenAI's JSON shape with the given HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


# ------------------------------------------- requests -> SamplingParams
_PARAM_NAMES = (
    "n",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "stop",
    "stop_token_ids",
    "logprobs",
)


def reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported by this server (only 0), got {value}", param=name)
    if req.logit_bias:
        raise RequestError("logit_bias is not supported by this server", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options is only allowed with stream=true", param="stream_options")


def build_sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    best_of: int | None = None,
    renames: dict[str, str] | None = None,
    guided_decoding: GuidedDecodingParams | None = None,
) -> SamplingParams:
    """SamplingParams from a request; its ValueErrors become 400s naming the
    API's parameter (e.g. max_completion_tokens rather than max_tokens)."""
    renames = renames or {}
    if req.n > MAX_N or (best_of or 0) > MAX_N:
        name = "n" if req.n > MAX_N else "best_of"
        raise RequestError(f"{name} must be <= {MAX_N}, got {getattr(req, name)}", param=name)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        name = renames.get("logprobs", "logprobs")
        raise RequestError(f"{name} must be <= {MAX_LOGPROBS}, got {logprobs}", param=name)
    try:
        return SamplingParams(
            n=req.n,
            best_of=best_of,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            max_tokens=max_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            guided_decoding=guided_decoding,
        )
    except ValueError as err:
        message = str(err)
        first = message.split(" ", 1)[0]
        param = renames.get(first, first) if first in _PARAM_NAMES else None
        if param is not None and param != first:
            message = param + message[len(first) :]
        raise RequestError(message, param=param) from None


# ------------------------------------------------- log-probs -> OpenAI's shapes
class TokenText:
    """A token id's text as it appears inside a sequence (with its leading
    space), for logprobs. Decoding a lone token drops SentencePiece's leading
    space, so each token is decoded after a fixed anchor token and the anchor's
    text is cut off."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self._anchor_text = tokenizer.decode(self._anchor)
        self._cache: dict[int, str] = {}  # bounded by the vocabulary

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode(self._anchor + [token_id])
            if text.startswith(self._anchor_text):
                text = text[len(self._anchor_text) :]
            else:
                text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def completion_logprobs(
    out: CompletionOutput, token_text: TokenText, start_offset: int, skip: int = 0
) -> CompletionLogprobs:
    """Legacy-completions logprobs for out's tokens from index `skip` on."""
    result = CompletionLogprobs()
    offset = start_offset
    for token_id, top in zip(out.token_ids[skip:], (out.logprobs or [])[skip:]):
        text = token_text(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(top.get(token_id))
        result.top_logprobs.append({token_text(t): lp for t, lp in top.items()})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(out: CompletionOutput, token_text: TokenText, num_top: int, skip: int = 0) -> ChatLogprobs:
    content = []
    for token_id, top in zip(out.token_ids[skip:], (out.logprobs or [])[skip:]):
        text = token_text(token_id)
        alternatives = [
            TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_text(t).encode()))
            for t, lp in list(top.items())[:num_top]
        ]
        content.append(
            ChatLogprobToken(
                token=text,
                logprob=top.get(token_id, float("-inf")),
                bytes=list(text.encode()),
                top_logprobs=alternatives,
            )
        )
    return ChatLogprobs(content=content)
