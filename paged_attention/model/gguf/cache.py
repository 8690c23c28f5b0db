"""The float32 safetensors cache of converted GGUF files.

Dequantizing the default model takes ~0.2-0.6 s; memory-mapping its cached
conversion takes ~10 ms (pages are read on first use). A cache file is keyed
by the GGUF's resolved path, size and mtime, and records them to be checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from paged_attention.config import default_cache_dir
from paged_attention.model.gguf.reader import TensorInfo

logger = logging.getLogger(__name__)

# Bump whenever the conversion (names, config, values) changes: old cache
# files then stop matching instead of serving stale results.
CACHE_FORMAT = "paged_attention.gguf/1"
_SAFETENSORS_ALIGN = 64  # where the data section starts; tensors are all float32


def cache_file_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where `load_gguf` keeps (or would keep) the float32 conversion of `gguf_path`."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return cache_key(Path(gguf_path), cache_dir)[0]


def cache_key(path: Path, cache_dir: Path) -> tuple[Path, dict[str, str]]:
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


def read_cache_index(cache_file: Path, source: dict[str, str]) -> tuple[dict[str, Any], list[str]] | None:
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


def iter_cache(cache_file: Path, order: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in `order`, each backed by a private (copy-on-write) mapping."""
    with safe_open(str(cache_file), framework="pt") as f:
        for name in order:
            yield name, f.get_tensor(name)


def write_cache(
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
    # Seconds of work on a first run: say so (and where it goes) instead of going quiet.
    logger.warning(
        "converting %s to float32 once, cached as %s (`paged-attention cache clear` removes it)",
        source["source"],
        cache_file,
    )
    header, blob = _safetensors_header(source, config, names)
    fd, tmp_name = tempfile.mkstemp(prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for hf_name, t in tensors:
                spec = header[hf_name]
                if tuple(t.shape) != tuple(spec["shape"]) or t.dtype != torch.float32:
                    raise RuntimeError(f"{hf_name}: produced {t.dtype} {tuple(t.shape)}, header says {spec}")
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
    _remove_stale(cache_file)


def _safetensors_header(
    source: dict[str, str], config: dict[str, Any], names: list[tuple[TensorInfo, str]]
) -> tuple[dict[str, Any], bytes]:
    """The header dict (tensor specs by HF name) and its padded JSON encoding."""
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
    return header, blob


def _remove_stale(cache_file: Path) -> None:
    """Delete older conversions of the same GGUF path (it has changed since)."""
    # startswith, not glob: a model name may contain glob characters.
    prefix = cache_file.name.rsplit("-", 1)[0] + "-"
    for old in cache_file.parent.iterdir():
        if old.name.startswith(prefix) and old.name.endswith(".safetensors") and old != cache_file:
            with contextlib.suppress(OSError):
                old.unlink()
