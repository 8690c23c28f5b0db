"""The HTTP side of `bench serve`: streams /v1/completions requests of token
ids to any OpenAI-compatible server and times every text chunk.

The request body is the same for every server: the prompt as a list of token
ids, `max_tokens` with `ignore_eos` (vLLM's extra, which llama-server also
reads) so each request makes exactly its tokens, greedy, and
`stream_options.include_usage` so the server reports the count. Nothing
server-specific is sent: our server rejects unknown fields.

Stream chunks differ between servers and `parse_sse_line` reads them all:
ours sends the usage in a chunk of its own with no choices; llama-server's
OpenAI endpoint puts it in the last chunk, beside `finish_reason`; its native
/completion endpoint streams `content` and `tokens_predicted`; chat
endpoints stream `choices[0].delta.content`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paged_attention.bench.serve_metrics import RequestResult, timed_result
from paged_attention.bench.workload import LoadRequest


# --------------------------------------------------------------------- SSE
@dataclass(frozen=True)
class StreamEvent:
    """What one `data:` line of a completion stream says."""

    text: str = ""
    completion_tokens: int | None = None  # the server's count, when this chunk carries it
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False  # the `[DONE]` sentinel


def parse_sse_line(line: str) -> StreamEvent | None:
    """One line of a server-sent event stream; None for lines that carry no
    data (blank separators, `:` comments, `event:`/`id:` fields)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return StreamEvent(done=True)
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"stream chunk is not a JSON object: {data[:200]}")
    if "error" in chunk:
        err = chunk["error"]
        return StreamEvent(error=str(err.get("message", err) if isinstance(err, dict) else err))
    tokens = _usage_tokens(chunk)
    choices = chunk.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = choice.get("text") if delta is None else delta.get("content")
        return StreamEvent(text or "", tokens, choice.get("finish_reason"))
    if "content" in chunk:  # llama-server's native /completion
        finish = chunk.get("stop_type") if chunk.get("stop") else None
        if chunk.get("stop") and tokens is None:
            tokens = chunk.get("tokens_predicted")
        return StreamEvent(chunk["content"] or "", tokens, finish)
    return StreamEvent(completion_tokens=tokens)


def _usage_tokens(chunk: dict[str, Any]) -> int | None:
    usage = chunk.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        return int(usage["completion_tokens"])
    return None


# ------------------------------------------------------------------ client
def request_body(model: str | None, req: LoadRequest, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }
    if model is not None:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send_one(
    client, model: str | None, req: LoadRequest, t0: float, headers: dict, stream: bool = True
) -> RequestResult:
    """One completion. Streaming: TTFT and ITL from the text chunks; not
    streaming, only the end-to-end latency."""
    body = request_body(model, req, stream)
    start = time.perf_counter()
    failed = RequestResult(ok=False, start=start - t0)
    try:
        if not stream:
            response = await client.post("/v1/completions", json=body, headers=headers)
            if response.status_code != 200:
                failed.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
                return _finish(failed, start)
            usage = response.json().get("usage") or {}
            result = timed_result(start, [], time.perf_counter(), usage.get("completion_tokens", 0), t0)
            return _check_length(result, req)
        chunk_times: list[float] = []
        tokens: int | None = None
        done = False
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                failed.error = f"HTTP {response.status_code}: {_error_message(text)}"
                return _finish(failed, start)
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                now = time.perf_counter()
                if event.error is not None:
                    failed.error = event.error
                    return _finish(failed, start)
                if event.done:
                    done = True
                    break
                if event.text:
                    chunk_times.append(now)
                if event.completion_tokens is not None:
                    tokens = event.completion_tokens
        end = time.perf_counter()
        if not done:
            failed.error = "stream ended without [DONE]"
            return _finish(failed, start)
        # Without a usage count, chunks are the best lower bound on tokens.
        result = timed_result(start, chunk_times, end, len(chunk_times) if tokens is None else tokens, t0)
        return _check_length(result, req)
    except Exception as err:  # count it, keep the run going
        failed.error = f"{type(err).__name__}: {err}"
        return _finish(failed, start)


def _finish(result: RequestResult, start: float) -> RequestResult:
    result.latency = time.perf_counter() - start
    return result


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _check_length(result: RequestResult, req: LoadRequest) -> RequestResult:
    if result.ok and result.output_tokens != req.max_tokens:
        result.ok = False
        result.error = f"got {result.output_tokens} tokens, asked for {req.max_tokens}"
    return result


async def run_load(
    url: str,
    model: str | None,
    workload: Sequence[LoadRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 600.0,
    stream: bool = True,
    transport=None,
) -> tuple[list[RequestResult], float]:
    """Send `workload` with exponential inter-arrival times (mean 1/rate; rate
    inf sends everything at once), never more than `max_concurrency` in flight
    (None: no cap). Returns per-request results and the seconds from the first
    send to the last answer. `transport`: an httpx transport (tests pass an
    in-process ASGI app)."""
    import httpx

    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {max_concurrency}")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connections = max_concurrency or len(workload) + 8
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, transport=transport) as client:

        async def limited(req: LoadRequest, t0: float) -> RequestResult:
            if limit is None:
                return await send_one(client, model, req, t0, headers, stream)
            async with limit:
                return await send_one(client, model, req, t0, headers, stream)

        t0 = time.perf_counter()
        tasks = []
        for i, req in enumerate(workload):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(limited(req, t0)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


@dataclass(frozen=True)
class ServedModel:
    name: str
    vocab_size: int | None  # llama-server says (`meta.n_vocab`); ours does not


def served_model(url: str, api_key: str | None = None) -> ServedModel:
    """The first model /v1/models lists."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as err:
        raise ValueError(f"cannot reach a server at {url}: {err}") from None
    if response.status_code != 200:
        raise ValueError(f"{url}/v1/models answered {response.status_code}: {response.text[:200]}")
    card = response.json()["data"][0]
    vocab = (card.get("meta") or {}).get("n_vocab")
    return ServedModel(card["id"], int(vocab) if vocab else None)
