"""What `bench serve` reports, computed from each request's timestamps, in
`vllm bench serve`'s definitions:

- TTFT: from sending the request to the first streamed chunk that carries text;
- ITL: the gaps between consecutive text chunks (one value per gap, pooled
  over all requests; a chunk may carry more than one token when a server holds
  back bytes of an incomplete character, so tokens/chunk is reported too);
- TPOT: per request, (end-to-end latency - TTFT) / (output tokens - 1);
- output tokens/s and requests/s over the whole run (first send to last answer).

Percentiles interpolate linearly (numpy's default), so they are exact
functions of the samples and the tests check them by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool
    start: float  # seconds since the run began
    latency: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # one gap per text chunk after the first
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def chunks(self) -> int:
        """Text chunks received."""
        return 0 if self.ttft is None else len(self.itl) + 1


def timed_result(
    start: float, chunk_times: Sequence[float], end: float, output_tokens: int, run_start: float = 0.0
) -> RequestResult:
    """A successful request from its clock readings: sent at `start`, text
    chunks received at `chunk_times`, stream closed at `end`."""
    ttft = chunk_times[0] - start if chunk_times else None
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return RequestResult(True, start - run_start, end - start, ttft, output_tokens, itl)


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    """Linear-interpolated percentiles (numpy's default), None when empty."""
    data = sorted(values)
    result: dict[str, float | None] = {}
    for q in qs:
        if not data:
            result[f"p{q}"] = None
            continue
        pos = (len(data) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        result[f"p{q}"] = data[lo] + (data[hi] - data[lo]) * (pos - lo)
    return result


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 (p50 is the median `vllm bench serve` prints)."""
    return {"mean": sum(values) / len(values) if values else None, **percentiles(values)}


def summarize(
    results: list[RequestResult], elapsed: float, request_rate: float, concurrency: int | None = None
) -> dict:
    """One run's figures; `concurrency` None means no cap on requests in flight."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "request_rate": request_rate,
        "concurrency": concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl]),
        "e2e_s": distribution([r.latency for r in ok]),
    }


def highest_rate_within_slo(runs: list[dict], slo: float) -> dict | None:
    """The run at the highest rate such that it and every lower rate met the
    p99 TTFT target without errors. Stopping at the first miss keeps one lucky
    run at a higher rate (a noisy machine) from overstating the capacity."""
    best = None
    for run in sorted(runs, key=lambda r: r["request_rate"]):
        p99 = run["ttft_s"]["p99"]
        if run["errors"] or p99 is None or p99 >= slo:
            break
        best = run
    return best
