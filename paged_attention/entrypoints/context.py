"""What one server app's routes share: its configuration and its parts (no
module-level state, so two apps in one process, as in tests, never mix)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from paged_attention.entrypoints.async_engine import AsyncEngine
from paged_attention.entrypoints.limits import ServerLimits
from paged_attention.entrypoints.metrics import ServerMetrics
from paged_attention.entrypoints.openai_protocol import RequestError, TokenText
from paged_attention.entrypoints.prompts import PromptBuilder

T = TypeVar("T")

# Host names a loopback-only server answers to (see guards.check_host).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int | None = None  # 503 once this many requests wait; None: no limit
    retry_after_s: int = 1
    limits: ServerLimits = field(default_factory=ServerLimits)
    # Host header values accepted without an API key (names, no port); None: any.
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (or unset for no limit), got {self.max_waiting}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string when given")


@dataclass
class ServerContext:
    config: ServerConfig
    engine: AsyncEngine
    prompts: PromptBuilder  # tokenizes with the server's own tokenizer copy
    metrics: ServerMetrics
    token_text: TokenText
    started: float = field(default_factory=time.time)
    draining: bool = False  # set when shutdown begins: new requests get 503
    # Parsing, tokenizing and validating run here, one at a time, off the
    # event loop: a large prompt must not stall /health or other clients,
    # and one tokenizer copy is not to be used by two threads at once.
    _prepare_limiter: Any = None
    # The server's own copy of the engine's Tokenizer (the engine thread decodes with the original).
    tokenizer: Any = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.prompts.tokenizer

    @property
    def limits(self) -> ServerLimits:
        return self.config.limits

    def check_model(self, model: str | None) -> None:
        name = self.config.served_model_name
        if model is not None and model != name:
            raise RequestError(
                f"the model {model!r} does not exist; this server serves {name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the preparation thread."""
        if self._prepare_limiter is None:
            self._prepare_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._prepare_limiter)
