"""Capacity planner: a calculator, not a measurement.

For a model (built-in table or a local config.json), a device memory size and
a workload, it computes: weight bytes, KV bytes per token (with grouped-query
attention: only the KV heads are cached), how many KV tokens fit, and how many
requests run at once when each reserves max_model_len (static), prompt +
max_tokens (Orca-style), or only the blocks it fills (paging); and the memory
a shared system prompt takes with and without sharing its blocks.

    paged-attention plan --model Llama-2-7B --gpu V100-32GB --dtype float16
    paged-attention plan --model ./my-model/config.json --memory 24GiB --json

Assumptions (each one a flag):
  * KV budget = device memory * gpu_memory_utilization (0.9, vLLM's default)
    - weights; activations and the CUDA context live in the remaining 10%.
    `--kv-memory` gives the KV budget directly instead.
  * A paged request holds the blocks of its final length, prompt_mean +
    output_mean, plus half a block of internal fragmentation on average: the
    conservative end-of-life footprint (over its life it holds less).
  * With a shared system prompt, prompt and output lengths are each user's own
    tokens after it. Its full blocks are stored once; its last, partly filled
    block is copied on write by every user, so each user's own tokens start in
    a private copy of that block.
  * `--tensor-parallel-size N` (N devices of `--memory` each, Megatron-style):
    each device holds 1/N of the attention (in whole KV-head groups: the
    figures are the most loaded device's) and MLP matrices, ceil(V/N) rows of
    the embedding and LM head, and all the norms; and, for every token, its
    share of the KV heads (one head when there are fewer KV heads than
    devices: those heads are replicated). Every device holds every token, so
    KV tokens that fit = one device's budget / its bytes per token.

The tutorial's V100-32GB example (Llama-2-7B-sized, 0.5 MiB of fp16 KV per
token): "about 25 versus 100 users" is 51,200 KV tokens (25 GiB) split as
2048 reserved per user versus about 512 used per user. With the fp16 weights
(12.6 GiB) on the card and 10% headroom, 16.3 GiB is left: the planner gets
16 versus 64 users, the same 4x; `--kv-memory 25GiB` reproduces 25 versus 98.
"60K versus 10.5K tokens for 100 users sharing a 500-token prompt" is 100 x
(500 + 100) versus 500 + 100 x 100 (`--shared-prompt 500 --users 100
--prompt-mean 0 --output-mean 100`); with 16-token blocks paging stores
11,696 slots, as the shared prompt's last block (4 tokens) is copied per user.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from paged_attention.distributed.sharding import check_split, kv_heads_per_rank
from paged_attention.entrypoints.engine_args import add_engine_args
from paged_attention.planner_configs import (
    DTYPE_BYTES,
    GIB,
    GPUS,
    ModelSpec,
    lookup_model,
)


@dataclass(frozen=True)
class Workload:
    prompt_mean: float = 256
    prompt_max: int = 1024
    output_mean: float = 256
    output_max: int = 1024
    max_model_len: int | None = None  # default: prompt_max + output_max, capped by the model
    block_size: int = 16
    shared_prompt: int = 0  # tokens of a system prompt every user shares
    users: int = 100  # users for the shared-prompt comparison


@dataclass(frozen=True)
class Plan:
    model: str
    num_params: int
    weight_dtype: str
    kv_dtype: str
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_without_gqa: int  # if every query head had its own K/V
    device_bytes: int
    gpu_memory_utilization: float
    kv_budget_bytes: int
    kv_tokens: int  # KV token slots that fit in the budget
    kv_blocks: int
    max_model_len: int
    static_concurrency: int  # each request reserves max_model_len
    orca_concurrency: int  # each reserves prompt_mean + output_max
    paged_concurrency: int  # each holds ceil-ish((prompt_mean + output_mean) / block) blocks
    paged_tokens_per_request: float
    shared_prompt: int
    users: int
    shared_tokens_without_sharing: int
    shared_tokens_with_sharing: int
    shared_slots_with_paging: int  # block-granular: what the paged pool really holds
    shared_bytes_without_sharing: int
    shared_bytes_with_sharing: int
    paged_concurrency_with_shared_prompt: int
    fits: bool  # do the weights fit at all
    tensor_parallel_size: int = 1
    weight_bytes_per_device: int = 0  # with tensor parallelism: each device's shard
    kv_bytes_per_token_per_device: int = 0  # each device's KV heads, for every token


def params_per_device(model: ModelSpec, size: int) -> int:
    """Parameters the most loaded of `size` tensor-parallel devices holds (the
    whole model's for size 1): its share of q/k/v/o (whole KV-head groups) and
    of the MLP, its KV heads, ceil(V / size) vocabulary rows, and every norm."""
    check_split(model.num_heads, model.num_kv_heads, model.intermediate_size, size)
    h, d = model.hidden_size, model.head_dim
    kv_heads = kv_heads_per_rank(model.num_kv_heads, size)
    if model.num_kv_heads < size:
        q = model.num_heads // size * d
    else:
        q = kv_heads * (model.num_heads // model.num_kv_heads) * d
    kv = kv_heads * d
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if model.qkv_bias else 0)
    mlp = 3 * h * -(-model.intermediate_size // size)
    embed = -(-model.vocab_size // size) * h * (1 if model.tie_word_embeddings else 2)
    return embed + model.num_layers * (attn + mlp + 2 * h) + h


def plan(
    model: ModelSpec,
    device_bytes: int,
    workload: Workload = Workload(),
    dtype: str = "float16",
    kv_dtype: str | None = None,
    gpu_memory_utilization: float = 0.9,
    kv_memory_bytes: int | None = None,
    tensor_parallel_size: int = 1,
) -> Plan:
    """`device_bytes` and `kv_memory_bytes` are per device: with
    `tensor_parallel_size` N the model spans N such devices."""
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype or dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"unknown {name} {value!r}; use one of {sorted(DTYPE_BYTES)}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    kv_dtype = kv_dtype or dtype
    w, bs = workload, workload.block_size
    if bs < 1:
        raise ValueError(f"block_size must be >= 1, got {bs}")
    n = tensor_parallel_size
    weight_bytes = math.ceil(model.num_params * DTYPE_BYTES[dtype])
    device_weight_bytes = math.ceil(params_per_device(model, n) * DTYPE_BYTES[dtype])
    kv_elem = DTYPE_BYTES[kv_dtype]
    per_token = int(2 * model.num_layers * model.num_kv_heads * model.head_dim * kv_elem)
    per_token_mha = int(2 * model.num_layers * model.num_heads * model.head_dim * kv_elem)
    device_per_token = int(
        2 * model.num_layers * kv_heads_per_rank(model.num_kv_heads, n) * model.head_dim * kv_elem
    )
    if kv_memory_bytes is not None:
        budget = kv_memory_bytes
    else:
        budget = max(0, int(device_bytes * gpu_memory_utilization) - device_weight_bytes)
    kv_tokens = budget // device_per_token
    kv_blocks = budget // (device_per_token * bs)
    max_len = min(w.max_model_len or (w.prompt_max + w.output_max), model.max_position_embeddings)
    per_request = w.prompt_mean + w.output_mean + bs / 2  # mean final length + half a block
    orca_len = min(w.prompt_mean + w.output_max, max_len)

    s, u = w.shared_prompt, w.users
    own = w.prompt_mean + w.output_mean
    shared_full_blocks = s // bs
    own_blocks = math.ceil((s % bs + own) / bs)  # the copied partial block and the user's own tokens
    without = round(u * (s + own))
    with_sharing = round(s + u * own)
    slots = (shared_full_blocks + u * own_blocks) * bs
    return Plan(
        model=model.name,
        num_params=model.num_params,
        weight_dtype=dtype,
        kv_dtype=kv_dtype,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=per_token,
        kv_bytes_per_token_without_gqa=per_token_mha,
        device_bytes=device_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_budget_bytes=budget,
        kv_tokens=kv_tokens,
        kv_blocks=kv_blocks,
        max_model_len=max_len,
        static_concurrency=kv_tokens // max_len,
        orca_concurrency=int(kv_tokens // orca_len) if orca_len > 0 else 0,
        paged_concurrency=int(kv_blocks * bs // per_request),
        paged_tokens_per_request=per_request,
        shared_prompt=s,
        users=u,
        shared_tokens_without_sharing=without,
        shared_tokens_with_sharing=with_sharing,
        shared_slots_with_paging=slots,
        shared_bytes_without_sharing=without * per_token,
        shared_bytes_with_sharing=slots * per_token,
        paged_concurrency_with_shared_prompt=max(0, (kv_blocks - shared_full_blocks) // max(own_blocks, 1)),
        fits=device_weight_bytes < device_bytes * gpu_memory_utilization or kv_memory_bytes is not None,
        tensor_parallel_size=n,
        weight_bytes_per_device=device_weight_bytes,
        kv_bytes_per_token_per_device=device_per_token,
    )


# ------------------------------------------------------------------ output
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(p: Plan) -> str:
    from paged_attention.bench.report import format_table

    rows = [
        ["model", f"{p.model} ({p.num_params / 1e9:.2f}B parameters)"],
        ["weights", f"{_gib(p.weight_bytes)} ({p.weight_dtype})"],
        [
            "KV per token",
            (
                f"{p.kv_bytes_per_token / 2**10:.0f} KiB ({p.kv_dtype}; "
                f"{p.kv_bytes_per_token_without_gqa / 2**10:.0f} KiB without GQA)"
            ),
        ],
        ["device memory", f"{_gib(p.device_bytes)} x {p.gpu_memory_utilization:.2f} usable"],
        *(
            [
                ["tensor parallel", f"{p.tensor_parallel_size} devices, each:"],
                ["  weights per device", _gib(p.weight_bytes_per_device)],
                ["  KV per token per device", f"{p.kv_bytes_per_token_per_device / 2**10:.0f} KiB"],
            ]
            if p.tensor_parallel_size > 1
            else []
        ),
        ["KV budget" + (" per device" if p.tensor_parallel_size > 1 else ""), _gib(p.kv_budget_bytes)],
        ["KV tokens that fit", f"{p.kv_tokens:,} ({p.kv_blocks:,} blocks)"],
        ["max_model_len", f"{p.max_model_len:,}"],
        ["concurrent: static", f"{p.static_concurrency:,} (each reserves {p.max_model_len:,} tokens)"],
        ["concurrent: Orca", f"{p.orca_concurrency:,} (each reserves prompt + max_tokens)"],
        [
            "concurrent: paged",
            f"{p.paged_concurrency:,} (each holds ~{p.paged_tokens_per_request:.0f} slots)",
        ],
    ]
    if p.shared_prompt:
        rows += [
            [
                f"{p.users} users, {p.shared_prompt}-token shared prompt",
                f"{p.shared_tokens_without_sharing:,} tokens ({_gib(p.shared_bytes_without_sharing)}) unshared",
            ],
            [
                "  with sharing",
                (
                    f"{p.shared_tokens_with_sharing:,} tokens; {p.shared_slots_with_paging:,} "
                    f"slots in blocks ({_gib(p.shared_bytes_with_sharing)})"
                ),
            ],
            ["  concurrent: paged + shared", f"{p.paged_concurrency_with_shared_prompt:,}"],
        ]
    text = format_table(["quantity", "value"], rows, left=2)
    if not p.fits:
        text += "\nthe weights alone do not fit in the usable device memory"
    return text + "\n(a calculator: see `paged_attention/planner.py` for its assumptions)"


def parse_device(gpu: str | None, memory: str | None) -> int:
    from paged_attention.config import parse_bytes

    if memory is not None:
        return parse_bytes(memory)
    if gpu is None:
        raise ValueError("give --gpu or --memory")
    key = gpu.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; use one of {', '.join(g.upper() for g in GPUS)} or --memory")
    return GPUS[key]


def main(args: argparse.Namespace) -> int:
    from paged_attention.config import parse_bytes

    workload = Workload(
        prompt_mean=args.prompt_mean,
        prompt_max=args.prompt_max,
        output_mean=args.output_mean,
        output_max=args.output_max,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        shared_prompt=args.shared_prompt,
        users=args.users,
    )
    result = plan(
        lookup_model(args.model),
        parse_device(args.gpu, args.memory),
        workload,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_memory_bytes=parse_bytes(args.kv_memory) if args.kv_memory else None,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    if args.json:
        print(json.dumps({"workload": asdict(workload), "plan": asdict(result)}, indent=2))
    else:
        print(format_plan(result))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="how many requests fit: static reservation vs paging (a calculator)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="SmolLM2-135M",
        help="built-in name (Llama-2-7B/13B/70B, Llama-3-8B/70B, Mistral-7B, Qwen2.5-7B, "
        "SmolLM2-135M/1.7B) or a config.json path",
    )
    p.add_argument("--gpu", default=None, help="V100-32GB, A100-40GB, A100-80GB, H100-80GB, RTX-4090")
    p.add_argument("--memory", default=None, help="device memory instead of --gpu, e.g. 24GiB")
    p.add_argument("--kv-memory", default=None, help="KV budget directly (skips weights and utilization)")
    p.add_argument("--dtype", default="float16", help="weight dtype (float32, bfloat16, float16, int8, int4)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--prompt-mean", type=float, default=256)
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--output-mean", type=float, default=256)
    p.add_argument("--output-max", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None, help="default: prompt max + output max")
    p.add_argument("--shared-prompt", type=int, default=0, help="tokens of a system prompt all users share")
    p.add_argument("--users", type=int, default=100, help="users for the shared-prompt comparison")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_engine_args(p, only=("block_size", "gpu_memory_utilization", "tensor_parallel_size"), model=False)
    p.set_defaults(func=main)
