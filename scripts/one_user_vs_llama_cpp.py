"""One user on the CPU: this engine against llama.cpp's `llama-bench`, same
GGUF file, same placement, one run.

    python scripts/one_user_vs_llama_cpp.py [--threads 1,2] [--pin-core 1] [--prompt 128] [--gen 256]

For each thread count: our engine in a fresh process (`LLM(gguf)`, a random
prompt of --prompt token ids, --gen tokens greedy with ignore_eos, streamed so
that prefill and decode are timed apart; best of --repeats), then `llama-bench
-p PROMPT -n GEN -t THREADS` (its pp and tg figures). With --pin-core each
side runs alone on that core (only sensible with one thread). Prints a table
beside the CPU's flags and writes results/one_user.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from paged_attention.bench.monitor import describe, environment
from paged_attention.bench.report import format_table, write_json
from paged_attention.bench.serve_llama_cpp import absent_message, find_llama_binary, run_llama_bench
from paged_attention.bench.serve_process import Placement

# Runs in a fresh process so each thread count starts torch anew.
_OURS = """
import json, sys, time
import torch
from paged_attention import LLM, SamplingParams
gguf, prompt_len, gen, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(gguf, max_num_seqs=1, swap_space=0)
vocab = llm.engine.runner.model.config.vocab_size
g = torch.Generator().manual_seed(0)
best = None
params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
# Warm-up with a 64-token prompt: a prompt's first dense pass makes the dense weight copies.
llm.generate({"prompt_token_ids": list(range(100, 164))}, SamplingParams(max_tokens=8, ignore_eos=True))
for r in range(repeats):
    ids = torch.randint(100, vocab, (prompt_len,), generator=g).tolist()
    start = time.perf_counter()
    first = None
    n = 0
    for out in llm.generate_stream({"prompt_token_ids": ids}, params):
        if first is None:
            first = time.perf_counter()
        n = len(out.outputs[0].token_ids)
    end = time.perf_counter()
    run = {"prefill_tok_s": prompt_len / (first - start), "decode_tok_s": (n - 1) / (end - first), "tokens": n}
    best = run if best is None else {k: max(v, run[k]) for k, v in best.items()}
print(json.dumps({**best, "threads": torch.get_num_threads(), "dtype": str(llm.engine.runner.model.dtype)}))
"""


def ours(gguf: Path, placement: Placement, prompt: int, gen: int, repeats: int) -> dict:
    command = [
        *placement.prefix(),
        sys.executable,
        "-c",
        _OURS,
        str(gguf),
        str(prompt),
        str(gen),
        str(repeats),
    ]
    env = {**os.environ, **placement.thread_env()}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-800:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a .gguf file (default: the default model's)")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--pin-core", type=int, default=None, help="run each side alone on this core")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-bench", default=None, help="path to llama-bench (default: searched)")
    parser.add_argument("--output-dir", default="results")
    args = parser.parse_args()
    from paged_attention.model.gguf import default_gguf_path

    gguf = Path(args.model) if args.model else default_gguf_path()
    binary = find_llama_binary("llama-bench", args.llama_bench)
    env = environment()
    print(describe(env))
    rows, records = [], []
    for threads in (int(t) for t in args.threads.split(",")):
        placement = Placement(threads, args.pin_core if threads == 1 else None)
        mine = ours(gguf, placement, args.prompt, args.gen, args.repeats)
        theirs: dict = {"error": absent_message("llama-bench")} if binary is None else {}
        if binary is not None:
            # --repack 0: llama.cpp's AMX repacking dies with SIGILL in some VMs.
            extra = ["--repack", "0"] if "amx_tile" in (env.get("cpu_flags") or []) else []
            theirs = run_llama_bench(
                binary, gguf, [threads], placement.core, args.prompt, args.gen, args.repeats, extra
            )
        records.append({"threads": threads, "pinned_core": placement.core, "ours": mine, "llama_cpp": theirs})
        speeds = {r["test"][:2]: r["tokens_per_s"] for r in theirs.get("records", [])}
        tg, pp = speeds.get("tg"), speeds.get("pp")
        rows.append(
            [
                threads,
                "" if placement.core is None else placement.core,
                f"{mine.get('decode_tok_s', float('nan')):.1f}",
                "-" if tg is None else f"{tg:.1f}",
                f"{mine.get('prefill_tok_s', float('nan')):.0f}",
                "-" if pp is None else f"{pp:.0f}",
            ]
        )
        print(json.dumps(records[-1]), flush=True)
    headers = ["threads", "core", "ours decode tok/s", "llama.cpp tg", "ours prefill tok/s", "llama.cpp pp"]
    print(format_table(headers, rows))
    write_json(
        args.output_dir,
        "one_user",
        {"gguf": str(gguf), "prompt": args.prompt, "gen": args.gen, "runs": records, "environment": env},
    )


if __name__ == "__main__":
    main()
