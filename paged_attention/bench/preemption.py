"""Preemption: swap against recompute, measured.

(a) The cost of preempting and resuming one sequence of L tokens, for L in
    64..4096 and block sizes 8..128, on the engine's own pools:
      * swap: the SwapManager moves a real block table of L tokens to the host
        pool and back; the two `copy_between_pools` calls are timed (and the
        whole move, bookkeeping included);
      * recompute: a real prefill of L fresh tokens (plus its one sampled
        token) through the engine, which is what a recomputed sequence runs
        when it is scheduled again.
    Per block size: which is faster at each length and where that flips (the
    crossover), and whether the engine's auto cost model
    (`PreemptionCostModel.prefers_swap`, with the copy bandwidth measured at
    start-up and the prefill speeds it has learned from the real steps before
    the decision) picks the faster one; and whether it would have with only
    its first step's prefill speed.
(b) A memory-starved run: the KV pool holds 25% of the blocks the workload
    used at its peak in an unconstrained run. Throughput and p50/p99 request
    latency with preemption by swap, recompute and auto; and how much work
    recompute redoes (`num_recomputed_tokens`) with the engine's default victim
    choice (`preemption_victim="lowest_priority_least_computed"`) against
    "newest first" (`"lowest_priority_latest"`, vLLM's order; every request
    here has the same priority). Tokens run through the model come from the
    engine's per-step records (`record_step_stats`).
Prefix caching is off in every engine here (where the engine has the option),
so a recompute really recomputes.

    paged-attention bench preemption [--quick] [--model stories15m-8k]
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from paged_attention.bench.block_size import timed
from paged_attention.bench.monitor import (
    MemoryMonitor,
    environment,
    format_monitor,
    torch_threads,
)
from paged_attention.bench.report import format_table, publish
from paged_attention.bench.sharing import caching_kwargs, ceil_div, random_ids
from paged_attention.bench.workload import STORIES15M_CONFIG
from paged_attention.core.block_table import BlockTable
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.sampling_params import SamplingParams

if TYPE_CHECKING:  # torch loads when the benchmark runs, not when the CLI builds its parser
    import torch

# The stories15M shape (random weights) with 8192 positions: long sequences
# cost real prefill time, and the model stays small enough to sweep to 4096
# tokens on a CPU (the default SmolLM2 took 179 s for one 4096-token prefill here).
STORIES15M_8K_CONFIG = {**STORIES15M_CONFIG, "max_position_embeddings": 8192}
SWAP_SPACE_GIB = 0.5  # host pool: holds 4096 tokens of SmolLM2 bf16 KV (94 MB) several times over


def resolve_model(name: str) -> str | None:
    """'stories15m-8k' (default, built once under the temp dir) or anything
    `bench sharing` accepts."""
    from paged_attention.bench.sharing import resolve_model as resolve_sharing_model
    from paged_attention.model.random_model import random_llama_folder

    if name.lower() == "stories15m-8k":
        folder = Path(tempfile.gettempdir()) / "paged_attention_bench" / "stories15m-8k-random"
        return str(random_llama_folder(folder, STORIES15M_8K_CONFIG))
    return resolve_sharing_model(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# ------------------------------------------------- (a) swap vs recompute
@dataclass(frozen=True)
class PreemptCost:
    length: int
    block_size: int
    num_blocks: int
    bytes_per_block: int
    kv_dtype: str
    swap_out_s: float  # device -> host copy (median)
    swap_in_s: float  # host -> device copy (median)
    swap_s: float  # both copies: what a swapped sequence costs to preempt and resume
    swap_total_s: float  # the whole move, SwapManager bookkeeping included
    recompute_s: float  # prefill of `length` tokens + its sampled token, through the engine (median)
    faster: str  # "swap" or "recompute", measured
    auto_choice: str  # the engine's cost model at the decision
    auto_predicted_swap_s: float
    auto_predicted_recompute_s: float
    auto_correct: bool
    startup_choice: str  # the same model knowing only its first step (the warm-up prefill)
    startup_correct: bool


def time_recompute(llm, length: int, vocab: int, repeats: int, rng: random.Random) -> float:
    """Median seconds to prefill `length` fresh tokens and sample one, stepping the engine."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats):
        llm.add_requests([{"prompt_token_ids": random_ids(rng, length, vocab)}], params)
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync(engine.kv_cache.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_swap(engine, length: int, repeats: int) -> tuple[float, float, float, int]:
    """Median (copy out, copy in, whole round trip) seconds for a real table of
    `length` tokens, and its block count. One untimed round first: it touches
    the host pages, as any long-running engine has."""
    from paged_attention.kv_cache import copy_between_pools

    swapper = engine.scheduler.swapper
    device_pool, host_pool = engine.kv_cache, engine.runner.host_cache
    assert swapper is not None and host_pool is not None, "engine has no swap space"
    table = BlockTable(engine.allocator)
    assert table.append_slots(length) is not None, f"device pool cannot hold {length} tokens"
    num_blocks = len(table.block_ids)
    outs, ins, totals = [], [], []
    try:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            copies = swapper.swap_out(table)
            t1 = time.perf_counter()
            copy_between_pools(device_pool, host_pool, copies)
            _sync(device_pool.device)
            t2 = time.perf_counter()
            back = swapper.swap_in(table)
            t3 = time.perf_counter()
            copy_between_pools(host_pool, device_pool, back)
            _sync(device_pool.device)
            t4 = time.perf_counter()
            # Nothing of a lone table is on the other side already: every block moves.
            assert len(copies) == len(back) == num_blocks, (len(copies), len(back), num_blocks)
            outs.append(t2 - t1)
            ins.append(t4 - t3)
            totals.append(t4 - t0)
    finally:
        table.free()
    return (
        statistics.median(outs[1:]),
        statistics.median(ins[1:]),
        statistics.median(totals[1:]),
        num_blocks,
    )


def sweep_block_size(
    model_path: str | None, vocab: int, block_size: int, lengths: list[int], swap_repeats: int, seed: int
) -> list[PreemptCost]:
    from paged_attention.engine.llm import LLM

    max_len = max(lengths) + 16
    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=2 * ceil_div(max_len, block_size) + 8,
        max_model_len=max_len,
        max_num_seqs=4,
        seed=seed,
        preemption_mode="auto",
        swap_space=SWAP_SPACE_GIB,
        **caching_kwargs(False),
    )
    engine = llm.engine
    assert engine.cost_model is not None and engine.scheduler.swapper is not None
    rng = random.Random(seed)
    time_recompute(llm, 64, vocab, 1, rng)  # warm-up: first-call allocations
    startup_model = dataclasses.replace(engine.cost_model)  # what its first step taught it
    rows = []
    for length in lengths:
        # Decide first, as the scheduler would now: the model knows the prefill
        # speeds of the steps so far, not of the timing run that follows.
        table = BlockTable(engine.allocator)
        table.append_slots(length)
        to_move = engine.scheduler.swapper.blocks_to_swap_out(table)
        table.free()
        cm = engine.cost_model
        auto = "swap" if cm.prefers_swap(to_move, length) else "recompute"
        predicted = (cm.swap_seconds(to_move), cm.recompute_seconds(length))
        startup = "swap" if startup_model.prefers_swap(to_move, length) else "recompute"
        # Long prefills are seconds each: one run is enough there; short ones vary more.
        recompute_s = time_recompute(llm, length, vocab, 3 if length <= 1024 else 1, rng)
        out_s, in_s, total_s, num_blocks = time_swap(engine, length, swap_repeats)
        faster = "swap" if out_s + in_s < recompute_s else "recompute"
        rows.append(
            PreemptCost(
                length=length,
                block_size=block_size,
                num_blocks=num_blocks,
                bytes_per_block=engine.kv_cache.bytes_per_block,
                kv_dtype=str(engine.kv_cache.dtype).removeprefix("torch."),
                swap_out_s=out_s,
                swap_in_s=in_s,
                swap_s=out_s + in_s,
                swap_total_s=total_s,
                recompute_s=recompute_s,
                faster=faster,
                auto_choice=auto,
                auto_predicted_swap_s=predicted[0],
                auto_predicted_recompute_s=predicted[1],
                auto_correct=auto == faster,
                startup_choice=startup,
                startup_correct=startup == faster,
            )
        )
    return rows


def crossovers(rows: list[PreemptCost]) -> list[dict]:
    """Per block size: the lengths between which the faster method changes."""
    out = []
    for bs in sorted({r.block_size for r in rows}):
        series = sorted((r for r in rows if r.block_size == bs), key=lambda r: r.length)
        flips = [
            {"between": [a.length, b.length], "from": a.faster, "to": b.faster}
            for a, b in itertools.pairwise(series)
            if a.faster != b.faster
        ]
        winners = {r.faster for r in series}
        out.append(
            {
                "block_size": bs,
                "flips": flips,
                "summary": (
                    f"{winners.pop()} faster at every length measured"
                    if len(winners) == 1
                    else "; ".join(
                        f"{f['from']} -> {f['to']} between {f['between'][0]} and {f['between'][1]} tokens"
                        for f in flips
                    )
                ),
            }
        )
    return out


# --------------------------------------------------- (b) a starved pool
@dataclass(frozen=True)
class StarvedRun:
    label: str
    preemption_mode: str
    victim: str  # the engine's preemption_victim option
    num_kv_blocks: int
    elapsed_s: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    num_preemptions: int
    num_swapped_out: int
    num_recomputed_tokens: int  # computed tokens thrown away by recompute preemptions
    model_tokens: int  # tokens run through the model: prompts + outputs + what recompute redid
    swap_copy_s: float  # time in the swap copies (copy_between_pools) during the run
    peak_used_blocks: int
    num_steps: int


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def starved_run(
    model_path: str | None,
    workload,
    label: str,
    mode: str,
    num_kv_blocks: int,
    block_size: int,
    victim: str = "lowest_priority_least_computed",
    seed: int = 0,
) -> StarvedRun:
    from paged_attention.engine import model_runner
    from paged_attention.engine.llm import LLM

    max_len = max(len(r.prompt_token_ids) + r.output_len for r in workload)
    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        max_model_len=max_len,
        max_num_seqs=len(workload),
        seed=seed,
        preemption_mode=mode,
        swap_space=SWAP_SPACE_GIB,
        preemption_victim=victim,
        record_step_stats=True,
        **caching_kwargs(False),
    )
    engine = llm.engine
    llm.generate(
        [{"prompt_token_ids": workload[0].prompt_token_ids[:16]}],  # warm-up, outside the timer
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
        use_tqdm=False,
    )
    s0 = engine.scheduler
    base = (s0.num_preemptions, s0.num_swapped_out, s0.num_recomputed_tokens)
    assert engine.step_stats is not None
    first_step = len(engine.step_stats)
    ids = llm.add_requests(
        [{"prompt_token_ids": r.prompt_token_ids} for r in workload],
        [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload],
    )
    finish: dict[str, float] = {}
    tokens = 0
    copy_time: dict[str, float] = {}
    start = time.perf_counter()
    with timed(model_runner, "copy_between_pools", copy_time, "swap"):
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finish[out.request_id] = time.perf_counter() - start  # all were queued at start
                    tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    assert sorted(finish) == sorted(ids), "a request did not finish"
    assert tokens == sum(r.output_len for r in workload), "wrong number of output tokens"
    latencies = list(finish.values())
    steps = engine.step_stats[first_step:]
    s = engine.scheduler
    return StarvedRun(
        label=label,
        preemption_mode=mode,
        victim=victim,
        num_kv_blocks=num_kv_blocks,
        elapsed_s=elapsed,
        output_tokens=tokens,
        tokens_per_s=tokens / elapsed,
        latency_p50_s=percentile(latencies, 0.5),
        latency_p99_s=percentile(latencies, 0.99),
        num_preemptions=s.num_preemptions - base[0],
        num_swapped_out=s.num_swapped_out - base[1],
        num_recomputed_tokens=s.num_recomputed_tokens - base[2],
        model_tokens=sum(step.num_tokens for step in steps),
        swap_copy_s=copy_time.get("swap", 0.0),
        peak_used_blocks=engine.stats.peak_used_blocks,
        num_steps=len(steps),
    )


STARVED_CONFIGS = (  # label, preemption mode, victim choice (the engine's preemption_victim)
    ("swap", "swap", "lowest_priority_least_computed"),
    ("recompute", "recompute", "lowest_priority_least_computed"),
    ("auto", "auto", "lowest_priority_least_computed"),
    ("recompute, newest first", "recompute", "lowest_priority_latest"),
)


def run_starved(
    model_path: str | None,
    vocab: int,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    block_size: int,
    fraction: float,
    seed: int,
    repeats: int = 1,
) -> dict:
    """Every configuration `repeats` times, round-robin (other work shares these
    cores, so one run can be slowed by a neighbour); each row is that
    configuration's median run by throughput, a real run with all its figures."""
    from paged_attention.bench.workload import uniform_workload

    workload = uniform_workload(num_requests, prompt_len, output_len, vocab, seed=seed)
    roomy = sum(ceil_div(len(r.prompt_token_ids) + r.output_len, block_size) for r in workload) + 8
    free = starved_run(model_path, workload, "unconstrained", "auto", roomy, block_size, seed=seed)
    assert free.num_preemptions == 0, "the unconstrained run preempted: its pool is too small"
    longest = max(ceil_div(len(r.prompt_token_ids) + r.output_len, block_size) for r in workload)
    # What the workload needs is what it used at its peak with room to spare.
    starved = max(ceil_div(int(free.peak_used_blocks * fraction * block_size), block_size), longest + 1)
    all_runs: dict[str, list[StarvedRun]] = {"unconstrained": [free]}
    for i in range(repeats):
        if i > 0:
            all_runs["unconstrained"].append(
                starved_run(model_path, workload, "unconstrained", "auto", roomy, block_size, seed=seed)
            )
        for label, mode, victim in STARVED_CONFIGS:
            all_runs.setdefault(label, []).append(
                starved_run(model_path, workload, label, mode, starved, block_size, victim, seed)
            )
    median_run = {
        label: sorted(runs, key=lambda r: r.tokens_per_s)[(len(runs) - 1) // 2]
        for label, runs in all_runs.items()
    }
    ours, newest = median_run["recompute"], median_run["recompute, newest first"]
    return {
        "workload": {
            "num_requests": num_requests,
            "prompt_len_range": list(prompt_len),
            "output_len_range": list(output_len),
            "block_size": block_size,
            "output_tokens": sum(r.output_len for r in workload),
        },
        "needed_blocks": free.peak_used_blocks,
        "pool_fraction": fraction,
        "starved_blocks": starved,
        "repeats": repeats,
        "runs": [asdict(r) for r in median_run.values()],
        "all_runs": {label: [asdict(r) for r in runs] for label, runs in all_runs.items()},
        "recomputed_tokens_ours": ours.num_recomputed_tokens,
        "recomputed_tokens_newest_first": newest.num_recomputed_tokens,
        # > 1: newest-first throws away more work than our choice.
        "recompute_work_ratio": (
            newest.num_recomputed_tokens / ours.num_recomputed_tokens if ours.num_recomputed_tokens else None
        ),
    }


# ---------------------------------------------------------------- report
def print_preemption(result: dict) -> None:
    cfg = result["config"]
    print(
        f"(a) preempt + resume one sequence ({cfg['model']}, {result['swap_vs_recompute']['dtype']}; "
        "swap = copy out + copy in, recompute = prefill through the engine)"
    )
    print(
        format_table(
            [
                "block",
                "tokens",
                "blocks",
                "swap ms",
                "swap+bookkeeping ms",
                "recompute ms",
                "faster",
                "auto picks",
                "auto right",
                "auto predicted swap/recompute ms",
            ],
            [
                [
                    r["block_size"],
                    r["length"],
                    r["num_blocks"],
                    f"{1000 * r['swap_s']:.2f}",
                    f"{1000 * r['swap_total_s']:.2f}",
                    f"{1000 * r['recompute_s']:.1f}",
                    r["faster"],
                    r["auto_choice"],
                    "yes" if r["auto_correct"] else "NO",
                    f"{1000 * r['auto_predicted_swap_s']:.2f} / {1000 * r['auto_predicted_recompute_s']:.1f}",
                ]
                for r in result["swap_vs_recompute"]["rows"]
            ],
        )
    )
    for c in result["swap_vs_recompute"]["crossovers"]:
        print(f"    block {c['block_size']}: {c['summary']}")
    a = result["swap_vs_recompute"]
    print(
        f"    auto picked the faster one in {a['auto_correct']}/{len(a['rows'])} cases "
        f"(knowing only its first step: {a['startup_correct']}/{len(a['rows'])})"
    )
    print(
        "    recompute measured / cost-model prediction, median over block sizes: "
        + ", ".join(f"{n} tok {x:.1f}x" for n, x in a["recompute_measured_over_predicted"].items())
    )
    b = result["starved"]
    w = b["workload"]
    print(
        f"(b) {w['num_requests']} requests (prompt {w['prompt_len_range'][0]}..{w['prompt_len_range'][1]}, "
        f"output {w['output_len_range'][0]}..{w['output_len_range'][1]}); unconstrained peak "
        f"{b['needed_blocks']} blocks, starved pool {b['starved_blocks']} blocks ({b['pool_fraction']:.0%}); "
        f"each row the median run by throughput of {b['repeats']}"
    )
    print(
        format_table(
            [
                "run",
                "pool blocks",
                "tokens/s",
                "p50 latency s",
                "p99 latency s",
                "preemptions",
                "swapped out",
                "recomputed tokens",
                "model tokens",
                "swap copy s",
            ],
            [
                [
                    r["label"],
                    r["num_kv_blocks"],
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['latency_p50_s']:.2f}",
                    f"{r['latency_p99_s']:.2f}",
                    r["num_preemptions"],
                    r["num_swapped_out"],
                    f"{r['num_recomputed_tokens']:,}",
                    f"{r['model_tokens']:,}",
                    f"{r['swap_copy_s']:.3f}",
                ]
                for r in b["runs"]
            ],
        )
    )
    speeds = {
        label: ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs) for label, runs in b["all_runs"].items()
    }
    print("    tokens/s of every run: " + "; ".join(f"{label} {v}" for label, v in speeds.items()))
    ratio = b["recompute_work_ratio"]
    print(
        f"    recompute redoes {b['recomputed_tokens_ours']:,} tokens with our victim choice, "
        f"{b['recomputed_tokens_newest_first']:,} with newest first"
        + (f" ({ratio:.2f}x)" if ratio is not None else "")
    )
    print(f"    part times: {', '.join(f'{k} {v:.0f} s' for k, v in result['part_seconds'].items())}")
    print(format_monitor(result["monitor"]))


def report_section(d: dict) -> str:
    """Markdown for results/REPORT.md (register in bench/report.py SECTIONS)."""
    from paged_attention.bench.report import markdown_table

    a, b = d["swap_vs_recompute"], d["starved"]
    rows = [
        [
            r["block_size"],
            r["length"],
            f"{1000 * r['swap_s']:.2f}",
            f"{1000 * r['recompute_s']:.1f}",
            r["faster"],
            r["auto_choice"],
            "yes" if r["auto_correct"] else "**no**",
        ]
        for r in a["rows"]
    ]
    text = (
        f"**(a) Swap vs recompute** ({d['config']['model']}, KV {a['dtype']}): preempting and resuming one "
        "sequence. Swap = the two `copy_between_pools` calls of a real swap-out and swap-in of its block "
        "table; recompute = a real prefill of that many tokens through the engine. *Auto* is the engine's "
        "cost model at the moment of decision.\n\n"
        + markdown_table(
            ["block", "tokens", "swap ms", "recompute ms", "faster", "auto picks", "auto right"], rows
        )
        + "\n\n"
        + "\n".join(f"- block {c['block_size']}: {c['summary']}" for c in a["crossovers"])
        + f"\n\nAuto picked the faster one in {a['auto_correct']}/{len(a['rows'])} cases. Measured recompute "
        "time over the cost model's prediction (it prices a prefill linearly in tokens), median over block "
        "sizes: "
        + ", ".join(f"{n} tokens {x:.1f}x" for n, x in a["recompute_measured_over_predicted"].items())
        + "."
    )
    w = b["workload"]
    rows = [
        [
            r["label"],
            r["num_kv_blocks"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['latency_p50_s']:.2f}",
            f"{r['latency_p99_s']:.2f}",
            r["num_preemptions"],
            r["num_swapped_out"],
            f"{r['num_recomputed_tokens']:,}",
            f"{r['model_tokens']:,}",
            f"{r['swap_copy_s']:.3f}",
        ]
        for r in b["runs"]
    ]
    text += (
        f"\n\n**(b) Memory-starved run:** {w['num_requests']} requests (prompt {w['prompt_len_range'][0]}.."
        f"{w['prompt_len_range'][1]}, output {w['output_len_range'][0]}..{w['output_len_range'][1]} tokens), KV "
        f"pool {b['starved_blocks']} blocks = {b['pool_fraction']:.0%} of the {b['needed_blocks']} the "
        "unconstrained run used at its peak. Latency from queueing (all at once) to the last token. Each "
        f"row is the median run (by throughput) of {b['repeats']}, run round-robin.\n\n"
        + markdown_table(
            [
                "run",
                "pool blocks",
                "tokens/s",
                "p50 latency (s)",
                "p99 latency (s)",
                "preemptions",
                "swapped out",
                "recomputed tokens",
                "model tokens",
                "swap copy (s)",
            ],
            rows,
        )
        + f"\n\nRecompute redid {b['recomputed_tokens_ours']:,} tokens with the engine's victim choice "
        f"(lowest priority, then least computed) and {b['recomputed_tokens_newest_first']:,} with newest first."
    )
    return text + (f"\n\n![preemption]({d['plot']})" if d.get("plot") else "")


def plot_preemption(result: dict, path: str | Path) -> Path:
    from paged_attention.bench.plots import _figure, _save

    fig, (cost, tput, lat, redo) = _figure(19, 4.2, ncols=4)
    rows = result["swap_vs_recompute"]["rows"]
    sizes = sorted({r["block_size"] for r in rows})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    for bs, colour in zip(sizes, colours):
        series = sorted((r for r in rows if r["block_size"] == bs), key=lambda r: r["length"])
        x = [r["length"] for r in series]
        cost.plot(x, [1000 * r["swap_s"] for r in series], "o-", color=colour, label=f"swap, block {bs}")
        cost.plot(
            x,
            [1000 * r["recompute_s"] for r in series],
            "s--",
            color=colour,
            alpha=0.6,
            label=f"recompute, block {bs}",
        )
        wrong = [r for r in series if not r["auto_correct"]]
        if wrong:
            cost.scatter(
                [r["length"] for r in wrong],
                [1000 * min(r["swap_s"], r["recompute_s"]) for r in wrong],
                marker="x",
                s=60,
                color="black",
                zorder=5,
            )
    cost.set_xscale("log", base=2)
    cost.set_yscale("log")
    cost.set_xlabel("sequence length (tokens)")
    cost.set_ylabel("ms to preempt and resume")
    cost.set_title("swap (solid) vs recompute (dashed); x: auto chose wrong")
    cost.legend(fontsize=6, ncol=2)
    runs = result["starved"]["runs"]
    labels = [r["label"].replace(", ", ",\n") for r in runs]
    tput.bar(labels, [r["tokens_per_s"] for r in runs], color="tab:blue")
    tput.set_ylabel("output tokens / s")
    tput.set_title(f"KV pool at {result['starved']['pool_fraction']:.0%} of need")
    tput.tick_params(axis="x", labelsize=7)
    x = range(len(runs))
    lat.bar([i - 0.2 for i in x], [r["latency_p50_s"] for r in runs], 0.4, color="tab:green", label="p50")
    lat.bar([i + 0.2 for i in x], [r["latency_p99_s"] for r in runs], 0.4, color="tab:red", label="p99")
    lat.set_xticks(list(x))
    lat.set_xticklabels(labels, fontsize=7)
    lat.set_ylabel("request latency (s)")
    lat.set_title("latency")
    lat.legend(fontsize=8)
    b = result["starved"]
    redo.bar(
        ["ours\n(least computed)", "newest first"],
        [b["recomputed_tokens_ours"], b["recomputed_tokens_newest_first"]],
        color=["tab:blue", "tab:gray"],
    )
    redo.set_ylabel("tokens recomputed")
    redo.set_title("work redone by recompute, per victim choice")
    return _save(fig, path)


# ------------------------------------------------------------------ main
def run_preemption(
    model: str = "stories15m-8k",
    quick: bool = False,
    lengths: list[int] | None = None,
    block_sizes: list[int] | None = None,
    block_size: int = 16,
    num_requests: int = 24,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    from paged_attention.bench.memory import model_vocab_size

    model_path = resolve_model(model)
    vocab = model_vocab_size(model_path)
    lengths = lengths or ([64, 256] if quick else [64, 128, 256, 512, 1024, 2048, 4096])
    block_sizes = block_sizes or ([16, 64] if quick else [8, 16, 32, 64, 128])
    seconds: dict[str, float] = {}
    with torch_threads(threads), MemoryMonitor() as monitor:
        t0 = time.perf_counter()
        rows = [
            row
            for bs in block_sizes
            for row in sweep_block_size(model_path, vocab, bs, lengths, 2 if quick else 3, seed)
        ]
        t1 = time.perf_counter()
        starved = run_starved(
            model_path,
            vocab,
            num_requests=6 if quick else num_requests,
            prompt_len=(32, 64) if quick else (64, 512),
            output_len=(8, 16) if quick else (32, 96),
            block_size=block_size,
            fraction=0.25,
            seed=seed,
            repeats=1 if quick else repeats,
        )
        seconds = {"swap_vs_recompute": t1 - t0, "starved": time.perf_counter() - t1}
        env = environment()
    return {
        "benchmark": "preemption",
        "config": {
            "model": model,
            "quick": quick,
            "lengths": lengths,
            "block_sizes": block_sizes,
            "starved_block_size": block_size,
            "seed": seed,
            "torch_threads": threads,
            "prefix_caching": "off",
        },
        "swap_vs_recompute": {
            "dtype": rows[0].kv_dtype,
            "rows": [asdict(r) for r in rows],
            "crossovers": crossovers(rows),
            "auto_correct": sum(r.auto_correct for r in rows),
            "startup_correct": sum(r.startup_correct for r in rows),
            # The model prices a prefill linearly in tokens; attention makes long
            # ones cost more per token. Measured / predicted at each length:
            "recompute_measured_over_predicted": {
                length: statistics.median(
                    r.recompute_s / r.auto_predicted_recompute_s for r in rows if r.length == length
                )
                for length in lengths
            },
        },
        "starved": starved,
        "part_seconds": seconds,
        "monitor": monitor.summary(),
        "environment": env,
    }


def _ints(text: str | None) -> list[int] | None:
    """'64,256' -> [64, 256]; None or '' -> None (the default)."""
    return [int(x) for x in text.split(",")] if text else None


def main(args) -> dict:
    result = run_preemption(
        model=args.model,
        quick=args.quick,
        lengths=_ints(args.lengths),
        block_sizes=_ints(args.block_sizes),
        block_size=args.block_size,
        num_requests=args.num_requests,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads if args.threads > 0 else None,
    )
    return publish(result, "preemption", args.output_dir, plot_preemption, print_preemption)


def add_parser(sub) -> None:
    p = sub.add_parser("preemption", help="swap vs recompute: cost per sequence, and a memory-starved run")
    p.add_argument(
        "--model",
        default="stories15m-8k",
        help="stories15m-8k (default: random weights, 8192 positions), smollm2, tiny-2k, or a path",
    )
    p.add_argument(
        "--lengths", default=None, help="comma list of sequence lengths (default 64..4096, doubling)"
    )
    p.add_argument("--block-sizes", default=None, help="comma list (default 8,16,32,64,128)")
    p.add_argument("--num-requests", type=int, default=24, help="requests in the starved run")
    p.add_argument(
        "--repeats", type=int, default=3, help="runs per configuration of the starved run (median kept)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)"
    )
    p.add_argument(
        "--quick", action="store_true", help="2 lengths x 2 block sizes, 6 small requests (for tests)"
    )
    p.add_argument("--output-dir", default="results")
    add_engine_args(p, only=("block_size",), model=False)  # the starved run's
    p.set_defaults(func=main)
