"""Accuracy and load cost of each weight format, on the default model.

Accuracy: the default model reads a fixed public-domain text (the Declaration
of Independence, `assets/texts/`, 1,703 tokens) teacher-forced, in one
sequence; every format is compared with the float32 model over the GGUF's
dequantized weights (the reference): top-1 agreement (share of positions
whose most likely next token equals the reference's) and perplexity of the
text. Quantized formats run their kernels at every row here (the engine
switches to a dense matmul over dequantized weights for prompts; the "dense
path" rows measure that one).

Load: each format loaded in a fresh process (seconds, weight MiB, resident
memory added by the load, and the cache it leaves on disk); the dense path's
first load converts the GGUF into a float32 safetensors cache, later loads
map it.

    paged-attention bench quant-accuracy [--quick] [--skip-load]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEXT = Path(__file__).resolve().parent.parent / "assets" / "texts" / "declaration_of_independence.txt"
REFERENCE = "none-fp32"
# (format, dtype, path): path "kernel" forces the weight-only kernels at every
# row, "decode" feeds the text a token per step (`teacher_forced_decode`). int4 on a GGUF takes its Q4_1 blocks as they are (the gguf rows);
# "int4-rtn" quantizes the dequantized floats instead, as for a float checkpoint.
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("none", "fp32", "dense"),
    ("none", "bf16", "dense"),
    ("gguf", "bf16", "kernel"),
    ("gguf", "bf16", "dense"),
    ("gguf", "bf16", "decode"),
    ("gguf", "auto", "dense"),
    ("gguf", "auto", "decode"),
    ("gguf", "fp32", "kernel"),
    ("gguf", "fp32", "dense"),
    ("int8", "bf16", "kernel"),
    ("int8", "fp32", "kernel"),
    ("int8", "fp32", "dense"),
    ("int4-rtn", "bf16", "kernel"),
    ("int4-rtn", "fp32", "kernel"),
    ("int4-g64", "bf16", "kernel"),
    ("int4-g64", "fp32", "dense"),
    ("int4-g128", "bf16", "kernel"),
)
LOAD_FORMATS = (("none", "bf16"), ("none", "fp32"), ("gguf", "bf16"), ("int8", "bf16"), ("int4", "bf16"))
_NEVER = 1 << 62


@contextmanager
def kernel_everywhere(model: Any):
    """Run every QuantLinear of `model` on its kernel whatever the row count."""
    layers = model.quant_layers()
    saved = [layer.dense_rows for layer in layers]
    for layer in layers:
        if layer.kind != "dense":
            layer.dense_rows = _NEVER
    try:
        yield
    finally:
        for layer, rows in zip(layers, saved):
            layer.dense_rows = rows


def teacher_forced(
    model: Any, tokens: list[int], chunk: int = 256, kv_dtype: Any = None, logits_out: list | None = None
) -> tuple[Any, Any]:
    """(argmax next token [T-1], log-prob of the true next token [T-1]) of one
    sequence run through the model in a single prefill (KV pool in `kv_dtype`,
    default the model's). `logits_out`, if given, receives the float32 logits
    a chunk of positions at a time."""
    import torch

    from paged_attention.attention.metadata import AttentionMetadata
    from paged_attention.kv_cache import KVCachePool

    cfg = model.config
    block_size = 16
    blocks = -(-len(tokens) // block_size)
    pool = KVCachePool(
        cfg.num_layers, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=kv_dtype or model.dtype
    )
    meta = AttentionMetadata.build([list(range(blocks))], [0], [len(tokens)], block_size, blocks)
    ids = torch.tensor(tokens)
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            hidden = model(ids, torch.arange(len(tokens)), pool, meta)[:-1]
            top1, logprob = [], []
            target = ids[1:]
            for start in range(0, hidden.shape[0], chunk):
                logits = model.compute_logits(hidden[start : start + chunk])
                if logits_out is not None:
                    logits_out.append(logits.float())
                top1.append(logits.argmax(dim=-1))
                lp = torch.log_softmax(logits, dim=-1)
                logprob.append(lp.gather(1, target[start : start + chunk, None]).squeeze(1))
    finally:
        torch.set_flush_denormal(False)
    return torch.cat(top1), torch.cat(logprob)


def teacher_forced_decode(model: Any, tokens: list[int], kv_dtype: Any = None) -> tuple[Any, Any]:
    """As `teacher_forced`, but one token per forward after the first, each a
    decode step over the KV cache the earlier steps wrote: the path every
    generated token takes (the kernels and, where it builds, the one-call
    decode stack), where `teacher_forced` takes the prompt path."""
    import torch

    from paged_attention.attention.metadata import AttentionMetadata
    from paged_attention.kv_cache import KVCachePool

    cfg = model.config
    block_size = 16
    blocks = -(-len(tokens) // block_size)
    pool = KVCachePool(
        cfg.num_layers, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=kv_dtype or model.dtype
    )
    table = [list(range(blocks))]
    top1, logprob = [], []
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            for pos in range(len(tokens) - 1):
                meta = AttentionMetadata.build(table, [pos], [1], block_size, blocks)
                hidden = model(torch.tensor(tokens[pos : pos + 1]), torch.tensor([pos]), pool, meta)
                logits = model.compute_logits(hidden)
                top1.append(logits.argmax(dim=-1))
                logprob.append(torch.log_softmax(logits, dim=-1)[:, tokens[pos + 1]])
    finally:
        torch.set_flush_denormal(False)
    return torch.cat(top1), torch.cat(logprob)


def run_accuracy(formats: tuple[tuple[str, str, str], ...] = FORMATS, max_tokens: int | None = None) -> dict:
    import torch

    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
    from paged_attention.model.gguf import default_gguf_path
    from paged_attention.model.loader import load_model
    from paged_attention.model.quant import QuantScheme
    from paged_attention.tokenizer import Tokenizer

    tokens = Tokenizer.load(DEFAULT_MODEL_ASSETS).encode(TEXT.read_text(encoding="utf-8"))
    tokens = tokens[:max_tokens] if max_tokens else tokens
    rows, ref_top1 = [], None
    dense_top1: dict[str, Any] = {}  # per dtype: the dense model's choices
    for quant, dtype_name, path in formats:
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        scheme: Any = quant
        kv_dtype = None
        if dtype_name == "auto":  # what dtype "auto" runs the engine in on this CPU
            auto = _auto_numerics(quant)
            dtype, kv_dtype, scheme = auto.dtype, auto.kv_dtype, auto.quantization
        if quant == "int4-rtn":
            model = _from_floats(QuantScheme("int4"), dtype)
        else:
            model, _ = load_model(
                default_gguf_path(), dtype, config=DEFAULT_MODEL_ASSETS, quantization=scheme
            )
        if path == "kernel":
            with kernel_everywhere(model):
                top1, logprob = teacher_forced(model, tokens, kv_dtype=kv_dtype)
        elif path == "decode":
            top1, logprob = teacher_forced_decode(model, tokens, kv_dtype=kv_dtype)
        else:
            top1, logprob = teacher_forced(model, tokens, kv_dtype=kv_dtype)
        if ref_top1 is None:
            assert (quant, dtype_name) == ("none", "fp32"), "the reference runs first"
            ref_top1, ref_nll = top1, -float(logprob.mean())
        if quant == "none":
            dense_top1[dtype_name] = top1
        same_dtype = dense_top1.get(dtype_name)
        nll = -float(logprob.mean())
        kinds: dict[str, int] = {}
        for layer in model.quant_layers():
            label = f"{layer.kind}{'' if layer.exact else ' requantized'}"
            kinds[label] = kinds.get(label, 0) + 1
        rows.append(
            {
                "format": quant,
                "dtype": dtype_name,
                # What "auto" resolved to: activations / KV pool / the dense path's matmuls.
                "numerics": _numerics_label(model, kv_dtype),
                "path": path,
                "top1_agreement": float((top1 == ref_top1).float().mean()),
                # Against the dense model in the same dtype: the weights' own effect.
                "top1_vs_dense_same_dtype": None
                if same_dtype is None
                else float((top1 == same_dtype).float().mean()),
                "perplexity": math.exp(nll),
                "perplexity_change": math.exp(nll) / math.exp(ref_nll) - 1,
                "weight_mib": model.weight_bytes() / 2**20,
                "layers": kinds,
            }
        )
        print(_format_row(rows[-1]), flush=True)
        del model
    return {"text": TEXT.name, "tokens": len(tokens), "reference": REFERENCE, "formats": rows}


def _auto_numerics(quant: str) -> Any:
    import torch

    from paged_attention.engine.resolve import quantized_numerics, resolve_dtype
    from paged_attention.model.quant import resolve_quantization

    cpu = torch.device("cpu")
    scheme = resolve_quantization(quant, is_gguf=True, device_type="cpu", float16_requested=False)
    return quantized_numerics("auto", resolve_dtype("auto", cpu), scheme, cpu)


def _numerics_label(model: Any, kv_dtype: Any) -> str:
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}
    dense = {str(layer.dense_dtype) for layer in model.quant_layers()} or {str(model.dtype)}
    act, kv = names[str(model.dtype)], names[str(kv_dtype or model.dtype)]
    return f"{act} / KV {kv} / matmuls {'+'.join(sorted(names[d] for d in dense))}"


def _from_floats(scheme: Any, dtype: Any) -> Any:
    """The default model quantized from its dequantized float32 weights."""
    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
    from paged_attention.model.gguf import default_gguf_path
    from paged_attention.model.llama import CausalLM
    from paged_attention.model.loader import load_model

    dense, config = load_model(default_gguf_path(), config=DEFAULT_MODEL_ASSETS, quantization="none")
    model = CausalLM(config, dtype, quantization=scheme)
    model.load_weights(dense.hf_weights())
    return model.eval()


_LOAD_SCRIPT = """
import json, os, sys, time, torch
torch.set_num_threads(1)
from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
from paged_attention.model.gguf import default_gguf_path
from paged_attention.model.loader import load_model
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
quant, dtype = sys.argv[1], getattr(torch, sys.argv[2])
path = default_gguf_path()
before = rss()
times = []
for _ in range(2):
    t = time.perf_counter()
    model, _ = load_model(path, dtype, config=DEFAULT_MODEL_ASSETS, quantization=quant)
    times.append(time.perf_counter() - t)
    if len(times) == 1:
        first_rss = rss() - before
        del model
print(json.dumps({"first_load_s": times[0], "second_load_s": times[1], "rss_added_mib": first_rss / 2**20,
                  "weight_mib": model.weight_bytes() / 2**20, "gguf_mib": path.stat().st_size / 2**20}))
"""


def measure_loads(formats: tuple[tuple[str, str], ...] = LOAD_FORMATS) -> list[dict]:
    """Each format in a fresh process with an empty cache directory: the first
    load (the dense path writes its cache then), a second one, resident memory
    added by the first, and the bytes left in the cache directory."""
    out = []
    for quant, dtype_name in formats:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "XDG_CACHE_HOME": cache, "OMP_NUM_THREADS": "1"}
            dtype = "float32" if dtype_name == "fp32" else "bfloat16"
            proc = subprocess.run(
                [sys.executable, "-c", _LOAD_SCRIPT, quant, dtype],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            record["cache_mib"] = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20
        out.append({"format": quant, "dtype": dtype_name, **record})
        print(_format_load(out[-1]), flush=True)
    return out


# Formats quantized at load from the one real float32 checkpoint shipped
# (stories260K), against that checkpoint in float32.
FLOAT_CHECKPOINT_FORMATS = (("none", "bf16"), ("int8", "fp32"), ("int8", "bf16"), ("int4", "fp32"))


def run_float_checkpoint(max_tokens: int | None = None) -> dict:
    """int8 and int4 quantized at load from a real float32 checkpoint
    (stories260K: 260K parameters, a 512-token vocabulary and context), over
    the same text in windows of its context, each teacher-forced from its
    start, against the checkpoint itself in float32. (The default model's only
    float weights are its GGUF's dequantized 4-bit values, which int4 groups of
    32 reproduce exactly: that row says nothing about a float checkpoint.)"""
    import torch

    from paged_attention.engine.builder import STORIES260K
    from paged_attention.model.loader import load_model
    from paged_attention.tokenizer import Tokenizer

    tokens = Tokenizer.load(STORIES260K).encode(TEXT.read_text(encoding="utf-8"))
    tokens = tokens[:max_tokens] if max_tokens else tokens
    model, config = load_model(STORIES260K, torch.float32, quantization="none")
    window = config.max_position_embeddings
    windows = [tokens[i : i + window] for i in range(0, len(tokens) - 1, window)]
    windows = [w for w in windows if len(w) > 1]

    def run(m: Any) -> tuple[Any, Any]:
        pairs = [teacher_forced(m, w) for w in windows]
        return torch.cat([t for t, _ in pairs]), torch.cat([lp for _, lp in pairs])

    ref_top1, ref_lp = run(model)
    ref_nll = -float(ref_lp.mean())
    rows = []
    for quant, dtype_name in FLOAT_CHECKPOINT_FORMATS:
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        m, _ = load_model(STORIES260K, dtype, quantization=quant)
        top1, logprob = run(m)
        nll = -float(logprob.mean())
        kinds: dict[str, int] = {}
        for layer in m.quant_layers():
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        rows.append(
            {
                "format": quant,
                "dtype": dtype_name,
                "top1_agreement": float((top1 == ref_top1).float().mean()),
                "perplexity": math.exp(nll),
                "perplexity_change": math.exp(nll) / math.exp(ref_nll) - 1,
                "layers": kinds,
            }
        )
        r = rows[-1]
        print(
            f"stories260K {quant:>4} {dtype_name}: top-1 {100 * r['top1_agreement']:.2f}%, "
            f"ppl {r['perplexity']:.3f} ({100 * r['perplexity_change']:+.2f}%)",
            flush=True,
        )
    return {
        "model": "stories260K",
        "tokens": len(tokens),
        "window": window,
        "reference_perplexity": math.exp(ref_nll),
        "formats": rows,
    }


def run_quant_accuracy(quick: bool = False, skip_load: bool = False) -> dict:
    formats = FORMATS[:1] + (("gguf", "bf16", "kernel"),) if quick else FORMATS
    result: dict = {"benchmark": "quant-accuracy"}
    result.update(run_accuracy(formats, max_tokens=64 if quick else None))
    result["float_checkpoint"] = run_float_checkpoint(max_tokens=64 if quick else None)
    result["loads"] = [] if skip_load or quick else measure_loads()
    return result


def _format_row(r: dict) -> str:
    return (
        f"{r['format']:>9} {r['dtype']} {r['path']:>6}: top-1 {100 * r['top1_agreement']:.2f}%, "
        f"ppl {r['perplexity']:.4f} ({100 * r['perplexity_change']:+.2f}%), {r['weight_mib']:.1f} MiB"
    )


def _format_load(r: dict) -> str:
    return (
        f"{r['format']:>5} {r['dtype']}: load {r['first_load_s']:.2f} s first, {r['second_load_s']:.2f} s "
        f"after; +{r['rss_added_mib']:.0f} MiB resident; weights {r['weight_mib']:.1f} MiB; "
        f"cache {r['cache_mib']:.0f} MiB (GGUF {r['gguf_mib']:.0f} MiB)"
    )


def accuracy_markdown(result: dict) -> str:
    """The lead's tables: accuracy per format, then load cost."""
    from paged_attention.bench.report import markdown_table

    rows = [
        [
            r["format"],
            r["dtype"],
            r["path"],
            r.get("numerics", ""),
            f"{100 * r['top1_agreement']:.2f}%",
            "" if r["top1_vs_dense_same_dtype"] is None else f"{100 * r['top1_vs_dense_same_dtype']:.2f}%",
            f"{r['perplexity']:.3f}",
            f"{100 * r['perplexity_change']:+.2f}%",
            f"{r['weight_mib']:.1f}",
            ", ".join(f"{n} {k}" for k, n in sorted(r["layers"].items())) or "dense",
        ]
        for r in result["formats"]
    ]
    text = (
        f"Teacher-forced over {result['tokens']} tokens of {result['text']}; reference: "
        f"dense float32 over the GGUF's dequantized weights.\n\n"
        + markdown_table(
            [
                "format",
                "dtype",
                "path",
                "activations / KV / matmuls",
                "top-1 vs ref",
                "top-1 vs dense same dtype",
                "perplexity",
                "vs ref",
                "weights MiB",
                "linear layers",
            ],
            rows,
        )
    )
    fc = result.get("float_checkpoint")
    if fc:
        text += (
            f"\n\nA real float32 checkpoint ({fc['model']}, {fc['tokens']} tokens of the same text in "
            f"windows of {fc['window']}) against itself in float32:\n\n"
            + markdown_table(
                ["format", "dtype", "top-1 vs float32", "perplexity", "vs float32", "linear layers"],
                [
                    [
                        r["format"],
                        r["dtype"],
                        f"{100 * r['top1_agreement']:.2f}%",
                        f"{r['perplexity']:.3f}",
                        f"{100 * r['perplexity_change']:+.2f}%",
                        ", ".join(f"{n} {k}" for k, n in sorted(r["layers"].items())) or "dense",
                    ]
                    for r in fc["formats"]
                ],
            )
        )
    if result.get("loads"):
        loads = [
            [
                r["format"],
                r["dtype"],
                f"{r['first_load_s']:.2f}",
                f"{r['second_load_s']:.2f}",
                f"{r['rss_added_mib']:.0f}",
                f"{r['weight_mib']:.1f}",
                f"{r['cache_mib']:.0f}",
            ]
            for r in result["loads"]
        ]
        text += "\n\n" + markdown_table(
            [
                "format",
                "dtype",
                "first load s",
                "next load s",
                "RSS added MiB",
                "weights MiB",
                "cache on disk MiB",
            ],
            loads,
        )
    return text + "\n"


def print_quant_accuracy(result: dict) -> None:
    print(accuracy_markdown(result))
