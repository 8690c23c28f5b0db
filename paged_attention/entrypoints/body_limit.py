"""ASGI middleware bounding a request body's size and the time it takes to
arrive, before anything parses it.

A Content-Length over the limit is answered 413 at once, nothing read (uvicorn
then reads the rest of the body off the connection and discards it, so the
client, still sending, sees the answer rather than a reset). A body without
one (chunked) is counted as it streams and refused once past the limit. A
body still incomplete after the read timeout is answered 408 and the
connection closed: a client that trickles a body holds no handler for long."""

from __future__ import annotations

import asyncio
from typing import Any

from paged_attention.entrypoints.errors import error_response
from paged_attention.entrypoints.openai_protocol import RequestError

Scope = dict[str, Any]
Message = dict[str, Any]


def too_large(size: int, limit: int, exact: bool) -> RequestError:
    what = f"{size} bytes" if exact else f"more than {limit} bytes"
    return RequestError(
        f"the request body is {what}; the limit is {limit} bytes (--max-request-bytes)",
        status=413,
        code="request_too_large",
    )


def too_slow(timeout_s: float, received: int) -> RequestError:
    return RequestError(
        f"the request body did not arrive within {timeout_s:g} s ({received} bytes received; "
        f"--body-read-timeout)",
        status=408,
        code="request_timeout",
        headers={"Connection": "close"},
    )


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(too_large(declared, self.max_bytes, exact=True))(scope, receive, send)
            return
        body = _BoundedBody(receive, self.max_bytes, self.read_timeout_s)
        await self.app(scope, body.receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


class _BoundedBody:
    """The app's `receive`: counts and times the body's messages; once the
    body is complete it only passes messages on (waits for a disconnect)."""

    def __init__(self, receive: Any, max_bytes: int, timeout_s: float) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._received = 0
        self._complete = False

    async def receive(self) -> Message:
        if self._complete:
            return await self._receive()
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise too_slow(self._timeout_s, self._received) from None
        if message["type"] != "http.request":
            self._complete = True  # a disconnect: nothing more will come
            return message
        self._received += len(message.get("body", b""))
        if self._received > self._max_bytes:
            raise too_large(self._received, self._max_bytes, exact=False)
        if not message.get("more_body", False):
            self._complete = True
        return message
