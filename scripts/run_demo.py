"""A one-minute tour of the engine on the CPU.

    python scripts/run_demo.py [--output-dir results]

1. correctness: paged attention over scattered blocks equals plain attention
   over contiguous K/V, and the engine's greedy tokens equal transformers';
2. memory: KV waste of paging against contiguous reservation on a
   ShareGPT-like workload (a short `bench memory` run);
3. copy-on-write: a forked block table shares blocks until one side writes;
4. swap versus recompute preemption, where the engine offers both.
Exits non-zero when a correctness check fails.
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from paged_attention.attention.metadata import AttentionMetadata
from paged_attention.attention.torch_attention import paged_attention
from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable
from paged_attention.engine.builder import STORIES260K
from paged_attention.kv_cache import KVCachePool
from paged_attention.sampling_params import SamplingParams
from paged_attention.visualize import draw_block_pool, render_text, snapshot_tables


def section(title: str) -> None:
    print(f"\n{'=' * 72}\n{title}\n{'=' * 72}", flush=True)


# ------------------------------------------------------------ 1. correctness
def attention_max_error(seed: int = 0) -> float:
    """Largest |paged - plain| over 5 sequences of random lengths, prefill and
    decode, with their blocks scattered through the pool by interleaved growth."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    heads, kv_heads, dim, bs = 8, 2, 16, 4
    allocator = BlockAllocator(64, bs)
    pool = KVCachePool(1, 64, bs, kv_heads, dim)
    lengths = [rng.randint(3, 40) for _ in range(5)]
    tables = [BlockTable(allocator) for _ in lengths]
    keys = [torch.randn(n, kv_heads, dim, generator=gen) for n in lengths]
    values = [torch.randn(n, kv_heads, dim, generator=gen) for n in lengths]
    # Grow the sequences a few tokens at a time, in turn, so blocks interleave.
    written = [0] * len(lengths)
    while any(w < n for w, n in zip(written, lengths)):
        for i, table in enumerate(tables):
            n = min(rng.randint(1, 6), lengths[i] - written[i])
            if n <= 0:
                continue
            slots, _ = table.append_slots(n)
            pool.write(
                0,
                keys[i][written[i] : written[i] + n],
                values[i][written[i] : written[i] + n],
                torch.tensor(slots),
            )
            written[i] += n
    scale = 1 / math.sqrt(dim)
    worst = 0.0
    for query_len_of in (lambda n: n, lambda n: 1):  # prefill (whole sequence), then decode (last token)
        q_lens = [query_len_of(n) for n in lengths]
        queries = [torch.randn(q, heads, dim, generator=gen) for q in q_lens]
        meta = AttentionMetadata.build(
            [t.block_ids for t in tables], [n - q for n, q in zip(lengths, q_lens)], q_lens, bs, 64
        )
        out = paged_attention(torch.cat(queries), pool.key(0), pool.value(0), meta, scale)
        start = 0
        for q, k, v, n in zip(queries, keys, values, lengths):
            ql = q.shape[0]
            # Plain attention over contiguous K/V: each query head reads its KV head.
            kk = k.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
            vv = v.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
            scores = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale
            causal = torch.ones(ql, n, dtype=torch.bool).tril(n - ql)
            ref = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ vv
            worst = max(worst, (out[start : start + ql] - ref.transpose(0, 1)).abs().max().item())
            start += ql
    return worst


def engine_matches_transformers(max_tokens: int = 24) -> tuple[bool, list[int], list[int]]:
    from transformers import AutoModelForCausalLM

    from paged_attention.engine.llm import LLM

    prompts = ["Once upon a time", "The little dog"]
    llm = LLM(str(STORIES260K), dtype="float32")
    ours = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
    )
    hf = AutoModelForCausalLM.from_pretrained(str(STORIES260K), dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    same = True
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            ref = hf.generate(
                ids,
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )[0, ids.shape[1] :].tolist()
        same &= list(out.outputs[0].token_ids) == ref
        print(f"  {prompt!r} -> {out.outputs[0].text!r}")
    return same, list(ours[0].outputs[0].token_ids), ref


# ----------------------------------------------------------------- 2. memory
def memory_comparison() -> dict:
    from paged_attention.bench.memory import (
        LengthMix,
        print_memory,
        run_memory_benchmark,
    )

    result = run_memory_benchmark(
        num_requests=24, max_model_len=1024, mix=LengthMix().scaled(0.5), progress=False
    )
    result.pop("_snapshots")
    print_memory(result)
    return result


# ---------------------------------------------------------- 3. copy-on-write
def copy_on_write(output_dir: Path | None) -> bool:
    """Fork a sequence whose last block is half full, write to the child, and
    check the copy: the child gets a private block holding the parent's K/V."""
    allocator = BlockAllocator(8, block_size=4)
    pool = KVCachePool(1, 8, 4, 1, 2)
    parent = BlockTable(allocator)
    slots, _ = parent.append_slots(6)  # 6 tokens: one full block, one half-full block
    kv = torch.arange(12, dtype=torch.float32).view(6, 1, 2)
    pool.write(0, kv, kv, torch.tensor(slots))
    child = parent.fork()
    before = snapshot_tables(allocator, [("parent", parent), ("child", child)], "after fork")
    print(render_text(before))
    print(
        f"  child.block_ids = {child.block_ids}, ref counts = "
        f"{[allocator.ref_count(b) for b in child.block_ids]}"
    )
    slots, cow = child.append_slots(1)
    print(f"  child appends one token -> {cow} (the shared, half-full last block is copied)")
    pool.copy_blocks([cow])
    after = snapshot_tables(allocator, [("parent", parent), ("child", child)], "after the child's write")
    print(render_text(after))
    bs = allocator.block_size
    src = pool.key(0).view(-1, 1, 2)[cow.src * bs : cow.src * bs + 2]
    dst = pool.key(0).view(-1, 1, 2)[cow.dst * bs : cow.dst * bs + 2]
    copied = torch.equal(src, dst)
    print(
        f"  the copy holds the parent's two tokens: {copied}; parent keeps block {parent.block_ids[-1]}, "
        f"child now has {child.block_ids}; block {child.block_ids[0]} still shared "
        f"(ref count {allocator.ref_count(child.block_ids[0])})"
    )
    if output_dir is not None:
        path = draw_block_pool([before, after], output_dir / "demo_copy_on_write.png")
        print(f"  picture: {path}")
    return copied and cow is not None


# ------------------------------------------------------- 4. swap / recompute
def swap_vs_recompute() -> None:
    from paged_attention.engine.llm import LLM

    if "preemption_mode" not in inspect.signature(LLM.__init__).parameters:
        print("  the engine has no swap preemption yet: this part comes with the scheduling issue")
        return
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(20, 60))]} for _ in range(16)
    ]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    texts = {}
    for mode in ("recompute", "swap"):
        # A pool of 40 blocks of 16 for 16 requests of up to 180 tokens: some must be preempted.
        llm = LLM(str(STORIES260K), num_kv_blocks=40, max_num_seqs=16, dtype="float32", preemption_mode=mode)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.memory_stats()
        texts[mode] = [o.outputs[0].token_ids for o in outs]
        extra = {k: v for k, v in stats.items() if "swap" in k}
        print(f"  {mode:9s}: {elapsed:.2f} s, {stats['num_preemptions']} preemptions {extra}")
    print(f"  same tokens either way: {texts['recompute'] == texts['swap']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="results", help="where the copy-on-write picture goes")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    torch.set_num_threads(1)  # see bench/monitor.py torch_threads: small ops on a shared 2-core machine
    start = time.perf_counter()
    ok = True

    section("1. Correctness: paged attention vs plain attention, engine vs transformers")
    err = attention_max_error()
    print(f"  paged vs plain attention (5 scattered sequences, prefill and decode): max |diff| = {err:.2e}")
    ok &= err < 1e-4
    same, _, _ = engine_matches_transformers()
    print(f"  engine greedy tokens == transformers greedy tokens (stories260K, float32): {same}")
    ok &= same

    section("2. Memory: paging vs contiguous reservation (ShareGPT-like lengths at half scale)")
    memory_comparison()

    section("3. Copy-on-write: BlockTable.fork, then append")
    ok &= copy_on_write(out)

    section("4. Preemption: swap vs recompute")
    swap_vs_recompute()

    print(f"\n{'all checks passed' if ok else 'A CHECK FAILED'} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
