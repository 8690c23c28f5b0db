"""Prometheus metrics for one server, in its own CollectorRegistry (two apps in
one process, as in tests, never share or double-register metrics).

Engine state (running, waiting, KV usage, token counts...) is read at scrape
time from the engine thread's latest snapshot rather than copied into gauges
on every step; latencies are histograms observed when a request finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paged_attention.entrypoints.async_engine import EngineLoad
from paged_attention.outputs import RequestOutput

PREFIX = "paged_attention"

# Seconds. CPU decoding of a 135M model takes tens of ms per token, a long
# request tens of seconds: cover both ends.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector(Collector):
    def __init__(self, load: Callable[[], EngineLoad], model_name: str) -> None:
        self._load = load
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        mem = load.memory

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["model_name"])
            g.add_metric([self._model], float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model_name"])
            c.add_metric([self._model], float(value))
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", load.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", load.num_waiting)
        yield gauge("num_requests_swapped", "Requests swapped out to CPU.", mem.get("num_swapped", 0))
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", mem.get("kv_cache_usage", 0.0)
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache.",
            mem.get("prefix_cache_hit_rate", 0.0),
        )
        yield gauge("num_kv_blocks", "KV blocks in the pool.", mem.get("num_blocks", 0))
        # The host swap pool (0 without swapping). Touched blocks are the host
        # pages it has committed: what swapping costs in resident memory.
        yield gauge("num_host_kv_blocks", "Blocks in the host swap pool.", mem.get("num_host_blocks", 0))
        yield gauge(
            "num_host_kv_blocks_used",
            "Host swap pool blocks held by swapped sequences.",
            mem.get("num_host_used_blocks", 0),
        )
        yield gauge(
            "num_host_kv_blocks_touched",
            "Host swap pool blocks ever handed out (host pages committed).",
            mem.get("num_host_touched_blocks", 0),
        )
        yield counter(
            "num_preemptions", "Requests preempted to free KV blocks.", mem.get("num_preemptions", 0)
        )
        yield counter("prompt_tokens", "Prompt tokens computed (prefill).", load.num_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", load.num_generation_tokens)
        yield counter("num_aborted_requests", "Requests aborted (client gone).", load.num_aborted)
        yield counter(
            "num_failed_requests", "Requests failed by an engine fault or shutdown.", load.num_failed
        )


class ServerMetrics:
    def __init__(self, load: Callable[[], EngineLoad], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(load, model_name))
        self._model = model_name
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the server accepting a request to its first generated token.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            ["model_name"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From the server accepting a request to its last token.",
            ["model_name"],
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            f"{PREFIX}_request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "Requests refused before queueing (queue full, shutting down), by reason.",
            ["model_name", "reason"],
            registry=self.registry,
        )

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(self._model, reason).inc()

    def observe_finished(self, out: RequestOutput, submitted_at: float) -> None:
        """Record a finished engine request. Times are measured from
        `submitted_at` (perf_counter when the server queued it), so they include
        the wait in the engine's inbox, which the engine's own metrics miss."""
        metrics = out.metrics
        arrival = metrics.get("arrival_time")
        completion = out.outputs[0]
        self.finished.labels(self._model, completion.finish_reason or "unknown").inc()
        if arrival is None:
            return
        ttft = metrics.get("time_to_first_token")
        latency = metrics.get("latency")
        if ttft is not None:
            self.time_to_first_token.labels(self._model).observe(arrival + ttft - submitted_at)
        if latency is not None:
            self.e2e_latency.labels(self._model).observe(arrival + latency - submitted_at)
        num_tokens = len(completion.token_ids)
        if ttft is not None and latency is not None and num_tokens > 1:
            self.time_per_output_token.labels(self._model).observe((latency - ttft) / (num_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
