"""PNG plots of benchmark results (matplotlib, Agg canvas).

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never
pyplot, so nothing here touches process-wide backend state and it runs without
a display. Each function takes the benchmark's result dict and a path, and
returns the path it wrote.
"""

from __future__ import annotations

from pathlib import Path


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_memory(result: dict, path: str | Path) -> Path:
    """KV slots over the run per scheme (left) and waste per scheme (right)."""
    fig, (ax, bar) = _figure(11, 4, ncols=2)
    steps = [r["step"] for r in result["timeline"]]
    cfg = result["config"]
    series = [
        ("slots_static", f"static (max_model_len {cfg['max_model_len']})", "tab:red"),
        ("slots_orca", "Orca (prompt + max_tokens)", "tab:orange"),
        ("slots_allocated", f"paged (block {cfg['block_size']})", "tab:blue"),
        ("tokens_stored", "tokens stored", "black"),
    ]
    for key, label, colour in series:
        ax.plot(
            steps,
            [r[key] for r in result["timeline"]],
            label=label,
            color=colour,
            linestyle="--" if key == "tokens_stored" else "-",
        )
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV token slots")
    ax.set_title("KV slots held by the running requests")
    ax.legend(fontsize=8)
    schemes = result["schemes"]
    names = ["paged", "orca", "static"]
    internal = [schemes[n]["internal_fragmentation"] for n in names]
    reservation = [schemes[n]["reservation"] for n in names]
    bar.bar(names, internal, color="tab:gray", label="internal fragmentation")
    bar.bar(names, reservation, bottom=internal, color="tab:olive", label="reservation (future tokens)")
    for i, n in enumerate(names):
        bar.text(i, schemes[n]["waste"] + 0.01, f"{schemes[n]['waste']:.1%}", ha="center", fontsize=9)
    lo, hi = result["literature"]["contiguous_waste"]
    bar.axhspan(lo, hi, color="tab:red", alpha=0.08, label="literature: contiguous 60-80%")
    bar.axhline(
        result["literature"]["paged_waste_below"],
        color="tab:blue",
        linestyle=":",
        label="literature: paged < 4%",
    )
    bar.set_ylim(0, 1)
    bar.set_ylabel("share of reserved slot-steps unused")
    bar.set_title("KV waste")
    bar.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_capacity(result: dict, path: str | Path) -> Path:
    fig, (ax,) = _figure(7, 4)
    rows = result["budgets"]
    x = [r["budget_tokens"] for r in rows]
    ax.plot(
        x,
        [r["paged_max_running"] for r in rows],
        "o-",
        color="tab:blue",
        label="paged: max running (measured)",
    )
    ax.plot(
        x,
        [r["paged_mean_running"] for r in rows],
        "o--",
        color="tab:blue",
        alpha=0.6,
        label="paged: mean running while requests wait (measured)",
    )
    ax.plot(
        x,
        [r["orca_concurrency"] for r in rows],
        "s-",
        color="tab:orange",
        label="Orca: prompt + max_tokens (arithmetic)",
    )
    ax.plot(
        x,
        [r["static_concurrency"] for r in rows],
        "^-",
        color="tab:red",
        label="static: max_model_len (arithmetic)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (token slots)")
    ax.set_ylabel("concurrent requests")
    ax.set_title("Requests that fit in a KV budget")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_block_size(result: dict, path: str | Path) -> Path:
    fig, (waste, speed, attn) = _figure(13, 3.8, ncols=3)
    rows = result["rows"]
    x = [r["block_size"] for r in rows]
    waste.plot(x, [r["waste"] for r in rows], "o-", color="tab:gray")
    waste.set_title("KV waste (internal fragmentation)")
    waste.set_ylabel("share of allocated slot-steps unused")
    speed.plot(x, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue", label="per wall second")
    if all("tokens_per_cpu_s" in r for r in rows):
        speed.plot(
            x, [r["tokens_per_cpu_s"] for r in rows], "s--", color="tab:purple", label="per CPU second"
        )
    speed.set_title("throughput")
    speed.set_ylabel("output tokens / s")
    speed.legend(fontsize=8)
    attn.plot(x, [r["attention_ms_per_step"] for r in rows], "o-", color="tab:green", label="attention")
    attn.plot(x, [r["step_ms"] for r in rows], "o--", color="black", alpha=0.6, label="whole step")
    attn.set_title("time per engine step")
    attn.set_ylabel("ms")
    attn.legend(fontsize=8)
    for ax in (waste, speed, attn):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens)")
    best = result.get("best_block_size")
    if best is not None:
        speed.axvline(best, color="tab:blue", linestyle=":", alpha=0.6)
    return _save(fig, path)


def plot_scaling(result: dict, path: str | Path) -> Path:
    fig, (tput, lat) = _figure(11, 4, ncols=2)
    rows = result["rows"]
    x = [r["concurrency"] for r in rows]
    tput.plot(x, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue")
    tput.set_ylabel("output tokens / s")
    tput.set_title("throughput")
    lat.plot(x, [r["latency_p50_s"] for r in rows], "o-", color="tab:red", label="end-to-end p50")
    lat.plot(x, [r["latency_p90_s"] for r in rows], "o--", color="tab:red", alpha=0.6, label="end-to-end p90")
    lat.plot(x, [r["ttft_mean_s"] for r in rows], "s-", color="tab:green", label="time to first token (mean)")
    lat.set_ylabel("seconds")
    lat.set_title("latency per request")
    lat.legend(fontsize=8)
    for ax in (tput, lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
    return _save(fig, path)


def plot_throughput(result: dict, path: str | Path) -> Path:
    """Bars per (model, dtype): this engine and every baseline in the run."""
    fig, (ax,) = _figure(9, 4)
    runs = result["runs"]
    systems = [
        k
        for k in ("engine", "hf_static", "hf_continuous", "llama_cpp")
        if any(isinstance(r.get(k), dict) and "tokens_per_s" in r[k] for r in runs)
    ]
    width = 0.8 / max(len(systems), 1)
    for j, system in enumerate(systems):
        values = [
            r[system]["tokens_per_s"]
            if isinstance(r.get(system), dict) and "tokens_per_s" in r[system]
            else 0.0
            for r in runs
        ]
        ax.bar([i + j * width for i in range(len(runs))], values, width, label=system)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(runs))])
    ax.set_xticklabels([f"{r['model']}\n{r['dtype']}" for r in runs], fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput: this engine vs baselines")
    ax.legend(fontsize=8)
    return _save(fig, path)
