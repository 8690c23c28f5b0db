"""Read one tensor-parallel rank's slices of a checkpoint, never the whole model.

safetensors: `safe_open(...).get_slice(name)[rows]` copies only the rank's rows
(or columns) out of the memory-mapped file. GGUF: the float32 safetensors cache
of the file (`model/gguf/cache.py`) is read the same way when it exists;
otherwise each tensor is dequantized, sliced and dropped before the next one,
so a rank holds at most its shard plus one whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from paged_attention.distributed.sharding import TPLayout

if TYPE_CHECKING:
    from paged_attention.model.loader import ModelFiles


def read_safetensors_shards(
    files: Sequence[Path], layout: TPLayout, names: Sequence[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's part) for every tensor of `files` (or those in `names`, in that order)."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names if names is not None else f.keys():
                yield name, layout.shard_of(name).read(f.get_slice(name))


def gguf_cache_names(gguf: Path) -> tuple[Path, list[str]] | None:
    """The valid float32 safetensors cache of `gguf` and its tensor order, if there is one."""
    from paged_attention.config import default_cache_dir
    from paged_attention.model.gguf.cache import cache_key, read_cache_index

    cache_file, source = cache_key(gguf, default_cache_dir())
    hit = read_cache_index(cache_file, source)
    return None if hit is None else (cache_file, hit[1])


def sharded_weights(
    files: ModelFiles, streamed: Iterable[tuple[str, Any]], layout: TPLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's part of every tensor of the checkpoint `files` describes.
    `streamed` is the loader's own (lazy) iterator over whole tensors: it is
    read only for a GGUF without a cache, one tensor at a time."""
    if files.safetensors:
        yield from read_safetensors_shards(files.safetensors, layout)
        return
    assert files.gguf is not None, "ModelFiles holds safetensors or a GGUF"
    cached = gguf_cache_names(files.gguf)
    if cached is not None:
        yield from read_safetensors_shards([cached[0]], layout, cached[1])
        return
    for name, tensor in streamed:
        yield name, layout.shard_of(name).take(tensor)
        del tensor  # the whole tensor goes before the next is read
