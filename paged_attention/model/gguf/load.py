"""`load_gguf`: a Llama GGUF file as a Hugging Face config dict and float32
tensors under Hugging Face names and shapes, through the safetensors cache;
`load_gguf_quantized`: the same with 4-bit blocks kept as int4 records."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paged_attention.config import default_cache_dir
from paged_attention.model.gguf.cache import cache_key, iter_cache, read_cache_index, write_cache
from paged_attention.model.gguf.dequant import dequantize_array
from paged_attention.model.gguf.hf_config import check_shapes, gguf_config
from paged_attention.model.gguf.names import hf_tensor_name
from paged_attention.model.gguf.qk_rows import unpermute_qk_rows
from paged_attention.model.gguf.reader import TensorInfo, read_gguf_header
from paged_attention.model.quant.gguf_repack import REPACKABLE_TYPES, repack_gguf
from paged_attention.model.quant.records import GroupQuantized
from paged_attention.model.weight_checks import check_finite

logger = logging.getLogger(__name__)


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
        cache_file, source = cache_key(path, cache_dir if cache_dir is not None else default_cache_dir())
        hit = read_cache_index(cache_file, source)
        if hit is not None:
            return hit[0], iter_cache(cache_file, hit[1])

    header = read_gguf_header(path)
    config = gguf_config(header)
    check_shapes(header, config)
    # Map every name up front so an unsupported tensor fails before any loading.
    names = [(info, hf_tensor_name(info.name)) for info in header.tensors.values()]

    if cache_file is not None and source is not None:
        try:
            write_cache(cache_file, source, config, _iter_tensors(path, names, config), names)
        except OSError as e:
            logger.warning("not caching %s as safetensors (%s); dequantizing it directly", path, e)
        else:
            return config, iter_cache(cache_file, [hf for _, hf in names])
    return config, _iter_tensors(path, names, config)


def load_gguf_quantized(
    gguf_path: Path,
) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor | GroupQuantized]]]:
    """Config dict and (HF name, tensor) pairs as `load_gguf` gives, except that
    Q4_0, Q4_1 and Q4_K matrices come as `GroupQuantized` records (groups of
    32, the file's values exactly) instead of float32; other types are
    dequantized to float32 as before.

    No cache: repacking reads the file once at about its own size, and a
    repacked copy on disk would only save that read (see `bench quant-accuracy`
    for the load time).
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    header = read_gguf_header(path)
    config = gguf_config(header)
    check_shapes(header, config)
    names = [(info, hf_tensor_name(info.name)) for info in header.tensors.values()]
    return config, _iter_tensors(path, names, config, repack=True)


def _iter_tensors(
    path: Path, names: list[tuple[TensorInfo, str]], config: dict[str, Any], *, repack: bool = False
) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for info, hf_name in names:
            # Read into a fresh array (not an mmap): F32 tensors then alias it
            # with no copy, and nothing refers to the file afterwards.
            raw = np.empty(info.nbytes, dtype=np.uint8)
            f.seek(info.offset)
            if f.readinto(raw.data) != info.nbytes:
                raise ValueError(f"short read of tensor {info.name!r} in {path}")
            if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                n_head = config["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
                # Reorder whole (still quantized) rows: cheaper than on floats, same result.
                rows = info.shape[0]
                order = unpermute_qk_rows(torch.arange(rows), n_head).numpy()
                raw = raw.reshape(rows, -1)[order].reshape(-1)
            value: Any
            if repack and info.ggml_type in REPACKABLE_TYPES and len(info.shape) == 2:
                value = repack_gguf(raw, info.ggml_type, info.shape)
            else:
                value = torch.from_numpy(dequantize_array(raw, info.ggml_type, info.shape))
            # Checked before the cache writer sees it: a bad file is never cached.
            yield hf_name, check_finite(info.name, value, path)
