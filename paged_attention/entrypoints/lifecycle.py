"""The HTTP server around an app: uvicorn with this server's connection limits,
a header deadline, and a graceful shutdown.

Connections: uvicorn closes idle keep-alive connections (`timeout_keep_alive`)
and answers 503 beyond `limit_concurrency`, but a connection that sends half a
request line is never timed out; a few hundred of them would hold every slot.
`_HeaderDeadlineH11` closes a connection that has not finished a request's
headers within --header-read-timeout of connecting (or of its previous
response). The body's own deadline is body_limit.py's.

Shutdown (SIGTERM, SIGINT, or `should_exit`): stop accepting, let in-flight
requests finish within --shutdown-timeout, then end each remaining one with an
OpenAI-shaped error (an error event and [DONE] for a stream, a 503 otherwise),
stop the engine (freeing every block) and return: the process exits 0 rather
than re-raising the signal as uvicorn does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from paged_attention.entrypoints.async_engine import EngineShutdown
from paged_attention.entrypoints.context import ServerContext

logger = logging.getLogger("paged_attention.server")

# Largest request line + headers h11 buffers (its default is 16 KiB).
MAX_HEADER_BYTES = 32 * 1024
# After the shutdown timeout: time for the remaining responses to send their
# error before their tasks are cancelled.
FLUSH_TIMEOUT_S = 5.0


class _HeaderDeadlineH11(H11Protocol):
    header_timeout_s = 10.0  # set per server by `protocol_class`

    def connection_made(self, transport: Any) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        self._arm()  # the next request's headers are due (or a pipelined one starts now)
        super().on_response_complete()
        if self.cycle is not cycle or self.transport.is_closing():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def protocol_class(header_timeout_s: float) -> type[asyncio.Protocol]:
    return type("HeaderDeadlineH11", (_HeaderDeadlineH11,), {"header_timeout_s": header_timeout_s})


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal it caught once it has shut down,
            # which ends the process with that signal's status; our shutdown
            # is complete, so the exit is a clean one.
            self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ctx = self.ctx
        ctx.draining = True  # /health says so; a request still arriving gets 503
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        timeout = ctx.limits.shutdown_timeout_s
        if self.server_state.tasks:
            logger.warning(
                "shutting down: waiting up to %g s for %d requests", timeout, len(self.server_state.tasks)
            )
        if not await self._requests_done(timeout):
            failed = ctx.engine.fail_all(
                EngineShutdown(
                    f"the server is shutting down and the request did not finish within "
                    f"--shutdown-timeout {timeout:g} s"
                )
            )
            logger.warning("shutdown: ended %d requests still running after %g s", failed, timeout)
            if not await self._requests_done(FLUSH_TIMEOUT_S):
                for task in self.server_state.tasks:
                    task.cancel(msg="shutdown: the response did not end in time")
        for server in self.servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), FLUSH_TIMEOUT_S)
        if not self.force_exit:
            await self.lifespan.shutdown()  # stops the engine: every block is freed

    async def _requests_done(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.server_state.tasks and not self.force_exit:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def make_server(app: Any, *, log_level: str = "warning", access_log: bool = False) -> GracefulServer:
    """The server for an app made by create_app, with that app's limits."""
    ctx: ServerContext = app.state.ctx
    limits = ctx.limits
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        http=protocol_class(limits.header_read_timeout_s),
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=int(FLUSH_TIMEOUT_S),
    )
    return GracefulServer(config, ctx)
