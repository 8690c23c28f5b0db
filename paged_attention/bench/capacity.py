"""Capacity: how many requests run at once in a fixed KV budget.

Paged (measured): the engine gets a KV pool of exactly the budget, a large
max_num_seqs (so memory is the only limit), and a queue of ShareGPT-like
requests (`bench memory`'s mix). Reported: the most requests ever running in
one step, and the mean running while others still wait (the sustained figure:
admission fills the pool with short prompts, then decode growth preempts some).

Static (arithmetic, not measured): budget // max_model_len, the requests a
system that reserves max_model_len slots per request can admit.
Orca (arithmetic): how many requests, taken in arrival order, fit when each
reserves prompt + max_tokens.

    paged-attention bench capacity [--quick] [--budgets 2048,4096,8192,16384]
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

from paged_attention.bench.memory import (
    DEFAULT_MIX,
    LengthMix,
    MemoryRequest,
    model_vocab_size,
    resolve_bench_model,
    sharegpt_like_workload,
    trace_run,
)
from paged_attention.bench.monitor import (
    MemoryMonitor,
    environment,
    format_monitor,
    torch_threads,
)
from paged_attention.bench.report import format_table, publish
from paged_attention.entrypoints.engine_args import add_engine_args


def orca_fit(requests: list[MemoryRequest], budget: int, max_model_len: int) -> int:
    """Requests admitted in arrival order until the next reservation does not fit."""
    used = count = 0
    for r in requests:
        need = min(len(r.prompt_token_ids) + r.max_tokens, max_model_len)
        if used + need > budget:
            break
        used += need
        count += 1
    return count


def measure_budget(
    model_path: str | None,
    requests: list[MemoryRequest],
    budget: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    max_steps: int,
    seed: int,
    progress: bool,
) -> dict:
    from paged_attention.engine.llm import LLM

    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=budget // block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
    )
    trace = trace_run(llm, requests, progress=progress, max_steps=max_steps, desc=f"capacity {budget}")
    waiting = [r.num_running for r in trace.records if r.num_waiting > 0] or [
        r.num_running for r in trace.records
    ]
    return {
        "budget_tokens": budget,
        "num_kv_blocks": budget // block_size,
        "paged_max_running": trace.max_running,
        "paged_mean_running": statistics.fmean(waiting),
        "steps_with_waiting": sum(1 for r in trace.records if r.num_waiting > 0),
        "static_concurrency": budget // max_model_len,
        "orca_concurrency": orca_fit(requests, budget, max_model_len),
        "num_preemptions": trace.num_preemptions,
        "num_steps": len(trace.records),
        "peak_used_blocks": trace.peak_used_blocks,
        "elapsed_s": trace.elapsed_s,
    }


def run_capacity(
    model: str = "tiny-2k",
    budgets: tuple[int, ...] = (2048, 4096, 8192, 16384),
    num_requests: int = 160,
    block_size: int = 16,
    max_model_len: int = 2048,
    max_num_seqs: int = 1024,
    max_steps: int = 300,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
    mix: LengthMix = DEFAULT_MIX,
) -> dict:
    model_path = resolve_bench_model(model)
    requests = sharegpt_like_workload(num_requests, max_model_len, model_vocab_size(model_path), seed, mix)
    rows = []
    with torch_threads(threads), MemoryMonitor() as monitor:
        for budget in budgets:
            rows.append(
                measure_budget(
                    model_path,
                    requests,
                    budget,
                    block_size,
                    max_model_len,
                    max_num_seqs,
                    max_steps,
                    seed,
                    progress,
                )
            )
        env = environment()
    return {
        "benchmark": "capacity",
        "config": {
            "model": model,
            "block_size": block_size,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "num_requests": num_requests,
            "max_steps": max_steps,
            "seed": seed,
            "length_mix": asdict(mix),
            "torch_threads": threads,
        },
        "method": {
            "paged": "measured: max (and mean while requests wait) running requests in the engine",
            "static": "arithmetic: budget // max_model_len",
            "orca": "arithmetic: requests in arrival order whose prompt + max_tokens fit",
        },
        "budgets": rows,
        "monitor": monitor.summary(),
        "environment": env,
    }


def print_capacity(result: dict) -> None:
    print(
        format_table(
            ["budget (tokens)", "paged max", "paged mean", "Orca*", "static*", "paged/static", "preemptions"],
            [
                [
                    f"{r['budget_tokens']:,}",
                    r["paged_max_running"],
                    f"{r['paged_mean_running']:.1f}",
                    r["orca_concurrency"],
                    r["static_concurrency"],
                    f"{r['paged_max_running'] / max(r['static_concurrency'], 1):.1f}x",
                    r["num_preemptions"],
                ]
                for r in result["budgets"]
            ],
        )
    )
    print(
        "paged: measured in the engine; * arithmetic (static = budget // max_model_len, "
        "Orca = prompt + max_tokens reservations in arrival order)"
    )
    print(format_monitor(result["monitor"]))


def main(args) -> dict:
    budgets = tuple(int(b) for b in args.budgets.split(","))
    result = run_capacity(
        model=args.model,
        budgets=budgets[:2] if args.quick else budgets,
        num_requests=48 if args.quick else args.num_requests,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_steps=40 if args.quick else args.max_steps,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quick,
    )
    from paged_attention.bench.plots import plot_capacity

    return publish(result, "capacity", args.output_dir, plot_capacity, print_capacity)


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="concurrent requests in a KV budget: paging (measured) vs static")
    p.add_argument("--model", default="tiny-2k", help="tiny-2k (default), stories260k, smollm2, or a path")
    p.add_argument("--budgets", default="2048,4096,8192,16384", help="KV budgets in token slots, comma list")
    p.add_argument("--num-requests", type=int, default=160, help="requests queued per budget")
    p.add_argument(
        "--max-steps", type=int, default=300, help="engine steps per budget (the queue stays full)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="two budgets, 48 requests, 40 steps (for tests)")
    p.add_argument("--output-dir", default="results")
    add_engine_args(
        p,
        only=("block_size", "max_model_len", "max_num_seqs"),
        defaults={"max_model_len": 2048, "max_num_seqs": 1024},
        model=False,
    )
    p.set_defaults(func=main)
