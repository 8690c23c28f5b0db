"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import subprocess
import sys

from paged_attention.engine.builder import STORIES260K


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paged_attention.entrypoints.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_generate_prints_text_and_a_summary():
    result = run_cli("generate", "Once upon a time", "--model", str(STORIES260K),
                     "--max-tokens", "20", "--num-kv-blocks", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time, there was a little girl named Lily")
    assert "20 tokens" in result.stderr and "tokens/s" in result.stderr
    assert "KV blocks used: 2 of 64" in result.stderr  # 5 + 20 tokens at block size 16


def test_generate_stream_gives_the_same_text():
    plain = run_cli("generate", "Once upon a time", "--model", str(STORIES260K), "--max-tokens", "20",
                    "--num-kv-blocks", "64")
    streamed = run_cli("generate", "Once upon a time", "--model", str(STORIES260K), "--max-tokens",
                       "20", "--num-kv-blocks", "64", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


def test_chat_reads_stdin_when_not_a_terminal(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = run_cli("chat", "--model", str(STORIES260K), "--max-tokens", "8", "--num-kv-blocks", "64",
                     "--chat-template", str(template), stdin="Once upon a time\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "8 tokens" in result.stderr


def test_bad_input_is_one_clear_line():
    result = run_cli("generate", "hi", "--model", "/no/such/model")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model path '/no/such/model' does not exist"
    result = run_cli("generate", "hi", "--model", str(STORIES260K), "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr


def test_help_reads_well():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("generate", "chat", "bench", "PagedAttention"):
        assert word in result.stdout
