"""KV sharing, measured in the engine's allocator.

(a) Parallel sampling (n samples) and beam search (width k) share the prompt's
    blocks by fork + copy-on-write. Each request runs once as one n-sample (or
    k-beam) request, and once as n (k) *independent n=1 requests with the same
    prompt*, with prefix caching off in both runs: then nothing is shared, each
    sequence holds its own copy, which is exactly the "without sharing" memory.
    The figure is the peak of the allocator's used blocks over the run; the
    traced "logical" blocks (table entries summed over sequences: what the
    same schedule would hold unshared) are a second, same-run check.
(b) Prefix sharing: 100 requests share a 500-token system prompt, each with its
    own 100-token question. KV token slots held (used blocks * block_size, and
    the distinct block ids in the tables) with prefix caching on and off, when
    every prompt is resident, and at the peak; plus the time to first token of
    a request whose prefix is cached against one whose prefix is new.
(c) The cost of prefix caching when nothing is shared: tokens/s of n=1
    requests with random prompts, caching on against off, in paired runs on
    the small block-count model (where bookkeeping weighs most: a worst case).

Parallel samples share only the prompt, so their saving in (a) follows the
prompt/output length ratio: the paper's traces have shorter prompts relative to
outputs (ShareGPT: 161 in, 338 out on average) than the 64..512-token prompts
with 128 output tokens used here. Beams also share their common history.

Literature: Kwon et al., SOSP 2023 (vLLM), Sec. 6.3: sharing saves 6.1-9.8%
(Alpaca) to 16.2-30.5% (ShareGPT) of KV memory for parallel sampling and
37.6-55.2% to 44.3-66.3% for beam search. The reference tutorial's prefix
example: 100 x (500 + 100) = 60K tokens without sharing, 500 + 100 x 100 =
10.5K with, 5.7x (arithmetic on token counts; block granularity makes the
measured figure differ).

Until prefix caching is wired into the engine (`LLM(enable_prefix_caching=...)`),
parts (b) and (c) report "prefix caching not available" instead of figures.

    paged-attention bench sharing [--quick] [--model tiny-2k] [--timing-model stories15m]
"""

from __future__ import annotations

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
from paged_attention.bench.report import format_table, publish
from paged_attention.core.request import RequestStatus
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.outputs import RequestOutput
from paged_attention.sampling_params import SamplingParams

LITERATURE = {
    "source": "Kwon et al., SOSP 2023 (vLLM), Sec. 6.3 / Fig. 15",
    "parallel_sampling_saving": [0.061, 0.305],  # Alpaca low end .. ShareGPT high end
    "beam_search_saving": [0.376, 0.663],
    "prefix_tutorial": {"tokens_without": 60_000, "tokens_with": 10_500, "ratio": 60_000 / 10_500},
}
NOT_AVAILABLE = "prefix caching not available: this engine's LLM() has no enable_prefix_caching option yet"


# ------------------------------------------------------------------ helpers
def prefix_caching_available() -> bool:
    """True once the engine takes `LLM(enable_prefix_caching=...)`."""
    from paged_attention.config import engine_option_names

    return "enable_prefix_caching" in engine_option_names()


def caching_kwargs(enabled: bool) -> dict:
    """The engine keyword for prefix caching, or nothing on an engine without it
    (such an engine never shares blocks between requests, i.e. caching is off)."""
    return {"enable_prefix_caching": enabled} if prefix_caching_available() else {}


def resolve_model(name: str) -> str | None:
    """'stories15m' (random stories15M-shaped weights, 1024 positions, built
    once under the temp dir), or anything `bench memory` accepts (tiny-2k,
    stories260k, smollm2, a path)."""
    from paged_attention.bench.memory import resolve_bench_model
    from paged_attention.bench.workload import STORIES15M_CONFIG
    from paged_attention.model.random_model import random_llama_folder

    if name.lower() == "stories15m":
        folder = Path(tempfile.gettempdir()) / "paged_attention_bench" / "stories15m-random"
        return str(random_llama_folder(folder, STORIES15M_CONFIG))
    return resolve_bench_model(name)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # never the special ids 0..2


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Trace:
    """What the allocator held while a set of requests ran (read after every step)."""

    peak_used_blocks: int = 0  # allocator.num_used_blocks: distinct physical blocks
    peak_logical_blocks: int = 0  # sum of table lengths on the device: what nothing shared would hold
    peak_distinct_blocks: int = 0  # distinct ids in those tables (cross-check of the allocator)
    max_resident: int = 0  # most sequences at once with their whole prompt in the pool
    resident_used_blocks: int = 0  # ... and the allocator's used blocks at that (first) step
    resident_logical_blocks: int = 0
    resident_distinct_blocks: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    elapsed_s: float = 0.0
    outputs: list[RequestOutput] = field(default_factory=list)


def traced_run(llm, prompts: list[list[int]], params: list[SamplingParams]) -> Trace:
    """Queue every request, step the engine to the end, and read the block
    tables and the allocator after each step."""
    engine = llm.engine
    preempt0 = engine.scheduler.num_preemptions
    ids = llm.add_requests([{"prompt_token_ids": p} for p in prompts], params)
    done: dict[str, RequestOutput] = {}
    trace = Trace()
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        trace.num_steps += 1
        tables = [
            r.block_table.block_ids
            for r in engine.scheduler.requests()
            if r.status is not RequestStatus.SWAPPED
        ]
        used = engine.allocator.num_used_blocks
        logical = sum(len(t) for t in tables)
        distinct = len({b for t in tables for b in t})
        trace.peak_used_blocks = max(trace.peak_used_blocks, used)
        trace.peak_logical_blocks = max(trace.peak_logical_blocks, logical)
        trace.peak_distinct_blocks = max(trace.peak_distinct_blocks, distinct)
        resident = sum(1 for r in engine.scheduler.running if r.num_computed_tokens >= r.num_prompt_tokens)
        if resident > trace.max_resident:
            trace.max_resident = resident
            trace.resident_used_blocks, trace.resident_logical_blocks = used, logical
            trace.resident_distinct_blocks = distinct
    trace.elapsed_s = time.perf_counter() - start
    trace.num_preemptions = engine.scheduler.num_preemptions - preempt0
    trace.outputs = [done[i] for i in ids]
    return trace


# ------------------------------------------------------- (a) fork sharing
@dataclass(frozen=True)
class ForkRow:
    mode: str  # "parallel" (n samples) or "beam" (beam width)
    width: int
    num_requests: int
    shared_peak_blocks: int  # one request with n samples / k beams each
    unshared_peak_blocks: int  # n (k) independent n=1 requests per prompt
    saving: float  # 1 - shared / unshared
    shared_logical_peak_blocks: int  # same-run check: table entries, shared counted once per holder
    same_run_saving: float  # 1 - used / logical at the shared run's peak
    output_tokens_shared: int
    output_tokens_unshared: int
    num_preemptions: int  # must be 0: a preemption would change what is held
    cached_tokens_unshared: int  # prefix-cache hits in the baseline: must be 0


def fork_sharing(llm, prompts: list[list[int]], output_len: int, mode: str, width: int, seed: int) -> ForkRow:
    if mode == "parallel":
        shared_params = SamplingParams(
            n=width, temperature=1.0, seed=seed, max_tokens=output_len, ignore_eos=True
        )
        # Independent copies: the same prompt, sampled width times with distinct seeds.
        unshared_params = [
            SamplingParams(temperature=1.0, seed=seed + i, max_tokens=output_len, ignore_eos=True)
            for i in range(width)
        ]
    elif mode == "beam":
        shared_params = SamplingParams(n=width, use_beam_search=True, max_tokens=output_len, ignore_eos=True)
        # A beam generates one token a round, so each unshared "beam" is a greedy
        # n=1 sequence of the same prompt and length.
        unshared_params = [SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)] * width
    else:
        raise ValueError(f"mode must be 'parallel' or 'beam', got {mode!r}")
    shared = traced_run(llm, prompts, [shared_params] * len(prompts))
    unshared = traced_run(
        llm, [p for p in prompts for _ in range(width)], [q for _ in prompts for q in unshared_params]
    )

    def tokens(trace) -> int:
        return sum(len(c.token_ids) for o in trace.outputs for c in o.outputs)

    return ForkRow(
        mode=mode,
        width=width,
        num_requests=len(prompts),
        shared_peak_blocks=shared.peak_used_blocks,
        unshared_peak_blocks=unshared.peak_used_blocks,
        saving=1 - shared.peak_used_blocks / unshared.peak_used_blocks,
        shared_logical_peak_blocks=shared.peak_logical_blocks,
        same_run_saving=1 - shared.peak_used_blocks / shared.peak_logical_blocks,
        output_tokens_shared=tokens(shared),
        output_tokens_unshared=tokens(unshared),
        num_preemptions=shared.num_preemptions + unshared.num_preemptions,
        cached_tokens_unshared=sum(o.num_cached_tokens for o in unshared.outputs),
    )


def run_fork_sharing(
    model_path: str | None,
    vocab: int,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: int,
    widths: list[int],
    block_size: int,
    seed: int,
) -> dict:
    from paged_attention.engine.llm import LLM

    rng = random.Random(seed)
    prompts = [random_ids(rng, rng.randint(*prompt_len), vocab) for _ in range(num_requests)]
    max_len = max(len(p) for p in prompts) + output_len
    # Room for every sequence unshared at its final length, so nothing is preempted.
    pool = sum(ceil_div(len(p) + output_len, block_size) for p in prompts) * max(widths) + 8
    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=pool,
        max_model_len=max_len,
        max_num_seqs=num_requests * max(widths),
        seed=seed,
        **caching_kwargs(False),
    )
    rows = [
        fork_sharing(llm, prompts, output_len, mode, w, seed) for mode in ("parallel", "beam") for w in widths
    ]
    lengths = [len(p) for p in prompts]
    return {
        "workload": {
            "num_requests": num_requests,
            "prompt_len_range": list(prompt_len),
            "prompt_len_mean": statistics.fmean(lengths),
            "output_len": output_len,
            "block_size": block_size,
            "pool_blocks": pool,
        },
        "baseline": (
            "the same prompts as n (k) independent n=1 requests, prefix caching "
            + ("off" if prefix_caching_available() else "not in this engine (nothing shared across requests)")
        ),
        "rows": [asdict(r) for r in rows],
    }


# ------------------------------------------------------ (b) prefix sharing
def prefix_run(
    model_path: str | None,
    system: list[int],
    questions: list[list[int]],
    warm_question: list[int],
    output_len: int,
    block_size: int,
    enabled: bool,
    warm: bool,
    seed: int,
) -> dict:
    """All requests at once into a fresh engine; with `warm`, one request with
    the system prompt runs to completion first (the steady state of a server)."""
    from paged_attention.engine.llm import LLM

    n = len(questions)
    total = len(system) + max(len(q) for q in questions) + output_len
    pool = ceil_div(total, block_size) * (n + 1) + 8  # everything unshared fits: no preemption
    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=pool,
        max_model_len=total,
        max_num_seqs=n,
        seed=seed,
        **caching_kwargs(enabled),
    )
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    if warm:
        llm.generate([{"prompt_token_ids": system + warm_question}], params, use_tqdm=False)
    trace = traced_run(llm, [system + q for q in questions], [params] * n)
    stats = llm.memory_stats()
    return {
        "prefix_caching": enabled,
        "warm": warm,
        "peak_used_blocks": trace.peak_used_blocks,
        "peak_tokens_held": trace.peak_used_blocks * block_size,
        "peak_logical_blocks": trace.peak_logical_blocks,
        "max_resident_prompts": trace.max_resident,
        "resident_used_blocks": trace.resident_used_blocks,
        "resident_tokens_held": trace.resident_used_blocks * block_size,
        "resident_distinct_blocks": trace.resident_distinct_blocks,
        "resident_logical_blocks": trace.resident_logical_blocks,
        "num_cached_tokens": sum(o.num_cached_tokens for o in trace.outputs),
        "prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate"),
        "num_preemptions": trace.num_preemptions,
        "num_steps": trace.num_steps,
    }


def time_to_first_token(llm, prompt: list[int]) -> tuple[float, int]:
    """Seconds from queueing a 1-token request to its token, and its cached tokens."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return time.perf_counter() - start, out.num_cached_tokens


def prefix_ttft(
    model_path: str | None,
    vocab: int,
    system_len: int,
    question_len: int,
    repeats: int,
    block_size: int,
    seed: int,
) -> dict:
    """Cached prefix vs a prefix never seen, alternating on one engine (same
    warm state for both): cold gets a fresh random system prompt each time."""
    from paged_attention.engine.llm import LLM

    rng = random.Random(seed + 1)
    system = random_ids(rng, system_len, vocab)
    total = system_len + question_len + 1
    llm = LLM(
        model_path,
        block_size=block_size,
        num_kv_blocks=ceil_div(total, block_size) * (2 * repeats + 4),
        max_model_len=total,
        max_num_seqs=4,
        seed=seed,
        **caching_kwargs(True),
    )
    time_to_first_token(llm, random_ids(rng, total - 1, vocab))  # warm-up: first-call allocations
    time_to_first_token(llm, system + random_ids(rng, question_len, vocab))  # caches the system prompt
    cold, warm, cold_cached, warm_cached = [], [], [], []
    for _ in range(repeats):
        s, c = time_to_first_token(llm, random_ids(rng, system_len + question_len, vocab))
        cold.append(s)
        cold_cached.append(c)
        s, c = time_to_first_token(llm, system + random_ids(rng, question_len, vocab))
        warm.append(s)
        warm_cached.append(c)
    return {
        "repeats": repeats,
        "cold_ttft_s": statistics.median(cold),
        "cached_ttft_s": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm),
        "cold_ttft_all_s": cold,
        "cached_ttft_all_s": warm,
        "cold_num_cached_tokens": cold_cached,
        "cached_num_cached_tokens": warm_cached,
    }


def run_prefix_sharing(
    model_path: str | None,
    vocab: int,
    timing_model: str | None,
    timing_vocab: int,
    num_requests: int,
    system_len: int,
    question_len: int,
    output_len: int,
    ttft_repeats: int,
    block_size: int,
    seed: int,
) -> dict:
    if not prefix_caching_available():
        return {"available": False, "reason": NOT_AVAILABLE}
    rng = random.Random(seed)
    system = random_ids(rng, system_len, vocab)
    questions = [random_ids(rng, question_len, vocab) for _ in range(num_requests)]
    warm_q = random_ids(rng, question_len, vocab)
    runs = [
        prefix_run(model_path, system, questions, warm_q, output_len, block_size, enabled, warm, seed)
        for enabled, warm in ((False, True), (True, True), (True, False))
    ]
    off, on_warm, on_cold = runs
    return {
        "available": True,
        "workload": {
            "num_requests": num_requests,
            "system_prompt_len": system_len,
            "question_len": question_len,
            "output_len": output_len,
            "block_size": block_size,
            "ideal_tokens_without": num_requests * (system_len + question_len),
            "ideal_tokens_with": system_len + num_requests * question_len,
        },
        "runs": runs,
        # Every prompt resident at once: the figure comparable to the tutorial's.
        "resident_ratio": off["resident_tokens_held"] / on_warm["resident_tokens_held"],
        "peak_ratio": off["peak_tokens_held"] / on_warm["peak_tokens_held"],
        "cold_batch_peak_ratio": off["peak_tokens_held"] / on_cold["peak_tokens_held"],
        "ttft": prefix_ttft(
            timing_model, timing_vocab, system_len, question_len, ttft_repeats, block_size, seed
        ),
    }


# ------------------------------------------------------ (c) the overhead
def caching_overhead(
    model_path: str | None,
    vocab: int,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    repeats: int,
    block_size: int,
    seed: int,
) -> dict:
    """Tokens/s with caching on vs off when no prefix is shared. Each repeat is
    a pair of runs of one fresh random workload (a repeated workload would hit
    the cache), on then off or off then on by turns; the overhead is the median
    of the pairs' ratios, so a change in the machine's load between pairs
    (other work shares these cores) cancels out."""
    if not prefix_caching_available():
        return {"available": False, "reason": NOT_AVAILABLE}
    from paged_attention.bench.workload import uniform_workload
    from paged_attention.engine.llm import LLM

    pool = num_requests * ceil_div(prompt_len[1] + output_len[1], block_size) + 8
    max_len = prompt_len[1] + output_len[1]
    engines = {
        name: LLM(
            model_path,
            block_size=block_size,
            num_kv_blocks=pool,
            max_model_len=max_len,
            max_num_seqs=num_requests,
            seed=seed,
            **caching_kwargs(name == "on"),
        )
        for name in ("on", "off")
    }
    for llm in engines.values():  # warm-up: first-call allocations, outside the timer
        llm.generate(
            [{"prompt_token_ids": [5] * prompt_len[0]}] * 2,
            SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
            use_tqdm=False,
        )
    speeds: dict[str, list[float]] = {"on": [], "off": []}
    output_tokens = 0
    for i in range(repeats):
        work = uniform_workload(num_requests, prompt_len, output_len, vocab, seed=seed + 1000 + i)
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in work]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in work]
        expected = sum(r.output_len for r in work)
        output_tokens += expected
        for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
            start = time.perf_counter()
            outs = engines[name].generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == expected, f"caching {name}: {tokens} tokens, expected {expected}"
            speeds[name].append(tokens / elapsed)
    ratios = [on / off for on, off in zip(speeds["on"], speeds["off"])]
    return {
        "available": True,
        "workload": {
            "num_requests": num_requests,
            "prompt_len_range": list(prompt_len),
            "output_len_range": list(output_len),
            "repeats": repeats,
            "output_tokens_per_run_mean": output_tokens / repeats,
        },
        "tokens_per_s_on": statistics.median(speeds["on"]),
        "tokens_per_s_off": statistics.median(speeds["off"]),
        "all_tokens_per_s_on": speeds["on"],
        "all_tokens_per_s_off": speeds["off"],
        "pair_ratios_on_over_off": ratios,
        "overhead": 1 - statistics.median(ratios),  # > 0: caching costs throughput
        # Random prompts share nothing: a hit here would mean the workload was not clean.
        "prefix_cache_hit_rate_on": engines["on"].memory_stats().get("prefix_cache_hit_rate"),
    }


# ---------------------------------------------------------------- report
def print_sharing(result: dict) -> None:
    a = result["fork_sharing"]
    w = a["workload"]
    print(
        f"(a) {w['num_requests']} prompts of {w['prompt_len_range'][0]}..{w['prompt_len_range'][1]} tokens "
        f"(mean {w['prompt_len_mean']:.0f}), {w['output_len']} output tokens, block {w['block_size']}; "
        f"baseline: {a['baseline']}"
    )
    lit = LITERATURE
    print(
        format_table(
            [
                "mode",
                "n / width",
                "peak blocks shared",
                "peak blocks unshared",
                "saving",
                "same-run saving",
                "vLLM paper",
            ],
            [
                [
                    r["mode"],
                    r["width"],
                    r["shared_peak_blocks"],
                    r["unshared_peak_blocks"],
                    f"{r['saving']:.1%}",
                    f"{r['same_run_saving']:.1%}",
                    "{:.0%}-{:.0%}".format(
                        *lit["parallel_sampling_saving" if r["mode"] == "parallel" else "beam_search_saving"]
                    ),
                ]
                for r in a["rows"]
            ],
        )
    )
    b = result["prefix_sharing"]
    if not b["available"]:
        print(f"(b) {b['reason']}")
    else:
        w = b["workload"]
        print(
            f"(b) {w['num_requests']} requests: {w['system_prompt_len']}-token shared system prompt + "
            f"{w['question_len']}-token question, {w['output_len']} output tokens, block {w['block_size']}"
        )
        print(
            format_table(
                [
                    "run",
                    "tokens held (all resident)",
                    "distinct blocks",
                    "table blocks",
                    "peak tokens held",
                    "cached tokens",
                    "hit rate",
                ],
                [
                    [
                        f"caching {'on' if r['prefix_caching'] else 'off'}, {'warm' if r['warm'] else 'cold'} cache",
                        f"{r['resident_tokens_held']:,}",
                        r["resident_distinct_blocks"],
                        r["resident_logical_blocks"],
                        f"{r['peak_tokens_held']:,}",
                        f"{r['num_cached_tokens']:,}",
                        "-" if r["prefix_cache_hit_rate"] is None else f"{r['prefix_cache_hit_rate']:.1%}",
                    ]
                    for r in b["runs"]
                ],
            )
        )
        t = b["ttft"]
        print(
            f"    without / with caching: {b['resident_ratio']:.2f}x (all resident), {b['peak_ratio']:.2f}x (peak), "
            f"{b['cold_batch_peak_ratio']:.2f}x (peak, cache cold when the batch arrives); tutorial "
            f"{w['ideal_tokens_without']:,} vs {w['ideal_tokens_with']:,} tokens "
            f"({w['ideal_tokens_without'] / w['ideal_tokens_with']:.1f}x, arithmetic)"
        )
        print(
            f"    time to first token ({result['config']['timing_model']}): cold prefix "
            f"{1000 * t['cold_ttft_s']:.1f} ms, cached prefix {1000 * t['cached_ttft_s']:.1f} ms "
            f"({t['speedup']:.1f}x, median of {t['repeats']})"
        )
    c = result["overhead"]
    if not c["available"]:
        print(f"(c) {c['reason']}")
    else:
        print(
            f"(c) no shared prefixes, {c['workload']['num_requests']} n=1 random-prompt requests "
            f"({result['config']['model']}, {c['workload']['repeats']} on/off pairs): caching on "
            f"{c['tokens_per_s_on']:.1f} tok/s, off {c['tokens_per_s_off']:.1f} tok/s (medians); overhead "
            f"{c['overhead']:+.1%} (median pair; pairs {', '.join(f'{1 - x:+.1%}' for x in c['pair_ratios_on_over_off'])}); "
            f"hit rate {c['prefix_cache_hit_rate_on']:.1%}"
        )
    print(f"    part times: {', '.join(f'{k} {v:.0f} s' for k, v in result['part_seconds'].items())}")
    print(format_monitor(result["monitor"]))


def report_section(d: dict) -> str:
    """Markdown for results/REPORT.md (register in bench/report.py SECTIONS)."""
    from paged_attention.bench.report import markdown_table

    a, b, c = d["fork_sharing"], d["prefix_sharing"], d["overhead"]
    w = a["workload"]
    lit = d["literature"]
    rows = [
        [
            r["mode"],
            r["width"],
            r["shared_peak_blocks"],
            r["unshared_peak_blocks"],
            f"{r['saving']:.1%}",
            "{:.0%}-{:.0%}".format(
                *lit["parallel_sampling_saving" if r["mode"] == "parallel" else "beam_search_saving"]
            ),
        ]
        for r in a["rows"]
    ]
    text = (
        f"**(a) Parallel sampling and beam search** ({d['config']['model']}): {w['num_requests']} prompts of "
        f"{w['prompt_len_range'][0]}..{w['prompt_len_range'][1]} tokens (mean {w['prompt_len_mean']:.0f}), "
        f"{w['output_len']} output tokens each, block {w['block_size']}. Peak KV blocks used (allocator) with "
        f"sharing vs {a['baseline']}.\n\n"
        + markdown_table(
            ["mode", "n / width", "peak blocks shared", "peak blocks unshared", "saved", "vLLM paper"], rows
        )
        + "\n\nParallel samples share only the prompt, so their saving follows the prompt/output length ratio "
        "(the paper's traces have shorter prompts relative to outputs); beams also share the generated history "
        "they have in common."
    )
    if not b["available"]:
        text += f"\n\n**(b) Prefix sharing:** {b['reason']}."
    else:
        w = b["workload"]
        rows = [
            [
                f"caching {'on' if r['prefix_caching'] else 'off'}, {'warm' if r['warm'] else 'cold'} cache",
                f"{r['resident_tokens_held']:,}",
                r["resident_distinct_blocks"],
                f"{r['peak_tokens_held']:,}",
                f"{r['num_cached_tokens']:,}",
            ]
            for r in b["runs"]
        ]
        t = b["ttft"]
        text += (
            f"\n\n**(b) Prefix sharing:** {w['num_requests']} requests, a shared {w['system_prompt_len']}-token "
            f"system prompt + a {w['question_len']}-token question each, {w['output_len']} output tokens, block "
            f"{w['block_size']}. KV token slots held (used blocks x block size) when every prompt is resident, "
            "and at the peak. *Warm*: one request with the system prompt ran first.\n\n"
            + markdown_table(
                ["run", "tokens held, all resident", "distinct blocks", "peak tokens held", "cached tokens"],
                rows,
            )
            + f"\n\nWithout / with caching: **{b['resident_ratio']:.2f}x** (tutorial: "
            f"{w['ideal_tokens_without']:,} vs {w['ideal_tokens_with']:,} tokens, "
            f"{w['ideal_tokens_without'] / w['ideal_tokens_with']:.1f}x, arithmetic on tokens; whole blocks "
            f"make the measured figure lower). Time to first token ({d['config']['timing_model']}): new prefix "
            f"{1000 * t['cold_ttft_s']:.0f} ms, cached prefix {1000 * t['cached_ttft_s']:.0f} ms "
            f"({t['speedup']:.1f}x, median of {t['repeats']})."
        )
    if c["available"]:
        text += (
            f"\n\n**(c) Overhead** with no shared prefix ({d['config']['model']}, {c['workload']['repeats']} "
            f"paired runs): caching on {c['tokens_per_s_on']:.0f} tok/s, off {c['tokens_per_s_off']:.0f} tok/s; "
            f"overhead {c['overhead']:+.1%} (median of the pairs)."
        )
    return text + (f"\n\n![sharing]({d['plot']})" if d.get("plot") else "")


def plot_sharing(result: dict, path: str | Path) -> Path:
    from paged_attention.bench.plots import _figure, _save

    fig, (fork, prefix, ttft, overhead) = _figure(18, 4.2, ncols=4)
    rows = result["fork_sharing"]["rows"]
    labels = [f"{'n' if r['mode'] == 'parallel' else 'beam'}={r['width']}" for r in rows]
    x = range(len(rows))
    fork.bar(
        [i - 0.2 for i in x],
        [r["unshared_peak_blocks"] for r in rows],
        0.4,
        color="tab:red",
        label="independent copies",
    )
    fork.bar(
        [i + 0.2 for i in x],
        [r["shared_peak_blocks"] for r in rows],
        0.4,
        color="tab:blue",
        label="shared (fork + copy-on-write)",
    )
    for i, r in zip(x, rows):
        fork.text(i, r["unshared_peak_blocks"], f"-{r['saving']:.0%}", ha="center", va="bottom", fontsize=8)
    fork.set_ylim(0, 1.25 * max(r["unshared_peak_blocks"] for r in rows))
    fork.set_xticks(list(x))
    fork.set_xticklabels(labels, fontsize=8)
    fork.set_ylabel("peak KV blocks used")
    fork.set_title("parallel sampling and beam search\n(vLLM paper: 6-30% and 37-66% saved)", fontsize=10)
    fork.legend(fontsize=8, loc="upper left")
    b, c = result["prefix_sharing"], result["overhead"]
    if b["available"]:
        names = [
            f"caching {'on' if r['prefix_caching'] else 'off'}\n{'warm' if r['warm'] else 'cold'} cache"
            for r in b["runs"]
        ]
        prefix.bar(names, [r["resident_tokens_held"] for r in b["runs"]], color="tab:green")
        w = b["workload"]
        prefix.axhline(
            w["ideal_tokens_without"],
            color="tab:red",
            linestyle=":",
            label=f"{w['ideal_tokens_without']:,} tokens without (arithmetic)",
        )
        prefix.axhline(
            w["ideal_tokens_with"],
            color="tab:blue",
            linestyle=":",
            label=f"{w['ideal_tokens_with']:,} tokens with (arithmetic)",
        )
        prefix.set_ylabel("KV token slots held, all prompts resident")
        prefix.set_title(
            f"{w['num_requests']} requests sharing a {w['system_prompt_len']}-token prompt", fontsize=10
        )
        prefix.legend(fontsize=8)
        t = b["ttft"]
        ttft.bar(
            ["new prefix", "cached prefix"],
            [1000 * t["cold_ttft_s"], 1000 * t["cached_ttft_s"]],
            color=["tab:red", "tab:blue"],
        )
        ttft.set_ylabel("ms")
        ttft.set_title(f"time to first token ({t['speedup']:.1f}x)", fontsize=10)
    for ax, ok in ((prefix, b["available"]), (ttft, b["available"]), (overhead, c["available"])):
        if not ok:
            ax.text(
                0.5, 0.5, "prefix caching\nnot available", ha="center", va="center", transform=ax.transAxes
            )
            ax.set_axis_off()
    if c["available"]:
        overhead.bar(
            ["caching off", "caching on"],
            [c["tokens_per_s_off"], c["tokens_per_s_on"]],
            color=["tab:gray", "tab:olive"],
        )
        overhead.set_ylabel("output tokens / s (median run)")
        overhead.set_title(
            f"no shared prefix: caching overhead {c['overhead']:+.1%}\n(median of paired runs)", fontsize=10
        )
    return _save(fig, path)


# ------------------------------------------------------------------ main
def run_sharing(
    model: str = "tiny-2k",
    timing_model: str = "stories15m",
    quick: bool = False,
    block_size: int = 16,
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    from paged_attention.bench.memory import model_vocab_size

    model_path = resolve_model(model)
    timing_path = resolve_model(timing_model)
    vocab, timing_vocab = model_vocab_size(model_path), model_vocab_size(timing_path)
    with torch_threads(threads), MemoryMonitor() as monitor:
        t0 = time.perf_counter()
        fork = run_fork_sharing(
            model_path,
            vocab,
            num_requests=4 if quick else 16,
            prompt_len=(64, 128) if quick else (64, 512),
            output_len=16 if quick else 128,
            widths=[2, 4] if quick else [2, 4, 6],
            block_size=block_size,
            seed=seed,
        )
        t1 = time.perf_counter()
        prefix = run_prefix_sharing(
            model_path,
            vocab,
            timing_path,
            timing_vocab,
            num_requests=10 if quick else 100,
            system_len=100 if quick else 500,
            question_len=20 if quick else 100,
            output_len=4 if quick else 16,
            ttft_repeats=2 if quick else 5,
            block_size=block_size,
            seed=seed,
        )
        # On the small block-count model the engine's own bookkeeping (where the
        # cache's hashing lives) is the largest share of a step: the worst case.
        t2 = time.perf_counter()
        overhead = caching_overhead(
            model_path,
            vocab,
            num_requests=8 if quick else 32,
            prompt_len=(32, 64) if quick else (64, 512),
            output_len=(8, 16) if quick else (16, 64),
            repeats=1 if quick else 7,
            block_size=block_size,
            seed=seed,
        )
        seconds = {"fork_sharing": t1 - t0, "prefix_sharing": t2 - t1, "overhead": time.perf_counter() - t2}
        env = environment()
    return {
        "benchmark": "sharing",
        "config": {
            "model": model,
            "timing_model": timing_model,
            "quick": quick,
            "block_size": block_size,
            "seed": seed,
            "torch_threads": threads,
            "prefix_caching_available": prefix_caching_available(),
        },
        "fork_sharing": fork,
        "prefix_sharing": prefix,
        "overhead": overhead,
        "literature": LITERATURE,
        "part_seconds": seconds,
        "monitor": monitor.summary(),
        "environment": env,
    }


def main(args) -> dict:
    # --quick times on the block-count model too: one tiny model keeps tests fast.
    timing_model = args.timing_model or (args.model if args.quick else "stories15m")
    result = run_sharing(
        model=args.model,
        timing_model=timing_model,
        quick=args.quick,
        block_size=args.block_size,
        seed=args.seed,
        threads=args.threads if args.threads > 0 else None,
    )
    return publish(result, "sharing", args.output_dir, plot_sharing, print_sharing)


def add_parser(sub) -> None:
    p = sub.add_parser("sharing", help="KV saved by sharing: parallel sampling, beam search, prefixes")
    p.add_argument(
        "--model",
        default="tiny-2k",
        help="model for the block counts: tiny-2k (default), stories260k, stories15m, smollm2, or a path",
    )
    p.add_argument(
        "--timing-model",
        default=None,
        help="model for the time to first token (default stories15m; --quick: --model)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)"
    )
    p.add_argument("--quick", action="store_true", help="a few small requests (for tests)")
    p.add_argument("--output-dir", default="results")
    add_engine_args(p, only=("block_size",), model=False)
    p.set_defaults(func=main)
