"""AWQ (AutoAWQ GEMM) and GPTQ (v1) checkpoints: small random Llama models
quantized to int4 groups here and packed exactly as those libraries pack,
then unpacked (bit-exact round trip) and run by the engine against the same
model saved with the dequantized float weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paged_attention import LLM, SamplingParams
from paged_attention.model import load_model
from paged_attention.model.quant.hf_formats import AWQ_ORDER, unpack_awq, unpack_gptq
from paged_attention.model.quant.scheme import QuantScheme, resolve_quantization
from tests.engine_utils import drive, save_random_model

GROUP = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QCONFIG = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
    "gptq": {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",
    },
}


def _quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> q uint8 [N, K], z uint8 [N, K/g] (integers 0..15), s fp16 [N, K/g]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-4).half()
    z = (-lo / s.float()).round().clamp(0, 15)
    q = (g / s.float().unsqueeze(-1) + z.unsqueeze(-1)).round().clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), z.to(torch.uint8), s


def _pack_words(nibbles: np.ndarray) -> torch.Tensor:
    """uint [..., 8] nibbles -> int32 [...]: nibble i at bits 4i."""
    words = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for i in range(8):
        words |= (nibbles[..., i].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32).copy())


def pack_awq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """As AutoAWQ's WQLinear_GEMM.from_linear: int32 column j packs output
    columns 8j + AWQ_ORDER[i] at nibble i, along [in, out / 8]."""

    def cols(m: torch.Tensor) -> torch.Tensor:  # [r, c] -> int32 [r, c / 8]
        r, c = m.shape
        grouped = m.numpy().reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)]
        return _pack_words(grouped)

    return {
        "qweight": cols(q.t().contiguous()),
        "qzeros": cols(z.t().contiguous()),
        "scales": s.t().contiguous(),
    }


def pack_gptq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """As AutoGPTQ's QuantLinear.pack (v1): 8 input rows per int32 word of
    qweight [in / 8, out]; qzeros [groups, out / 8] hold zero - 1, sequential."""
    n, k = q.shape
    rows = q.t().numpy().reshape(k // 8, 8, n).transpose(0, 2, 1)  # [k/8, n, 8]
    zeros = (z.t().numpy().astype(np.int64) - 1) & 0xF  # [groups, n]
    return {
        "qweight": _pack_words(rows),
        "qzeros": _pack_words(zeros.reshape(zeros.shape[0], n // 8, 8)),
        "scales": s.t().contiguous(),
        "g_idx": (torch.arange(k) // GROUP).to(torch.int32),
    }


def _dequantize(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    zs = z.repeat_interleave(GROUP, dim=1).float()
    return (q.float() - zs) * s.float().repeat_interleave(GROUP, dim=1)


def make_checkpoints(tmp_path: Path, method: str) -> tuple[Path, Path]:
    """(the packed checkpoint, the same model with the dequantized float32 weights)."""
    folder, _ = save_random_model(
        tmp_path, "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    tensors = load_file(str(folder / "model.safetensors"))
    packed: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEARS:
            q, z, s = _quantize(t, GROUP)
            pack = pack_awq if method == "awq" else pack_gptq
            packed.update({f"{prefix}.{part}": v for part, v in pack(q, z, s).items()})
            dense[name] = _dequantize(q, z, s)
        else:
            packed[name] = dense[name] = t.contiguous()
    float_folder = tmp_path / f"{method}-float"
    float_folder.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (float_folder / f.name).write_bytes(f.read_bytes())
    save_file(dense, str(float_folder / "model.safetensors"))
    save_file(packed, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = QCONFIG[method]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, float_folder


@pytest.mark.parametrize("method", ["awq", "gptq"])
@pytest.mark.parametrize("shape", [(64, 64), (48, 128), (16, 256)])
def test_unpacking_round_trips_exactly(method: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    n, k = shape
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8)  # 0 and 15 too (v1 wrap-around)
    s = (torch.rand(n, k // GROUP) * 0.1 + 0.01).half()
    if method == "awq":
        p = pack_awq(q, z, s)
        record = unpack_awq(p["qweight"], p["qzeros"], p["scales"], GROUP)
    else:
        p = pack_gptq(q, z, s)
        record = unpack_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], GROUP)
    assert record.shape == (n, k) and record.group_size == GROUP
    assert torch.equal(record.values, q)
    assert torch.equal(record.scales, s.float())
    assert torch.equal(record.offsets, -(z.float() * s.float()))
    torch.testing.assert_close(record.dequantize(), _dequantize(q, z, s), rtol=0, atol=1e-6)


def test_gptq_act_order_g_idx_is_refused() -> None:
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    p = pack_gptq(q, torch.full((16, 2), 8, dtype=torch.uint8), torch.ones(16, 2).half())
    shuffled = p["g_idx"][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="act-order"):
        unpack_gptq(p["qweight"], p["qzeros"], p["scales"], shuffled, GROUP, "layer")


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_engine_on_packed_checkpoint_matches_dequantized_floats(tmp_path: Path, method: str) -> None:
    folder, float_folder = make_checkpoints(tmp_path, method)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 9)]
    llm = LLM(str(folder), dtype="bfloat16", quantization="auto", num_kv_blocks=32, block_size=4)
    net = llm.engine.runner.model
    assert net.quantization == QuantScheme("int4", GROUP, source=method)
    assert net.head is None  # the checkpoint's float head stays dense
    assert {(layer.kind, layer.exact) for layer in net.quant_layers()} == {("int4", True)}
    ref = LLM(str(float_folder), dtype="bfloat16", quantization="none", num_kv_blocks=32, block_size=4)
    ours, theirs = drive(llm, prompts, params), drive(ref, prompts, params)
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        assert ta[:3] == tb[:3]
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert la is not None and lb is not None
        # First token (same prefix by construction): every common top-5 entry.
        common = la[0].keys() & lb[0].keys()
        assert len(common) >= 3
        worst = max(worst, max(abs(la[0][t] - lb[0][t]) for t in common))
    print(f"{method}: max |logprob difference| over the first token's top-5: {worst:.4f}")
    assert worst < 0.1


def test_wrong_method_named_explicitly_is_refused(tmp_path: Path) -> None:
    folder, float_folder = make_checkpoints(tmp_path, "awq")
    with pytest.raises(ValueError, match=r"'gptq'.*'awq'"):
        load_model(folder, torch.bfloat16, quantization="gptq")
    with pytest.raises(ValueError, match=r"'awq'.*'none'"):
        load_model(float_folder, torch.bfloat16, quantization="awq")
    # Named correctly, or "none": the int4 records, or dense dequantized weights.
    quantized, _ = load_model(folder, torch.bfloat16, quantization="awq")
    assert quantized.quantization.name == "awq"
    dense, _ = load_model(folder, torch.float32, quantization="none")
    reference, _ = load_model(float_folder, torch.float32, quantization="none")
    for (name, a), (_, b) in zip(dense.hf_weights(), reference.hf_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_config_is_checked() -> None:
    def resolve(value: str, qcfg: dict) -> QuantScheme:
        return resolve_quantization(
            value, is_gguf=False, device_type="cpu", float16_requested=False, checkpoint=qcfg
        )

    assert resolve("auto", QCONFIG["gptq"]) == QuantScheme("int4", GROUP, source="gptq")
    assert resolve("gptq", QCONFIG["gptq"]).name == "gptq"
    with pytest.raises(ValueError, match="bits=8"):
        resolve("auto", {**QCONFIG["awq"], "bits": 8})
    with pytest.raises(ValueError, match="group_size=-1"):
        resolve("auto", {**QCONFIG["gptq"], "group_size": -1})
    with pytest.raises(ValueError, match="GEMM"):
        resolve("awq", {**QCONFIG["awq"], "version": "gemv"})
    with pytest.raises(ValueError, match="gptq_v2"):
        resolve("auto", {**QCONFIG["gptq"], "checkpoint_format": "gptq_v2"})
