"""The same prompts through transformers (one at a time, then one padded
batch) and through this engine, with time and memory per phase.

    python scripts/run_experiment.py [--model stories260k|smollm2|PATH] [--max-tokens 64] [--dtype float32]

Every phase runs greedy with ignore_eos, so all produce the same number of
tokens; the script reports how many sequences agree with transformers'
one-at-a-time output. Memory is the process RSS sampled in a background thread
during each phase (bench/monitor.py). Writes results/experiment.json, which
`paged-attention bench report` adds to REPORT.md. No interactive pauses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from paged_attention.bench.monitor import MemoryMonitor, environment, torch_threads
from paged_attention.bench.report import format_table, write_json

PROMPTS = [
    "Once upon a time, there was a little girl",
    "The cat sat on the",
    "One day, Tom went to the park with his mom and",
    "Lily liked to play with her red ball. One day",
    "There was a big tree in the garden.",
    "Ben and his dog",
    "The sun was shining and the birds were singing. Sue wanted to",
    "A little bird",
]


def resolve(model: str) -> tuple[str | None, Path]:
    """(model argument for LLM / hf_model_for, folder with the tokenizer)."""
    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS, STORIES260K

    if model == "stories260k":
        return str(STORIES260K), STORIES260K
    if model == "smollm2":
        return None, DEFAULT_MODEL_ASSETS
    return model, Path(model)


def phase(name: str, fn, phases: list[dict], tokens: int = 0):
    with MemoryMonitor() as monitor:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    summary = monitor.summary()
    phases.append(
        {
            "phase": name,
            "seconds": seconds,
            "output_tokens": tokens,
            "tokens_per_s": tokens / seconds if tokens else 0.0,
            "rss_start_mib": summary["rss_start_mib"],
            "rss_peak_mib": summary["rss_peak_mib"],
        }
    )
    print(f"{name:38s} {seconds:7.2f} s   peak RSS {summary['rss_peak_mib']:6.0f} MiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="stories260k", help="stories260k (default), smollm2, or a path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--output-dir", default="results")
    args = parser.parse_args(argv)

    from paged_attention.bench.throughput import hf_model_for
    from paged_attention.engine.llm import LLM
    from paged_attention.engine.model_runner import flush_denormals
    from paged_attention.sampling_params import SamplingParams
    from paged_attention.tokenizer import load_auto_tokenizer

    model_arg, tok_dir = resolve(args.model)
    dtype = getattr(torch, args.dtype)
    n = args.max_tokens
    total = n * len(PROMPTS)
    phases: list[dict] = []
    with torch_threads(args.threads), torch.inference_mode(), flush_denormals(True):
        tok = phase("load tokenizer", lambda: load_auto_tokenizer(tok_dir), phases)
        ids = [tok.encode(p) for p in PROMPTS]
        hf = phase("transformers: load model", lambda: hf_model_for(model_arg, dtype), phases)
        pad = 0

        def one_at_a_time() -> list[list[int]]:
            outs = []
            for p in ids:
                x = torch.tensor([p])
                y = hf.generate(
                    x,
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    eos_token_id=None,
                    pad_token_id=pad,
                )
                outs.append(y[0, len(p) :].tolist())
            return outs

        def padded_batch() -> list[list[int]]:
            width = max(map(len, ids))
            x = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for i, p in enumerate(ids):  # left padding, as decoder-only generation needs
                x[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            y = hf.generate(
                x,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=pad,
            )
            return [row[width:].tolist() for row in y]

        hf.generate(torch.tensor([ids[0]]), do_sample=False, max_new_tokens=2, pad_token_id=pad)  # warm-up
        sequential = phase("transformers: one at a time", one_at_a_time, phases, total)
        batched = phase("transformers: padded batch", padded_batch, phases, total)
        hf = None  # free the transformers model before the engine loads
        llm = phase("engine: load model", lambda: LLM(model_arg, dtype=args.dtype), phases)
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in ids]
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
        ours = phase(
            "engine: continuous batching",
            lambda: llm.generate(prompts, params, use_tqdm=False),
            phases,
            total,
        )
    ours_ids = [list(o.outputs[0].token_ids) for o in ours]
    agree_batch = sum(a == b for a, b in zip(sequential, batched))
    agree_engine = sum(a == b for a, b in zip(sequential, ours_ids))
    print()
    print(
        format_table(
            ["phase", "seconds", "tokens/s", "peak RSS (MiB)"],
            [
                [
                    p["phase"],
                    f"{p['seconds']:.2f}",
                    f"{p['tokens_per_s']:.1f}" if p["output_tokens"] else "-",
                    f"{p['rss_peak_mib']:.0f}",
                ]
                for p in phases
            ],
        )
    )
    print(
        f"agree with transformers one at a time: padded batch {agree_batch}/{len(ids)}, "
        f"engine {agree_engine}/{len(ids)}"
    )
    print(
        f"engine KV: {llm.memory_stats()['peak_used_blocks']} blocks at peak of {llm.memory_stats()['num_blocks']}"
    )
    result = {
        "benchmark": "experiment",
        "model": args.model,
        "dtype": args.dtype,
        "num_prompts": len(ids),
        "max_tokens": n,
        "torch_threads": args.threads,
        "phases": phases,
        "agree_padded_batch": agree_batch,
        "agree_engine": agree_engine,
        "environment": environment(),
    }
    print(f"wrote {write_json(args.output_dir, 'experiment', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
