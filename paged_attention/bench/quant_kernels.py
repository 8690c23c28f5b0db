"""Quantized matmuls against dense ones, per matmul and per decode step.

Per matmul: SmolLM2-135M's projection shapes (hidden 576, intermediate 1536,
9 query and 3 KV heads of 64, vocabulary 49152) at a few batch sizes (rows),
each as dense float32, dense bfloat16 (plain, and packed in oneDNN's layout as the
engine keeps its dense copies), and through `QuantLinear` (int8, int4
with groups of 32 and 64) both on PyTorch's weight-only kernels and on the
dense path (weights dequantized into scratch, then a dense bfloat16 matmul).
Every layer-sized weight exists in `copies` distinct instances used in turn,
as a model's 30 layers are: one instance would sit in cache, while decode
reads its weights from memory.

Per decode step: the default model loaded dense (float32, bfloat16) and
quantized (gguf, int8, int4), one forward over `batch` sequences of `context`
cached tokens plus the LM head: what a decode step of the engine runs.

    paged-attention bench quant-kernels [--rows 1,64] [--batches 1,64] [--quick]

Timings are medians over repeats; the shapes and models are fixed, so figures
from two machines compare directly (with ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 set before the run,
an AVX-512 machine takes the AVX2 code paths).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

HIDDEN, INTERMEDIATE, HEAD_DIM, HEADS, KV_HEADS, VOCAB = 576, 1536, 64, 9, 3, 49152
# name -> (out_features, in_features): the fused projections, their parts, the head.
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "q": (HEADS * HEAD_DIM, HIDDEN),
    "k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "gate": (INTERMEDIATE, HIDDEN),
    "up": (INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
    "lm_head": (VOCAB, HIDDEN),
}
# One decode layer's matmuls, fused as the model runs them.
LAYER = ("qkv", "o", "gate_up", "down")
IMPLS = (
    "dense-fp32",
    "dense-bf16",
    "dense-bf16-packed",
    "int8-kernel",
    "int4-g32-kernel",
    "int4-g64-kernel",
    "int8-dense",
    "int4-g32-dense",
)
STEP_FORMATS = ("none-fp32", "none-bf16", "gguf-bf16", "gguf-fp32", "int8-bf16", "int4-bf16")


def median_ms(fn: Callable[[], Any], repeats: int, min_time_s: float = 0.05) -> float:
    """Median over `repeats` of the mean time of a batch of calls sized to take
    about `min_time_s` (short calls are timed in bulk, as timers are coarse)."""
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    n = max(1, min(1000, int(min_time_s / max(once, 1e-7))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return 1e3 * statistics.median(times)


def _layers(impl: str, n: int, k: int, copies: int, seed: int) -> list[Callable[[Any], Any]]:
    """`copies` independent layers of `impl`, as callables on an activation."""
    import torch
    import torch.nn.functional as F

    from paged_attention.model.quant import QuantLinear, QuantScheme, Scratch, kernels

    if impl == "dense-bf16-packed" and not kernels.bf16_packing():
        return []  # no oneDNN blocked layout here: the engine's copies stay plain
    gen = torch.Generator().manual_seed(seed)
    scratch = Scratch()
    out: list[Callable[[Any], Any]] = []
    for _ in range(copies):
        w = torch.randn(n, k, generator=gen) * 0.05
        if impl == "dense-bf16-packed":  # what the engine's dense copies run
            packed = kernels.pack_bf16(w.bfloat16())
            out.append(lambda x, packed=packed: kernels.packed_bf16_linear(x, packed))
            continue
        if impl.startswith("dense"):
            wd = w if impl == "dense-fp32" else w.bfloat16()
            out.append(lambda x, wd=wd: F.linear(x, wd))
            continue
        method, _, path = impl.rpartition("-")
        scheme = QuantScheme("int8") if method == "int8" else QuantScheme("int4", int(method[-2:]))
        layer = QuantLinear(n, k, scheme, bias=False, dtype=torch.bfloat16, scratch=scratch)
        layer.load_rows(0, n, w)
        layer.dense_rows = 1 << 62 if path == "kernel" else 0
        out.append(layer)
    return out


def time_matmuls(
    rows: list[int], copies: int, repeats: int, impls: tuple[str, ...] = IMPLS, seed: int = 0
) -> list[dict]:
    """ms per matmul for every shape x impl x rows (one record each)."""
    import torch

    records = []
    for name, (n, k) in SHAPES.items():
        # The head is 28M weights: one instance is out of cache already.
        count = 1 if name == "lm_head" else copies
        for impl in impls:
            layers = _layers(impl, n, k, count, seed)
            if not layers:
                continue
            for m in rows:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
                x = x if impl == "dense-fp32" else x.bfloat16()
                state = {"i": 0}

                def call(layers=layers, x=x, state=state) -> None:
                    state["i"] = (state["i"] + 1) % len(layers)
                    layers[state["i"]](x)

                with torch.inference_mode():
                    ms = median_ms(call, repeats)
                records.append({"shape": name, "n": n, "k": k, "impl": impl, "rows": m, "ms": ms})
            del layers
    return records


def time_decode_steps(formats: tuple[str, ...], batches: list[int], context: int, repeats: int) -> list[dict]:
    """ms per decode step (forward + LM head) of the default model per format and batch."""
    import torch

    from paged_attention.attention.metadata import AttentionMetadata
    from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
    from paged_attention.kv_cache import KVCachePool
    from paged_attention.model.gguf import default_gguf_path
    from paged_attention.model.loader import load_model

    records = []
    for fmt in formats:
        quant, _, dtype_name = fmt.rpartition("-")
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        model, cfg = load_model(default_gguf_path(), dtype, config=DEFAULT_MODEL_ASSETS, quantization=quant)
        for batch in batches:
            block_size = 16
            per_seq = -(-(context + 1) // block_size)
            pool = KVCachePool(
                cfg.num_layers, batch * per_seq, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype
            )
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
            meta = AttentionMetadata.build(
                tables, [context] * batch, [1] * batch, block_size, batch * per_seq
            )
            ids = torch.randint(cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(0))
            positions = torch.full((batch,), context, dtype=torch.long)

            def step(model=model, ids=ids, positions=positions, pool=pool, meta=meta) -> None:
                model.compute_logits(model(ids, positions, pool, meta))

            torch.set_flush_denormal(True)  # as the model runner does on the CPU
            try:
                with torch.inference_mode():
                    ms = median_ms(step, repeats, min_time_s=0.2)
            finally:
                torch.set_flush_denormal(False)
            records.append(
                {
                    "format": fmt,
                    "batch": batch,
                    "context": context,
                    "ms": ms,
                    "weight_mib": model.weight_bytes() / 2**20,
                }
            )
        del model
    return records


def run_quant_kernels(
    rows: list[int],
    batches: list[int],
    context: int = 128,
    copies: int = 30,
    repeats: int = 5,
    quick: bool = False,
    step_formats: tuple[str, ...] = STEP_FORMATS,
) -> dict:
    import torch

    from paged_attention.model.quant import kernels

    if quick:
        rows, batches, copies, repeats, step_formats = [1], [1], 2, 2, ("none-bf16", "gguf-bf16")
    matmuls = time_matmuls(rows, copies, repeats)
    steps = time_decode_steps(step_formats, batches, context, repeats)
    return {
        "benchmark": "quant-kernels",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int4_pack_layout": str(kernels.int4_pack_layout()),
        "rows": rows,
        "copies": copies,
        "repeats": repeats,
        "matmuls": matmuls,
        "decode_steps": steps,
    }


def matmul_table(result: dict) -> tuple[list[str], list[list[object]]]:
    """Rows: shape x rows; columns: ms per impl (and the layer total)."""
    by: dict[tuple[str, int], dict[str, float]] = {}
    for r in result["matmuls"]:
        by.setdefault((r["shape"], r["rows"]), {})[r["impl"]] = r["ms"]
    impls = [i for i in IMPLS if any(i in v for v in by.values())]
    headers = ["shape", "rows", *impls]
    table: list[list[object]] = []
    for m in result["rows"]:
        layer = {i: sum(by[(s, m)].get(i, float("nan")) for s in LAYER) for i in impls}
        for shape in SHAPES:
            if (shape, m) in by:
                table.append([shape, m, *(f"{by[(shape, m)].get(i, float('nan')):.4f}" for i in impls)])
        table.append(["layer (qkv+o+gate_up+down)", m, *(f"{layer[i]:.4f}" for i in impls)])
    return headers, table


def step_table(result: dict) -> tuple[list[str], list[list[object]]]:
    headers = ["format", "batch", "ms/step", "weights MiB"]
    rows = [
        [r["format"], r["batch"], f"{r['ms']:.2f}", f"{r['weight_mib']:.1f}"] for r in result["decode_steps"]
    ]
    return headers, rows


def print_quant_kernels(result: dict) -> None:
    from paged_attention.bench.report import format_table

    print(f"CPU capability {result['cpu_capability']}, int4 pack layout {result['int4_pack_layout']}")
    print("ms per matmul (median; rows = activation rows):")
    print(format_table(*matmul_table(result), left=1))
    print("ms per decode step of SmolLM2-135M (forward + LM head):")
    print(format_table(*step_table(result), left=1))
