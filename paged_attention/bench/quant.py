"""`bench quant-kernels` and `bench quant-accuracy`: quantized weights against
dense ones, in speed (`quant_kernels`) and in accuracy and load cost
(`quant_accuracy`). Both use the default model (SmolLM2-135M-Instruct) and
write JSON under results/; quant-accuracy also writes results/quant_accuracy.md."""

from __future__ import annotations

from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main_kernels(args) -> dict:
    from paged_attention.bench.monitor import torch_threads
    from paged_attention.bench.quant_kernels import print_quant_kernels, run_quant_kernels
    from paged_attention.bench.report import write_json

    with torch_threads(args.threads if args.threads > 0 else None):
        result = run_quant_kernels(
            rows=_ints(args.rows),
            batches=_ints(args.batches),
            context=args.context,
            copies=args.copies,
            repeats=args.repeats,
            quick=args.quick,
        )
        print_quant_kernels(result)
        print(f"wrote {write_json(args.output_dir, 'quant_kernels', result)}")
    return result


def main_accuracy(args) -> dict:
    from paged_attention.bench.monitor import torch_threads
    from paged_attention.bench.quant_accuracy import accuracy_markdown, run_quant_accuracy
    from paged_attention.bench.report import write_json

    with torch_threads(args.threads if args.threads > 0 else None):
        result = run_quant_accuracy(quick=args.quick, skip_load=args.skip_load)
    markdown = accuracy_markdown(result)
    print(markdown)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_accuracy.md").write_text(markdown)
    print(f"wrote {write_json(out, 'quant_accuracy', result)} and {out / 'quant_accuracy.md'}")
    return result


def add_parser(sub) -> None:
    k = sub.add_parser(
        "quant-kernels", help="int8/int4 weight-only kernels vs dense matmuls, per matmul and decode step"
    )
    k.add_argument("--rows", default="1,64", help="activation rows per matmul, comma list (default 1,64)")
    k.add_argument("--batches", default="1,64", help="decode batch sizes, comma list (default 1,64)")
    k.add_argument("--context", type=int, default=128, help="cached tokens per sequence in a decode step")
    k.add_argument("--copies", type=int, default=30, help="distinct instances of each layer weight")
    k.add_argument("--repeats", type=int, default=5, help="timed repeats (median kept)")
    k.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's)")
    k.add_argument("--quick", action="store_true", help="1 row, 1 sequence, 2 copies (for tests)")
    k.add_argument("--output-dir", default="results")
    k.set_defaults(func=main_kernels)

    a = sub.add_parser(
        "quant-accuracy", help="top-1 agreement and perplexity of each weight format, and its load cost"
    )
    a.add_argument("--skip-load", action="store_true", help="skip the load-time runs (fresh processes)")
    a.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's)")
    a.add_argument("--quick", action="store_true", help="64 tokens, reference and gguf only (for tests)")
    a.add_argument("--output-dir", default="results")
    a.set_defaults(func=main_accuracy)
