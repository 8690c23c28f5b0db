"""Drive an `LLMEngine` from asyncio: one thread owns the engine and steps it
while requests arrive and leave.

Why a thread and not a task: a step is a blocking model forward (tens of ms on
CPU); run on the event loop it would stall every connection. The engine is not
thread-safe, so exactly one thread touches it. The event loop talks to that
thread only through an inbox of commands (add, abort, call) guarded by a
condition variable, and gets results back through `loop.call_soon_threadsafe`,
which puts each output into its request's asyncio queue. When there is no work
the engine thread sleeps on the condition: no busy loop.

`submit` queues an OpenAI request as one engine request per prompt (the engine
samples n / best_of itself), checking the waiting-queue limit and queueing in
one step; its `Submission` yields the choices, numbered as OpenAI numbers them.

Faults stay small: a step that raises fails the requests the engine blames
(`StepError`) and serving goes on; should the thread itself die (any
BaseException), every waiting client is answered with an EngineError instead
of waiting forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from paged_attention.engine.errors import EngineDeadError
from paged_attention.engine.llm_engine import LLMEngine, StepError
from paged_attention.outputs import CompletionOutput, RequestOutput
from paged_attention.sampling_params import SamplingParams

logger = logging.getLogger("paged_attention.server")

T = TypeVar("T")


class EngineError(RuntimeError):
    """The engine failed (or stopped) while a request was in flight."""


class EngineShutdown(EngineError):
    """The server is shutting down: the request was refused or cut short."""


class EngineUnavailable(EngineError):
    """The engine is not running (not started, or its thread died): refused."""


class EngineOverloaded(EngineError):
    """The waiting queue has no room for a request's prompts."""

    def __init__(self, num_waiting: int, limit: int, num_new: int) -> None:
        super().__init__(f"{num_waiting} requests are waiting (limit {limit}); this request adds {num_new}")
        self.num_waiting = num_waiting
        self.limit = limit
        self.num_new = num_new


class RequestTimeout(EngineError):
    """A request ran past its time budget and was aborted."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request did not finish within the server's request timeout ({timeout_s:g} s)")
        self.timeout_s = timeout_s


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
    num_failed: int = 0  # failed by an engine fault (not by the client)

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

    `submit`, `abort`, `fail_all`, `call` and `load` must be called from the
    event loop that called `start()` (they are not coroutines: queueing never
    blocks).
    """

    def __init__(self, engine: LLMEngine, *, on_finished: FinishHook | None = None) -> None:
        self._engine = engine
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort | _Call] = []
        self._pending_adds = 0
        self._stopping = False
        self._died: BaseException | None = None  # what killed the engine thread
        # For /health: whether work is queued or running, and when the engine
        # last made progress (or, if it was idle, when work arrived).
        self._busy = False
        self._progress_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        # Event-loop side: where each live request's outputs go, and when it was submitted.
        self._sinks: dict[str, asyncio.Queue] = {}
        self._submitted: dict[str, float] = {}
        self._num_aborted = 0
        self._num_failed = 0
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
        return self._thread is not None and self._thread.is_alive() and self._died is None

    @property
    def died(self) -> BaseException | None:
        """What ended the engine thread unexpectedly (None while it serves)."""
        return self._died

    def stalled_for(self) -> float:
        """Seconds the engine has made no progress while work waits for it (0 when idle)."""
        with self._cond:
            if not (self._busy or self._inbox):
                return 0.0
            return time.monotonic() - self._progress_at

    # ------------------------------------------------------------- requests
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a prompt the engine would refuse. Safe off the
        engine thread: the check reads only the engine's fixed limits."""
        self._engine.validate_prompt(prompt_token_ids, params)

    def submit(
        self,
        prompts: Sequence[PromptInput],
        params: SamplingParams,
        *,
        stream: bool = False,
        priority: int = 0,
        max_waiting: int | None = None,
        timeout_s: float | None = None,
    ) -> Submission:
        """Queue one engine request per prompt, all or none: EngineOverloaded
        when they would take the waiting queue past `max_waiting`. The check
        and the queueing happen under one lock with no await between, so a
        burst of requests fills exactly the free room. `timeout_s` bounds the
        whole request (RequestTimeout, and its engine requests aborted)."""
        if not self.is_running:
            raise self._not_running()
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        commands = [
            _Add(request_id, list(prompt.token_ids), params, prompt.text, stream, priority)
            for request_id, prompt in zip(ids, prompts)
        ]
        with self._cond:
            self._check_open()
            if max_waiting is not None:
                waiting = int(self._load.memory.get("num_waiting", 0)) + self._pending_adds
                if waiting + len(commands) > max_waiting:
                    raise EngineOverloaded(waiting, max_waiting, len(commands))
            self._note_arrival()
            self._inbox.extend(commands)
            self._pending_adds += len(commands)
            self._cond.notify()
        now = time.perf_counter()
        for request_id in ids:
            self._sinks[request_id] = sink
            self._submitted[request_id] = now
        deadline = None if timeout_s is None else loop.time() + timeout_s
        return Submission(
            self, params.n, sink, dict(zip(ids, range(len(ids)))), set(ids), deadline, timeout_s
        )

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

    def fail_all(self, error: EngineError) -> int:
        """Answer every request in flight with `error` now and abort it (the
        graceful shutdown's last word). Returns how many were failed."""
        failed = list(self._sinks.items())
        self._sinks.clear()
        self._submitted.clear()
        for request_id, sink in failed:
            sink.put_nowait(error)
            try:
                self._post(_Abort(request_id))
            except EngineError:
                pass  # stopping: the engine thread aborts everything still live
        return len(failed)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; returns its result."""
        if not self.is_running:
            raise self._not_running()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def load(self) -> EngineLoad:
        with self._cond:
            return dataclasses.replace(
                self._load,
                num_pending=self._pending_adds,
                num_aborted=self._num_aborted,
                num_failed=self._num_failed,
            )

    def _post(self, command: _Abort | _Call) -> None:
        with self._cond:
            self._check_open()
            self._note_arrival()
            self._inbox.append(command)
            self._cond.notify()

    def _check_open(self) -> None:
        """Under the lock. Refused once stopping: the thread's last pass has
        taken (or will take) everything posted before, so nothing posted is
        ever stranded."""
        if self._died is not None or self._stopping:
            raise self._not_running()

    def _note_arrival(self) -> None:
        """Under the lock: work arriving at an idle engine starts its progress clock."""
        if not (self._busy or self._inbox):
            self._progress_at = time.monotonic()

    def _not_running(self) -> EngineError:
        if self._died is not None:
            return EngineUnavailable(f"the engine thread died: {type(self._died).__name__}: {self._died}")
        if self._stopping:
            return EngineShutdown("the server is shutting down")
        return EngineUnavailable("the engine is not running")

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # even SystemExit: no client may wait forever
            logger.critical("the engine thread died; failing every request", exc_info=True)
            self._die(err)

    def _serve(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not self._inbox and not busy and not self._stopping:
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
                self._busy = busy or bool(commands)  # taken work is work in progress
            outputs: list[RequestOutput] = []
            errors: list[tuple[str, BaseException]] = []
            num_adds = self._apply(commands, errors)
            if stopping:
                self._fail_all(EngineShutdown("the server is shutting down"), errors)
            elif self._engine.has_unfinished():
                outputs = self._step(errors)
            busy = self._engine.has_unfinished()
            load = self._measure(num_pending=0)
            with self._cond:
                self._pending_adds -= num_adds
                self._load = load
                self._busy = busy
                self._progress_at = time.monotonic()
            if outputs or errors:
                self._deliver(outputs, errors)
            if stopping:
                return

    def _step(self, errors: list[tuple[str, BaseException]]) -> list[RequestOutput]:
        try:
            outputs = self._engine.step()
        except StepError as err:  # the engine aborted the requests it blames; the rest go on
            logger.error("engine step failed for %d requests: %s", len(err.failures), err, exc_info=err)
            outputs = err.outputs
            for request_id, cause in err.failures.items():
                self._live.discard(request_id)
                errors.append(
                    (request_id, EngineError(f"engine step failed: {type(cause).__name__}: {cause}"))
                )
        except EngineDeadError:
            raise  # the thread dies: _die answers every client
        except Exception as err:  # nothing to blame it on: fail the requests in flight, keep serving
            logger.exception("engine step failed; aborting %d requests", len(self._live))
            self._fail_all(EngineError(f"engine step failed: {type(err).__name__}: {err}"), errors)
            return []
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        return outputs

    def _die(self, err: BaseException) -> None:
        """The thread is ending by surprise: refuse new work, fail what it held."""
        with self._cond:
            self._died = err
            leftover, self._inbox = self._inbox, []
        error = EngineUnavailable(f"the engine thread died: {type(err).__name__}: {err}")
        for cmd in leftover:
            if isinstance(cmd, _Call) and cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(error)
        self._live.clear()
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._fail_sinks, error)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _apply(self, commands: list[_Add | _Abort | _Call], errors: list[tuple[str, BaseException]]) -> int:
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
                self._num_failed += 1
                sink.put_nowait(err)

    def _fail_sinks(self, error: EngineError) -> None:
        for sink in self._sinks.values():
            self._num_failed += 1
            sink.put_nowait(error)
        self._sinks.clear()
        self._submitted.clear()


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
    # The prompt's log-probs (RequestOutput.prompt_logprobs) when the params
    # asked for them: complete on every update (the prompt is done by the first).
    prompt_logprobs: list[dict[int, float] | None] | None = None


def _join(prev: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Two consecutive stream deltas of one request as one."""
    by_index = {c.index: c for c in prev.outputs}
    for c in new.outputs:
        old = by_index.get(c.index)
        by_index[c.index] = c if old is None else dataclasses.replace(c, text=old.text + c.text)
    return dataclasses.replace(new, outputs=sorted(by_index.values(), key=lambda c: c.index))


async def _next_batch(
    sink: asyncio.Queue, deadline: float | None, timeout_s: float | None
) -> list[RequestOutput]:
    """Everything queued now, each request's deltas joined into one. A consumer
    that fell behind (slow client, busy event loop) then sends one event per
    request instead of one per engine step, and catches up."""
    if deadline is None:
        first = await sink.get()
    else:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            first = await asyncio.wait_for(sink.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            assert timeout_s is not None
            raise RequestTimeout(timeout_s) from None
    items = [first]
    while not sink.empty():
        items.append(sink.get_nowait())
    merged: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            raise item
        prev = merged.get(item.request_id)
        merged[item.request_id] = item if prev is None else _join(prev, item)
    return list(merged.values())


@dataclass
class Submission:
    """One HTTP request's engine requests (one per prompt), from `submit`.

    Each prompt is one engine request with the request's params as given: the
    engine prefills the prompt once, samples best_of sequences on shared blocks
    (sample i seeded seed + i when the request has a seed), and with best_of > n
    returns the n most likely, so a request gets the same choices here as from
    `LLM.generate`. Whoever holds a Submission calls `abort()` when done with
    it (idempotent): it stops whatever still runs and frees its blocks."""

    engine: AsyncEngine
    n: int
    sink: asyncio.Queue
    prompt_of: dict[str, int]  # engine request id -> prompt index
    remaining: set[str]
    deadline: float | None = None  # loop time
    timeout_s: float | None = None

    async def choices(self) -> AsyncGenerator[ChoiceUpdate, None]:
        """All n choices of every prompt, as they are produced. Raises
        EngineError (RequestTimeout past the deadline) and aborts the rest."""
        try:
            while self.remaining:
                for item in await _next_batch(self.sink, self.deadline, self.timeout_s):
                    if item.finished:
                        self.remaining.discard(item.request_id)
                    prompt_index = self.prompt_of[item.request_id]
                    for out in item.outputs:
                        yield ChoiceUpdate(
                            prompt_index * self.n + out.index,
                            prompt_index,
                            out,
                            out.finished(),
                            item.prompt_logprobs,
                        )
        finally:
            self.abort()

    def abort(self) -> None:
        for request_id in self.remaining:
            self.engine.abort(request_id)
        self.remaining.clear()
