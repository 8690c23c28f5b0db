"""The planner against hand computations, and its command line."""

from __future__ import annotations

import argparse
import json

import pytest

from paged_attention import planner
from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS
from paged_attention.planner import Workload, plan
from paged_attention.planner_configs import GIB, GPUS, MODELS, ModelSpec, lookup_model


def test_llama2_7b_on_v100_by_hand():
    # Parameters: embeddings and LM head 2 * 32000 * 4096; per layer q, k, v, o
    # 4 * 4096^2, MLP 3 * 4096 * 11008, two norms 2 * 4096; final norm 4096.
    params = 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert params == 6_738_415_616  # the published count
    p = plan(lookup_model("Llama-2-7B"), GPUS["v100-32gb"], Workload(), dtype="float16")
    assert p.num_params == params
    assert p.weight_bytes == 2 * params
    assert p.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # K and V, 32 layers, 32 heads, fp16
    budget = int(32 * GIB * 0.9) - 2 * params
    assert p.kv_budget_bytes == budget
    assert p.kv_tokens == budget // (512 * 1024) == 33_277
    assert p.kv_blocks == budget // (512 * 1024 * 16)
    assert p.max_model_len == 2048  # prompt max 1024 + output max 1024
    assert p.static_concurrency == 33_277 // 2048 == 16
    assert p.orca_concurrency == 33_277 // (256 + 1024)
    assert p.paged_concurrency == p.kv_blocks * 16 // (256 + 256 + 8) == 63


def test_llama3_8b_gqa_on_a100_by_hand():
    params = 2 * 128256 * 4096 + 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    assert params == 8_030_261_248
    w = Workload(prompt_mean=500, prompt_max=4000, output_mean=300, output_max=4192)
    p = plan(lookup_model("llama-3-8b"), GPUS["a100-80gb"], w, dtype="bfloat16")
    # GQA: 8 KV heads of 128 cached, not 32: a quarter of the multi-head figure.
    assert p.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert p.kv_bytes_per_token_without_gqa == 4 * p.kv_bytes_per_token
    tokens = (int(80 * GIB * 0.9) - 2 * params) // 131_072
    assert p.kv_tokens == tokens
    assert p.max_model_len == 8192  # 4000 + 4192, the model's limit
    assert p.static_concurrency == tokens // 8192
    assert p.paged_concurrency == (p.kv_blocks * 16) // 808


def test_tutorial_v100_example():
    """About 25 versus 100 users in 25 GiB of fp16 Llama-2-7B KV cache; 60K versus
    10.5K tokens for 100 users sharing a 500-token prompt."""
    model, v100 = lookup_model("Llama-2-7B"), GPUS["v100-32gb"]
    p = plan(model, v100, Workload(prompt_mean=256, output_mean=256), kv_memory_bytes=25 * GIB)
    assert p.kv_tokens == 51_200
    assert p.static_concurrency == 25
    assert p.paged_concurrency == 98  # 51,200 / (512 + half a block)
    s = plan(model, v100, Workload(prompt_mean=0, output_mean=100, shared_prompt=500, users=100))
    assert s.shared_tokens_without_sharing == 60_000
    assert s.shared_tokens_with_sharing == 10_500
    # 31 full shared blocks once; each user: the copied 4-token tail + 100 own = 7 blocks.
    assert s.shared_slots_with_paging == 31 * 16 + 100 * 7 * 16 == 11_696


def test_config_json_matches_the_builtin_table():
    from_file = ModelSpec.from_config(DEFAULT_MODEL_ASSETS / "config.json")
    builtin = MODELS["smollm2-135m"]
    assert from_file.num_params == builtin.num_params == 134_515_008
    assert (from_file.num_kv_heads, from_file.head_dim) == (builtin.num_kv_heads, builtin.head_dim)


def test_weights_that_do_not_fit_are_flagged():
    p = plan(lookup_model("Llama-2-70B"), GPUS["rtx-4090"], Workload(), dtype="float16")
    assert not p.fits and p.kv_tokens == 0 and p.static_concurrency == 0


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        lookup_model("GPT-5")
    with pytest.raises(ValueError, match="unknown GPU"):
        planner.parse_device("TPU", None)
    with pytest.raises(ValueError, match="dtype"):
        plan(lookup_model("Llama-2-7B"), GPUS["a100-40gb"], dtype="float12")


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    planner.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0


def test_cli_json_and_table(capsys):
    _cli(["plan", "--model", "Mistral-7B", "--gpu", "A100-40GB", "--dtype", "bfloat16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    assert data["plan"]["num_params"] == 7_241_732_096
    _cli(["plan", "--model", str(DEFAULT_MODEL_ASSETS), "--memory", "8GiB", "--shared-prompt", "500"])
    out = capsys.readouterr().out
    assert "concurrent: paged" in out and "shared prompt" in out and "calculator" in out


def test_llama2_13b_tensor_parallel_on_two_24gib_devices_by_hand():
    """Too big for one 24 GiB card in fp16; split over two, each holds half
    of every matrix, all the norms, and half the KV heads of every token."""
    whole = 2 * 32000 * 5120 + 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 5120
    assert whole == 13_015_864_320
    one = plan(lookup_model("Llama-2-13B"), 24 * GIB, Workload(), dtype="float16")
    assert not one.fits and one.weight_bytes_per_device == one.weight_bytes == 2 * whole
    p = plan(lookup_model("Llama-2-13B"), 24 * GIB, Workload(), dtype="float16", tensor_parallel_size=2)
    norms = 40 * 2 * 5120 + 5120  # replicated on both devices
    per_device = (whole - norms) // 2 + norms
    assert per_device == 6_508_139_520
    assert p.fits and p.weight_bytes == 2 * whole and p.weight_bytes_per_device == 2 * per_device
    assert p.kv_bytes_per_token == 2 * 40 * 40 * 128 * 2
    assert p.kv_bytes_per_token_per_device == 2 * 40 * 20 * 128 * 2 == 409_600
    budget = int(24 * GIB * 0.9) - 2 * per_device
    assert p.kv_budget_bytes == budget  # on each device
    assert p.kv_tokens == budget // 409_600 == 24_845
    assert p.paged_concurrency == p.kv_blocks * 16 // 520 == 47


def test_tensor_parallel_with_fewer_kv_heads_than_devices_replicates_them():
    llama3 = lookup_model("Llama-3-70B")  # 64 query heads, 8 KV heads
    p16 = plan(llama3, 80 * GIB, dtype="bfloat16", tensor_parallel_size=16)
    p8 = plan(llama3, 80 * GIB, dtype="bfloat16", tensor_parallel_size=8)
    # One KV head per device either way: 16 devices replicate each head twice.
    assert p16.kv_bytes_per_token_per_device == p8.kv_bytes_per_token_per_device == 2 * 80 * 1 * 128 * 2
    assert plan(llama3, 80 * GIB, dtype="bfloat16").kv_bytes_per_token_per_device == 2 * 80 * 8 * 128 * 2
    with pytest.raises(
        ValueError, match="tensor_parallel_size 12 is more than the model's num_key_value_heads"
    ):
        plan(llama3, 80 * GIB, tensor_parallel_size=12)
    # Whole KV-head groups: SmolLM2-135M's 3 groups over 2 devices go 2 + 1;
    # the figures are the fuller device's.
    smol = plan(lookup_model("SmolLM2-135M"), 8 * GIB, dtype="bfloat16", tensor_parallel_size=2)
    assert smol.kv_bytes_per_token_per_device == 2 * 30 * 2 * 64 * 2
    h = 576
    per_layer = h * 6 * 64 + 2 * h * 2 * 64 + 6 * 64 * h + 3 * h * 768 + 2 * h
    assert smol.weight_bytes_per_device == 2 * (49152 // 2 * h + 30 * per_layer + h)


def test_cli_tensor_parallel_flag(capsys):
    _cli(["plan", "--model", "Llama-2-13B", "--memory", "24GiB", "--tensor-parallel-size", "2", "--json"])
    data = json.loads(capsys.readouterr().out)["plan"]
    assert (data["tensor_parallel_size"], data["kv_tokens"], data["fits"]) == (2, 24_845, True)
    _cli(["plan", "--model", "Llama-2-13B", "--memory", "24GiB", "--tensor-parallel-size", "2"])
    out = capsys.readouterr().out
    assert "weights per device" in out and "KV budget per device" in out
