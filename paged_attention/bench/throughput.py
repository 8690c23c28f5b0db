"""Throughput of this engine against transformers `generate` with static padded
batches: same model weights, same requests, greedy, `ignore_eos`, same dtype.
Only requested output tokens are counted.

    paged-attention bench throughput [--quick] [--models stories15m,smollm2] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paged_attention.bench.block_size import timed_backend
from paged_attention.bench.monitor import MemoryMonitor, format_monitor
from paged_attention.bench.peers import run_hf_continuous, run_llama_cpp
from paged_attention.bench.workload import (
    STORIES15M_CONFIG,
    BenchRequest,
    throughput_record,
    uniform_workload,
)
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:  # torch loads when a benchmark runs, not when the CLI builds its parser
    import torch

    from paged_attention.engine.llm_engine import LLMEngine

DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------- our engine
def run_engine(model: str | None, workload: list[BenchRequest], dtype: str, **engine_kwargs) -> dict:
    from paged_attention.engine.llm import LLM

    llm = LLM(model, dtype=dtype, **engine_kwargs)
    # Warm-up outside the timer (first-call allocations, kernel selection).
    llm.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in workload[:4]],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == sum(r.output_len for r in workload), "engine produced the wrong token count"
    stats = llm.memory_stats()
    return throughput_record(
        tokens,
        elapsed,
        len(workload),
        num_steps=stats["num_steps"],
        peak_used_blocks=stats["peak_used_blocks"],
        num_preemptions=stats["num_preemptions"],
    )


# ------------------------------------------------------------- transformers
def hf_model_for(model: str | None, dtype: torch.dtype):
    """The transformers model with exactly the weights our engine loads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    # The default GGUF: build the HF model from our dequantized tensors (the same
    # numbers transformers' own GGUF loader produces, without its 15 s load).
    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
    from paged_attention.model.gguf import default_gguf_path, load_gguf

    _, tensors = load_gguf(default_gguf_path())
    config = LlamaConfig.from_pretrained(str(DEFAULT_MODEL_ASSETS))
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(dict(tensors), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.to(dtype).eval()


def run_hf_static(hf, workload: list[BenchRequest], batch_size: int) -> dict:
    """Static batching: requests in arrival order, `batch_size` at a time,
    left-padded; each batch runs until its longest requested output."""
    import torch

    from paged_attention.engine.denormals import flush_denormals

    pad = 0

    def run_batch(batch: list[BenchRequest]) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids) :] = 1
        longest = max(r.output_len for r in batch)
        hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=longest,
            min_new_tokens=longest,
            eos_token_id=None,
            pad_token_id=pad,
        )

    # The same denormal flushing our engine uses, so neither side pays for them.
    with flush_denormals(True), torch.inference_mode():
        run_batch(workload[:2])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(workload), batch_size):
            run_batch(workload[i : i + batch_size])
        elapsed = time.perf_counter() - start
    tokens = sum(r.output_len for r in workload)
    return throughput_record(tokens, elapsed, len(workload), batch_size=batch_size)


# ------------------------------------------------------- decode step profile
def decoding_engine(
    model: str | None, dtype: str, num_seqs: int, max_tokens: int, **options: Any
) -> LLMEngine:
    """An engine running `num_seqs` greedy sequences (prompts of 128..256
    tokens, `max_tokens` each) with every prefill done and DENSE_COPY_AFTER
    decode steps run: the next steps decode in the steady state (quantized
    layers make their dense copies after a few large batches)."""
    from paged_attention.engine.llm import LLM
    from paged_attention.model.quant.linear import DENSE_COPY_AFTER

    assert max_tokens > DENSE_COPY_AFTER, f"max_tokens {max_tokens} leaves no step after the warm-up"

    llm = LLM(model, dtype=dtype, max_num_seqs=num_seqs, **options)
    workload = uniform_workload(num_seqs, (128, 256), (max_tokens, max_tokens), 500, seed=1)
    llm.add_requests(
        [{"prompt_token_ids": r.prompt_token_ids} for r in workload],
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    engine = llm.engine
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests()):
        engine.step()
    for _ in range(DENSE_COPY_AFTER):
        engine.step()
    return engine


def profile_decode_step(model: str | None, dtype: str, num_seqs: int = 64, steps: int = 20) -> dict:
    """Where a decode step's time goes with `num_seqs` running sequences: the
    engine's own per-step records (scheduler, model runner, the update after
    it: sampling, stop rules, freeing) and, inside the model, attention and KV
    writes (timed around the attention backend; the CPU's fused decode layer,
    RoPE included, counts as attention). Where the one-call decode step
    serves the batch (`model/decode_stack.py`), attention runs inside it and
    is not timed apart: attention_ms and kv_write_ms are None."""
    from paged_attention.model.quant.linear import DENSE_COPY_AFTER

    # Room for the warm-up steps and the steps that decode early sequences while later prompts prefill.
    engine = decoding_engine(model, dtype, num_seqs, steps + 8 + DENSE_COPY_AFTER, record_step_stats=True)
    assert engine.step_stats is not None
    first = len(engine.step_stats)
    bucket: dict[str, float] = {}
    model = engine.runner.model
    stacked = model.decode_stack_serves(num_seqs)
    with contextlib.nullcontext() if stacked else timed_backend(model, bucket):  # "attention", "kv_write"
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - start
    records = engine.step_stats[first:]
    assert len(records) == steps and all(r.num_tokens == num_seqs for r in records), "not all decode steps"
    while engine.has_unfinished():
        engine.step()
    ms = {k: None if stacked else 1000 * bucket.get(k, 0.0) / steps for k in ("attention", "kv_write")}
    step_ms = 1000 * total / steps
    runner_ms = 1000 * sum(r.execute_s for r in records) / steps
    update_ms = 1000 * sum(r.update_s for r in records) / steps
    scheduler_ms = 1000 * sum(r.schedule_s for r in records) / steps
    return {
        "num_seqs": num_seqs,
        "step_ms": step_ms,
        "attention_ms": ms["attention"],
        "kv_write_ms": ms["kv_write"],
        "model_other_ms": runner_ms - (ms["attention"] or 0.0) - (ms["kv_write"] or 0.0),
        "update_ms": update_ms,  # sampling, stop rules, detokenising, freeing blocks
        "scheduler_ms": scheduler_ms,
        "engine_other_ms": step_ms - runner_ms - update_ms - scheduler_ms,
    }


def time_to_first_token(model: str | None, env: dict[str, str] | None = None) -> float:
    """Seconds from launching a fresh Python process (with environment `env`,
    default this one's) to its first streamed token (interpreter start-up and
    imports included; the process's exit is not)."""
    code = (
        "import time\n"
        "from paged_attention import LLM, SamplingParams\n"
        f"llm = LLM({model!r})\n"
        "next(iter(llm.generate_stream('Once upon a time', SamplingParams(temperature=0, max_tokens=8))))\n"
        "print(time.time(), flush=True)\n"
    )
    start = time.time()  # wall clock: comparable across the two processes
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(done.stdout.split()[-1]) - start


# ---------------------------------------------------------------------- main
def main(args) -> dict:
    with MemoryMonitor() as monitor:
        results = measure(args)
    results["monitor"] = monitor.summary()
    print(format_monitor(results["monitor"]))
    from paged_attention.bench.plots import plot_throughput

    out_dir = Path(args.output_dir)
    results["plot"] = plot_throughput(results, out_dir / "throughput.png").name
    from paged_attention.bench.monitor import describe, environment

    results.setdefault("environment", environment())
    print(describe(results["environment"]))
    out = out_dir / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def measure(args) -> dict:
    from paged_attention.model.random_model import random_llama_folder

    models: dict[str, str | None] = {}
    tmp = Path(tempfile.gettempdir()) / "paged_attention_bench"
    for name in args.models.split(","):
        if name == "stories15m":
            models[name] = str(random_llama_folder(tmp / "stories15m-random", STORIES15M_CONFIG))
        elif name == "smollm2":
            models[name] = None
        else:
            raise ValueError(f"unknown benchmark model {name!r}; use stories15m and/or smollm2")
    n = 16 if args.quick else args.num_requests
    workload = uniform_workload(
        n,
        (16, 128) if args.quick else (16, 512),
        (16, 32) if args.quick else (16, 256),
        vocab_size=32000,
        seed=0,
    )
    results: dict = {"workload": {"num_requests": n, "seed": 0}, "runs": []}
    for model_name, model in models.items():
        vocab = 49152 if model is None else 32000
        reqs = [BenchRequest([t % vocab for t in r.prompt_token_ids], r.output_len) for r in workload]
        for dtype in args.dtypes.split(","):
            ours = run_engine(model, reqs, dtype)
            if dtype not in DTYPES:
                raise ValueError(f"unknown benchmark dtype {dtype!r}; use {' and/or '.join(DTYPES)}")
            import torch

            hf_model = hf_model_for(model, getattr(torch, dtype))
            hf = run_hf_static(hf_model, reqs, args.hf_batch_size)
            row = {
                "model": model_name,
                "dtype": dtype,
                "engine": ours,
                "hf_static": hf,
                "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
            }
            line = (
                f"{model_name:10s} {dtype:9s} engine {ours['tokens_per_s']:8.1f} tok/s  "
                f"HF static {hf['tokens_per_s']:8.1f} tok/s  x{row['speedup']:.2f}"
            )
            if args.hf_continuous:
                cont = run_hf_continuous(hf_model, reqs)
                row["hf_continuous"] = cont
                row["speedup_vs_hf_continuous"] = ours["tokens_per_s"] / cont["tokens_per_s"]
                line += (
                    f"  HF continuous {cont['tokens_per_s']:8.1f} tok/s"
                    f"  x{row['speedup_vs_hf_continuous']:.2f}"
                )
            if args.llama_cpp and model is None:  # llama.cpp reads the default model's GGUF
                from paged_attention.model.gguf import default_gguf_path

                row["llama_cpp"] = run_llama_cpp(str(default_gguf_path()), reqs)
            results["runs"].append(row)
            print(line, flush=True)
    if not args.quick:
        profile_model = models.get("smollm2", next(iter(models.values())))
        results["decode_profile"] = profile_decode_step(profile_model, "auto")
        print("decode step at 64 seqs (ms):", {k: round(v, 2) for k, v in results["decode_profile"].items()})
        if "smollm2" in models:
            results["time_to_first_token_s"] = time_to_first_token(None)
            print(f"process start to first token: {results['time_to_first_token_s']:.2f} s")
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("throughput", help="this engine vs transformers static batching")
    p.add_argument("--models", default="stories15m,smollm2", help="comma list: stories15m, smollm2")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list: float32, bfloat16")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=32, help="transformers static batch size")
    p.add_argument(
        "--hf-continuous",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run transformers' continuous batching (generate_batch)",
    )
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also run llama.cpp on the default model's GGUF (needs llama-cpp-python)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    p.add_argument("--output-dir", default="results")
    p.set_defaults(func=main)
