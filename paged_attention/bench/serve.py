"""Load generator for OpenAI-compatible servers, reporting what `vllm bench
serve` reports: output tokens/s, requests/s, TTFT, TPOT and ITL (mean, median,
p90, p99), over a sweep of concurrency caps and/or Poisson request rates.

    paged-attention bench serve                                  # our server, concurrency 1,4,16,64,inf
    paged-attention bench serve --url http://127.0.0.1:8080      # any running server (llama-server, vLLM...)
    paged-attention bench serve --request-rate 2,4,8 --max-concurrency 16   # Poisson arrivals
    paged-attention bench serve --peer llama-server [--pin-core 1] # ours, then llama-server, same GGUF
    paged-attention bench serve --quick                          # stories260K, 8 requests, concurrency 1,4

Every request is the same for every server: a prompt of token ids (random
ids of the model's vocabulary, distinct per request, reproducible from
--workload-seed), max_tokens with ignore_eos, greedy, streamed. A run point is
a (request rate, concurrency) pair: --concurrency alone sends every request at
once with at most C in flight (closed loop); --request-rate alone spaces
arrivals as a Poisson process (capped by --max-concurrency); both give every
pair. Each point starts with two warm-up requests of other prompts.

Without --url it starts `paged-attention serve` for --model (and the engine
options) on a free port with --threads (OMP_NUM_THREADS) and stops it
afterwards, recording its resident memory idle, at peak and after each run.
--peer llama-server measures llama.cpp's server the same way, one server at a
time (bench/serve_peer.py). --baseline also runs the workload through
LLM.generate in this process, after the server stopped, to show the HTTP
overhead. Writes results/serve[_TAG].json and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from paged_attention.bench.serve_client import run_load, served_model
from paged_attention.bench.serve_metrics import highest_rate_within_slo, percentiles, summarize
from paged_attention.bench.serve_process import Placement, RssSampler, ServerProcess
from paged_attention.bench.workload import LoadRequest, make_workload

__all__ = [
    "LoadPoint",
    "LoadRequest",
    "highest_rate_within_slo",
    "make_workload",
    "measure_point",
    "percentiles",
    "summarize",
]

DEFAULT_CONCURRENCY = "1,4,16,64,inf"
QUICK = {"num_requests": 8, "concurrency": "1,4", "input_len": "4,16", "output_len": "4,16"}
FULL = {
    "num_requests": 100,
    "concurrency": DEFAULT_CONCURRENCY,
    "input_len": "32,256",
    "output_len": "16,128",
}


@dataclass(frozen=True)
class LoadPoint:
    """One run: arrivals at `request_rate` (inf: all at once), at most
    `concurrency` requests in flight (None: no cap)."""

    request_rate: float
    concurrency: int | None

    def label(self) -> str:
        conc = "inf" if self.concurrency is None else str(self.concurrency)
        return f"conc {conc:>4} rate {self.request_rate:>5g}"


# ------------------------------------------------------------------ parsing
def parse_range(text: str, name: str) -> tuple[int, int]:
    parts = [int(p) for p in text.split(",")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
    if len(parts) > 2 or not 1 <= lo <= hi:
        raise ValueError(f"--{name} must be N or LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",")]
    bad = [r for r in rates if not r > 0]
    if bad:
        raise ValueError(f"--request-rate values must be > 0 (or inf), got {bad[0]}")
    return rates


def parse_concurrency(text: str) -> list[int | None]:
    """ "1,4,inf" -> [1, 4, None] (None: no cap)."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in {"inf", "unbounded", "none"}:
            out.append(None)
            continue
        value = int(part)
        if value < 1:
            raise ValueError(f"--concurrency values must be >= 1 (or inf), got {value}")
        out.append(value)
    return out


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    """The sweep: every (rate, concurrency) pair. Only --request-rate given: those
    rates under --max-concurrency; otherwise the concurrency list (default
    1,4,16,64,inf) at rate inf."""
    rates = parse_rates(args.request_rate) if args.request_rate else [math.inf]
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.concurrency:
        caps = parse_concurrency(args.concurrency)
    elif args.request_rate:
        caps = [args.max_concurrency]
    else:
        caps = parse_concurrency((QUICK if args.quick else FULL)["concurrency"])
    return [LoadPoint(rate, cap) for rate in rates for cap in caps]


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the sizes left unset from --quick's or the full defaults."""
    sizes = QUICK if args.quick else FULL
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    if args.quick and args.model is None and not args.url and not args.peer:
        from paged_attention.engine.builder import STORIES260K

        args.model = str(STORIES260K)


def placement(args: argparse.Namespace) -> Placement:
    """--threads (default: the cores this process may use), or one thread on --pin-core."""
    if args.pin_core is not None:
        if args.threads not in (None, 1):
            raise ValueError(f"--pin-core runs one thread on one core; drop --threads {args.threads}")
        return Placement(1, args.pin_core)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cores
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    return Placement(threads)


def workloads(
    args: argparse.Namespace, token_pool: Sequence[int]
) -> tuple[list[LoadRequest], list[LoadRequest]]:
    """(measured requests, two warm-up requests of other prompts)."""
    input_len = parse_range(args.input_len, "input-len")
    output_len = parse_range(args.output_len, "output-len")
    work = make_workload(args.num_requests, input_len, output_len, args.workload_seed, token_pool)
    warm = make_workload(2, input_len, (2, 4), args.workload_seed + 1, token_pool)
    return work, warm


def workload_record(workload: Sequence[LoadRequest], args: argparse.Namespace, pool_size: int) -> dict:
    return {
        "num_requests": len(workload),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.workload_seed,
        "token_pool_size": pool_size,
        "prompt_tokens": sum(len(r.prompt) for r in workload),
        "output_tokens": sum(r.max_tokens for r in workload),
        "max_prompt_tokens": max(len(r.prompt) for r in workload),
        "max_output_tokens": max(r.max_tokens for r in workload),
    }


# ------------------------------------------------------------------ running
def measure_point(
    url: str,
    model: str | None,
    workload: Sequence[LoadRequest],
    warmup: Sequence[LoadRequest],
    point: LoadPoint,
    args: argparse.Namespace,
    server: ServerProcess | None = None,
) -> dict:
    """Warm up, then run the workload at `point`; the summary, with the server's
    RSS before, at peak and after when `server` is ours to watch."""
    asyncio.run(run_load(url, model, warmup, api_key=args.api_key, timeout=args.timeout))
    before = server.rss_mib() if server else None
    sampler = RssSampler(server) if server else None

    def run() -> tuple[list, float]:
        return asyncio.run(
            run_load(
                url,
                model,
                workload,
                point.request_rate,
                point.concurrency,
                args.workload_seed,
                args.api_key,
                args.timeout,
                not args.no_stream,
            )
        )

    if sampler is not None:
        with sampler:
            results, elapsed = run()
    else:
        results, elapsed = run()
    summary = summarize(results, elapsed, point.request_rate, point.concurrency)
    if server is not None and sampler is not None:
        summary["server_rss_mib"] = {"before": before, "peak": sampler.peak_mib, "after": server.rss_mib()}
    summary["requests"] = [asdict(r) for r in results] if args.save_requests else None
    return summary


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def run_line(label: str, s: dict) -> str:
    line = (
        f"{label}: {s['completed']}/{s['num_requests']} ok, {s['output_tokens_per_s']:8.1f} tok/s, "
        f"{s['requests_per_s']:6.2f} req/s | TTFT p50/p99 {ms(s['ttft_s']['p50'])}/{ms(s['ttft_s']['p99'])} ms"
        f" | TPOT p50/p99 {ms(s['tpot_s']['p50'])}/{ms(s['tpot_s']['p99'])} ms"
        f" | ITL p50/p99 {ms(s['itl_s']['p50'])}/{ms(s['itl_s']['p99'])} ms | errors {s['errors']}"
    )
    rss = s.get("server_rss_mib")
    if rss:
        line += (
            f" | server RSS {mib(rss['before'])}/{mib(rss['peak'])}/{mib(rss['after'])} MiB before/peak/after"
        )
    return line


def print_run(label: str, summary: dict) -> None:
    print(run_line(label, summary), flush=True)
    for message, count in summary["error_messages"].items():
        print(f"    {count} x {message}", flush=True)


TABLE_HEADERS = [
    "system",
    "conc",
    "rate",
    "ok",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "tok/chunk",
    "RSS idle MiB",
    "RSS after MiB",
]


def table_row(system: str, s: dict) -> list[str]:
    """One run as a row under TABLE_HEADERS."""
    rss = s.get("server_rss_mib") or {}
    rate = s["request_rate"]
    return [
        system,
        "inf" if s["concurrency"] is None else str(s["concurrency"]),
        f"{rate:g}" if isinstance(rate, float) else str(rate),
        f"{s['completed']}/{s['num_requests']}",
        f"{s['requests_per_s']:.2f}",
        f"{s['output_tokens_per_s']:.1f}",
        ms(s["ttft_s"]["p50"]),
        ms(s["ttft_s"]["p99"]),
        ms(s["tpot_s"]["p50"]),
        ms(s["tpot_s"]["p99"]),
        ms(s["itl_s"]["p50"]),
        ms(s["itl_s"]["p99"]),
        "-" if s.get("tokens_per_chunk") is None else f"{s['tokens_per_chunk']:.2f}",
        mib(rss.get("idle", rss.get("before"))),
        mib(rss.get("after")),
    ]


def token_pool_for(args: argparse.Namespace, url: str | None, vocab_size: int | None) -> list[int]:
    """Ids for the prompts: the model's own when known (--model, or the server's
    vocabulary size), else 3..255, which every real vocabulary has."""
    from paged_attention.bench.workload import model_token_pool

    if args.model is not None or url is None:
        return model_token_pool(args.model)
    if vocab_size:
        return list(range(3, vocab_size))
    print("vocabulary unknown (give --model or --vocab-size): prompts use token ids 3..255", flush=True)
    return list(range(3, 256))


# -------------------------------------------------------------------- plot
def plot(runs: list[dict], slo: float, path: Path, series: str = "system") -> None:
    """TTFT and output tokens/s against concurrency (or rate, for a rate sweep),
    one line per `series` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_conc = len({r["concurrency"] for r in runs}) > 1
    key = "concurrency" if by_conc else "request_rate"

    def x_of(r: dict) -> float:
        value = r[key]
        return math.inf if value is None else float(value)

    finite = sorted({x for r in runs if math.isfinite(x := x_of(r))})
    top = max(finite, default=1.0)
    xs_of = {x: x for x in finite} | {math.inf: top * 2 if finite else 1.0}  # "inf" drawn to the right
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(str(r.get(series, "")), []).append(r)
    for name, group in groups.items():
        group = sorted(group, key=x_of)
        xs = [xs_of[x_of(r)] for r in group]
        prefix = f"{name} " if name else ""
        for q, style in (("p50", "o-"), ("p99", "^--")):
            ax1.plot(xs, [r["ttft_s"][q] or float("nan") for r in group], style, label=f"{prefix}TTFT {q}")
        ax2.plot(xs, [r["output_tokens_per_s"] for r in group], "o-", label=f"{prefix}output tok/s")
    if not by_conc:
        ax1.axhline(slo, color="grey", linestyle=":", label=f"{slo:g} s")
    ax1.set_ylabel("time to first token (s)")
    ax1.set_yscale("log")
    ax2.set_ylabel("output tokens/s")
    ticks = sorted(xs_of.values()) if any(not math.isfinite(x_of(r)) for r in runs) else finite
    for ax in (ax1, ax2):
        ax.set_xlabel("concurrency" if by_conc else "request rate (req/s)")
        if by_conc:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{x:g}" if x in finite else "inf" for x in ticks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- baseline
def offline_baseline(args: argparse.Namespace, workload: list[LoadRequest]) -> dict:
    """The same requests through LLM.generate, all at once, in this process."""
    from paged_attention.engine.llm import LLM
    from paged_attention.entrypoints.engine_args import engine_kwargs
    from paged_attention.sampling_params import SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    llm.generate("Hello", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in workload]
    prompts = [{"prompt_token_ids": list(r.prompt)} for r in workload]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(workload) / elapsed,
    }


# -------------------------------------------------------------------- main
def json_safe(value):
    """Non-finite floats (request rate inf) as strings: JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(out_dir: str | Path, stem: str, results: dict) -> Path:
    from paged_attention.bench.monitor import describe, environment

    results.setdefault("environment", environment())
    print(describe(results["environment"]), flush=True)
    path = Path(out_dir) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(results), indent=2, default=str, allow_nan=False))
    return path


def config_record(args: argparse.Namespace) -> dict:
    hidden = {"func", "api_key", "bench_subparsers"}
    return {k: v for k, v in vars(args).items() if k not in hidden}


def main(args: argparse.Namespace) -> dict:
    resolve_defaults(args)
    if args.peer:
        from paged_attention.bench import serve_peer

        return serve_peer.main(args)
    from paged_attention.bench.serve_process import (
        client_off_core,
        free_port,
        our_server_command,
        server_process,
    )

    points = load_points(args)
    runs: list[dict] = []
    server_record: dict | None = None
    results: dict = {"benchmark": "serve", "config": config_record(args)}

    # One workload for every point, made at the first.
    made: dict = {}

    def run_point(url: str, server: ServerProcess | None, point: LoadPoint) -> None:
        served = served_model(url, args.api_key)
        model = args.served_model_name or served.name
        if not made:
            pool = token_pool_for(args, None if server else url, args.vocab_size or served.vocab_size)
            made["workload"], made["warmup"] = workloads(args, pool)
            results["workload"] = workload_record(made["workload"], args, len(pool))
        idle = server.rss_mib() if server else None  # started, no request yet
        summary = measure_point(url, model, made["workload"], made["warmup"], point, args, server)
        if server is not None:
            summary["server_rss_mib"]["idle"] = idle
            summary["server_pid"] = server.pid
        runs.append(summary)
        print_run(point.label(), summary)

    if args.url:
        for point in points:
            run_point(args.url.rstrip("/"), None, point)
    else:
        # A fresh server per point: one kept across points would serve the later
        # points' prompts (the same workload) from its prefix cache.
        where = placement(args)
        command: list[str] = []
        with client_off_core(where.core):
            for i, point in enumerate(points):
                port = free_port()
                command = where.prefix() + our_server_command(_serve_args(args), port)
                with server_process(command, port, where.thread_env()) as server:
                    if i == 0:
                        print("\n".join(server.log), flush=True)
                    run_point(server.url, server, point)
        server_record = {"command": command, "threads": where.threads, "pin_core": where.core}
    workload = made["workload"]
    results["server"] = server_record
    results["runs"] = runs
    # The SLO search walks up the rates at one concurrency cap.
    rate_sweep = len({p.request_rate for p in points}) > 1 and len({p.concurrency for p in points}) == 1
    best = highest_rate_within_slo(runs, args.ttft_slo) if rate_sweep else None
    results["ttft_slo_s"] = args.ttft_slo
    results["max_rate_within_slo"] = None if best is None else best["request_rate"]
    results["throughput_at_max_rate"] = None if best is None else best["output_tokens_per_s"]
    if best is not None:
        print(
            f"highest rate with p99 TTFT < {args.ttft_slo:g} s: {best['request_rate']:g} req/s "
            f"({best['output_tokens_per_s']:.1f} output tok/s)"
        )
    if args.baseline:
        if args.url:
            raise ValueError("--baseline needs --model (it loads the model here), not --url")
        base = offline_baseline(args, workload)
        results["offline_baseline"] = base
        burst = next(
            (r for r in runs if not math.isfinite(r["request_rate"]) and r["concurrency"] is None), None
        )
        if burst is not None:
            results["http_overhead"] = burst["elapsed_s"] / base["elapsed_s"] - 1
        print(
            f"LLM.generate, same workload at once: {base['output_tokens_per_s']:.1f} tok/s in "
            f"{base['elapsed_s']:.2f} s"
            + (
                f"; HTTP with no cap at rate inf took {100 * results['http_overhead']:+.1f}%"
                if "http_overhead" in results
                else " (add concurrency inf to compare)"
            )
        )
    from paged_attention.bench.report import format_table

    print(format_table(TABLE_HEADERS, [table_row("paged-attention", r) for r in runs]))
    stem = f"serve_{args.tag}" if args.tag else "serve"
    path = write_results(args.output_dir, stem, results)
    plot(runs, args.ttft_slo, Path(args.output_dir) / f"{stem}.png")
    print(f"wrote {path} and {stem}.png")
    return results


def _serve_args(args: argparse.Namespace) -> list[str]:
    """This command's engine options as `serve` options (every engine flag, so
    new engine options pass through)."""
    from paged_attention.entrypoints.engine_args import engine_argv

    out = engine_argv(args)
    if args.api_key:
        out += ["--api-key", args.api_key]
    return out


REPORT_TITLE = "Serving over HTTP"


def report_section(data: dict) -> str:
    """results/serve.json for REPORT.md."""
    from paged_attention.bench.report import markdown_table

    return markdown_table(TABLE_HEADERS, [table_row("paged-attention", r) for r in data.get("runs", [])])


def add_parser(sub) -> None:
    from paged_attention.entrypoints.engine_args import add_engine_args

    p = sub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (ours, or llama-server as a peer)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        default=None,
        help="a running server, e.g. http://127.0.0.1:8000 (default: start ours for --model)",
    )
    p.add_argument("--served-model-name", default=None, help="model name to send (default: ask /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key for the server")
    p.add_argument("--vocab-size", type=int, default=None, help="with --url: draw prompt ids below this")
    load = p.add_argument_group("load")
    load.add_argument("--num-requests", type=int, default=None, help="requests per run point (default 100)")
    load.add_argument(
        "--concurrency",
        default=None,
        help=f"most requests in flight, comma list, inf = no cap (default {DEFAULT_CONCURRENCY}, "
        "or --max-concurrency when --request-rate is given)",
    )
    load.add_argument(
        "--request-rate", default=None, help="Poisson arrivals in req/s, comma list; inf = all at once"
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="cap in flight for a --request-rate sweep"
    )
    load.add_argument(
        "--input-len",
        "--input-words",
        dest="input_len",
        default=None,
        help="prompt tokens, LO,HI (default 32,256)",
    )
    load.add_argument("--output-len", default=None, help="tokens to generate, LO,HI (default 16,128)")
    load.add_argument("--workload-seed", type=int, default=0, help="prompts, lengths and arrival times")
    load.add_argument("--quick", action="store_true", help="stories260K, 8 short requests, concurrency 1,4")
    load.add_argument("--ttft-slo", type=float, default=1.0, help="p99 TTFT target in s for a rate sweep")
    load.add_argument(
        "--no-stream",
        action="store_true",
        help="non-streaming requests (no TTFT; isolates the cost of streaming)",
    )
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s")
    where = p.add_argument_group("placement (started servers)")
    where.add_argument(
        "--threads", type=int, default=None, help="compute threads per server (default: all cores)"
    )
    where.add_argument(
        "--pin-core",
        type=int,
        default=None,
        metavar="CORE",
        help="run each server on this core alone, one thread",
    )
    peer = p.add_argument_group("peer")
    peer.add_argument(
        "--peer",
        choices=["llama-server"],
        default=None,
        help="also measure llama.cpp's server on the same GGUF (writes serve_peer.json)",
    )
    peer.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="default: $LLAMA_SERVER, ./llama.cpp-peer/bin, PATH",
    )
    peer.add_argument(
        "--llama-bench", default=None, metavar="PATH", help="default: $LLAMA_BENCH, beside llama-server, PATH"
    )
    peer.add_argument("--no-llama-bench", action="store_true", help="skip llama-bench's one-user figures")
    peer.add_argument("--llama-server-args", default="", help="extra llama-server flags, one string")
    out = p.add_argument_group("output")
    out.add_argument("--baseline", action="store_true", help="also run LLM.generate on the same workload")
    out.add_argument("--save-requests", action="store_true", help="keep per-request timings in the JSON")
    out.add_argument("--tag", default="", help="suffix for the output file names")
    out.add_argument("--output-dir", default="results")
    add_engine_args(p)
    p.set_defaults(func=main)
