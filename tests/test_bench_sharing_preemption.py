"""`bench sharing` and `bench preemption` in --quick mode (real engine runs on
small models): their JSON, tables and plots, and the pieces they are built from."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

from paged_attention.bench import preemption, sharing
from paged_attention.bench.preemption import PreemptCost, crossovers, percentile
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.request import Request, RequestStatus
from paged_attention.core.scheduler import Scheduler

# Real benchmark runs (--quick) on tiny models: seconds each.
pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(module, name: str, out_dir) -> dict:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="bench_command", required=True)
    module.add_parser(sub)
    args = parser.parse_args([name, "--quick", "--output-dir", str(out_dir)])
    args.func(args)
    saved = json.loads((out_dir / f"{name}.json").read_text())
    assert saved["benchmark"] == name
    assert (out_dir / saved["plot"]).read_bytes()[:8] == PNG_MAGIC
    return saved


# ------------------------------------------------------------------ sharing
@pytest.fixture(scope="module")
def sharing_result(tmp_path_factory) -> dict:
    return run_quick(sharing, "sharing", tmp_path_factory.mktemp("sharing"))


def test_sharing_json_has_every_part(sharing_result):
    assert {
        "config",
        "fork_sharing",
        "prefix_sharing",
        "overhead",
        "literature",
        "monitor",
        "environment",
        "plot",
    } <= set(sharing_result)
    assert sharing_result["config"]["quick"] is True
    assert sharing_result["monitor"]["num_samples"] >= 2
    assert set(sharing_result["part_seconds"]) == {"fork_sharing", "prefix_sharing", "overhead"}


def test_sharing_saves_blocks_for_samples_and_beams(sharing_result):
    rows = sharing_result["fork_sharing"]["rows"]
    assert {(r["mode"], r["width"]) for r in rows} == {
        ("parallel", 2),
        ("parallel", 4),
        ("beam", 2),
        ("beam", 4),
    }
    for r in rows:
        assert 0 < r["shared_peak_blocks"] < r["unshared_peak_blocks"], r
        assert 0 < r["saving"] < 1
        assert r["saving"] == pytest.approx(1 - r["shared_peak_blocks"] / r["unshared_peak_blocks"])
        # The baseline really held independent copies, and nothing was preempted.
        assert r["cached_tokens_unshared"] == 0 and r["num_preemptions"] == 0
        # The same tokens were generated either way: n (k) sequences of output_len.
        expected = r["num_requests"] * r["width"] * sharing_result["fork_sharing"]["workload"]["output_len"]
        assert r["output_tokens_unshared"] == expected
        assert r["output_tokens_shared"] == expected
        assert r["shared_logical_peak_blocks"] > r["shared_peak_blocks"]
    by = {(r["mode"], r["width"]): r for r in rows}
    for mode in ("parallel", "beam"):  # more sequences per prompt: more of each saved
        assert by[(mode, 4)]["saving"] > by[(mode, 2)]["saving"]


def test_sharing_prefix_caching_holds_fewer_tokens(sharing_result):
    part = sharing_result["prefix_sharing"]
    if not part["available"]:
        assert part["reason"].startswith("prefix caching not available")
        pytest.skip(part["reason"])
    off, on_warm, _ = part["runs"]
    assert off["prefix_caching"] is False and on_warm["prefix_caching"] is True
    n = part["workload"]["num_requests"]
    assert off["max_resident_prompts"] == on_warm["max_resident_prompts"] == n
    assert on_warm["resident_tokens_held"] < off["resident_tokens_held"]
    assert on_warm["peak_tokens_held"] < off["peak_tokens_held"]
    assert part["resident_ratio"] > 1
    assert on_warm["num_cached_tokens"] > 0 and off["num_cached_tokens"] == 0
    # The distinct ids in the tables are exactly what the allocator reports used.
    for run in part["runs"]:
        assert run["resident_distinct_blocks"] == run["resident_used_blocks"]
    ttft = part["ttft"]
    assert ttft["cold_ttft_s"] > 0 and ttft["cached_ttft_s"] > 0
    assert all(c > 0 for c in ttft["cached_num_cached_tokens"])
    assert all(c == 0 for c in ttft["cold_num_cached_tokens"])


def test_sharing_overhead_measured(sharing_result):
    part = sharing_result["overhead"]
    if not part["available"]:
        pytest.skip(part["reason"])
    assert part["tokens_per_s_on"] > 0 and part["tokens_per_s_off"] > 0
    assert part["overhead"] == pytest.approx(1 - part["tokens_per_s_on"] / part["tokens_per_s_off"])


def test_caching_kwargs_follow_the_engine():
    kwargs = sharing.caching_kwargs(False)
    assert kwargs == ({"enable_prefix_caching": False} if sharing.prefix_caching_available() else {})


# ---------------------------------------------------------------- preemption
@pytest.fixture(scope="module")
def preemption_result(tmp_path_factory) -> dict:
    return run_quick(preemption, "preemption", tmp_path_factory.mktemp("preemption"))


def test_preemption_swap_and_recompute_times(preemption_result):
    part = preemption_result["swap_vs_recompute"]
    rows = part["rows"]
    assert {(r["block_size"], r["length"]) for r in rows} == {(16, 64), (16, 256), (64, 64), (64, 256)}
    for r in rows:
        assert r["swap_out_s"] > 0 and r["swap_in_s"] > 0 and r["recompute_s"] > 0
        assert r["swap_total_s"] >= r["swap_s"] == pytest.approx(r["swap_out_s"] + r["swap_in_s"])
        assert r["num_blocks"] == -(-r["length"] // r["block_size"])
        assert r["faster"] == ("swap" if r["swap_s"] < r["recompute_s"] else "recompute")
        # The cost model's choice is recorded, with the prediction behind it.
        assert r["auto_choice"] in ("swap", "recompute") and r["startup_choice"] in ("swap", "recompute")
        predicted_swap = r["auto_predicted_swap_s"] < r["auto_predicted_recompute_s"]
        assert r["auto_choice"] == ("swap" if predicted_swap else "recompute")
        assert r["auto_correct"] == (r["auto_choice"] == r["faster"])
    assert part["auto_correct"] == sum(r["auto_correct"] for r in rows)
    assert [c["block_size"] for c in part["crossovers"]] == [16, 64]
    assert set(part["recompute_measured_over_predicted"]) == {"64", "256"}  # JSON keys
    assert all(x > 0 for x in part["recompute_measured_over_predicted"].values())


def test_preemption_starved_run(preemption_result):
    part = preemption_result["starved"]
    assert part["starved_blocks"] < part["needed_blocks"]
    runs = {r["label"]: r for r in part["runs"]}
    assert set(runs) == {"unconstrained", "swap", "recompute", "auto", "recompute, newest first"}
    assert runs["unconstrained"]["num_preemptions"] == 0
    prompt_and_output = runs["unconstrained"]["model_tokens"]
    for label, r in runs.items():
        assert r["output_tokens"] == part["workload"]["output_tokens"]
        # Everything computed at least once; recompute adds what it redid.
        assert r["model_tokens"] >= prompt_and_output
        assert r["swap_copy_s"] >= 0
        assert r["tokens_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p99_s"]
        if label != "unconstrained":
            assert r["num_kv_blocks"] == part["starved_blocks"]
            assert r["peak_used_blocks"] <= part["starved_blocks"]
            assert r["num_preemptions"] > 0, label
    assert runs["recompute"]["num_swapped_out"] == 0 and runs["recompute"]["num_recomputed_tokens"] > 0
    assert runs["swap"]["num_swapped_out"] > 0 and runs["swap"]["swap_copy_s"] > 0
    assert runs["recompute"]["model_tokens"] > prompt_and_output
    assert runs["recompute"]["swap_copy_s"] == 0
    assert {label: len(rs) for label, rs in part["all_runs"].items()} == {
        label: part["repeats"] for label in runs
    }
    assert part["recomputed_tokens_ours"] == runs["recompute"]["num_recomputed_tokens"]
    assert part["recomputed_tokens_newest_first"] == runs["recompute, newest first"]["num_recomputed_tokens"]


# ------------------------------------------------------------------ pieces
def _running(
    sched: Scheduler, alloc: BlockAllocator, computed: list[int], priorities: list[int]
) -> list[Request]:
    reqs = [
        Request.create(str(i), [5] * 8, alloc, 4, priority=p, arrival_index=i)
        for i, p in enumerate(priorities)
    ]
    for r, n in zip(reqs, computed):
        r.status = RequestStatus.RUNNING
        r.num_computed_tokens = n
        sched.running.append(r)
    return reqs


def test_preemption_victim_orders_part_where_the_oldest_is_least_computed():
    """The bench's two victim choices are the engine's own option; they agree on
    priority and part on the rest: least computed against latest arrival."""
    alloc = BlockAllocator(16, 4)
    ours = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64)
    newest = Scheduler(
        alloc, max_num_seqs=8, max_num_batched_tokens=64, preemption_victim="lowest_priority_latest"
    )
    for sched in (ours, newest):
        reqs = _running(sched, alloc, computed=[1, 6, 4], priorities=[0, 0, 0])
        assert sched._pick_victim(set()) is (reqs[0] if sched is ours else reqs[2])
        assert sched._pick_victim({id(reqs[0]), id(reqs[2])}) is reqs[1]  # only unscheduled ones
    for sched in (ours, newest):
        sched.running.clear()
        reqs = _running(sched, alloc, computed=[1, 6, 4], priorities=[0, 1, 0])
        assert sched._pick_victim(set()) is reqs[1]  # the lowest priority goes first either way
    with pytest.raises(ValueError, match="preemption_victim must be one of"):
        Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64, preemption_victim="oldest")


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.5) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    assert percentile([7.0], 0.99) == 7.0


def _cost(length: int, faster: str) -> PreemptCost:
    swap, recompute = (1.0, 2.0) if faster == "swap" else (2.0, 1.0)
    return PreemptCost(
        length,
        16,
        length // 16,
        1,
        "float32",
        swap / 2,
        swap / 2,
        swap,
        swap,
        recompute,
        faster,
        "swap",
        0.0,
        0.0,
        faster == "swap",
        "swap",
        faster == "swap",
    )


def test_crossovers_report_where_the_winner_changes():
    rows = [_cost(64, "recompute"), _cost(128, "recompute"), _cost(256, "swap"), _cost(512, "swap")]
    (c,) = crossovers(rows)
    assert c["flips"] == [{"between": [128, 256], "from": "recompute", "to": "swap"}]
    (c,) = crossovers([_cost(64, "swap"), _cost(128, "swap")])
    assert c["flips"] == [] and c["summary"] == "swap faster at every length measured"
