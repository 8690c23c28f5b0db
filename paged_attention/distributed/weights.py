"""Read one tensor-parallel rank's slices of a checkpoint, never the whole model.

safetensors: `safe_open(...).get_slice(name)[rows]` copies only the rank's rows
(or columns) out of the memory-mapped file. GGUF: the float32 safetensors cache
of the file (`model/gguf/cache.py`) is read the same way when it exists;
otherwise each tensor is dequantized, sliced and dropped before the next one,
so a rank holds at most its shard plus one whole tensor.

Quantized weights shard like dense ones. A GGUF's 4-bit records are sliced by
rows or (whole groups of) columns. Quantizing at load (int8, int4) is per
output row, so row parts quantize as the whole would; a column part (o_proj,
down_proj) is quantized whole first and then sliced, so that every rank keeps
the single-process scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from paged_attention.distributed.sharding import Shard, TPLayout
from paged_attention.model.quant.records import ChannelQuantized, GroupQuantized
from paged_attention.model.quant.scheme import NONE, QuantScheme
from paged_attention.model.weight_checks import check_finite

if TYPE_CHECKING:
    from paged_attention.model.loader import ModelFiles


def read_safetensors_shards(
    files: Sequence[Path], layout: TPLayout, names: Sequence[str] | None = None, scheme: QuantScheme = NONE
) -> Iterator[tuple[str, Any]]:
    """(name, this rank's part) for every tensor of `files` (or those in `names`,
    in that order), each part checked as the whole-model loader checks tensors."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in list(names if names is not None else f.keys()):
                    shard = layout.shard_of(name)
                    if scheme.quantized and shard.dim == 1:  # quantized whole, then sliced
                        part = take_quantized(name, shard, f.get_tensor(name), scheme)
                    else:
                        part = shard.read(f.get_slice(name))
                    yield name, check_finite(name, part, file)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read safetensors file {file}: {exc}") from exc


def take_quantized(name: str, shard: Shard, tensor: Any, scheme: QuantScheme) -> Any:
    """`shard` of a weight that `scheme` quantizes. A column part is cut from
    the record the single-process layer would hold (quantized per row, or in
    groups along the row), so it keeps that layer's scales.

    Raises:
        ValueError: naming the weight, when its column part is not whole groups.
    """
    if shard.dim == 1:
        from paged_attention.model.quant.quantize import quantize_int4, quantize_int8

        if scheme.method == "int4" and not (
            isinstance(tensor, GroupQuantized) and tensor.group_size == scheme.group_size
        ):
            tensor = quantize_int4(_float(tensor), scheme.group_size)
        elif scheme.method != "int4" and not isinstance(tensor, (ChannelQuantized, GroupQuantized)):
            tensor = quantize_int8(_float(tensor))
        elif scheme.method == "int8" and isinstance(tensor, GroupQuantized):
            tensor = quantize_int8(tensor.dequantize())
        try:
            return shard.take(tensor)
        except ValueError as e:
            raise ValueError(
                f"{name}: tensor parallel part {e} ({shard.stop - shard.start} of "
                f"{tensor.shape[1]} columns); use a tensor_parallel_size or quantization "
                f"group size that splits it in whole groups"
            ) from None
    return shard.take(tensor)


def _float(tensor: Any) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, (ChannelQuantized, GroupQuantized)) else tensor.float()


def gguf_cache_names(gguf: Path) -> tuple[Path, list[str]] | None:
    """The valid float32 safetensors cache of `gguf` and its tensor order, if there is one."""
    from paged_attention.config import default_cache_dir
    from paged_attention.model.gguf.cache import cache_key, read_cache_index

    cache_file, source = cache_key(gguf, default_cache_dir())
    hit = read_cache_index(cache_file, source)
    return None if hit is None else (cache_file, hit[1])


def sharded_weights(
    files: ModelFiles, streamed: Iterable[tuple[str, Any]], layout: TPLayout, scheme: QuantScheme = NONE
) -> Iterator[tuple[str, Any]]:
    """This rank's part of every tensor of the checkpoint `files` describes.
    `streamed` is the loader's own (lazy) iterator over whole tensors (or a
    GGUF's quantized records): it is read only for a GGUF without a cache, or
    a GGUF kept quantized, one tensor at a time."""
    if files.safetensors:
        yield from read_safetensors_shards(files.safetensors, layout, scheme=scheme)
        return
    assert files.gguf is not None, "ModelFiles holds safetensors or a GGUF"
    cached = None if scheme.quantized else gguf_cache_names(files.gguf)
    if cached is not None:
        yield from read_safetensors_shards([cached[0]], layout, cached[1])
        return
    for name, tensor in streamed:
        shard = layout.shard_of(name)
        yield name, take_quantized(name, shard, tensor, scheme) if scheme.quantized else shard.take(tensor)
        del tensor  # the whole tensor goes before the next is read
