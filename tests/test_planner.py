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
