"""Where a decode step's time goes, at several batch sizes.

    paged-attention bench decode-step [--model M] [--dtype auto] [--batch-sizes 1,16,64,256]

For each batch size: the step's wall time split by the engine's own per-step
records (scheduler, model runner, the update after it) and, inside the model,
attention and KV writes (`throughput.profile_decode_step`); then one more step
under torch.profiler, which counts the operators dispatched and their summed
self time. `python_ms` is what the step spent outside any operator: Python,
dispatch and allocation overhead, the part that compilation and fusion remove.
Writes results/decode_step.json; prints the machine's CPU flags beside it.
"""

from __future__ import annotations

import argparse
import time

from paged_attention.bench.monitor import torch_threads
from paged_attention.bench.report import format_table, write_json


def operator_profile(model: str | None, dtype: str, num_seqs: int) -> dict:
    """One decode step of `num_seqs` sequences under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from paged_attention.bench.throughput import decoding_engine

    engine = decoding_engine(model, dtype, num_seqs, 16, swap_space=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    # Top-level operators only (depth 0), so nested calls are not counted twice.
    events = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    op_ms = sum(e.cpu_time_total for e in events) / 1000
    return {
        "profiled_step_ms": 1000 * wall,
        "num_ops": len(events),
        "op_ms": op_ms,
        "python_ms": max(0.0, 1000 * wall - op_ms),
    }


def run(model: str | None, dtype: str, batch_sizes: list[int], steps: int) -> dict:
    from paged_attention.bench.throughput import profile_decode_step

    rows = []
    for n in batch_sizes:
        row = profile_decode_step(model, dtype, num_seqs=n, steps=steps)
        row.update(operator_profile(model, dtype, n))
        row["tokens_per_s"] = 1000 * n / row["step_ms"]
        rows.append(row)
    return {"model": model or "default (SmolLM2-135M-Instruct)", "dtype": dtype, "steps": steps, "rows": rows}


def show(result: dict) -> None:
    headers = [
        "seqs",
        "step ms",
        "tok/s",
        "attention",
        "kv write",
        "model other",
        "update",
        "sched",
        "ops",
        "python",
    ]
    rows = [
        [
            r["num_seqs"],
            f"{r['step_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            "in step" if r["attention_ms"] is None else f"{r['attention_ms']:.2f}",
            "in step" if r["kv_write_ms"] is None else f"{r['kv_write_ms']:.2f}",
            f"{r['model_other_ms']:.1f}",
            f"{r['update_ms']:.2f}",
            f"{r['scheduler_ms']:.2f}",
            r["num_ops"],
            f"{r['python_ms']:.1f}",
        ]
        for r in result["rows"]
    ]
    print(f"decode step, {result['model']}, dtype {result['dtype']} (ms per step)")
    print(format_table(headers, rows))


def main(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with torch_threads(args.threads):
        result = run(args.model, args.dtype, sizes, args.steps)
    result["threads"] = args.threads
    show(result)
    print(f"wrote {write_json(args.output_dir, 'decode_step', result)}")
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("decode-step", help="where a decode step's time goes at batch 1..256")
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="running sequences per step, comma list")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--output-dir", default="results")
    p.set_defaults(func=main)
