"""Throughput and latency against the number of concurrent requests.

For each concurrency c, c requests (random prompts of `prompt_len` tokens,
`output_len` greedy tokens each, ignore_eos) are queued together on one engine
and stepped to the end. Per request: time to first token (queueing to the step
that sampled its first token), end-to-end latency (to its last token) and time
per output token after the first. Throughput counts output tokens over the
wall time of the whole batch. The KV pool holds every request of the largest
c at once, so nothing is preempted.

    paged-attention bench scaling [--quick] [--concurrency 1,2,4,...,256] [--model smollm2]
"""

from __future__ import annotations

import random
import statistics
import time

from paged_attention.bench.memory import model_vocab_size, resolve_bench_model
from paged_attention.bench.monitor import (
    MemoryMonitor,
    environment,
    format_monitor,
    torch_threads,
)
from paged_attention.bench.report import format_table, publish
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.sampling_params import SamplingParams

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_concurrency(
    llm, c: int, prompt_len: int, output_len: int, vocab: int, seed: int, progress: bool
) -> dict:
    from tqdm.auto import tqdm

    engine = llm.engine
    rng = random.Random(seed + c)
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(prompt_len)]} for _ in range(c)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    bar = tqdm(
        total=c * output_len,
        desc=f"scaling c={c}",
        unit="tok",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    start = time.perf_counter()
    ids = llm.add_requests(prompts, params)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    steps = 0
    try:
        while engine.has_unfinished():
            before = engine.stats.num_generated_tokens
            outputs = engine.step()
            now = time.perf_counter()
            steps += 1
            bar.update(engine.stats.num_generated_tokens - before)
            for req in engine.scheduler.running:
                if req.output_token_ids and req.request_id not in first:
                    first[req.request_id] = now
            for out in outputs:
                if out.finished:
                    done[out.request_id] = now
                    first.setdefault(out.request_id, now)  # finished in the step of its first token
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    assert set(done) == set(ids), "some requests did not finish"
    latency = [done[i] - start for i in ids]
    ttft = [first[i] - start for i in ids]
    tpot = [(done[i] - first[i]) / (output_len - 1) for i in ids] if output_len > 1 else [0.0]
    return {
        "concurrency": c,
        "elapsed_s": elapsed,
        "num_steps": steps,
        "output_tokens": c * output_len,
        "tokens_per_s": c * output_len / elapsed,
        "requests_per_s": c / elapsed,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p90_s": _quantile(ttft, 0.9),
        "tpot_mean_ms": 1000 * statistics.fmean(tpot),
        "latency_mean_s": statistics.fmean(latency),
        "latency_p50_s": _quantile(latency, 0.5),
        "latency_p90_s": _quantile(latency, 0.9),
        "latency_max_s": max(latency),
    }


def run_scaling(
    model: str = "smollm2",
    concurrency: tuple[int, ...] = CONCURRENCY,
    prompt_len: int = 32,
    output_len: int = 32,
    dtype: str = "auto",
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
) -> dict:
    from paged_attention.engine.llm import LLM

    model_path = resolve_bench_model(model)
    vocab = model_vocab_size(model_path)
    max_model_len = prompt_len + output_len
    largest = max(concurrency)
    block_size = 16
    num_blocks = largest * -(-max_model_len // block_size)
    rows = []
    with torch_threads(threads), MemoryMonitor() as monitor:
        llm = LLM(
            model_path,
            block_size=block_size,
            num_kv_blocks=num_blocks,
            max_model_len=max_model_len,
            max_num_seqs=largest,
            dtype=dtype,
            seed=seed,
        )
        measure_concurrency(llm, 2, prompt_len, min(output_len, 4), vocab, seed, False)  # warm-up
        for c in concurrency:
            rows.append(measure_concurrency(llm, c, prompt_len, output_len, vocab, seed, progress))
        env = environment()
        resolved_dtype = str(llm.engine.kv_cache.dtype).removeprefix("torch.")
    return {
        "benchmark": "scaling",
        "config": {
            "model": model,
            "prompt_len": prompt_len,
            "output_len": output_len,
            "dtype": resolved_dtype,
            "block_size": block_size,
            "num_kv_blocks": num_blocks,
            "max_num_seqs": largest,
            "seed": seed,
            "torch_threads": threads,
        },
        "rows": rows,
        "monitor": monitor.summary(),
        "environment": env,
    }


def print_scaling(result: dict) -> None:
    c = result["config"]
    print(
        f"model {c['model']} ({c['dtype']}), prompt {c['prompt_len']} tokens, output {c['output_len']} tokens"
    )
    print(
        format_table(
            [
                "concurrent",
                "tokens/s",
                "requests/s",
                "TTFT mean (s)",
                "TPOT mean (ms)",
                "latency p50 (s)",
                "p90 (s)",
            ],
            [
                [
                    r["concurrency"],
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['requests_per_s']:.2f}",
                    f"{r['ttft_mean_s']:.3f}",
                    f"{r['tpot_mean_ms']:.1f}",
                    f"{r['latency_p50_s']:.2f}",
                    f"{r['latency_p90_s']:.2f}",
                ]
                for r in result["rows"]
            ],
        )
    )
    print(format_monitor(result["monitor"]))


def main(args) -> dict:
    quick = args.quick
    result = run_scaling(
        model="stories260k" if quick and args.model == "smollm2" else args.model,
        concurrency=(1, 4, 16) if quick else tuple(int(c) for c in args.concurrency.split(",")),
        prompt_len=16 if quick else args.prompt_len,
        output_len=8 if quick else args.output_len,
        dtype=args.dtype,
        seed=args.seed,
        threads=args.threads,
        progress=not quick,
    )
    from paged_attention.bench.plots import plot_scaling

    return publish(result, "scaling", args.output_dir, plot_scaling, print_scaling)


def add_parser(sub) -> None:
    p = sub.add_parser("scaling", help="throughput and latency against concurrent requests (1..256)")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), stories260k, tiny-2k, or a path")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma list")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="stories260k, concurrency 1, 4, 16, 16-token prompts, 8 tokens out (for tests)",
    )
    p.add_argument("--output-dir", default="results")
    add_engine_args(p, only=("dtype",), model=False)
    p.set_defaults(func=main)
