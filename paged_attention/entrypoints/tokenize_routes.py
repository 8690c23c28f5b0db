"""vLLM's utility routes, which `vllm bench serve` and similar clients call:

    POST /tokenize    {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?: false}
                   or {"model"?, "messages", "add_generation_prompt"?: true, "add_special_tokens"?: false, ...}
                   -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"model"?, "tokens"} -> {"prompt"}
    GET  /version     -> {"version"}

Parsing and tokenizing run on the server's own tokenizer copy, off the event
loop (the context's preparation thread, as for completions), never on the
engine thread."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pydantic import ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from paged_attention.entrypoints.openai_protocol import (
    ChatMessage,
    RequestError,
    _Model,
    _Strict,
    parse_request,
)

T = TypeVar("T")

# A guard against one request asking to tokenize or decode without bound.
MAX_DETOKENIZE_TOKENS = 1_000_000


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template already writes BOS and the like (vLLM's default too).
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Model):
    prompt: str


class VersionResponse(_Model):
    model_config = ConfigDict(defer_build=True)
    version: str


def package_version() -> str:
    try:
        return importlib.metadata.version("paged-attention")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _has_key(body: bytes, key: str) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False  # parse_request reports the bad JSON
    return isinstance(data, dict) and key in data


class RouteContext(Protocol):
    """What these routes use of the server's context."""

    tokenizer: Any  # the server's copy of the engine's Tokenizer
    engine: Any  # has max_model_len and vocab_size

    def check_model(self, model: str | None) -> None: ...

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T: ...


class TokenizeRoutes:
    def __init__(self, ctx: RouteContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, Any, str]]:
        """(path, endpoint, method) for the app's router."""
        return [
            ("/tokenize", self.tokenize, "POST"),
            ("/detokenize", self.detokenize, "POST"),
            ("/version", self.version, "GET"),
        ]

    async def tokenize(self, request: Request) -> Response:
        response = await self.ctx.off_loop(self._tokenize, await request.body())
        return JSONResponse(response.model_dump())

    def _tokenize(self, body: bytes) -> TokenizeResponse:
        ctx = self.ctx
        tokenizer = ctx.tokenizer
        # The two shapes differ by their text field; the chat one has "messages".
        req: TokenizeCompletionRequest | TokenizeChatRequest
        if _has_key(body, "messages"):
            req = parse_request(TokenizeChatRequest, body)
            ctx.check_model(req.model)
            text = self._chat_text(req)
        else:
            req = parse_request(TokenizeCompletionRequest, body)
            ctx.check_model(req.model)
            text = req.prompt
        tokens = tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        token_strs = tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=ctx.engine.max_model_len, tokens=tokens, token_strs=token_strs
        )

    def _chat_text(self, req: TokenizeChatRequest) -> str:
        tokenizer = self.ctx.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(
                "this model has no chat template: start the server with --chat-template FILE",
                param="messages",
            )
        if req.add_generation_prompt and req.continue_final_message:
            raise RequestError(
                "add_generation_prompt and continue_final_message cannot both be true",
                param="continue_final_message",
            )
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as err:  # the template's own raise_exception, or a jinja error
            raise RequestError(
                f"the chat template rejected these messages: {err}", param="messages"
            ) from None

    async def detokenize(self, request: Request) -> Response:
        response = await self.ctx.off_loop(self._detokenize, await request.body())
        return JSONResponse(response.model_dump())

    def _detokenize(self, body: bytes) -> DetokenizeResponse:
        ctx = self.ctx
        req = parse_request(DetokenizeRequest, body)
        ctx.check_model(req.model)
        if len(req.tokens) > MAX_DETOKENIZE_TOKENS:
            raise RequestError(
                f"tokens has {len(req.tokens)} ids; the limit is {MAX_DETOKENIZE_TOKENS}", param="tokens"
            )
        vocab = ctx.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))

    async def version(self, _: Request) -> Response:
        return JSONResponse(VersionResponse(version=package_version()).model_dump())
