"""The benchmark subcommands in --quick mode (real engine runs on tiny models),
their JSON, plots and report, and the pieces they are built from."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

from paged_attention.bench import all as bench_all
from paged_attention.bench import block_size, capacity, memory, report, scaling
from paged_attention.bench.memory import (
    LengthMix,
    MemoryRequest,
    StepRecord,
    sharegpt_like_workload,
    waste_summary,
)
from paged_attention.bench.monitor import MemoryMonitor, torch_threads
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.visualize import draw_block_pool, render_text, snapshot_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_parser(*modules) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for module in modules:
        module.add_parser(sub)
    return parser, sub


def run(argv: list[str], *modules):
    parser, _ = bench_parser(*modules)
    args = parser.parse_args(argv)
    return args.func(args)


def assert_png(path) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


def assert_monitor(result: dict) -> None:
    m = result["monitor"]
    assert m["num_samples"] >= 2
    assert 0 < m["rss_start_mib"] <= m["rss_peak_mib"]
    assert m["rss_end_mib"] <= m["rss_peak_mib"]


# ------------------------------------------------------------------ workload
def test_sharegpt_like_lengths_follow_the_documented_mix():
    mix = LengthMix()
    reqs = sharegpt_like_workload(3000, 2048, 512, seed=0)
    prompts = [len(r.prompt_token_ids) for r in reqs]
    outputs = [r.output_len for r in reqs]
    # Clipping trims the tails a little: the means stay near ShareGPT's 161 / 338.
    assert abs(statistics.fmean(prompts) - mix.prompt_mean) / mix.prompt_mean < 0.1
    assert abs(statistics.fmean(outputs) - mix.output_mean) / mix.output_mean < 0.1
    assert statistics.median(outputs) < statistics.fmean(outputs)  # right-skewed, like chat traffic
    for r in reqs:
        n = len(r.prompt_token_ids)
        assert mix.min_len <= n <= mix.max_prompt and 1 <= r.output_len <= mix.max_output
        assert n + r.output_len <= 2048
        # Declared max_tokens: the next power of two, unless max_model_len caps it.
        assert r.max_tokens >= r.output_len or n + r.max_tokens == 2048
        assert r.max_tokens & (r.max_tokens - 1) == 0 or n + r.max_tokens == 2048
        assert all(3 <= t < 512 for t in r.prompt_token_ids)
    assert sharegpt_like_workload(5, 2048, 512, seed=0) == reqs[:5]  # reproducible from the seed


def test_waste_summary_by_hand():
    # Two steps, block size 4, one request: prompt 3, final length 6, declared 8 (reserve 11), max_len 16.
    recs = [
        StepRecord(
            0,
            1,
            0,
            tokens_stored=3,
            slots_allocated=4,
            slots_orca=11,
            slots_static=16,
            final_tokens=6,
            shared_blocks=0,
            step_s=0.0,
        ),
        StepRecord(
            1,
            1,
            0,
            tokens_stored=5,
            slots_allocated=8,
            slots_orca=11,
            slots_static=16,
            final_tokens=6,
            shared_blocks=0,
            step_s=0.0,
        ),
    ]
    s = waste_summary(recs)
    assert s["paged"]["waste"] == pytest.approx(1 - 8 / 12)
    assert s["paged"]["reservation"] == 0
    assert s["orca"]["waste"] == pytest.approx(1 - 8 / 22)
    assert s["orca"]["internal_fragmentation"] == pytest.approx((22 - 12) / 22)
    assert s["orca"]["reservation"] == pytest.approx((12 - 8) / 22)
    assert s["static"]["waste"] == pytest.approx(1 - 8 / 32)
    for scheme in ("paged", "orca", "static"):
        assert s[scheme]["waste"] == pytest.approx(
            s[scheme]["internal_fragmentation"] + s[scheme]["reservation"]
        )


# ------------------------------------------------------------------ memory
@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    result = run(["memory", "--quick", "--draw", "--output-dir", str(tmp_path)], memory)
    data = json.loads((tmp_path / "memory.json").read_text())
    assert {"config", "workload", "schemes", "peak", "run", "literature", "monitor", "timeline"} <= set(data)
    s = data["schemes"]
    for scheme in ("paged", "orca", "static"):
        assert 0 <= s[scheme]["waste"] <= 1
        assert 0 <= s[scheme]["internal_fragmentation"] <= 1 and 0 <= s[scheme]["reservation"] <= 1
    # Paging wastes least; reserving max_model_len wastes most.
    assert s["paged"]["waste"] < s["orca"]["waste"] < s["static"]["waste"]
    assert s["paged"]["waste"] < 0.15
    assert data["run"]["num_preemptions"] == 0  # the default pool holds every request
    bs = data["config"]["block_size"]
    for rec in data["timeline"]:
        # Paging holds at most one partly filled block per running request.
        assert (
            rec["tokens_stored"]
            <= rec["slots_allocated"]
            < rec["tokens_stored"] + bs * max(rec["num_running"], 1)
        )
        assert rec["tokens_stored"] <= rec["final_tokens"] <= rec["slots_orca"] <= rec["slots_static"]
    assert data["peak"]["paged_slots"] >= max(r["slots_allocated"] for r in data["timeline"])
    assert_monitor(data)
    assert_png(tmp_path / data["plot"])
    assert_png(tmp_path / data["pool_picture"])
    assert result["schemes"] == data["schemes"]


def test_memory_run_counts_every_generated_token():
    result = memory.run_memory_benchmark(
        model="stories260k", num_requests=6, max_model_len=256, mix=LengthMix().scaled(0.2), progress=False
    )
    assert result["run"]["output_tokens"] == round(result["workload"]["output_mean"] * 6)
    assert result["timeline"][-1]["num_running"] == 0  # the run went to the end


# ------------------------------------------------------------------ capacity
def test_orca_fit_by_hand():
    reqs = [MemoryRequest([5] * p, 1, m) for p, m in ((10, 6), (20, 12), (5, 3))]
    assert capacity.orca_fit(reqs, 16, 100) == 1  # 16, then 32 more does not fit
    assert capacity.orca_fit(reqs, 48, 100) == 2  # 16 + 32, then 8 more does not fit
    assert capacity.orca_fit(reqs, 56, 100) == 3
    assert capacity.orca_fit(reqs, 48, 12) == 3  # each capped at max_model_len 12: 12 + 12 + 8


@pytest.mark.slow
def test_bench_capacity_quick(tmp_path):
    run(["capacity", "--quick", "--output-dir", str(tmp_path)], capacity)
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert {"config", "method", "budgets", "monitor"} <= set(data)
    max_len, bs = data["config"]["max_model_len"], data["config"]["block_size"]
    assert len(data["budgets"]) == 2
    for row in data["budgets"]:
        assert row["static_concurrency"] == row["budget_tokens"] // max_len  # arithmetic
        assert row["num_kv_blocks"] == row["budget_tokens"] // bs
        assert row["peak_used_blocks"] <= row["num_kv_blocks"]
        # Paging runs more requests than static reservation could admit.
        assert row["paged_max_running"] > row["static_concurrency"]
        assert row["paged_max_running"] >= row["paged_mean_running"] > 0
    small, large = data["budgets"]
    assert large["paged_max_running"] >= small["paged_max_running"]
    assert_monitor(data)
    assert_png(tmp_path / data["plot"])


# ------------------------------------------------------------------ block size
@pytest.mark.slow
def test_bench_block_size_quick(tmp_path):
    run(["block-size", "--quick", "--output-dir", str(tmp_path)], block_size)
    data = json.loads((tmp_path / "block_size.json").read_text())
    rows = data["rows"]
    assert [r["block_size"] for r in rows] == [4, 16, 64]
    wastes = [r["waste"] for r in rows]
    assert all(0 <= w < 1 for w in wastes)
    assert wastes == sorted(wastes)  # bigger blocks leave more unused slots
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0 and r["num_preemptions"] == 0
        assert 0 < r["attention_ms_per_step"] < r["step_ms"]
    # Every block size did the same work.
    assert len({r["num_steps"] for r in rows}) == 1
    assert data["best_block_size"] in data["near_best_block_sizes"] and data["best_block_size"] in (4, 16, 64)
    assert_monitor(data)
    assert_png(tmp_path / data["plot"])


def test_timed_backend_counts_attention_and_restores_the_backend():
    from paged_attention.engine.builder import STORIES260K
    from paged_attention.engine.llm import LLM
    from paged_attention.sampling_params import SamplingParams

    llm = LLM(str(STORIES260K), num_kv_blocks=64, max_model_len=128)
    model = llm.engine.runner.model
    backend = model.attn_backend
    bucket: dict[str, float] = {}
    with block_size.timed_backend(model, bucket):
        llm.generate(["Once"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert bucket["attention"] > 0 and bucket["kv_write"] > 0
    assert model.attn_backend is backend
    assert all(m.backend is backend for m in model.modules() if hasattr(m, "backend"))


def test_timed_restores_classmethods():
    from paged_attention.attention.metadata import AttentionMetadata

    raw = vars(AttentionMetadata)["build"]
    bucket: dict[str, float] = {}
    with block_size.timed(AttentionMetadata, "build", bucket, "metadata"):
        AttentionMetadata.build([[0]], [0], [1], 4, 2)
    assert bucket["metadata"] > 0
    assert vars(AttentionMetadata)["build"] is raw


# ------------------------------------------------------------------ scaling
@pytest.mark.slow
def test_bench_scaling_quick(tmp_path):
    run(["scaling", "--quick", "--output-dir", str(tmp_path)], scaling)
    data = json.loads((tmp_path / "scaling.json").read_text())
    rows = data["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4, 16]
    for r in rows:
        assert r["output_tokens"] == r["concurrency"] * data["config"]["output_len"]
        assert r["tokens_per_s"] > 0
        assert 0 < r["ttft_mean_s"] <= r["latency_mean_s"] <= r["latency_max_s"]
        assert r["latency_p50_s"] <= r["latency_p90_s"] <= r["latency_max_s"]
        # Greedy decode of 8 tokens: one prefill step, then one step per token.
        assert r["num_steps"] >= data["config"]["output_len"]
    assert_monitor(data)
    assert_png(tmp_path / data["plot"])


# ------------------------------------------------------------------ all + report
@pytest.mark.slow
def test_bench_all_runs_every_registered_subcommand_and_reports(tmp_path):
    parser, _ = bench_parser(memory, report, bench_all)
    args = parser.parse_args(["all", "--quick", "--output-dir", str(tmp_path)])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "all.json").read_text())
    assert [r["benchmark"] for r in summary["runs"]] == ["memory"]  # not itself, not report
    assert summary["runs"][0]["error"] is None
    text = (tmp_path / "REPORT.md").read_text()
    assert "## KV memory waste" in text and "](memory.png)" in text and "## Run summary" in text


@pytest.mark.slow
def test_bench_all_records_a_failing_benchmark_and_goes_on(tmp_path):
    parser, sub = bench_parser(bench_all)
    broken = sub.add_parser("broken")
    broken.add_argument("--output-dir")
    broken.set_defaults(func=lambda a: 1 / 0)
    args = parser.parse_args(["all", "--quick", "--output-dir", str(tmp_path)])
    assert args.func(args) == 1
    run_ = json.loads((tmp_path / "all.json").read_text())["runs"][0]
    assert run_["benchmark"] == "broken" and "ZeroDivisionError" in run_["error"]


def test_report_has_a_generic_section_for_unknown_results(tmp_path):
    report.write_json(tmp_path, "future_bench", {"saved_fraction": 0.5, "plot": "future.png"})
    text = report.build_report(tmp_path).read_text()
    assert "## Future bench" in text and "saved_fraction: 0.5" in text and "](future.png)" in text


def test_report_uses_a_benchmark_modules_own_section():
    module = pytest.importorskip("paged_attention.bench.sharing")
    if not hasattr(module, "report_section"):
        pytest.skip("bench.sharing has no report_section")
    assert report.section_for("sharing")[1] is module.report_section
    assert report.section_for("memory")[1] is report.SECTIONS["memory"][1]


def test_all_adds_only_the_options_a_subcommand_has():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes")
    parser.add_argument("--output-dir")
    argv = bench_all.benchmark_argv("throughput", parser, "out", quick=False)
    assert argv == ["--dtypes", "bfloat16", "--output-dir", "out"]  # no --num-requests: it has none
    assert bench_all.benchmark_argv("throughput", parser, "out", quick=True) == ["--output-dir", "out"]


def test_format_table_aligns_columns():
    text = report.format_table(["name", "value"], [["a", 1], ["longer", 22]])
    lines = text.splitlines()
    assert lines[0] == "name    value"
    assert lines[2] == "a           1" and lines[3] == "longer     22"


# ------------------------------------------------------------------ monitor
def test_monitor_sees_a_large_allocation():
    with MemoryMonitor(interval_s=0.01) as monitor:
        n0 = len(monitor.samples)
        big = torch.ones(64 * 2**20)  # 256 MiB, written so the pages are resident
        for _ in range(500):  # until the sampler has looked at least twice (bounded)
            if len(monitor.samples) >= n0 + 2:
                break
            time.sleep(0.01)
        del big
    s = monitor.summary()
    assert s["rss_peak_mib"] - s["rss_start_mib"] > 200
    assert s["cuda"] is None or s["cuda"]["peak_allocated_mib"] >= 0


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------ visualize
def test_pool_snapshot_marks_shared_blocks(tmp_path):
    alloc = BlockAllocator(8, block_size=4)
    parent = BlockTable(alloc)
    parent.append_slots(6)
    child = parent.fork()
    snap = snapshot_tables(alloc, [("p", parent), ("c", child)], "fork")
    assert snap.num_used == 2 and snap.num_shared == 2
    assert snap.used[0].num_filled == 4 and snap.used[1].num_filled == 2
    text = render_text(snap)
    assert text.splitlines()[1].startswith("*8 *4 ..")
    _, cow = child.append_slots(1)
    snap2 = snapshot_tables(alloc, [("p", parent), ("c", child)])
    assert snap2.num_shared == 1 and snap2.used[cow.dst].owners == ("c",)
    # A block the allocator handed out that no table passed in holds.
    stray = alloc.allocate()
    assert snapshot_tables(alloc, [("p", parent)]).used[stray].owners == ("(other)",)
    assert_png(draw_block_pool([snap, snap2], tmp_path / "pool.png"))


# ------------------------------------------------------------------ peers
@pytest.mark.slow
def test_transformers_continuous_batching_peer():
    from transformers import AutoModelForCausalLM

    from paged_attention.bench.peers import run_hf_continuous
    from paged_attention.bench.workload import BenchRequest
    from paged_attention.engine.builder import STORIES260K

    hf = AutoModelForCausalLM.from_pretrained(str(STORIES260K), dtype=torch.float32).eval()
    rng = random.Random(0)
    work = [
        BenchRequest([rng.randrange(3, 512) for _ in range(rng.randint(4, 30))], rng.randint(2, 12))
        for _ in range(5)
    ]
    with torch_threads(1):
        result = run_hf_continuous(hf, work)
    assert result["output_tokens"] == sum(r.output_len for r in work)
    assert result["tokens_per_s"] > 0


def test_llama_cpp_peer_skips_cleanly_when_not_installed():
    from paged_attention.bench.peers import llama_cpp_available, run_llama_cpp

    if llama_cpp_available():
        pytest.skip("llama-cpp-python is installed")
    assert "not installed" in run_llama_cpp("missing.gguf", [])["skipped"]


def test_engine_step_stats_count_what_each_step_ran():
    """The per-step records benchmarks read instead of wrapping the engine."""
    from paged_attention.engine.builder import STORIES260K
    from paged_attention.engine.llm import LLM
    from paged_attention.sampling_params import SamplingParams

    llm = LLM(str(STORIES260K), num_kv_blocks=32, record_step_stats=True, max_num_batched_tokens=16)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (20, 3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    records = llm.engine.step_stats
    assert len(records) == llm.engine.stats.num_steps
    # Every prompt token once (20 in two chunks under the 16-token budget), then
    # the 3 decodes after each prompt's first sampled token.
    assert sum(r.num_prompt_tokens for r in records) == 23
    assert sum(r.num_tokens for r in records) == 23 + 2 * 3
    assert records[0].num_tokens == 16 and records[0].num_prompt_tokens == 16
    assert all(r.num_tokens <= 16 and 1 <= r.num_seqs <= 2 for r in records)
    assert all(r.num_preempted == r.num_swap_out_blocks == r.num_swap_in_blocks == 0 for r in records)
    assert all(min(r.schedule_s, r.execute_s, r.update_s) >= 0 for r in records)
    assert all(r.step_s == r.schedule_s + r.execute_s + r.update_s for r in records)
    assert LLM(str(STORIES260K), num_kv_blocks=32).engine.step_stats is None  # off by default


@pytest.mark.slow
def test_decode_step_breakdown_adds_up(tmp_path):
    from paged_attention.bench import decode_step
    from paged_attention.engine.builder import STORIES260K

    result = decode_step.run(str(STORIES260K), "float32", [1, 3], steps=3)
    assert [r["num_seqs"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        parts = row["attention_ms"] + row["kv_write_ms"] + row["model_other_ms"] + row["update_ms"]
        assert 0 < parts <= row["step_ms"] + 1e-6
        assert row["num_ops"] > 0 and row["op_ms"] > 0 and row["python_ms"] >= 0
