"""`bench serve --peer llama-server`: this engine's server and llama.cpp's
llama-server, measured one after the other (never at once: each alone on the
machine) on the same GGUF file, the same requests (token ids), the same
thread count, and optionally pinned to the same single core.

For every run point, each server is started afresh: ours as `paged-attention
serve --model GGUF` with OMP_NUM_THREADS=N; llama-server with -t N -tb N,
-np equal to the concurrency (the number of requests when unbounded) and
-c = np x max(768, longest prompt + output), so every slot holds any request.
Its resident memory is read idle (started, before any request), at peak
(sampled every 0.1 s) and after the run. Then llama-bench, when present,
records llama.cpp's one-user figures (pp128 and tg128 at 1 and N threads).
Writes results/serve_peer[_TAG].json and .png and prints one table.

When llama-server is not found, says where it looked and how to build it,
and still measures our side.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path

from paged_attention.bench.serve import (
    TABLE_HEADERS,
    LoadPoint,
    config_record,
    load_points,
    measure_point,
    placement,
    plot,
    print_run,
    table_row,
    workload_record,
    workloads,
    write_results,
)
from paged_attention.bench.serve_client import served_model
from paged_attention.bench.serve_llama_cpp import (
    NO_REPACK,
    absent_message,
    binary_version,
    default_search_dirs,
    find_llama_binary,
    library_env,
    llama_server_command,
    run_llama_bench,
    slot_context,
    working_flags,
)
from paged_attention.bench.serve_process import (
    Placement,
    client_off_core,
    free_port,
    our_server_command,
    server_process,
)

OURS = "paged-attention"
LLAMA = "llama-server"
REPORT_TITLE = "Serving against llama.cpp's llama-server"

# A server's command line for a port and a run point.
CommandFor = Callable[[int, LoadPoint], list[str]]


def resolve_gguf(model: str | None) -> Path:
    if model is None:
        from paged_attention.model.gguf.default_model import default_gguf_path

        return default_gguf_path()
    return Path(model)


def llama_parallel(point: LoadPoint, num_requests: int) -> int:
    """-np: the concurrency, or every request when there is no cap."""
    return point.concurrency or num_requests


def run_system(
    name: str,
    command_for: CommandFor,
    env: dict[str, str],
    point: LoadPoint,
    workload,
    warmup,
    args: argparse.Namespace,
) -> dict:
    """Start `name`'s server alone, measure `point`, stop it."""
    port = free_port()
    command = command_for(port, point)
    with server_process(command, port, env) as server:
        idle = server.rss_mib()
        model = served_model(server.url).name
        summary = measure_point(server.url, model, workload, warmup, point, args, server)
    summary["server_rss_mib"]["idle"] = idle
    summary["system"] = name
    summary["command"] = command
    print_run(f"{name:>15} {point.label()}", summary)
    return summary


def compare(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Per run point both systems completed: ours / llama-server."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    rows = []
    for a in ours:
        b = next(
            (
                r
                for r in theirs
                if (r["concurrency"], r["request_rate"]) == (a["concurrency"], a["request_rate"])
            ),
            None,
        )
        if b is None:
            continue
        rows.append(
            {
                "concurrency": a["concurrency"],
                "request_rate": a["request_rate"],
                "output_tokens_per_s": {OURS: a["output_tokens_per_s"], LLAMA: b["output_tokens_per_s"]},
                "throughput_ratio": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                "tpot_p50_ratio": ratio(a["tpot_s"]["p50"], b["tpot_s"]["p50"]),
                "ttft_p50_ratio": ratio(a["ttft_s"]["p50"], b["ttft_s"]["p50"]),
                "rss_after_ratio": ratio(a["server_rss_mib"]["after"], b["server_rss_mib"]["after"]),
            }
        )
    return rows


def main(args: argparse.Namespace) -> dict:
    from paged_attention.bench.report import format_table
    from paged_attention.bench.serve import _serve_args
    from paged_attention.bench.workload import model_token_pool

    if args.url:
        raise ValueError("--peer starts both servers itself: drop --url")
    if args.baseline:
        raise ValueError("--baseline is for a single server: drop it with --peer")
    # Without --model, ours loads the default GGUF (with the config and tokenizer
    # shipped beside the package), the very file llama-server gets.
    gguf = resolve_gguf(args.model)
    where: Placement = placement(args)
    points = load_points(args)
    pool = model_token_pool(gguf)
    workload, warmup = workloads(args, pool)
    record = workload_record(workload, args, len(pool))
    per_slot = slot_context(record["max_prompt_tokens"], record["max_output_tokens"])

    ours_argv = _serve_args(args)
    systems: dict[str, dict] = {
        OURS: {"available": True, "threads_env": where.thread_env(), "runs": [], "failures": []},
        LLAMA: {
            "available": False,
            "binary": None,
            "version": None,
            "reason": None,
            "runs": [],
            "failures": [],
        },
    }
    commands: dict[str, tuple[CommandFor, dict[str, str]]] = {
        OURS: (lambda port, point: where.prefix() + our_server_command(ours_argv, port), where.thread_env())
    }
    llama = find_llama_binary(LLAMA, args.llama_server)
    if llama is None:
        systems[LLAMA]["reason"] = absent_message(LLAMA)
    elif gguf.suffix != ".gguf":
        systems[LLAMA]["reason"] = f"llama-server needs a .gguf model; {gguf} is not one"
    else:
        systems[LLAMA].update(available=True, binary=str(llama), version=binary_version(llama))
        env = library_env(llama)

        def start_once(flags: list[str]) -> None:
            port = free_port()
            with server_process(
                llama_server_command(llama, gguf, port, where, 1, per_slot, flags), port, env
            ):
                pass

        try:
            extra, note = working_flags(start_once, shlex.split(args.llama_server_args))
        except RuntimeError as err:
            extra, note = [], None
            systems[LLAMA].update(available=False, reason=f"llama-server does not start: {err}")
        systems[LLAMA].update(flags=extra, note=note)
        if note:
            print(f"{LLAMA}: {note}", flush=True)
        if systems[LLAMA]["available"]:

            def llama_command(port: int, point: LoadPoint) -> list[str]:
                np_ = llama_parallel(point, len(workload))
                return llama_server_command(llama, gguf, port, where, np_, np_ * per_slot, extra)

            commands[LLAMA] = (llama_command, env)
    if systems[LLAMA]["reason"]:
        print(f"{LLAMA}: {systems[LLAMA]['reason']}\nMeasuring {OURS} alone.", flush=True)
    place = f"{where.threads} thread(s)" + (
        f", pinned to core {where.core}" if where.core is not None else ""
    )
    print(
        f"model {gguf}; {len(workload)} requests per point; {place}; {LLAMA}: {llama or 'absent'}", flush=True
    )

    with client_off_core(where.core):
        for point in points:  # interleaved, so a drift in machine load touches both alike
            for name, (command_for, env) in commands.items():
                try:
                    run = run_system(name, command_for, env, point, workload, warmup, args)
                except Exception as err:  # one failed point must not lose the others
                    failure = {"concurrency": point.concurrency, "request_rate": point.request_rate}
                    failure["error"] = f"{type(err).__name__}: {err}"
                    systems[name]["failures"].append(failure)
                    print(f"{name} {point.label()} FAILED: {failure['error']}", flush=True)
                    continue
                run["llama_parallel"] = llama_parallel(point, len(workload)) if name == LLAMA else None
                systems[name]["runs"].append(run)

    results: dict = {
        "benchmark": "serve_peer",
        "config": config_record(args),
        "model": {"gguf": str(gguf)},
        "placement": {"threads": where.threads, "pin_core": where.core},
        "llama_slot_context": per_slot,
        "workload": record,
        "systems": systems,
        "llama_bench": bench_llama(
            args, llama, gguf, where, no_repack=NO_REPACK in systems[LLAMA].get("flags", [])
        ),
        "comparison": compare(systems[OURS]["runs"], systems[LLAMA]["runs"]),
    }
    print()
    print(format_table(TABLE_HEADERS, table_rows(results)))
    for row in results["comparison"]:
        conc = "inf" if row["concurrency"] is None else row["concurrency"]
        print(
            f"conc {conc}: {OURS} / {LLAMA} output tok/s = {_x(row['throughput_ratio'])}, "
            f"TPOT p50 = {_x(row['tpot_p50_ratio'])}, RSS after = {_x(row['rss_after_ratio'])}"
        )
    bench_rows = llama_bench_rows(results["llama_bench"])
    if bench_rows:
        print(format_table(["llama-bench", "threads", "tok/s", "stddev"], bench_rows))
    else:
        print(f"llama-bench: {results['llama_bench'].get('skipped') or results['llama_bench'].get('error')}")
    print(f"{LLAMA} {systems[LLAMA]['version'] or ''} {place}")
    stem = f"serve_peer_{args.tag}" if args.tag else "serve_peer"
    path = write_results(args.output_dir, stem, results)
    runs = [*systems[OURS]["runs"], *systems[LLAMA]["runs"]]
    if runs:
        plot(runs, args.ttft_slo, Path(args.output_dir) / f"{stem}.png", series="system")
    print(f"wrote {path}" + (f" and {stem}.png" if runs else ""))
    return results


def bench_llama(
    args: argparse.Namespace, llama_server: Path | None, gguf: Path, where: Placement, no_repack: bool = False
) -> dict:
    """llama-bench's pp128/tg128 at 1 thread and at the run's thread count
    (without repacking when llama-server needed --no-repack)."""
    if args.no_llama_bench:
        return {"skipped": "--no-llama-bench"}
    if gguf.suffix != ".gguf":
        return {"skipped": f"llama-bench needs a .gguf model; {gguf} is not one"}
    dirs = ([llama_server.parent] if llama_server else []) + default_search_dirs()
    binary = find_llama_binary("llama-bench", args.llama_bench, dirs=dirs)
    if binary is None:
        return {"skipped": absent_message("llama-bench", dirs)}
    threads = [1] if where.core is not None else sorted({1, where.threads})
    print(f"llama-bench {binary} -t {','.join(map(str, threads))} ...", flush=True)
    extra = ["--repack", "0"] if no_repack else []
    return {"binary": str(binary), **run_llama_bench(binary, gguf, threads, where.core, extra=extra)}


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_rows(data: dict) -> list[list[str]]:
    """Both systems' runs, run point by run point."""
    systems = data["systems"]
    runs = [r for name in (OURS, LLAMA) for r in systems[name]["runs"]]
    order = {OURS: 0, LLAMA: 1}

    def key(r: dict) -> tuple:
        conc = r["concurrency"]
        return (conc is None, conc or 0, str(r["request_rate"]), order[r["system"]])

    return [table_row(r["system"], r) for r in sorted(runs, key=key)]


def llama_bench_rows(bench: dict) -> list[list[str]]:
    return [
        [r["test"], str(r["threads"]), f"{r['tokens_per_s']:.1f}", f"{r['stddev_tokens_per_s']:.1f}"]
        for r in bench.get("records", [])
    ]


def report_section(data: dict) -> str:
    """results/serve_peer.json for REPORT.md."""
    from paged_attention.bench.report import markdown_table

    parts = [markdown_table(TABLE_HEADERS, table_rows(data))]
    llama = data["systems"][LLAMA]
    if not llama["available"]:
        parts.append(f"{LLAMA} was not run: {llama['reason']}")
    rows = llama_bench_rows(data.get("llama_bench", {}))
    if rows:
        parts.append(markdown_table(["llama-bench", "threads", "tok/s", "stddev"], rows))
    where = data["placement"]
    parts.append(
        f"Threads: {where['threads']} per server"
        + (f", pinned to core {where['pin_core']}" if where["pin_core"] is not None else "")
    )
    return "\n\n".join(parts)
