"""KV memory: what paging allocates against what contiguous schemes reserve.

A workload of variable-length requests runs through the engine. After every
step the benchmark reads, for the requests then running:

  * tokens stored:   sum of num_computed_tokens (the KV actually written);
  * paged:           slots allocated = the allocator's used blocks * block_size;
  * Orca-style:      prompt + max_tokens per request, reserved up front;
  * static:          max_model_len per request, reserved up front.

The two contiguous figures are what those schemes would reserve for the *same*
running set (a counterfactual on the measured run: they would fit fewer
requests, see `bench capacity`). Waste is the share of reserved slot-steps that
held no token, 1 - sum(stored) / sum(reserved), summed over steps. It splits
into internal fragmentation (slots that will never hold a token: beyond the
request's final length, or, for paging, the unused tail of partly filled last
blocks) and reservation (slots held now for tokens that come later).
External fragmentation of a contiguous allocator is not modelled: the figures
assume a perfect compacting allocator, so real contiguous systems waste more.

Literature (Kwon et al., "Efficient Memory Management for Large Language Model
Serving with PagedAttention", SOSP 2023): existing contiguous systems keep only
20-38% of KV memory for token states (60-80% waste); vLLM wastes under 4%.

    paged-attention bench memory [--quick] [--draw] [--model tiny-2k|stories260k|smollm2|PATH]
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paged_attention.bench.monitor import (
    MemoryMonitor,
    environment,
    format_monitor,
    torch_threads,
)
from paged_attention.bench.report import format_table, write_json
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.sampling_params import SamplingParams

LITERATURE = {
    "source": "Kwon et al., SOSP 2023 (vLLM): Fig. 2 and Sec. 3",
    "contiguous_waste": [0.6, 0.8],
    "paged_waste_below": 0.04,
}

# The shape of llama2.c's stories260K with 2048 positions and random weights: the
# memory figures depend only on request lengths (fixed here by max_tokens with
# ignore_eos), not on what the model says, and a tiny model keeps the run short.
TINY_2K_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 5,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}


def resolve_bench_model(name: str) -> str | None:
    """'tiny-2k' (random weights, built once under the temp dir), 'stories260k'
    (shipped), 'smollm2' (the default model), or a model path."""
    from paged_attention.engine.builder import STORIES260K
    from paged_attention.model.random_model import random_llama_folder

    key = name.lower()
    if key == "tiny-2k":
        folder = Path(tempfile.gettempdir()) / "paged_attention_bench" / "tiny-2k-random"
        return str(random_llama_folder(folder, TINY_2K_CONFIG))
    if key == "stories260k":
        return str(STORIES260K)
    if key == "smollm2":
        return None
    return name


def model_vocab_size(model_path: str | None) -> int:
    """The vocabulary size from the model's config.json, without loading it. A
    GGUF file with no config.json beside it gets 256: token ids below that are
    valid for any real vocabulary, and the memory figures do not depend on them."""
    import json

    from paged_attention.engine.builder import resolve_model

    config_path = resolve_model(model_path).tokenizer_dir / "config.json"
    if not config_path.exists():
        return 256
    return int(json.loads(config_path.read_text())["vocab_size"])


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class LengthMix:
    """Lognormal prompt and output lengths, clipped, with ShareGPT's means.

    Means are the ShareGPT figures in the vLLM paper (Fig. 11: 161 input and
    338 output tokens on average); sigma 1.0 (prompts) and 0.8 (outputs) give
    the long right tail of chat traffic (medians 97 and 246). Lengths are
    clipped to [min_len, max_prompt] and [min_len, max_output], and outputs so
    that prompt + output <= max_model_len. A client's declared max_tokens is the
    next power of two at or above the answer it gets (capped by max_model_len):
    the "Pow2" Orca variant of the paper."""

    prompt_mean: float = 161.0
    prompt_sigma: float = 1.0
    output_mean: float = 338.0
    output_sigma: float = 0.8
    min_len: int = 4
    max_prompt: int = 1024
    max_output: int = 1024

    def scaled(self, factor: float) -> LengthMix:
        """The same shape with every length times `factor` (for --quick runs)."""
        return LengthMix(
            self.prompt_mean * factor,
            self.prompt_sigma,
            self.output_mean * factor,
            self.output_sigma,
            self.min_len,
            max(self.min_len, int(self.max_prompt * factor)),
            max(self.min_len, int(self.max_output * factor)),
        )

    def sample(self, rng: random.Random, max_model_len: int) -> tuple[int, int, int]:
        def draw(mean: float, sigma: float, hi: int) -> int:
            mu = math.log(mean) - sigma**2 / 2  # so that the unclipped mean is `mean`
            return int(min(hi, max(self.min_len, round(rng.lognormvariate(mu, sigma)))))

        prompt = min(draw(self.prompt_mean, self.prompt_sigma, self.max_prompt), max_model_len - 1)
        output = min(draw(self.output_mean, self.output_sigma, self.max_output), max_model_len - prompt)
        declared = min(1 << (output - 1).bit_length(), max_model_len - prompt)
        return prompt, output, declared


DEFAULT_MIX = LengthMix()


@dataclass(frozen=True)
class MemoryRequest:
    prompt_token_ids: list[int]
    output_len: int  # tokens it really produces (ignore_eos, max_tokens = output_len)
    max_tokens: int  # what the client declared: what an Orca-style system reserves


def sharegpt_like_workload(
    num_requests: int, max_model_len: int, vocab_size: int, seed: int = 0, mix: LengthMix = DEFAULT_MIX
) -> list[MemoryRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt, output, declared = mix.sample(rng, max_model_len)
        ids = [rng.randrange(3, vocab_size) for _ in range(prompt)]  # never the special ids 0..2
        out.append(MemoryRequest(ids, output, declared))
    return out


def describe_workload(requests: list[MemoryRequest]) -> dict:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return {
        "num_requests": len(requests),
        "prompt_mean": statistics.fmean(prompts),
        "prompt_median": statistics.median(prompts),
        "prompt_max": max(prompts),
        "output_mean": statistics.fmean(outputs),
        "output_median": statistics.median(outputs),
        "output_max": max(outputs),
        "declared_max_tokens_mean": statistics.fmean(r.max_tokens for r in requests),
    }


# ------------------------------------------------------------------ tracing
@dataclass(frozen=True)
class StepRecord:
    step: int
    num_running: int
    num_waiting: int
    tokens_stored: int  # sum of num_computed_tokens over running requests
    slots_allocated: int  # used blocks * block_size, from the allocator
    slots_orca: int  # sum of prompt + declared max_tokens (capped at max_model_len)
    slots_static: int  # num_running * max_model_len
    final_tokens: int  # what the running requests will hold when they finish
    shared_blocks: int  # used blocks with ref count > 1
    step_s: float


@dataclass
class Trace:
    records: list[StepRecord] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time over the run: less disturbed by other load than wall time
    output_tokens: int = 0
    num_preemptions: int = 0
    peak_used_blocks: int = 0
    max_running: int = 0
    snapshots: list = field(default_factory=list)  # visualize.PoolSnapshot, with --draw


def trace_run(
    llm,
    requests: list[MemoryRequest],
    *,
    progress: bool = True,
    draw: bool = False,
    max_steps: int | None = None,
    desc: str = "memory",
) -> Trace:
    """Queue every request, step the engine to the end (or `max_steps`), and
    record the running set's memory after each step. With `draw`, keep a
    snapshot of the block pool at the step of peak use."""
    from tqdm.auto import tqdm

    engine = llm.engine
    bs = engine.allocator.block_size
    max_len = engine.max_model_len
    ids = llm.add_requests(
        [{"prompt_token_ids": r.prompt_token_ids} for r in requests],
        [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests],
    )
    declared = {rid: r.max_tokens for rid, r in zip(ids, requests)}
    trace = Trace()
    peak_snapshot = None
    bar = tqdm(
        total=sum(r.output_len for r in requests),
        desc=desc,
        unit="tok",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    preempt0 = engine.scheduler.num_preemptions
    generated0 = engine.stats.num_generated_tokens
    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        while engine.has_unfinished() and (max_steps is None or len(trace.records) < max_steps):
            t = time.perf_counter()
            before = engine.stats.num_generated_tokens
            engine.step()
            dt = time.perf_counter() - t
            bar.update(engine.stats.num_generated_tokens - before)
            running = engine.scheduler.running
            alloc = engine.allocator
            used_blocks = alloc.num_used_blocks
            rec = StepRecord(
                step=len(trace.records),
                num_running=len(running),
                num_waiting=engine.scheduler.num_waiting,
                tokens_stored=sum(r.num_computed_tokens for r in running),
                slots_allocated=used_blocks * bs,
                slots_orca=sum(min(r.num_prompt_tokens + declared[r.request_id], max_len) for r in running),
                slots_static=len(running) * max_len,
                final_tokens=sum(r.num_prompt_tokens + r.max_tokens for r in running),
                shared_blocks=sum(
                    1 for b in {b for r in running for b in r.block_table.block_ids} if alloc.ref_count(b) > 1
                ),
                step_s=dt,
            )
            trace.records.append(rec)
            trace.max_running = max(trace.max_running, rec.num_running)
            if used_blocks > trace.peak_used_blocks:
                trace.peak_used_blocks = used_blocks
                if draw:
                    from paged_attention.visualize import snapshot_pool

                    peak_snapshot = (rec.step, snapshot_pool(engine))
        trace.elapsed_s = time.perf_counter() - start
        trace.cpu_s = time.process_time() - cpu_start
    finally:
        bar.close()
        for rid in ids:  # after max_steps (or an error): free what is left
            engine.abort(rid)
    trace.output_tokens = engine.stats.num_generated_tokens - generated0
    trace.num_preemptions = engine.scheduler.num_preemptions - preempt0
    if draw and peak_snapshot is not None:
        step, snap = peak_snapshot
        snap.title = f"step {step} (peak use)"
        trace.snapshots.append(snap)
    return trace


# ------------------------------------------------------------------ accounting
def waste_summary(records: list[StepRecord]) -> dict:
    """Waste, internal fragmentation and reservation per scheme, over all steps."""
    stored = sum(r.tokens_stored for r in records)
    final = sum(r.final_tokens for r in records)
    out = {}
    for scheme, attr in (("paged", "slots_allocated"), ("orca", "slots_orca"), ("static", "slots_static")):
        reserved = sum(getattr(r, attr) for r in records)
        if scheme == "paged":
            # Paging reserves nothing ahead: every unused slot is in a partly filled block.
            internal, reservation = reserved - stored, 0
        else:
            internal, reservation = reserved - final, final - stored
        out[scheme] = {
            "slot_steps_reserved": reserved,
            "waste": 1 - stored / reserved if reserved else 0.0,
            "internal_fragmentation": internal / reserved if reserved else 0.0,
            "reservation": reservation / reserved if reserved else 0.0,
        }
    out["token_steps_stored"] = stored
    return out


def peak_summary(records: list[StepRecord]) -> dict:
    """The step where paging used the most slots, and each scheme's figure there."""
    peak = max(records, key=lambda r: r.slots_allocated)
    return {
        "step": peak.step,
        "num_running": peak.num_running,
        "tokens_stored": peak.tokens_stored,
        "paged_slots": peak.slots_allocated,
        "orca_slots": peak.slots_orca,
        "static_slots": peak.slots_static,
        "paged_waste": 1 - peak.tokens_stored / peak.slots_allocated,
        "orca_waste": 1 - peak.tokens_stored / peak.slots_orca,
        "static_waste": 1 - peak.tokens_stored / peak.slots_static,
    }


def thin(records: list[StepRecord], max_points: int = 400) -> list[dict]:
    step = max(1, math.ceil(len(records) / max_points))
    return [asdict(r) for r in records[::step]]


# ------------------------------------------------------------------ main
def run_memory_benchmark(
    model: str = "tiny-2k",
    num_requests: int = 64,
    block_size: int = 16,
    max_model_len: int = 2048,
    num_kv_blocks: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
    draw: bool = False,
    progress: bool = True,
    mix: LengthMix = DEFAULT_MIX,
) -> dict:
    from paged_attention.engine.llm import LLM

    model_path = resolve_bench_model(model)
    requests = sharegpt_like_workload(num_requests, max_model_len, model_vocab_size(model_path), seed, mix)
    if num_kv_blocks is None:
        # Room for every request at its final length: nothing is preempted, so
        # the figures describe the allocation scheme alone.
        num_kv_blocks = sum(-(-(len(r.prompt_token_ids) + r.output_len) // block_size) for r in requests)
    with torch_threads(threads), MemoryMonitor() as monitor:
        llm = LLM(
            model_path,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            max_model_len=max_model_len,
            max_num_seqs=1024,
            seed=seed,
        )
        trace = trace_run(llm, requests, progress=progress, draw=draw)
        env = environment()
    stats = llm.memory_stats()
    return {
        "benchmark": "memory",
        "config": {
            "model": model,
            "block_size": block_size,
            "max_model_len": max_model_len,
            "num_kv_blocks": stats["num_blocks"],
            "num_requests": num_requests,
            "seed": seed,
            "length_mix": asdict(mix),
            "torch_threads": threads,
        },
        "workload": describe_workload(requests),
        "schemes": waste_summary(trace.records),
        "peak": peak_summary(trace.records),
        "run": {
            "elapsed_s": trace.elapsed_s,
            "num_steps": len(trace.records),
            "output_tokens": trace.output_tokens,
            "tokens_per_s": trace.output_tokens / trace.elapsed_s,
            "num_preemptions": trace.num_preemptions,
            "peak_used_blocks": trace.peak_used_blocks,
            "max_running": trace.max_running,
        },
        "literature": LITERATURE,
        "monitor": monitor.summary(),
        "environment": env,
        "timeline": thin(trace.records),
        "_snapshots": trace.snapshots,  # not JSON: main() draws and drops them
    }


def print_memory(result: dict) -> None:
    cfg, s = result["config"], result["schemes"]
    rows = [
        [
            f"paged (block {cfg['block_size']})",
            s["paged"]["waste"],
            s["paged"]["internal_fragmentation"],
            s["paged"]["reservation"],
            result["peak"]["paged_slots"],
        ],
        [
            "Orca (prompt + max_tokens)",
            s["orca"]["waste"],
            s["orca"]["internal_fragmentation"],
            s["orca"]["reservation"],
            result["peak"]["orca_slots"],
        ],
        [
            f"static (max_model_len {cfg['max_model_len']})",
            s["static"]["waste"],
            s["static"]["internal_fragmentation"],
            s["static"]["reservation"],
            result["peak"]["static_slots"],
        ],
    ]
    w = result["workload"]
    print(
        f"workload: {w['num_requests']} requests, prompt mean {w['prompt_mean']:.0f} (max {w['prompt_max']}), "
        f"output mean {w['output_mean']:.0f} (max {w['output_max']}); model {cfg['model']}, "
        f"{result['run']['num_steps']} steps in {result['run']['elapsed_s']:.1f} s"
    )
    print(
        format_table(
            ["scheme", "waste", "internal frag", "reservation", "slots at peak"],
            [[r[0], f"{r[1]:.1%}", f"{r[2]:.1%}", f"{r[3]:.1%}", f"{r[4]:,}"] for r in rows],
        )
    )
    print(
        f"tokens stored at peak: {result['peak']['tokens_stored']:,} "
        f"({result['peak']['num_running']} running requests)"
    )
    print("literature: contiguous schemes waste 60-80%, paging (block 16) under 4% (vLLM paper)")
    print(format_monitor(result["monitor"]))


# --quick: the same mix at a quarter of the lengths, in a 512-token context.
QUICK_SCALE = 0.25


def main(args) -> dict:
    quick = args.quick
    result = run_memory_benchmark(
        model=args.model,
        num_requests=12 if quick else args.num_requests,
        block_size=args.block_size,
        max_model_len=512 if quick else args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        seed=args.seed,
        threads=args.threads,
        draw=args.draw,
        progress=not quick,
        mix=LengthMix().scaled(QUICK_SCALE) if quick else LengthMix(),
    )
    snapshots = result.pop("_snapshots")
    out_dir = Path(args.output_dir)
    from paged_attention.bench.plots import plot_memory

    result["plot"] = plot_memory(result, out_dir / "memory.png").name
    if args.draw and snapshots:
        from paged_attention.visualize import draw_block_pool

        result["pool_picture"] = draw_block_pool(snapshots, out_dir / "memory_pool.png").name
    print_memory(result)
    print(f"wrote {write_json(out_dir, 'memory', result)}")
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("memory", help="KV waste: paging vs Orca-style vs static reservation")
    p.add_argument("--model", default="tiny-2k", help="tiny-2k (default), stories260k, smollm2, or a path")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV pool size (default: room for every request, so nothing is preempted)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--draw", action="store_true", help="also draw the block pool at peak use (memory_pool.png)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="12 requests at a quarter of the lengths, max_model_len 512 (for tests)",
    )
    p.add_argument("--output-dir", default="results")
    add_engine_args(p, only=("block_size", "max_model_len"), defaults={"max_model_len": 2048}, model=False)
    p.set_defaults(func=main)
