"""Who may call the API. With an API key: requests must carry it. Without one
(the default, for a server on this machine), two checks stop a web page in
the user's browser from driving the server:
  * a POST must be `application/json`: a page may send a form or text/plain
    to any origin without a CORS preflight, but not JSON;
  * the Host header must name this server (localhost, 127.0.0.1, [::1], the
    bound address or --allowed-hosts): a DNS-rebinding page reaches
    127.0.0.1 under its own host name, which this refuses.
/health and /metrics stay open to probes and scrapers; /docs and
/openapi.json follow the API's rule."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from paged_attention.entrypoints.context import ServerConfig
from paged_attention.entrypoints.openai_protocol import RequestError

Endpoint = Callable[[Request], Awaitable[Response]]


def host_name(header: str) -> str:
    """The host of a Host header, without port or brackets: '[::1]:8000' -> '::1'."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end != -1 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def check_api_key(api_key: str, request: Request) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            "missing API key: send 'Authorization: Bearer <key>'",
            status=401,
            type="authentication_error",
            code="invalid_api_key",
        )
    if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError("invalid API key", status=401, type="authentication_error", code="invalid_api_key")


def check_host(allowed: frozenset[str] | None, request: Request) -> None:
    if allowed is None:
        return
    header = request.headers.get("host")
    if header is None or host_name(header) not in allowed:
        shown = ", ".join(sorted(allowed))
        raise RequestError(
            f"Host {header!r} is not this server's: without an API key it answers only to {shown} "
            f"(set an API key, or add the name with --allowed-hosts)",
            status=421,
            code="host_not_allowed",
        )


def check_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise RequestError(
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
            status=415,
            code="unsupported_media_type",
        )


def guarded(config: ServerConfig, endpoint: Endpoint) -> Endpoint:
    """`endpoint` behind the server's rule: its key if it has one, else the
    Host check and JSON-only POSTs. Checked on headers alone, before any
    body is read."""

    async def checked(request: Request) -> Response:
        if config.api_key is not None:
            check_api_key(config.api_key, request)
        else:
            check_host(config.allowed_hosts, request)
            if request.method == "POST":
                check_json(request)
        return await endpoint(request)

    return checked
