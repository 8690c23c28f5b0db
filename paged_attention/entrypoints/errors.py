"""Every error the server answers, in OpenAI's shape {"error": {message, type,
param, code}}: as JSON with its HTTP status before a response starts, as an
error event once a stream is under way (its 200 already sent). No route ever
answers a bare text 500."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from paged_attention.entrypoints.async_engine import (
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    EngineUnavailable,
    RequestTimeout,
)
from paged_attention.entrypoints.openai_protocol import (
    ErrorInfo,
    ErrorResponse,
    RequestError,
    describe_validation_error,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("paged_attention.server")


def engine_request_error(err: EngineError, retry_after_s: int = 1) -> RequestError:
    """The HTTP answer to an engine error: 503 overloaded, shutting down or
    no engine, 504 past the request timeout, 500 for a fault."""
    if isinstance(err, EngineOverloaded):
        return RequestError(
            f"the server is overloaded: {err.num_waiting} requests are waiting (limit --max-waiting "
            f"{err.limit}) and this request adds {err.num_new}; retry in {retry_after_s} s",
            status=503,
            type="server_overloaded",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(err, EngineShutdown):
        return RequestError(
            str(err),
            status=503,
            type="server_shutting_down",
            code="shutting_down",
            headers={"Retry-After": str(retry_after_s), "Connection": "close"},
        )
    if isinstance(err, EngineUnavailable):
        return RequestError(str(err), status=503, type="server_error", code="engine_unavailable")
    if isinstance(err, RequestTimeout):
        return RequestError(
            f"{err}; it was aborted (--request-timeout {err.timeout_s:g})",
            status=504,
            type="timeout_error",
            code="request_timeout",
        )
    return RequestError(str(err), status=500, type="internal_server_error", code="engine_error")


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


def sse_error(err: Exception) -> str:
    """An error after the stream started, as an event (the stream then ends with [DONE])."""
    if isinstance(err, RequestError):
        info = err.body().error
    elif isinstance(err, EngineError):
        info = engine_request_error(err).body().error
    elif isinstance(err, ValueError):  # the engine refused the request's input
        info = ErrorInfo(message=str(err), type="invalid_request_error", code=400)
    else:
        info = ErrorInfo(
            message=f"internal server error: {type(err).__name__}: {err}",
            type="internal_server_error",
            code=500,
        )
    return f"data: {ErrorResponse(error=info).model_dump_json()}\n\n"


# ----------------------------------------------------------- app handlers
async def _request_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestError)
    return error_response(err)


async def _validation_error(_: Request, err: Exception) -> JSONResponse:
    # FastAPI answers 422; OpenAI's API (and its clients) expect 400.
    message, param = describe_validation_error(list(err.errors()))  # type: ignore[attr-defined]
    return error_response(RequestError(message, param=param))


async def _http_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    headers = getattr(err, "headers", None)
    return error_response(RequestError(str(err.detail), status=err.status_code, type=kind, headers=headers))


async def _value_error(_: Request, err: Exception) -> JSONResponse:
    # The engine's own input checks (the server validates first, so rare).
    return error_response(RequestError(str(err)))


async def _engine_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, EngineError)
    ctx = getattr(request.app.state, "ctx", None)
    return error_response(engine_request_error(err, ctx.config.retry_after_s if ctx else 1))


async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=err)
    return error_response(
        RequestError(
            f"internal server error: {type(err).__name__}: {err}",
            status=500,
            type="internal_server_error",
        )
    )


def install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(Exception, _unexpected)
