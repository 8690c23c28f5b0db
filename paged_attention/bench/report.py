"""Benchmark output: text tables, JSON files under results/, and
`results/REPORT.md` assembled from whatever JSON files are there, with their
plots embedded.

    paged-attention bench report [--output-dir results]

Known results (memory, capacity, block_size, throughput, scaling, experiment)
get a section of their own. For any other NAME.json, a benchmark module
`paged_attention.bench.NAME` that defines `report_section(data) -> str` (and
optionally `REPORT_TITLE`) renders it; otherwise a generic section lists its
scalar figures and its plot. So the report never needs to know every
benchmark in advance.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

SECTION_ORDER = [
    "memory",
    "capacity",
    "block_size",
    "sharing",
    "preemption",
    "throughput",
    "scaling",
    "experiment",
    "all",
]


# ------------------------------------------------------------------ helpers
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """A plain fixed-width text table: the first `left` columns left-aligned
    (labels), the rest right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join(row.rstrip() for row in [line(cells[0]), sep] + [line(r) for r in cells[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "| " + " | ".join("---" for _ in headers) + " |"
    return "\n".join([head, sep] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_json(output_dir: str | Path, name: str, data: dict) -> Path:
    """Write NAME.json, recording (and printing) the machine beside the figures."""
    from paged_attention.bench.monitor import describe, environment

    data.setdefault("environment", environment())
    print(describe(data["environment"]))
    path = Path(output_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def publish(
    result: dict,
    name: str,
    output_dir: str | Path,
    plot: Callable[[dict, Path], Path],
    show: Callable[[dict], None],
) -> dict:
    """How every bench subcommand ends: its plot, its table, its JSON."""
    out_dir = Path(output_dir)
    result["plot"] = plot(result, out_dir / f"{name}.png").name
    show(result)
    print(f"wrote {write_json(out_dir, name, result)}")
    return result


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _monitor_line(data: dict) -> str:
    m = data.get("monitor")
    if not m:
        return ""
    cuda = m.get("cuda")
    gpu = f"; CUDA peak allocated {cuda['peak_allocated_mib']:.0f} MiB" if cuda else "; no CUDA device"
    return (
        f"\n\n*Process memory during the run (sampled every {1000 * m['interval_s']:.0f} ms):* "
        f"RSS {m['rss_start_mib']:.0f} MiB at start, peak {m['rss_peak_mib']:.0f} MiB{gpu}."
    )


def _image(data: dict, key: str, alt: str) -> str:
    return f"\n\n![{alt}]({data[key]})" if data.get(key) else ""


# ------------------------------------------------------------------ sections
def _memory(d: dict) -> str:
    c, s, w, p = d["config"], d["schemes"], d["workload"], d["peak"]
    rows = [
        [
            f"paged (block {c['block_size']})",
            *(_pct(s["paged"][k]) for k in ("waste", "internal_fragmentation", "reservation")),
            f"{p['paged_slots']:,}",
        ],
        [
            "Orca (prompt + max_tokens)",
            *(_pct(s["orca"][k]) for k in ("waste", "internal_fragmentation", "reservation")),
            f"{p['orca_slots']:,}",
        ],
        [
            f"static (max_model_len {c['max_model_len']})",
            *(_pct(s["static"][k]) for k in ("waste", "internal_fragmentation", "reservation")),
            f"{p['static_slots']:,}",
        ],
    ]
    text = (
        f"{w['num_requests']} requests with ShareGPT-like lengths (lognormal, seed {c['seed']}: prompt mean "
        f"{w['prompt_mean']:.0f}, max {w['prompt_max']}; output mean {w['output_mean']:.0f}, max {w['output_max']}), "
        f"run through the engine ({c['model']}, {d['run']['num_steps']} steps). After every step: tokens stored "
        f"(sum of num_computed_tokens), slots the allocator handed out, and what contiguous schemes would "
        f"reserve for the same running set. Waste = 1 - stored / reserved over all steps.\n\n"
        + markdown_table(["scheme", "waste", "internal fragmentation", "reservation", "slots at peak"], rows)
        + f"\n\nAt the peak step, {p['tokens_stored']:,} tokens were stored for {p['num_running']} running requests. "
        "Literature (vLLM paper): contiguous schemes waste 60-80%; paging with block size 16 under 4%. "
        "External fragmentation of contiguous allocators is not modelled (a perfect compacting allocator is "
        "assumed), so their real waste is higher."
    )
    return (
        text
        + _image(d, "plot", "KV slots and waste")
        + _image(d, "pool_picture", "block pool at peak use")
        + _monitor_line(d)
    )


def _capacity(d: dict) -> str:
    rows = [
        [
            f"{r['budget_tokens']:,}",
            r["paged_max_running"],
            f"{r['paged_mean_running']:.1f}",
            r["orca_concurrency"],
            r["static_concurrency"],
            f"{r['paged_max_running'] / max(r['static_concurrency'], 1):.1f}x",
            r["num_preemptions"],
        ]
        for r in d["budgets"]
    ]
    c = d["config"]
    return (
        f"KV budgets in token slots, max_model_len {c['max_model_len']}, block size {c['block_size']}, "
        f"max_num_seqs {c['max_num_seqs']}, {c['num_requests']} ShareGPT-like requests queued at once. "
        "Paged figures are measured in the engine (max and mean running requests while others still wait); "
        "static (budget // max_model_len) and Orca (requests in arrival order whose prompt + max_tokens fit) "
        "are arithmetic.\n\n"
        + markdown_table(
            [
                "budget (tokens)",
                "paged max",
                "paged mean",
                "Orca",
                "static",
                "paged max / static",
                "preemptions",
            ],
            rows,
        )
        + _image(d, "plot", "capacity")
        + _monitor_line(d)
    )


def _block_size(d: dict) -> str:
    rows = [
        [
            r["block_size"],
            _pct(r["waste"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r.get('tokens_per_cpu_s', 0):.0f}",
            f"{r['step_ms']:.2f}",
            f"{r['attention_ms_per_step']:.2f}",
            f"{r['metadata_ms_per_step']:.2f}",
        ]
        for r in d["rows"]
    ]
    c = d["config"]
    return (
        f"The memory workload ({c['num_requests']} requests, {c['model']}) per block size, KV pool of "
        f"{c['pool_tokens']:,} token slots each time. Best block size on the measuring machine (most output tokens per "
        "CPU second; wall-clock throughput also moves with other processes' load): "
        f"**{d['best_block_size']}**; within {d.get('near_best_fraction', 0.1):.0%} of its throughput "
        f"(noise here): {d.get('near_best_block_sizes', [d['best_block_size']])}. Waste grows "
        "about linearly with the block size (half a block per running request).\n\n"
        + markdown_table(
            [
                "block size",
                "waste",
                "tokens/s",
                "tokens/CPU-s",
                "ms/step",
                "attention ms/step",
                "metadata ms/step",
            ],
            rows,
        )
        + _image(d, "plot", "block size sweep")
        + _monitor_line(d)
    )


def _throughput(d: dict) -> str:
    rows = []
    for r in d["runs"]:
        row = [
            r["model"],
            r["dtype"],
            f"{r['engine']['tokens_per_s']:.1f}",
            f"{r['hf_static']['tokens_per_s']:.1f}",
        ]
        cont = r.get("hf_continuous")
        row.append(
            f"{cont['tokens_per_s']:.1f}" if isinstance(cont, dict) and "tokens_per_s" in cont else "-"
        )
        lcpp = r.get("llama_cpp")
        row.append(
            f"{lcpp['tokens_per_s']:.1f}" if isinstance(lcpp, dict) and "tokens_per_s" in lcpp else "-"
        )
        row.append(f"x{r['speedup']:.2f}")
        rows.append(row)
    text = (
        f"{d['workload']['num_requests']} requests (seed {d['workload']['seed']}), greedy, ignore_eos; output "
        "tokens per second.\n\n"
        + markdown_table(
            ["model", "dtype", "engine", "HF static", "HF continuous", "llama.cpp", "engine / HF static"],
            rows,
        )
    )
    if "decode_profile" in d:
        prof = d["decode_profile"]
        text += "\n\nDecode step profile (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in prof.items() if k != "num_seqs"
        )
    if "time_to_first_token_s" in d:
        text += f"\n\nProcess start to first token: {d['time_to_first_token_s']:.2f} s."
    return text + _image(d, "plot", "throughput") + _monitor_line(d)


def _scaling(d: dict) -> str:
    rows = [
        [
            r["concurrency"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['requests_per_s']:.2f}",
            f"{r['ttft_mean_s']:.3f}",
            f"{r['tpot_mean_ms']:.1f}",
            f"{r['latency_p50_s']:.2f}",
            f"{r['latency_p90_s']:.2f}",
        ]
        for r in d["rows"]
    ]
    c = d["config"]
    return (
        f"{c['model']}: c requests (prompt {c['prompt_len']} tokens, output {c['output_len']}) queued together, "
        "for each c; latency from queueing to the last token.\n\n"
        + markdown_table(
            [
                "concurrent",
                "tokens/s",
                "requests/s",
                "TTFT mean (s)",
                "TPOT mean (ms)",
                "latency p50 (s)",
                "latency p90 (s)",
            ],
            rows,
        )
        + _image(d, "plot", "scaling")
        + _monitor_line(d)
    )


def _experiment(d: dict) -> str:
    rows = [
        [p["phase"], f"{p['seconds']:.2f}", f"{p['tokens_per_s']:.1f}", f"{p['rss_peak_mib']:.0f}"]
        for p in d["phases"]
    ]
    return (
        f"{d['num_prompts']} prompts, {d['max_tokens']} new tokens each, greedy, model {d['model']}.\n\n"
        + markdown_table(["phase", "seconds", "tokens/s", "peak RSS (MiB)"], rows)
    )


def _all(d: dict) -> str:
    def status(error: str | None) -> str:
        if not error:
            return "ok"
        first = " ".join(error.split())  # one table cell: no line breaks
        return "FAILED: " + (first[:160] + "..." if len(first) > 160 else first).replace("|", "\\|")

    rows = [
        [
            f"`bench {r['benchmark']} {' '.join(r['argv'])}`",
            status(r["error"]),
            f"{r['elapsed_s']:.1f}",
            f"{r['monitor']['rss_peak_mib']:.0f}",
        ]
        for r in d["runs"]
    ]
    return (
        f"`bench all`{' --quick' if d['quick'] else ''}: {d['total_s'] / 60:.1f} minutes in total. Process "
        "memory sampled in a background thread during each benchmark.\n\n"
        + markdown_table(["command", "status", "seconds", "peak RSS (MiB)"], rows)
    )


def _generic(d: dict) -> str:
    scalars = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) and k != "plot"}
    text = "\n".join(f"- {k}: {v}" for k, v in scalars.items()) or "(no scalar figures)"
    return text + _image(d, "plot", "plot") + _monitor_line(d)


SECTIONS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "memory": ("KV memory waste", _memory),
    "capacity": ("Capacity: concurrent requests per KV budget", _capacity),
    "block_size": ("Block size", _block_size),
    "throughput": ("Throughput against other systems", _throughput),
    "scaling": ("Throughput and latency against concurrency", _scaling),
    "experiment": ("Experiment: transformers vs this engine", _experiment),
    "all": ("Run summary", _all),
}


def section_for(name: str) -> tuple[str, Callable[[dict], str]]:
    """(title, renderer) for results/NAME.json."""
    if name in SECTIONS:
        return SECTIONS[name]
    title = name.replace("_", " ").capitalize()
    if name.isidentifier():
        try:
            module = importlib.import_module(f"paged_attention.bench.{name}")
        except ImportError:
            module = None
        render = getattr(module, "report_section", None)
        if callable(render):
            return getattr(module, "REPORT_TITLE", title), render
    return title, _generic


def build_report(results_dir: str | Path) -> Path:
    """Write results_dir/REPORT.md from the JSON files in results_dir."""
    from paged_attention.bench.plots import plot_throughput

    results_dir = Path(results_dir)
    found = {p.stem: p for p in sorted(results_dir.glob("*.json"))}
    names = [n for n in SECTION_ORDER if n in found] + [n for n in found if n not in SECTION_ORDER]
    parts = [
        "# Benchmark report",
        (
            f"Assembled {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the JSON files in `{results_dir}/` "
            "(each written by `paged-attention bench ...`). Every figure comes from a real run of the engine, "
            "except where a table says *arithmetic*."
        ),
    ]
    env = None
    for name in names:
        data = json.loads(found[name].read_text())
        env = env or data.get("environment")
        if name == "throughput" and "plot" not in data and data.get("runs"):
            data["plot"] = plot_throughput(data, results_dir / "throughput.png").name
        title, render = section_for(name)
        parts.append(f"## {title}\n\n*Source: `{found[name].name}`*\n\n{render(data)}")
    if env:
        parts.append("## Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()))
    if not names:
        parts.append("No results yet: run `paged-attention bench all`.")
    out = results_dir / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    return out


def main(args) -> Path:
    path = build_report(args.output_dir)
    print(f"wrote {path}")
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="assemble results/REPORT.md from the JSON files there")
    p.add_argument("--output-dir", default="results")
    p.set_defaults(func=main)
