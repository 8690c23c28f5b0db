"""The GPU run: kernel correctness at real sizes, decode bandwidth, prefill
throughput, end-to-end generation and start-up time. Writes one JSON report
(rewritten after every section, so a run cut short keeps what it finished).

    python benchmarks/gpu_bench.py [--out gpu_bench.json] [--quick]
        [--sections correctness,decode,prefill,tuning,e2e,startup]

Sections:
  correctness  Triton write/decode/split-K/prefill vs the reference evaluated in
               float64, bf16/fp16/fp32, head_dim 64/80/96/128, block sizes 8..128.
  decode       decode kernel bandwidth: bytes of K/V and queries read plus
               outputs written, over the median time (triton.testing.do_bench),
               against measured device-to-device copy bandwidth; batch 1..256 x
               context 128..32K; SDPA's flash backend on contiguous K/V as the
               unpaged reference; split-K on vs off.
  prefill      prefill kernel TFLOP/s vs SDPA flash (causal) on contiguous tensors.
  tuning       decode (BLOCK_N x num_warps) and prefill (BLOCK_M x num_warps)
               tile choices at a few sizes, to check the defaults in
               triton_kernels.py.
  e2e          generation throughput, random-weight ~1B Llama in bf16: this
               engine (CUDA graphs and eager, where the engine takes
               enforce_eager) vs transformers generate (static batches) and
               transformers continuous batching (generate_batch).
  startup      cold (empty Triton cache) and warm start: import, LLM(), first token.

Every section catches its own failure and records it, so one broken part
does not hide the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paged_attention.attention.random_batch import random_paged_batch
from paged_attention.attention.torch_attention import paged_attention
from paged_attention.kv_cache import write_kv as torch_write_kv

GiB = 2**30
# "cuda" for real runs; the end-to-end helpers also run on "cpu" for a smoke test.
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Max abs error against float64 for outputs of magnitude ~1 (randn values):
# a few units in the last place of the storage dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def kernels():
    from paged_attention.attention import triton_kernels

    return triton_kernels


def do_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ============================================================ correctness
def _check(out, q, k_pool, v_pool, meta, scale, dtype) -> dict:
    ref = paged_attention(q.double(), k_pool.double(), v_pool.double(), meta, scale)
    err = (out.double() - ref).abs().max().item()
    return {"max_abs_err": err, "nan": bool(out.isnan().any()), "ok": bool(err <= TOLERANCE[dtype])}


def section_correctness(quick: bool) -> dict:
    from paged_attention.attention.backend import build_kernel_metadata, select_attention_backend

    tk = kernels()
    backend = select_attention_backend("cuda", "triton")
    configs = [
        # name, Hq, Hkv, head_dim, block_size, dtype
        ("llama3-8b-like", 32, 8, 128, 16, "bf16"),
        ("mqa-d128-b128", 16, 1, 128, 128, "fp16"),
        ("smollm2-like-group3-d64-b8", 9, 3, 64, 8, "bf16"),
        ("mha-d80-b32", 32, 32, 80, 32, "fp16"),
        ("d96-b64", 16, 4, 96, 64, "bf16"),
        ("fp32-ieee", 8, 2, 128, 16, "fp32"),
    ]
    if quick:
        configs = configs[:3]
    results = []
    gen = torch.Generator().manual_seed(0)
    for name, hq, hkv, dim, bs, dt in configs:
        dtype = DTYPES[dt]
        scale = dim**-0.5
        row: dict = {
            "name": name,
            "heads": hq,
            "kv_heads": hkv,
            "head_dim": dim,
            "block_size": bs,
            "dtype": dt,
        }
        try:
            # write_kv: bitwise equal to the torch write, padding slots untouched.
            shape = (64, hkv, bs, dim)
            kp, vp, ref_k, ref_v = (torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(4))
            k = torch.randn(100, hkv, dim, device="cuda")
            v = torch.randn(100, hkv, dim, device="cuda")
            slots = torch.randperm(64 * bs, device="cuda")[:100]
            slots[::7] = -1
            tk.write_kv(kp, vp, k, v, slots)
            keep = slots >= 0
            torch_write_kv(ref_k, ref_v, k[keep], v[keep], slots[keep])
            row["write_kv_equal"] = bool(torch.equal(kp, ref_k) and torch.equal(vp, ref_v))

            # decode, 48 sequences of random length up to 4K, backend path.
            ctx = torch.randint(1, 4097, (48,), generator=gen).tolist()
            k_pool, v_pool, meta = random_paged_batch(
                [c - 1 for c in ctx], [1] * 48, bs, hkv, dim, dtype, "cuda", seed=1, spare_blocks=8
            )
            q = torch.randn(48, hq, dim, device="cuda").to(dtype)
            row["decode"] = _check(
                backend.attention(q, k_pool, v_pool, meta, scale), q, k_pool, v_pool, meta, scale, dtype
            )
            del k_pool, v_pool

            # split-K: two long sequences and a one-token one.
            ctx = [16384, 1, 5000]
            k_pool, v_pool, meta = random_paged_batch(
                [c - 1 for c in ctx], [1] * 3, bs, hkv, dim, dtype, "cuda", seed=2, spare_blocks=8
            )
            q = torch.randn(3, hq, dim, device="cuda").to(dtype)
            km = build_kernel_metadata(meta, torch.device("cuda"))
            row["split_k"] = {
                str(s): _check(
                    tk.decode_attention(q, k_pool, v_pool, km.block_tables, km.context_lens, scale, s),
                    q,
                    k_pool,
                    v_pool,
                    meta,
                    scale,
                    dtype,
                )
                for s in (1, 7, 32)
            }
            del k_pool, v_pool

            # prefill: fresh prompts, prefix hits, chunks and decode rows in one step.
            num_computed = [0, 0, 1000, 37, 2048, 500, 0, 3000]
            query_lens = [1024, 7, 300, 1, 768, 1, 129, 64]
            k_pool, v_pool, meta = random_paged_batch(
                num_computed, query_lens, bs, hkv, dim, dtype, "cuda", seed=3, spare_blocks=8
            )
            q = torch.randn(meta.num_tokens, hq, dim, device="cuda").to(dtype)
            row["prefill"] = _check(
                backend.attention(q, k_pool, v_pool, meta, scale), q, k_pool, v_pool, meta, scale, dtype
            )
            del k_pool, v_pool
            parts = [row["decode"], row["prefill"], *row["split_k"].values()]
            row["ok"] = row["write_kv_equal"] and all(p["ok"] and not p["nan"] for p in parts)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=5)
            row["ok"] = False
        free_cuda()
        results.append(row)
        print(f"correctness {name}: {'ok' if row['ok'] else 'FAILED'}", flush=True)
    return {"all_ok": all(r["ok"] for r in results), "configs": results}


# ================================================================= decode
def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written over the median time."""
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(partial(dst.copy_, src))
    del src, dst
    return 2 * GiB / (ms * 1e-3) / 1e9


def _sdpa_flash(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Callable[[], object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q4.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q4, k, v, is_causal=causal, **({"enable_gqa": True} if gqa else {})
            )

    run()  # raises here, not inside do_bench, if flash cannot take these inputs
    return run


def section_decode(quick: bool) -> dict:
    tk = kernels()
    hq, hkv, dim, bs, dtype = 32, 8, 128, 16, torch.bfloat16  # Llama-3-8B's attention shape
    elt = 2
    token_bytes = 2 * hkv * dim * elt  # K and V of one token, one layer
    free, _ = torch.cuda.mem_get_info()
    # Pool and the contiguous SDPA copy of the largest config must both fit.
    budget = min(16 * GiB, int(free * 0.3))
    num_blocks = budget // (bs * token_bytes)
    k_pool = torch.empty(num_blocks, hkv, bs, dim, dtype=dtype, device="cuda").normal_()
    v_pool = torch.empty_like(k_pool).normal_()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbs = copy_bandwidth_gbs()
    batches = [1, 4, 16, 64, 256] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    contexts = [128, 2048, 32768] if quick else [128, 512, 2048, 8192, 32768]
    rows = []
    for batch in batches:
        for ctx in contexts:
            row: dict = {"batch": batch, "context": ctx}
            blocks = -(-ctx // bs)
            if batch * blocks > num_blocks:
                row["skipped"] = (
                    f"needs {batch * ctx * token_bytes / GiB:.1f} GiB of K/V, budget {budget / GiB:.1f}"
                )
                rows.append(row)
                continue
            try:
                # Fragmented like a long-running pool: random blocks for every sequence.
                tables = torch.randperm(num_blocks, device="cuda")[: batch * blocks].view(batch, blocks).int()
                lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
                q = torch.randn(batch, hq, dim, device="cuda", dtype=dtype)
                scale = dim**-0.5
                moved = batch * ctx * token_bytes + 2 * batch * hq * dim * elt  # K/V + q read, out written
                splits = tk.decode_num_splits(batch, hkv, sms, ctx)
                ms = do_bench(partial(tk.decode_attention, q, k_pool, v_pool, tables, lens, scale, splits))
                row.update(splits=splits, ms=ms, gbs=moved / (ms * 1e-3) / 1e9)
                row["fraction_of_copy_bw"] = row["gbs"] / copy_gbs
                if splits > 1:
                    ms1 = do_bench(partial(tk.decode_attention, q, k_pool, v_pool, tables, lens, scale, 1))
                    row.update(ms_no_split=ms1, gbs_no_split=moved / (ms1 * 1e-3) / 1e9)
                del tables
                try:
                    k = torch.randn(batch, hkv, ctx, dim, device="cuda", dtype=dtype)
                    v = torch.randn_like(k)
                    run = _sdpa_flash(q.view(batch, hq, 1, dim), k, v, causal=False)
                    sdpa_ms = do_bench(run)
                    row.update(sdpa_flash_ms=sdpa_ms, sdpa_flash_gbs=moved / (sdpa_ms * 1e-3) / 1e9)
                    del k, v
                except Exception as exc:
                    row["sdpa_flash_error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            free_cuda()
            rows.append(row)
            print(
                f"decode B={batch} ctx={ctx}: {row.get('gbs', 0):.0f} GB/s "
                f"(sdpa {row.get('sdpa_flash_gbs', 0):.0f}) splits={row.get('splits')}",
                flush=True,
            )
    del k_pool, v_pool
    free_cuda()
    return {
        "shape": {"heads": hq, "kv_heads": hkv, "head_dim": dim, "block_size": bs, "dtype": "bf16"},
        "num_sms": sms,
        "copy_bandwidth_gbs": copy_gbs,
        "rows": rows,
    }


# ================================================================ prefill
def section_prefill(quick: bool) -> dict:
    tk = kernels()
    hq, hkv, dim, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    cases = [(1, 2048), (4, 2048), (1, 8192)]
    if not quick:
        cases = [(1, 512), (8, 512), (1, 2048), (8, 2048), (1, 8192), (2, 16384)]
    rows = []
    for batch, length in cases:
        row: dict = {"batch": batch, "length": length}
        try:
            blocks = -(-length // bs)
            num_blocks = batch * blocks
            k_pool = torch.randn(num_blocks, hkv, bs, dim, device="cuda", dtype=dtype)
            v_pool = torch.randn_like(k_pool)
            tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks).int()
            lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
            starts = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
            q = torch.randn(batch * length, hq, dim, device="cuda", dtype=dtype)
            scale = dim**-0.5
            flops = 4 * batch * hq * dim * length * (length + 1) / 2  # causal half of QK^T and PV
            ms = do_bench(partial(tk.prefill_attention, q, k_pool, v_pool, tables, lens, starts, scale))
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            # Prefix-cache hit: the first half already cached, the second half new.
            half = length // 2
            starts_h = torch.arange(0, (batch + 1) * half, half, dtype=torch.int32, device="cuda")
            qh = q[: batch * half]
            ms_h = do_bench(partial(tk.prefill_attention, qh, k_pool, v_pool, tables, lens, starts_h, scale))
            row["prefix_hit_half_ms"] = ms_h
            try:
                q4 = q.view(batch, length, hq, dim).transpose(1, 2)
                k = torch.randn(batch, hkv, length, dim, device="cuda", dtype=dtype)
                v = torch.randn_like(k)
                run = _sdpa_flash(q4, k, v, causal=True)
                sdpa_ms = do_bench(run)
                row.update(sdpa_flash_ms=sdpa_ms, sdpa_flash_tflops=flops / (sdpa_ms * 1e-3) / 1e12)
                del k, v
            except Exception as exc:
                row["sdpa_flash_error"] = f"{type(exc).__name__}: {exc}"
            del k_pool, v_pool
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        free_cuda()
        rows.append(row)
        print(
            f"prefill B={batch} L={length}: {row.get('tflops', 0):.0f} TFLOP/s "
            f"(sdpa {row.get('sdpa_flash_tflops', 0):.0f})",
            flush=True,
        )
    return {
        "shape": {"heads": hq, "kv_heads": hkv, "head_dim": dim, "block_size": bs, "dtype": "bf16"},
        "rows": rows,
    }


# ================================================================= tuning
def section_tuning(quick: bool) -> dict:
    tk = kernels()
    hq, hkv, dim, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    scale = dim**-0.5
    rows = []
    for batch, ctx in ((1, 32768), (32, 4096), (256, 1024)):
        blocks = -(-ctx // bs)
        k_pool = torch.randn(batch * blocks, hkv, bs, dim, device="cuda", dtype=dtype)
        v_pool = torch.randn_like(k_pool)
        tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, dim, device="cuda", dtype=dtype)
        splits = tk.decode_num_splits(
            batch, hkv, torch.cuda.get_device_properties(0).multi_processor_count, ctx
        )
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                fn = partial(
                    tk.decode_attention,
                    q,
                    k_pool,
                    v_pool,
                    tables,
                    lens,
                    scale,
                    splits,
                    block_n=block_n,
                    num_warps=warps,
                )
                try:
                    rows.append(
                        {
                            "kernel": "decode",
                            "batch": batch,
                            "context": ctx,
                            "block_n": block_n,
                            "num_warps": warps,
                            "ms": do_bench(fn),
                        }
                    )
                except Exception as exc:
                    rows.append(
                        {
                            "kernel": "decode",
                            "batch": batch,
                            "context": ctx,
                            "block_n": block_n,
                            "num_warps": warps,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
        del k_pool, v_pool
        free_cuda()
    for batch, length in ((1, 8192), (8, 1024)):
        blocks = -(-length // bs)
        k_pool = torch.randn(batch * blocks, hkv, bs, dim, device="cuda", dtype=dtype)
        v_pool = torch.randn_like(k_pool)
        tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()
        lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        starts = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
        q = torch.randn(batch * length, hq, dim, device="cuda", dtype=dtype)
        for block_m in (64, 128):
            for warps in (4, 8):
                fn = partial(
                    tk.prefill_attention,
                    q,
                    k_pool,
                    v_pool,
                    tables,
                    lens,
                    starts,
                    scale,
                    block_m=block_m,
                    num_warps=warps,
                )
                try:
                    rows.append(
                        {
                            "kernel": "prefill",
                            "batch": batch,
                            "length": length,
                            "block_m": block_m,
                            "num_warps": warps,
                            "ms": do_bench(fn),
                        }
                    )
                except Exception as exc:
                    rows.append(
                        {
                            "kernel": "prefill",
                            "batch": batch,
                            "length": length,
                            "block_m": block_m,
                            "num_warps": warps,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
        del k_pool, v_pool
        free_cuda()
    for row in rows:
        print("tuning", row, flush=True)
    return {
        "defaults": {
            "decode_block_n": tk.DECODE_BLOCK_N,
            "decode_num_warps": tk.DECODE_NUM_WARPS,
            "prefill_block_m": tk.PREFILL_BLOCK_M,
            "prefill_num_warps": tk.PREFILL_NUM_WARPS,
        },
        "rows": rows,
    }


# ==================================================================== e2e
# Llama-3.2-1B's shape with a 32K vocabulary: about 1.04B parameters.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)


def random_1b(folder: Path) -> Path:
    """LLAMA_1B with random bf16 weights (initialised on the GPU: seconds, not
    minutes) and the shipped tokenizer, saved once."""
    from paged_attention.model.random_model import random_llama_folder

    random_llama_folder(folder, LLAMA_1B, dtype=torch.bfloat16, device=DEVICE)
    free_cuda()
    return folder


def _attention_backend_name(llm) -> str:
    """Which attention the engine's model runs, if the model exposes it."""
    from paged_attention.attention.backend import AttentionBackend

    for module in llm.engine.runner.model.modules():
        for value in vars(module).values():
            if isinstance(value, AttentionBackend):
                return value.name
    return "unknown (no AttentionBackend on the model)"


def run_engine(folder: Path, workload, **kwargs) -> dict:
    from paged_attention.config import engine_option_names
    from paged_attention.engine.llm import LLM
    from paged_attention.sampling_params import SamplingParams

    accepted = engine_option_names()
    dropped = [k for k in kwargs if k not in accepted]
    llm = LLM(str(folder), **{k: v for k, v in kwargs.items() if k in accepted})
    prompts = [{"prompt_token_ids": ids} for ids, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in workload]
    # Warm-up: Triton compilation and graph capture for the small sizes.
    llm.generate(
        prompts[:8], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 8, use_tqdm=False
    )
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "attention_backend": _attention_backend_name(llm),
        "kwargs_not_supported_by_LLM": dropped,
    }
    del llm, outputs
    free_cuda()
    return result


@torch.inference_mode()
def run_hf_generate(hf, workload, batch_size: int) -> dict:
    """Static batches, left-padded, each run to its requested length."""

    def run(batch):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=DEVICE)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p, device=DEVICE)
            mask[i, width - len(p) :] = 1
        n = max(n for _, n in batch)
        out = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
        return (out.shape[1] - width) * len(batch)

    run(workload[:2])
    sync()
    start = time.perf_counter()
    tokens = sum(run(workload[i : i + batch_size]) for i in range(0, len(workload), batch_size))
    sync()
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "batch_size": batch_size,
        "attn_implementation": hf.config._attn_implementation,
    }


def run_hf_continuous(hf, workload, max_new_tokens: int) -> dict:
    """transformers' own paged continuous batching. Not under inference_mode:
    its generation thread updates, outside that mode, tensors it makes here."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    inputs = [ids for ids, _ in workload]
    hf.generate_batch(inputs=inputs[:8], generation_config=config, progress_bar=False)  # warm-up
    sync()
    start = time.perf_counter()
    outputs = hf.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    sync()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    errors = [o.error for o in outputs.values() if getattr(o, "error", None)]
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "num_errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def section_e2e(quick: bool, workdir: Path) -> dict:
    import random

    import transformers
    from transformers import AutoModelForCausalLM

    folder = random_1b(workdir / "llama-1b-random")
    rng = random.Random(0)
    num_requests, output_len = (64, 128) if quick else (256, 256)
    # One output length for all: transformers' continuous batching takes one config.
    workload = [
        ([rng.randrange(3, LLAMA_1B["vocab_size"]) for _ in range(rng.randint(128, 1024))], output_len)
        for _ in range(num_requests)
    ]
    report: dict = {
        "model": LLAMA_1B,
        "num_requests": num_requests,
        "prompt_len": [128, 1024],
        "output_len": output_len,
        "transformers": transformers.__version__,
    }
    engine_kwargs = dict(dtype="bfloat16", device="cuda", max_model_len=2048, kv_cache_memory="16GiB")
    for name, extra in (
        ("engine_cuda_graphs", {"enforce_eager": False}),
        ("engine_eager", {"enforce_eager": True}),
    ):
        try:
            report[name] = run_engine(folder, workload, **engine_kwargs, **extra)
        except Exception as exc:
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5),
            }
        print(f"e2e {name}: {report[name].get('tokens_per_s', 0):.0f} tok/s", flush=True)
    hf = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, attn_implementation="sdpa"
    ).cuda()
    hf.eval()
    for name, fn, arg in (
        ("hf_generate_bs64", run_hf_generate, 64),
        ("hf_continuous_batching", run_hf_continuous, output_len),
    ):
        try:
            report[name] = fn(hf, workload, arg)
        except Exception as exc:
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5),
            }
        free_cuda()
        print(f"e2e {name}: {report[name].get('tokens_per_s', 0):.0f} tok/s", flush=True)
    del hf
    free_cuda()
    return report


# ================================================================ startup
STARTUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from paged_attention.engine.llm import LLM
from paged_attention.sampling_params import SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], dtype="bfloat16", device="cuda", max_model_len=2048, kv_cache_memory="8GiB")
t2 = time.perf_counter()
p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
llm.generate([{"prompt_token_ids": list(range(3, 203))}], p, use_tqdm=False)
t3 = time.perf_counter()
llm.generate([{"prompt_token_ids": list(range(3, 203))}], p, use_tqdm=False)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "construct_s": t2 - t1, "first_generate_s": t3 - t2,
                  "second_generate_s": t4 - t3, "total_to_first_output_s": t3 - t0}))
"""


def section_startup(workdir: Path) -> dict:
    folder = random_1b(workdir / "llama-1b-random")
    cache = workdir / "triton-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
    env.pop("TRITON_INTERPRET", None)
    report = {}
    for name in ("cold_triton_cache", "warm_triton_cache"):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", STARTUP_SCRIPT, str(folder)],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=300,
        )
        wall = time.perf_counter() - start
        if proc.returncode == 0:
            report[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall}
        else:
            report[name] = {"error": proc.stderr[-3000:]}
        print(f"startup {name}: {report[name]}", flush=True)
    return report


# =================================================================== main
def environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / GiB)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(os.environ.get("OUT", ".")) / "gpu_bench.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--quick", action="store_true", help="fewer configs (a few minutes in all)")
    parser.add_argument("--sections", default="correctness,decode,prefill,tuning,e2e,startup")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random model is saved")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this script measures the real GPU kernels")
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this script is for a GPU machine")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    report: dict = {"environment": environment(), "quick": args.quick}
    sections: dict[str, Callable[[], dict]] = {
        "correctness": lambda: section_correctness(args.quick),
        "decode": lambda: section_decode(args.quick),
        "prefill": lambda: section_prefill(args.quick),
        "tuning": lambda: section_tuning(args.quick),
        "e2e": lambda: section_e2e(args.quick, workdir),
        "startup": lambda: section_startup(workdir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as exc:
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        report[name + "_wall_s"] = time.perf_counter() - start
        args.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"== {name} done in {report[name + '_wall_s']:.0f} s -> {args.out}", flush=True)
    ok = report.get("correctness", {}).get("all_ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
