"""Drive an `LLMEngine` from asyncio: one thread owns the engine and steps it
while requests arrive and leave.

Why a thread and not a task: a step is a blocking model forward (tens of ms on
CPU); run on the event loop it would stall every connection. The engine is not
thread-safe, so exactly one thread touches it. The event loop talks to that
thread only through an inbox of commands (add, abort, call) guarded by a
condition variable, and gets results back through `loop.call_soon_threadsafe`,
which puts each output into its request's asyncio queue. When there is no work
the engine thread sleeps on the condition: no busy loop.

`generate_choices` turns an OpenAI request into one engine request per prompt
(the engine samples n / best_of itself) and numbers the choices.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from paged_attention.engine.llm_engine import LLMEngine
from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

logger = logging.getLogger("paged_attention.server")

T = TypeVar("T")


class EngineError(RuntimeError):
    """The engine failed (or stopped) while a request was in flight."""


# ------------------------------------------------------------------ commands
@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: bool
    priority: int


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


@dataclass(frozen=True)
class EngineLoad:
    """A consistent view of the engine taken by its thread after every step."""

    memory: dict[str, int | float]
    num_pending: int  # added on the event loop, not yet seen by the engine
    num_prompt_tokens: int
    num_generation_tokens: int
    num_aborted: int

    @property
    def num_running(self) -> int:
        return int(self.memory.get("num_running", 0))

    @property
    def num_waiting(self) -> int:
        # A request in the inbox is waiting just as much as one in the scheduler.
        return int(self.memory.get("num_waiting", 0)) + self.num_pending


FinishHook = Callable[[RequestOutput, float], None]


class AsyncEngine:
    """Owns `engine` from `start()` to `stop()`: nothing else may touch it then.

    `add`, `abort`, `call` and `load` must be called from the event loop that
    called `start()` (they are not coroutines: adding never blocks).
    """

    def __init__(self, engine: LLMEngine, *, on_finished: FinishHook | None = None) -> None:
        self._engine = engine
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort | _Call] = []
        self._pending_adds = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        # Event-loop side: where each live request's outputs go, and when it was submitted.
        self._sinks: dict[str, asyncio.Queue] = {}
        self._submitted: dict[str, float] = {}
        self._num_aborted = 0
        # Engine-thread side.
        self._live: set[str] = set()
        self._load = self._measure(num_pending=0)
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        # daemon: a test or server that dies without stop() must not hang interpreter exit.
        self._thread = threading.Thread(target=self._run, name="paged-attention-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort whatever is in flight (freeing its blocks), then end the thread."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------- requests
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a prompt the engine would refuse. Safe from the
        event loop: the check reads only the engine's fixed limits."""
        self._engine.validate_prompt(prompt_token_ids, params)

    def add(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: asyncio.Queue,
        *,
        prompt: str | None = None,
        stream: bool = False,
        priority: int = 0,
    ) -> str:
        """Queue a request; its RequestOutputs (deltas when `stream`, else only
        the final one) and any EngineError are put into `sink`."""
        if not self.is_running:
            raise EngineError("the engine is not running")
        request_id = f"req-{next(self._ids)}"
        self._sinks[request_id] = sink
        self._submitted[request_id] = time.perf_counter()
        self._post(_Add(request_id, list(prompt_token_ids), params, prompt, stream, priority), add=True)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the engine's next step.
        Never raises: it runs in cleanup paths (a client that went away)."""
        if self._sinks.pop(request_id, None) is None:
            return  # already finished: nothing to free
        self._submitted.pop(request_id, None)
        self._num_aborted += 1
        try:
            self._post(_Abort(request_id))
        except EngineError:
            pass  # stopping: the engine thread aborts everything still live

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; returns its result."""
        if not self.is_running:
            raise EngineError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def load(self) -> EngineLoad:
        with self._cond:
            return dataclasses.replace(
                self._load, num_pending=self._pending_adds, num_aborted=self._num_aborted
            )

    def _post(self, command: _Add | _Abort | _Call, add: bool = False) -> None:
        with self._cond:
            # Refused once stopping: the thread's last pass has taken (or will
            # take) everything posted before, so nothing posted is ever stranded.
            if self._stopping:
                raise EngineError("the engine is stopping")
            self._inbox.append(command)
            self._pending_adds += add
            self._cond.notify()

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not self._inbox and not busy and not self._stopping:
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            outputs: list[RequestOutput] = []
            errors: list[tuple[str, BaseException]] = []
            num_adds = self._apply(commands, errors)
            if stopping:
                self._fail_all(EngineError("the server is shutting down"), errors)
            elif self._engine.has_unfinished():
                try:
                    outputs = self._engine.step()
                except Exception as err:  # a bug or OOM: fail the requests in flight, keep serving
                    logger.exception("engine step failed; aborting %d requests", len(self._live))
                    self._fail_all(EngineError(f"engine step failed: {err}"), errors)
                for out in outputs:
                    if out.finished:
                        self._live.discard(out.request_id)
            busy = self._engine.has_unfinished()
            load = self._measure(num_pending=0)
            with self._cond:
                self._pending_adds -= num_adds
                self._load = load
            if outputs or errors:
                self._deliver(outputs, errors)
            if stopping:
                return

    def _apply(self, commands: list, errors: list[tuple[str, BaseException]]) -> int:
        num_adds = 0
        for cmd in commands:
            if isinstance(cmd, _Add):
                num_adds += 1
                try:
                    self._engine.add_request(
                        cmd.prompt_token_ids,
                        cmd.params,
                        prompt=cmd.prompt,
                        request_id=cmd.request_id,
                        priority=cmd.priority,
                        stream=cmd.stream,
                    )
                    self._live.add(cmd.request_id)
                except Exception as err:
                    errors.append((cmd.request_id, err))
            elif isinstance(cmd, _Abort):
                self._live.discard(cmd.request_id)
                try:
                    self._engine.abort(cmd.request_id)
                except Exception:  # keep the thread alive for everyone else
                    logger.exception("abort of %s failed", cmd.request_id)
            elif cmd.future.set_running_or_notify_cancel():
                try:
                    cmd.future.set_result(cmd.fn(self._engine))
                except Exception as err:
                    cmd.future.set_exception(err)
        return num_adds

    def _fail_all(self, error: EngineError, errors: list[tuple[str, BaseException]]) -> None:
        for request_id in sorted(self._live):
            try:
                self._engine.abort(request_id)
            except Exception:  # keep freeing the others
                logger.exception("abort of %s failed", request_id)
            errors.append((request_id, error))
        self._live.clear()

    def _measure(self, num_pending: int) -> EngineLoad:
        stats = getattr(self._engine, "stats", None)
        return EngineLoad(
            memory=dict(self._engine.memory_stats()),
            num_pending=num_pending,
            num_prompt_tokens=getattr(stats, "num_prompt_tokens", 0),
            num_generation_tokens=getattr(stats, "num_generated_tokens", 0),
            num_aborted=0,
        )

    def _deliver(self, outputs: list[RequestOutput], errors: list[tuple[str, BaseException]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outputs, errors)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------- event-loop side
    def _dispatch(self, outputs: list[RequestOutput], errors: list[tuple[str, BaseException]]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue  # aborted by its client while this step ran
            if out.finished:
                del self._sinks[out.request_id]
                submitted = self._submitted.pop(out.request_id)
                if self._on_finished is not None:
                    try:
                        self._on_finished(out, submitted)
                    except Exception:  # metrics must never lose a client its answer
                        logger.exception("on_finished hook failed for %s", out.request_id)
            sink.put_nowait(out)
        for request_id, err in errors:
            sink = self._sinks.pop(request_id, None)
            self._submitted.pop(request_id, None)
            if sink is not None:
                sink.put_nowait(err)


# ------------------------------------------------------------------ choices
@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None


@dataclass
class ChoiceUpdate:
    """New output for one choice. `output.text` is the new text when streaming,
    else the whole text; `output.token_ids` / `output.logprobs` are always all
    tokens so far."""

    index: int  # prompt_index * n + choice number, as OpenAI numbers choices
    prompt_index: int
    output: CompletionOutput
    finished: bool  # this choice is complete (its siblings may still run)


def _join(prev: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Two consecutive stream deltas of one request as one."""
    by_index = {c.index: c for c in prev.outputs}
    for c in new.outputs:
        old = by_index.get(c.index)
        by_index[c.index] = c if old is None else dataclasses.replace(c, text=old.text + c.text)
    return dataclasses.replace(new, outputs=sorted(by_index.values(), key=lambda c: c.index))


async def _next_batch(sink: asyncio.Queue) -> list[RequestOutput]:
    """Everything queued now, each request's deltas joined into one. A consumer
    that fell behind (slow client, busy event loop) then sends one event per
    request instead of one per engine step, and catches up."""
    items = [await sink.get()]
    while not sink.empty():
        items.append(sink.get_nowait())
    merged: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            raise item
        prev = merged.get(item.request_id)
        merged[item.request_id] = item if prev is None else _join(prev, item)
    return list(merged.values())


async def generate_choices(
    engine: AsyncEngine,
    prompts: Sequence[PromptInput],
    params: SamplingParams,
    *,
    stream: bool,
    priority: int = 0,
) -> AsyncIterator[ChoiceUpdate]:
    """All n choices of every prompt, as they are produced.

    Each prompt is one engine request with `params` as given: the engine
    prefills the prompt once, samples best_of sequences on shared blocks
    (sample i seeded seed + i when the request has a seed), and with best_of > n
    returns the n most likely, so a request gets the same choices here as from
    `LLM.generate`. The engine refuses best_of > n with `stream` (ValueError).

    Leaving the iterator early (client gone, error) aborts every request that
    is still running.
    """
    n = params.n
    sink: asyncio.Queue = asyncio.Queue()
    prompt_of: dict[str, int] = {}  # engine request id -> prompt index
    remaining: set[str] = set()
    try:
        for prompt_index, prompt in enumerate(prompts):
            request_id = engine.add(
                prompt.token_ids,
                params,
                sink,
                prompt=prompt.text,
                stream=stream,
                priority=priority,
            )
            prompt_of[request_id] = prompt_index
            remaining.add(request_id)
        while remaining:
            for item in await _next_batch(sink):
                if item.finished:
                    remaining.discard(item.request_id)
                prompt_index = prompt_of[item.request_id]
                for out in item.outputs:
                    yield ChoiceUpdate(prompt_index * n + out.index, prompt_index, out, out.finished())
    finally:
        for request_id in remaining:
            engine.abort(request_id)
