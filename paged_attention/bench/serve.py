"""Load generator for the OpenAI-compatible server: clients arrive as a Poisson
process at a given rate and stream completions over real HTTP, so time to
first token (TTFT) is what a client sees.

    paged-attention bench serve --url http://127.0.0.1:8000 --request-rate 2,4,8
    paged-attention bench serve --model paged_attention/assets/stories260K --request-rate 4 --baseline

Without --url it starts `paged-attention serve` for --model (and the engine
options) as a subprocess on a free port, and stops it afterwards. --baseline
then also runs the same workload through LLM.generate in this process (after
the server has stopped, so they never share the CPU) to show the HTTP
overhead. Writes results/serve[_TAG].json and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# Words for synthetic prompts: common in TinyStories, so every tokenizer has them.
WORDS = (
    "the a little girl boy dog cat tree park ball sun happy sad big small red blue went saw "
    "played said mom dad friend house garden bird fish toy car day night water flower"
).split()


@dataclass(frozen=True)
class LoadRequest:
    prompt: str
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    start: float  # seconds since the run began
    latency: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_workload(
    num_requests: int, input_words: tuple[int, int], output_len: tuple[int, int], seed: int = 0
) -> list[LoadRequest]:
    """Distinct prompts (each starts with its own number) of random words."""
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    rng = random.Random(seed)
    return [
        LoadRequest(
            f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*input_words))),
            rng.randint(*output_len),
        )
        for i in range(num_requests)
    ]


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


def summarize(results: list[RequestResult], elapsed: float, request_rate: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "request_rate": request_rate,
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "e2e_s": percentiles([r.latency for r in ok]),
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


# ------------------------------------------------------------------ client
async def send_one(
    client, model: str, req: LoadRequest, t0: float, headers: dict, stream: bool = True
) -> RequestResult:
    """One completion. Streaming: TTFT is the first chunk that carries text;
    not streaming, there is no TTFT, only end-to-end latency."""
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - t0)
    try:
        if not stream:
            response = await client.post("/v1/completions", json=body, headers=headers)
            payload = response.json()
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {payload.get('error', {}).get('message')}"
            else:
                result.ok = True
                result.output_tokens = payload["usage"]["completion_tokens"]
            result.latency = time.perf_counter() - start
            return _check_length(result, req)
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text[:200]
                result.error = f"HTTP {response.status_code}: {message}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "stream error")
                    break
                if result.ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    result.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as err:  # count it, keep the run going
        result.error = f"{type(err).__name__}: {err}"
    result.latency = time.perf_counter() - start
    return _check_length(result, req)


def _check_length(result: RequestResult, req: LoadRequest) -> RequestResult:
    if result.ok and result.output_tokens != req.max_tokens:
        result.ok = False
        result.error = f"got {result.output_tokens} tokens, asked for {req.max_tokens}"
    return result


async def run_load(
    url: str,
    model: str,
    workload: list[LoadRequest],
    request_rate: float,
    max_concurrency: int | None = None,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 600.0,
    stream: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send `workload` with exponential inter-arrival times (mean 1/rate; rate
    inf sends everything at once). Returns per-request results and the
    seconds from the first send to the last answer."""
    import httpx

    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(
        max_connections=max_concurrency or len(workload) + 8,
        max_keepalive_connections=max_concurrency or len(workload) + 8,
    )

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

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


def served_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as err:
        raise ValueError(f"cannot reach a server at {url}: {err}") from None
    if response.status_code != 200:
        raise ValueError(f"{url}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


# ------------------------------------------------------------------ server
_LISTENING = re.compile(r"at (http://\S+?)/v1")


@contextmanager
def server_process(serve_args: list[str], startup_timeout: float = 600.0) -> Iterator[str]:
    """Run `python -m paged_attention.entrypoints.server ARGS --port 0` and yield
    its base URL; always stopped (SIGINT, then kill) on exit."""
    cmd = [sys.executable, "-m", "paged_attention.entrypoints.server", *serve_args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:  # keep reading so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if not found.is_set() and (m := _LISTENING.search(line)):
                url.append(m.group(1))
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        found.wait(startup_timeout)
        if not url:
            raise RuntimeError("server did not start:\n" + "\n".join(lines[-20:]))
        print("\n".join(lines), flush=True)
        yield url[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)


def _serve_args(args) -> list[str]:
    """This command's engine options as `serve` options (every engine flag, so
    new engine options pass through)."""
    from paged_attention.entrypoints.engine_args import engine_argv

    out = engine_argv(args)
    if args.api_key:
        out += ["--api-key", args.api_key]
    return out


# ---------------------------------------------------------------- baseline
def offline_baseline(args, workload: list[LoadRequest]) -> dict:
    """The same requests through LLM.generate, all at once, in this process."""
    from paged_attention.engine.llm import LLM
    from paged_attention.entrypoints.engine_args import engine_kwargs
    from paged_attention.sampling_params import SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    llm.generate("Hello", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in workload]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in workload], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(workload) / elapsed,
    }


# -------------------------------------------------------------------- plot
def plot(runs: list[dict], slo: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["request_rate"])
    finite = [r["request_rate"] if math.isfinite(r["request_rate"]) else None for r in runs]
    top = max([x for x in finite if x is not None], default=1.0)
    xs = [x if x is not None else top * 2 for x in finite]  # "inf" drawn to the right
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
        ax1.plot(xs, [r["ttft_s"][q] or float("nan") for r in runs], style, label=f"TTFT {q}")
    ax1.axhline(slo, color="grey", linestyle=":", label=f"{slo:g} s")
    ax1.set_xlabel("request rate (req/s)")
    ax1.set_ylabel("time to first token (s)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(xs, [r["output_tokens_per_s"] for r in runs], "o-", label="output tokens/s")
    ax2.set_xlabel("request rate (req/s)")
    ax2.set_ylabel("output tokens/s")
    ax3 = ax2.twinx()
    ax3.plot(
        xs,
        [(r["tpot_s"]["p50"] or float("nan")) * 1000 for r in runs],
        "s--",
        color="C1",
        label="TPOT p50 (ms)",
    )
    ax3.set_ylabel("TPOT p50 (ms)")
    ax2.legend(loc="upper left")
    ax3.legend(loc="lower right")
    for ax in (ax1, ax2):
        if any(x is None for x in finite):
            ax.set_xticks(xs, [f"{x:g}" if x is not None else "inf" for x in finite])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------- main
def _parse_range(text: str, name: str) -> tuple[int, int]:
    parts = [int(p) for p in text.split(",")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
    if len(parts) > 2 or not 1 <= lo <= hi:
        raise ValueError(f"--{name} must be N or LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",")]
    bad = [r for r in rates if not r > 0]
    if bad:
        raise ValueError(f"--request-rate values must be > 0 (or inf), got {bad[0]}")
    return rates


def _json_safe(value):
    """Non-finite floats (request rate inf) as strings: JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def main(args) -> dict:
    rates = _parse_rates(args.request_rate)
    workload = make_workload(
        args.num_requests,
        _parse_range(args.input_words, "input-words"),
        _parse_range(args.output_len, "output-len"),
        args.workload_seed,
    )
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    runs: list[dict] = []

    def run_all(url: str) -> None:
        model = args.served_model_name or served_model(url, args.api_key)
        # Warm-up outside the measurement: first-call costs in the server.
        asyncio.run(run_load(url, model, workload[:2], math.inf, api_key=args.api_key))
        for rate in rates:
            results, elapsed = asyncio.run(
                run_load(
                    url,
                    model,
                    workload,
                    rate,
                    args.max_concurrency,
                    args.workload_seed,
                    args.api_key,
                    args.timeout,
                    not args.no_stream,
                )
            )
            summary = summarize(results, elapsed, rate)
            summary["requests"] = [asdict(r) for r in results] if args.save_requests else None
            runs.append(summary)
            print(
                f"rate {rate:>6g} req/s: {summary['completed']}/{summary['num_requests']} ok, "
                f"{summary['output_tokens_per_s']:8.1f} tok/s, {summary['requests_per_s']:6.2f} req/s | "
                f"TTFT p50/p90/p99 {_fmt(summary['ttft_s']['p50'])}/{_fmt(summary['ttft_s']['p90'])}/"
                f"{_fmt(summary['ttft_s']['p99'])} s | TPOT p50/p99 {_fmt(summary['tpot_s']['p50'], 1000, 1)}/"
                f"{_fmt(summary['tpot_s']['p99'], 1000, 1)} ms | errors {summary['errors']}",
                flush=True,
            )
            for message, count in summary["error_messages"].items():
                print(f"    {count} x {message}", flush=True)

    if args.url:
        run_all(args.url.rstrip("/"))
    else:
        with server_process(_serve_args(args)) as url:
            run_all(url)
    best = highest_rate_within_slo(runs, args.ttft_slo)
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"},
        "workload": {"num_requests": len(workload), "output_tokens": sum(r.max_tokens for r in workload)},
        "runs": runs,
        "ttft_slo_s": args.ttft_slo,
        "max_rate_within_slo": None if best is None else best["request_rate"],
        "throughput_at_max_rate": None if best is None else best["output_tokens_per_s"],
    }
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
        burst = next((r for r in runs if not math.isfinite(r["request_rate"])), None)
        if burst is not None:
            results["http_overhead"] = burst["elapsed_s"] / base["elapsed_s"] - 1
        print(
            f"LLM.generate, same workload at once: {base['output_tokens_per_s']:.1f} tok/s in "
            f"{base['elapsed_s']:.2f} s"
            + (
                f"; HTTP at rate inf took {100 * results['http_overhead']:+.1f}%"
                if "http_overhead" in results
                else " (add 'inf' to --request-rate to compare)"
            )
        )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serve_{args.tag}" if args.tag else "serve"
    from paged_attention.bench.monitor import describe, environment

    results.setdefault("environment", environment())
    print(describe(results["environment"]))
    (out_dir / f"{stem}.json").write_text(
        json.dumps(_json_safe(results), indent=2, default=str, allow_nan=False)
    )
    plot(runs, args.ttft_slo, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    return results


def add_parser(sub) -> None:
    from paged_attention.entrypoints.engine_args import add_engine_args

    p = sub.add_parser(
        "serve",
        help="load-test the HTTP server (Poisson arrivals, streaming)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        default=None,
        help="a running server, e.g. http://127.0.0.1:8000 (default: start one for --model)",
    )
    p.add_argument("--served-model-name", default=None, help="model name to send (default: ask /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key for the server")
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate (default 100)")
    p.add_argument("--request-rate", default="4", help="req/s, comma list for a sweep; inf = all at once")
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)"
    )
    p.add_argument("--input-words", default="8,48", help="prompt length in words, LO,HI (default 8,48)")
    p.add_argument("--output-len", default="16,128", help="tokens to generate, LO,HI (default 16,128)")
    p.add_argument("--workload-seed", type=int, default=0, help="prompts, lengths and arrival times")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="p99 TTFT target in s (default 1)")
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="non-streaming requests (no TTFT; isolates the cost of streaming)",
    )
    p.add_argument("--baseline", action="store_true", help="also run LLM.generate on the same workload")
    p.add_argument("--save-requests", action="store_true", help="keep per-request timings in the JSON")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--output-dir", default="results")
    add_engine_args(p)
    p.set_defaults(func=main)
