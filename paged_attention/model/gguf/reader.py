"""Parse a GGUF header: metadata key/values and tensor infos, no tensor data.

Parsed with `struct` rather than `gguf.GGUFReader`, which spends ~2 s turning
a 49k-token vocabulary and its 49k merges into numpy views; string arrays are
skipped here, not decoded, since the loader needs none of them.

Layout facts this relies on (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
  * little-endian; header = magic "GGUF", u32 version (2 or 3), u64 tensor
    count, u64 metadata count, metadata key/values, tensor infos, padding to
    `general.alignment` (default 32), then tensor data;
  * a tensor info lists dims innermost first, so GGUF `[in, out]` is torch
    `[out, in]`, and quantization blocks run along the innermost (`in`) dim,
    so a row of a quantized matrix is a whole number of blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from paged_attention.model.gguf.ggml_types import tensor_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

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
            raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
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
        nbytes = tensor_nbytes(shape, ggml_type, name)
        info = TensorInfo(name, shape, ggml_type, data_start + rel_offset, nbytes)
        if info.offset + nbytes > file_size:
            raise ValueError(f"tensor {name!r} runs past the end of {path} (truncated file?)")
        tensors[name] = info
    return GGUFHeader(version, metadata, tensors)
