"""Tensor parallelism over 2 ranks (gloo on the CPU): sharded loading, greedy
parity with TP=1 and transformers (Llama with one KV head, so it is replicated,
and with biases; Mistral; Qwen2 with its q/k/v biases), preemption in both
modes, prefix hits, n > 1 and beam search, and what happens when a worker dies
or hangs. Tests that start worker processes take 2-4 s each and are `slow`,
except one parity test, so the fast tier still runs two ranks once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from paged_attention import LLM, SamplingParams
from paged_attention.distributed.executor import TIMEOUT_ENV, WorkerError
from paged_attention.distributed.parallel_state import ParallelContext
from paged_attention.distributed.sharding import TPLayout, check_tensor_parallel, parameter_bytes
from paged_attention.distributed.worker import split_cores
from paged_attention.engine.llm_engine import StepError
from paged_attention.model.config import ModelConfig
from paged_attention.model.loader import load_model, read_json
from tests.engine_utils import drive, hf_greedy, save_random_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[1, 5, 9, 20, 33, 7], [1, 100, 3], [1, *range(40, 63)]]
# Llama with one KV head (replicated on both ranks) and every bias Llama can
# have (o_proj's and down_proj's are added once, by rank 0); Qwen2 splits its
# q/k/v biases with their weights.
ARCHS = {
    "llama": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "mistral": dict(num_attention_heads=6, num_key_value_heads=3),  # groups split 2 + 1
    "qwen2": dict(num_key_value_heads=2),
}


def _tp(folder: Path, **kw) -> LLM:
    options = dict(tensor_parallel_size=2, dtype="float32", num_kv_blocks=64, block_size=4)
    options.update(kw)
    return LLM(str(folder), **options)


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _check_ranks(llm: LLM, folder: Path) -> None:
    """Every rank ran every step on its own heads and KV heads over the
    driver's block ids, and the one BlockPool (the driver's) is all free."""
    engine = llm.engine
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    (info,) = engine.runner.worker_info()
    layout = TPLayout(ModelConfig.from_hf_config(read_json(folder / "config.json")), 2, rank=1)
    assert info.steps == engine.stats.num_steps > 0
    assert (info.num_blocks, info.num_heads, info.num_kv_heads, info.kv_head_start) == (
        engine.kv_cache.num_blocks,
        layout.num_heads,
        layout.num_kv_heads,
        layout.kv_head_start,
    )


# --------------------------------------------------------------- no processes
def test_split_rules_and_their_errors():
    cfg = ModelConfig.from_hf_config(
        dict(
            architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=48, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="3 is more than the model's num_key_value_heads"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match="must then be a multiple of them"):
        check_tensor_parallel(replace(cfg, num_heads=12, num_kv_heads=3), 4)
    with pytest.raises(ValueError, match="more than the model's intermediate_size"):
        check_tensor_parallel(replace(cfg, intermediate_size=1), 2)
    # SmolLM2-135M's shape: 3 groups of 3 query heads go 2 + 1; odd MLP rows 49 + 48.
    smol = replace(cfg, num_heads=9, num_kv_heads=3, intermediate_size=97)
    split = [TPLayout(smol, 2, r) for r in (0, 1)]
    assert [(t.head_start, t.num_heads, t.kv_head_start, t.num_kv_heads) for t in split] == [
        (0, 6, 0, 2),
        (6, 3, 2, 1),
    ]
    assert [(t.intermediate_start, t.intermediate_size) for t in split] == [(0, 49), (49, 48)]
    # One KV head, two ranks: both hold it; two heads over four ranks: pairs share.
    one = replace(cfg, num_kv_heads=1)
    assert [TPLayout(one, 2, r).kv_head_start for r in (0, 1)] == [0, 0]
    eight = replace(cfg, num_heads=8, num_kv_heads=2)
    assert [TPLayout(eight, 4, r).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert TPLayout(eight, 4).local_config().num_kv_heads == 1
    # Vocabulary rows: ceil(V / N) each, the last rank's padded.
    odd = TPLayout(replace(cfg, vocab_size=255), 2, 1)
    assert (odd.vocab_size, odd.vocab_start, odd.shard_of("lm_head.weight").stop) == (128, 128, 255)
    shares = split_cores(2)
    assert len(shares) == 2 and all(s.threads >= 1 for s in shares)
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(shares[0].cores) & set(shares[1].cores)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-uneven", "gguf-cache", "gguf-streamed"])
def test_each_rank_loads_only_its_slices(tmp_path, monkeypatch, fmt):
    """Rank shards put back together equal the whole model, tensor by tensor;
    each rank holds about half the weights (replicated norms, and rank 0's
    o/down biases, are the difference)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if fmt == "safetensors":
        path, _ = save_random_model(tmp_path, "llama", vocab_size=255, **ARCHS["llama"])
    elif fmt == "safetensors-uneven":  # 3 KV-head groups and 97 MLP rows over 2 ranks
        path, _ = save_random_model(tmp_path, "qwen2", intermediate_size=97, **ARCHS["mistral"])
    else:
        from tests.test_gguf import write_tiny_gguf

        path = write_tiny_gguf(tmp_path / "tiny.gguf")
        if fmt == "gguf-streamed":  # no cache: slice each tensor as it is dequantized
            monkeypatch.setattr("paged_attention.distributed.weights.gguf_cache_names", lambda _: None)
    # Dense weights (a GGUF's float cache, or its tensors dequantized one by one).
    whole, cfg = load_model(path, quantization="none")
    ranks = [load_model(path, tp=ParallelContext(r, 2), quantization="none")[0] for r in (0, 1)]
    q = [r.config.q_size for r in ranks]
    kv = [r.config.kv_size for r in ranks]
    inter = [r.config.intermediate_size for r in ranks]
    for i, layer in enumerate(whole.layers):
        attn = [r.layers[i].self_attn for r in ranks]
        mlp = [r.layers[i].mlp for r in ranks]
        rows = [a.qkv_weight for a in attn]
        whole_qkv = layer.self_attn.qkv_weight
        assert torch.equal(torch.cat([w[:n] for w, n in zip(rows, q)]), whole_qkv[: cfg.q_size])
        kv_rows = {(r.config.num_kv_heads, r.tp.layout(cfg).kv_head_start) for r in ranks}
        for w, r, nq, nkv in zip(rows, ranks, q, kv):
            start = cfg.q_size + r.tp.layout(cfg).kv_head_start * cfg.head_dim
            assert torch.equal(w[nq : nq + nkv], whole_qkv[start : start + nkv])
        assert len(kv_rows) == (1 if cfg.num_kv_heads == 1 else 2)  # one KV head: replicated
        assert torch.equal(torch.cat([a.o_weight for a in attn], dim=1), layer.self_attn.o_weight)
        gates = [m.gate_up_weight[:n] for m, n in zip(mlp, inter)]
        ups = [m.gate_up_weight[n:] for m, n in zip(mlp, inter)]
        assert torch.equal(torch.cat(gates + ups), layer.mlp.gate_up_weight)
        assert torch.equal(torch.cat([m.down_weight for m in mlp], dim=1), layer.mlp.down_weight)
        if layer.mlp.down_bias is not None:  # added once: rank 0 holds it, rank 1 zeros
            assert torch.equal(mlp[0].down_bias, layer.mlp.down_bias) and not mlp[1].down_bias.any()
            assert torch.equal(attn[0].o_bias, layer.self_attn.o_bias) and not attn[1].o_bias.any()
    embed = torch.cat([r.embed_tokens for r in ranks])
    assert torch.equal(embed[: cfg.vocab_size], whole.embed_tokens) and not embed[cfg.vocab_size :].any()
    total = parameter_bytes(whole)
    for r in ranks:  # uneven groups: rank 0 holds 2 of 3
        assert 0.35 * total < parameter_bytes(r) < (0.66 if fmt.endswith("uneven") else 0.55) * total


# ------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize(
    "arch",
    ["llama", pytest.param("mistral", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow)],
)
def test_greedy_equals_tp1_and_transformers(tmp_path, arch):
    folder, hf = save_random_model(tmp_path, arch, **ARCHS[arch])
    expected = [[hf_greedy(hf, p, GREEDY.max_tokens)] for p in PROMPTS]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    single = LLM(str(folder), dtype="float32", num_kv_blocks=64, block_size=4)
    assert _tokens(drive(single, prompts, GREEDY)) == expected
    llm = _tp(folder)
    try:
        assert _tokens(drive(llm, prompts, GREEDY)) == expected
        _check_ranks(llm, folder)
        # The LM head outside a step would wait on workers that wait for a step:
        # refused, and the engine goes on.
        with pytest.raises(StepError, match="prompt_logprobs"):
            llm.generate(prompts[0], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
        assert _tokens(drive(llm, prompts[:1], GREEDY)) == expected[:1]
    finally:
        llm.shutdown()


def _mixed_params() -> list[SamplingParams]:
    samples = SamplingParams(n=2, seed=5, max_tokens=16, ignore_eos=True)
    beams = SamplingParams(use_beam_search=True, best_of=3, n=3, max_tokens=10)
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [long, samples, long, beams, long]


def _mixed_prompts() -> list[dict]:
    shared = list(range(60, 84))  # 6 full blocks of 4: the second prompt hits them
    ids = [[1, *shared, 7], [1, *shared, 9, 11], [1, 100, 3], [1, 50, 51, 52], [1, 5, 9, 20, 33, 7]]
    return [{"prompt_token_ids": p} for p in ids]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A Llama with one KV head, and its outputs on one rank with a roomy pool."""
    folder, _ = save_random_model(tmp_path_factory.mktemp("tp"), "llama", **ARCHS["llama"])
    roomy = LLM(str(folder), dtype="float32", num_kv_blocks=256, block_size=4)
    outs = drive(roomy, _mixed_prompts(), _mixed_params())
    assert roomy.memory_stats()["num_preemptions"] == 0
    return folder, _tokens(outs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_prefix_hits_samples_and_beams(mixed, mode):
    """A pool too small for the batch: requests are preempted (swapped out and
    back on every rank, or recomputed), the shared prompt prefix is a cache
    hit, and greedy, n=2 seeded samples and 3 beams all equal TP=1's."""
    folder, expected = mixed
    llm = _tp(folder, num_kv_blocks=24, max_model_len=64, preemption_mode=mode, swap_space=0.01)
    try:
        prompts, params = _mixed_prompts(), _mixed_params()
        (first,) = drive(llm, prompts[:1], params[0])  # leaves the shared prefix cached
        outs = drive(llm, prompts, params)
        assert _tokens([first, *outs]) == [expected[0], *expected]
        assert [o.num_cached_tokens for o in outs[:2]] == [24, 24]  # the six shared blocks
        stats = llm.memory_stats()
        assert stats["num_preemptions"] > 0
        assert (stats["num_swapped_out"] > 0) == (mode == "swap")
        _check_ranks(llm, folder)
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_killed_worker_is_a_clear_error_and_leaves_no_process(tmp_path, monkeypatch):
    """Kill rank 1 while a generation runs: the engine raises WorkerError
    naming it (well within the worker timeout, never a hang), frees the
    requests' blocks, refuses later steps with the same error, and no worker
    process is left."""
    monkeypatch.setenv(TIMEOUT_ENV, "60")
    folder, _ = save_random_model(tmp_path, "llama")
    llm = _tp(folder)
    (pid,) = llm.engine.runner.executor.worker_pids()

    def kill_after_some_steps() -> None:
        while llm.engine.stats.num_steps < 3:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_some_steps)
    killer.start()
    began = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        llm.generate(
            {"prompt_token_ids": [1, 2, 3]},
            SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0),
            use_tqdm=False,
        )
    waited = time.monotonic() - began
    killer.join()
    assert f"rank 1 (pid {pid}, killed by SIGKILL) died" in str(caught.value)
    assert waited < 60  # the error came from the dead socket, not the timeout
    assert _gone(pid) and multiprocessing.active_children() == []
    assert llm.memory_stats()["num_free_blocks"] == llm.memory_stats()["num_blocks"]
    with pytest.raises(WorkerError, match="rank 1"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()


@pytest.mark.slow
def test_hung_worker_times_out_and_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    folder, _ = save_random_model(tmp_path, "llama")
    llm = _tp(folder)
    (pid,) = llm.engine.runner.executor.worker_pids()
    llm.add_requests({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=50, ignore_eos=True))
    llm.engine.step()
    os.kill(pid, signal.SIGSTOP)  # alive, never answering
    with pytest.raises(WorkerError, match="did not answer within 2 s"):
        llm.engine.step()
    assert _gone(pid) and multiprocessing.active_children() == []
    llm.shutdown()


@pytest.mark.slow
def test_shutdown_and_garbage_collection_leave_no_process(tmp_path):
    import gc

    folder, _ = save_random_model(tmp_path, "qwen2")
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    llm = _tp(folder)
    (pid,) = llm.engine.runner.executor.worker_pids()
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert _gone(pid)
    # This process ran rank 0 on its share of the cores; it has them all back.
    assert (torch.get_num_threads(), os.sched_getaffinity(0)) == (threads, cores)
    llm = _tp(folder)
    (pid,) = llm.engine.runner.executor.worker_pids()
    del llm
    gc.collect()
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert (torch.get_num_threads(), os.sched_getaffinity(0)) == (threads, cores)


def test_bad_splits_and_quantization_are_value_errors(tmp_path):
    folder, _ = save_random_model(tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(
        ValueError, match="tensor_parallel_size 3 is more than the model's num_key_value_heads"
    ):
        _tp(folder, tensor_parallel_size=3)  # refused before any worker starts
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(str(folder), tensor_parallel_size=0)
    # int4 in groups of 64: o_proj's 64 input columns split 32 + 32, not whole groups.
    wide, _ = save_random_model(tmp_path / "wide", "llama", hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match=r"self_attn\.o_proj\.weight: .*group size 64"):
        load_model(wide, tp=ParallelContext(0, 2), quantization="int4-g64")
    assert multiprocessing.active_children() == []


def test_record_slices_equal_slices_of_the_dequantized_matrix():
    from paged_attention.model.quant.quantize import quantize_int4, quantize_int8

    w = torch.randn(12, 128)
    for record in (quantize_int8(w), quantize_int4(w, 32)):
        dense = record.dequantize()
        assert torch.equal(record.slice_rows(3, 9).dequantize(), dense[3:9])
        assert torch.equal(record.slice_cols(32, 96).dequantize(), dense[:, 32:96])
    with pytest.raises(ValueError, match="group size 32"):
        quantize_int4(w, 32).slice_cols(0, 48)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_shard_like_dense_ones(tmp_path, quantization):
    """TP=2 with quantized weights computes what TP=1 computes with the same
    weights: int8 gives the same greedy tokens; int4's partial sums are added in
    a different order (and, on a rank whose rows are not whole tiles of the C
    kernel, by PyTorch's bfloat16 kernel), so its next-token log-probs are
    compared, and its greedy tokens agree until the first near-tie."""
    folder, _ = save_random_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    options = dict(dtype="bfloat16", num_kv_blocks=64, block_size=4, quantization=quantization)
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    single = LLM(str(folder), **options)
    expected, expected_first = drive(single, prompts, GREEDY), drive(single, prompts, first)
    llm = _tp(folder, **options)
    try:
        got, got_first = drive(llm, prompts, GREEDY), drive(llm, prompts, first)
    finally:
        llm.shutdown()
    for want, have in zip(expected_first, got_first):
        (want_top,), (have_top,) = want.outputs[0].logprobs, have.outputs[0].logprobs
        for token, logprob in want_top.items():
            if token in have_top:
                assert have_top[token] == pytest.approx(logprob, abs=0.15)  # sums in another order
            else:  # a near-tie at the top-5 cut: the token that replaced it is as likely
                assert logprob == pytest.approx(min(have_top.values()), abs=0.15)
    if quantization == "int8":
        assert _tokens(got) == _tokens(expected)
    else:
        assert [o.outputs[0].token_ids[:3] for o in got] == [o.outputs[0].token_ids[:3] for o in expected]


@pytest.mark.slow
def test_ray_backend(tmp_path):
    """The same workers as Ray actors, on a local Ray of 2 CPUs."""
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'paged-attention[ray]'")
    folder, hf = save_random_model(tmp_path, "mistral", **ARCHS["mistral"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        llm = _tp(folder, distributed_executor_backend="ray")
        (pid,) = llm.engine.runner.executor.worker_pids()
        try:
            outs = drive(llm, [{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
            assert _tokens(outs) == [[hf_greedy(hf, p, GREEDY.max_tokens)] for p in PROMPTS]
            _check_ranks(llm, folder)
        finally:
            llm.shutdown()
        deadline = time.monotonic() + 20
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid)
    finally:
        ray.shutdown()
