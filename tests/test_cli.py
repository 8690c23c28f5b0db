"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paged_attention.engine.builder import STORIES260K


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paged_attention.entrypoints.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_generate_prints_text_and_a_summary():
    result = run_cli(
        "generate",
        "Once upon a time",
        "--model",
        str(STORIES260K),
        "--max-tokens",
        "20",
        "--num-kv-blocks",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time, there was a little girl named Lily")
    assert "20 tokens" in result.stderr and "tokens/s" in result.stderr
    assert "KV blocks used: 2 of 64" in result.stderr  # 5 + 20 tokens at block size 16


@pytest.mark.slow
def test_generate_stream_gives_the_same_text():
    plain = run_cli(
        "generate",
        "Once upon a time",
        "--model",
        str(STORIES260K),
        "--max-tokens",
        "20",
        "--num-kv-blocks",
        "64",
    )
    streamed = run_cli(
        "generate",
        "Once upon a time",
        "--model",
        str(STORIES260K),
        "--max-tokens",
        "20",
        "--num-kv-blocks",
        "64",
        "--stream",
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


@pytest.mark.slow
def test_chat_reads_stdin_when_not_a_terminal(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = run_cli(
        "chat",
        "--model",
        str(STORIES260K),
        "--max-tokens",
        "8",
        "--num-kv-blocks",
        "64",
        "--chat-template",
        str(template),
        stdin="Once upon a time\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "8 tokens" in result.stderr


@pytest.mark.slow
def test_bad_input_is_one_clear_line():
    result = run_cli("generate", "hi", "--model", "/no/such/model")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model path '/no/such/model' does not exist"
    result = run_cli("generate", "hi", "--model", str(STORIES260K), "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr


@pytest.mark.slow
def test_help_reads_well():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("generate", "chat", "bench", "PagedAttention"):
        assert word in result.stdout


# ------------------------------------------------------- parsing, no torch
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_help_and_a_mistyped_flag_do_not_import_torch():
    """Arguments are parsed before torch loads: --help and a typo answer at once."""
    result = run_python(
        "import sys\n"
        "from paged_attention.entrypoints.cli import build_parser, main\n"
        "build_parser()\n"
        "for argv in (['--help'], ['generate', 'hi', '--blok-size', '8'], ['bench', 'throughput', '--bogus'],\n"
        "             ['serve', '--help'], ['generate', 'hi', '--dtype', 'int3']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code, file=sys.stderr)\n"
        "print('torch' in sys.modules, 'fastapi' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert result.stderr.count("exit 2") == 3 and result.stderr.count("exit 0") == 2
    assert "unrecognized arguments: --blok-size 8" in result.stderr
    assert "invalid choice: 'int3'" in result.stderr


def test_every_engine_option_is_a_flag_of_every_engine_command():
    from paged_attention.config import EngineConfig, engine_options
    from paged_attention.entrypoints.cli import ONE_USER_DEFAULTS, build_parser, engine_kwargs
    from paged_attention.entrypoints.engine_args import cli_options

    parser = build_parser()
    defaults = {f.name: f.default for f in cli_options()}
    assert {f.name for f in engine_options()} - set(defaults) == {"record_step_stats"}  # programmatic only
    for argv in (["generate", "hi"], ["chat"], ["serve"], ["bench", "serve"]):
        args = parser.parse_args(argv)
        one_user = argv[0] in ("generate", "chat")
        assert engine_kwargs(args) == ({**defaults, **ONE_USER_DEFAULTS} if one_user else defaults), argv
        assert args.model is None
    EngineConfig(**defaults)  # the flags' defaults are a valid configuration
    args = parser.parse_args(
        [
            "generate",
            "hi",
            "--block-size",
            "32",
            "--kv-cache-memory",
            "1GiB",
            "--no-enable-prefix-caching",
            "--preemption-victim",
            "lowest_priority_latest",
            "--swap-space",
            "0.5",
            "--dtype",
            "bf16",
        ]
    )
    assert engine_kwargs(args) == {
        **defaults,
        **ONE_USER_DEFAULTS,
        "block_size": 32,
        "kv_cache_memory": "1GiB",
        "enable_prefix_caching": False,
        "swap_space": 0.5,
        "dtype": "bf16",
        "preemption_victim": "lowest_priority_latest",
    }


def test_a_benchmark_takes_a_subset_of_engine_flags_with_its_own_defaults():
    from paged_attention.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["bench", "capacity"])
    # --seed is the benchmark's own (it seeds the workload and the engine).
    assert engine_kwargs(args) == {"block_size": 16, "max_model_len": 2048, "max_num_seqs": 1024, "seed": 0}
    args = build_parser().parse_args(["plan", "--gpu", "A100-80GB", "--block-size", "32"])
    assert (args.block_size, args.gpu_memory_utilization) == (32, 0.9)


def test_engine_args_reject_an_unknown_option_name():
    import argparse

    import pytest

    from paged_attention.entrypoints.engine_args import add_engine_args

    with pytest.raises(ValueError, match="'blocksize' is not an engine option"):
        add_engine_args(argparse.ArgumentParser(), only=("blocksize",))


def test_engine_argv_round_trips_through_the_serve_parser():
    from paged_attention.entrypoints.cli import build_parser, engine_kwargs
    from paged_attention.entrypoints.engine_args import engine_argv

    parser = build_parser()
    args = parser.parse_args(
        [
            "generate",
            "hi",
            "--model",
            "m",
            "--max-model-len",
            "512",
            "--no-enable-prefix-caching",
            "--enforce-eager",
        ]
    )
    argv = engine_argv(args)
    assert argv[:2] == ["--model", "m"] and "--no-enable-prefix-caching" in argv and "--enforce-eager" in argv
    served = parser.parse_args(["serve", *argv])
    assert served.model == "m" and engine_kwargs(served) == engine_kwargs(args)


def test_llm_keywords_are_the_engine_options():
    import inspect

    import pytest

    from paged_attention.config import engine_options
    from paged_attention.engine.llm import LLM

    params = inspect.signature(LLM).parameters
    assert list(params) == ["model", *(f.name for f in engine_options())]
    assert all(params[f.name].default == f.default for f in engine_options())
    assert "block_size = 16" in LLM.__doc__
    # Bad keywords fail before any model is loaded.
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'; did you mean 'block_size'"):
        LLM("/no/such/model", blocksize=8)
    with pytest.raises(ValueError, match="preemption_victim must be one of"):
        LLM("/no/such/model", preemption_victim="oldest")
    with pytest.raises(ValueError, match="enforce_eager must be True or False"):
        LLM("/no/such/model", enforce_eager="no")


@pytest.mark.slow
def test_bad_engine_option_on_the_command_line_is_one_clear_line():
    result = run_cli("generate", "hi", "--model", str(STORIES260K), "--block-size", "3")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: block_size must be a power of two")


def test_one_user_commands_size_the_pool_for_one_sequence():
    """generate and chat default to one sequence and no swap space; serve keeps
    the engine's serving defaults. Flags still override."""
    from paged_attention.config import EngineConfig
    from paged_attention.entrypoints.cli import build_parser

    parser = build_parser()
    for command in (["generate", "hi"], ["chat"]):
        args = parser.parse_args(command)
        assert (args.max_num_seqs, args.swap_space) == (1, 0.0)
    serve = parser.parse_args(["serve"])
    assert (serve.max_num_seqs, serve.swap_space) == (EngineConfig.max_num_seqs, EngineConfig.swap_space)
    assert parser.parse_args(["generate", "hi", "--max-num-seqs", "4"]).max_num_seqs == 4


def test_cache_lists_and_clears_what_the_engine_keeps(tmp_path, monkeypatch, capsys):
    from paged_attention.entrypoints.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "paged_attention"
    folder.mkdir()
    (folder / "model-abc-def.safetensors").write_bytes(b"\0" * 2**20)
    (folder / "tokenizer-123.json").write_text("{}")
    (folder / "tokenizer-123.hf").mkdir()  # transformers' tokenizer of a GGUF, saved
    (folder / "tokenizer-123.hf" / "tokenizer.json").write_bytes(b"\0" * 2**20)
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "model-abc-def.safetensors" in listing and "tokenizer-123.hf/" in listing
    assert "2.0 MiB in 3 entries in" in listing
    assert main(["cache", "clear"]) == 0
    assert "removed 3 entries (2.0 MiB)" in capsys.readouterr().out
    assert list(folder.iterdir()) == []
