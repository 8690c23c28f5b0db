"""What dtype "auto" costs on a quantized model: the default model's offline
128-request workload (prompts 16..512, outputs 16..256, greedy, ignore_eos,
no prefix caching) and one user (128-token prompt, 256 out), under each
dtype, in fresh processes, alternating dtypes so that the machine's drift
falls on both.

    python scripts/dtype_cost.py [--dtypes auto,bfloat16] [--rounds 2] [--threads 2]

On a CPU with fast bfloat16, "auto" runs a quantized model in float32 with a
bfloat16 KV pool and bfloat16 prompt matmuls (`engine/resolve.py`), for
decode-path agreement with the float32 model (bench quant-accuracy); this
prints what that costs against "bfloat16" beside the CPU's flags and writes
results/dtype_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from paged_attention.bench.report import format_table, write_json

# One dtype in a fresh process: both workloads, one JSON line.
_RUN = """
import json, sys, time, torch
from paged_attention import LLM, SamplingParams
from paged_attention.bench.workload import uniform_workload
dtype = sys.argv[1]
llm = LLM(None, dtype=dtype, enable_prefix_caching=False, swap_space=0)
vocab = llm.engine.runner.model.config.vocab_size
work = uniform_workload(128, (16, 512), (16, 256), vocab, seed=0)
prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in work]
params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in work]
llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: dense copies, kernels
start = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
one = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
first = None
start1 = time.perf_counter()
for out in llm.generate_stream({"prompt_token_ids": list(range(1000, 1128))}, one):
    first = first or time.perf_counter()
end1 = time.perf_counter()
print(json.dumps({
    "dtype": dtype,
    "activations": str(llm.engine.runner.model.dtype),
    "kv": str(llm.engine.runner.kv_cache.dtype),
    "offline_tok_s": tokens / elapsed,
    "one_user_decode_tok_s": 255 / (end1 - first),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="auto,bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="results")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs = []
    for _ in range(args.rounds):
        for dtype in args.dtypes.split(","):
            out = subprocess.run(
                [sys.executable, "-c", _RUN, dtype], env=env, capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    print(
        format_table(
            ["dtype", "activations", "KV", "offline tok/s (128 requests)", "one user decode tok/s"],
            [
                [
                    r["dtype"],
                    r["activations"],
                    r["kv"],
                    f"{r['offline_tok_s']:.1f}",
                    f"{r['one_user_decode_tok_s']:.1f}",
                ]
                for r in runs
            ],
        )
    )
    path = write_json(
        args.output_dir, "dtype_cost", {"benchmark": "dtype-cost", "threads": args.threads, "runs": runs}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
