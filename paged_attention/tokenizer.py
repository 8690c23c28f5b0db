"""The engine's tokenizer: transformers' AutoTokenizer, with encode and decode run
straight on the Rust `tokenizers` backend that it wraps.

Importing transformers and building an AutoTokenizer takes about 1.5 s here, half
of the time from process start to the first token; building its backend from
JSON takes 0.15 s. So the first load of a tokenizer folder builds the
AutoTokenizer and saves its backend, exactly as transformers configured it
(post-processor, added tokens), to a cache file keyed by the tokenizer files and
the transformers version. Later starts read that file, and load the
AutoTokenizer only when a chat template or `get_tokenizer()` asks for it.
Tokenizers whose decode does more than the backend's (slow tokenizers,
`clean_up_tokenization_spaces`) always go through transformers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from paged_attention.config import default_cache_dir

logger = logging.getLogger(__name__)

# Bump when the cache file's contents change meaning.
CACHE_FORMAT = "paged_attention.tokenizer/1"
# The files AutoTokenizer reads from a folder (weights and model config excluded).
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt")


def load_auto_tokenizer(folder: Path, gguf_file: str | None = None, cache_dir: Path | None = None) -> Any:
    """AutoTokenizer from a local folder, or from the metadata of the GGUF file
    `gguf_file` in it. Handing it an empty model config skips AutoConfig, whose
    model-module imports cost about 2 s of start-up; the tokenizer class still
    comes from tokenizer_config.json (or the GGUF).

    transformers rebuilds a GGUF's tokenizer from the file each time (3 s for
    the default model's, against 0.6 s for a saved one): the first build is
    saved (`save_pretrained`) under `cache_dir`, named as the backend cache is,
    and later loads read that folder."""
    from transformers import AutoTokenizer
    from transformers.configuration_utils import PretrainedConfig

    if gguf_file is None:
        return AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig())
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    saved = _cache_file(folder, cache_dir, gguf_file).with_suffix(".hf")
    if (saved / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(saved), config=PretrainedConfig())
        except Exception as exc:  # a damaged folder is a miss, not an error
            logger.warning("ignoring the saved tokenizer %s (%s)", saved, exc)
    hf = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    try:
        _save_atomic(hf, saved)
    except OSError as exc:
        logger.warning("not saving the tokenizer of %s (%s)", folder / gguf_file, exc)
    return hf


class Tokenizer:
    """encode/decode/eos_token_id for the engine; `hf` is the AutoTokenizer.

    It also answers the few AutoTokenizer calls the server makes (chat
    templates, token strings, special ids), loading the AutoTokenizer only when
    one of those needs it: on the default model the AutoTokenizer and the
    server's copy of it were 47 MiB of the server's memory at start (94 for a
    GGUF's own tokenizer, which transformers rebuilds from the file)."""

    def __init__(
        self,
        folder: Path,
        backend: tokenizers.Tokenizer | None,
        eos_token_id: int | None,
        hf: Any = None,
        gguf_file: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        assert backend is not None or hf is not None, "a tokenizer needs a backend or an AutoTokenizer"
        self.folder = folder
        self.gguf_file = gguf_file
        self.cache_dir = cache_dir
        self.eos_token_id = eos_token_id
        self._backend = backend
        self._hf = hf
        self._chat_template: str | None = None  # an override (`--chat-template`)

    @classmethod
    def load(
        cls, folder: str | Path, cache_dir: Path | None = None, *, gguf_file: str | None = None
    ) -> Tokenizer:
        """The tokenizer of `folder`, or of the GGUF file `gguf_file` in it."""
        folder = Path(folder)
        cache_file = _cache_file(
            folder, cache_dir if cache_dir is not None else default_cache_dir(), gguf_file
        )
        try:
            text = cache_file.read_text()
        except OSError:
            text = None
        if text is not None:
            try:
                saved = json.loads(text)
                cached = tokenizers.Tokenizer.from_str(saved["backend"])
                return cls(folder, cached, saved["eos_token_id"], gguf_file=gguf_file, cache_dir=cache_dir)
            except Exception as exc:  # tokenizers raises bare Exception; a bad file is a miss
                logger.warning("ignoring the tokenizer cache %s (%s)", cache_file, exc)
        if gguf_file is not None:
            logger.warning("reading the tokenizer from %s (once; then cached)", folder / gguf_file)
        hf = load_auto_tokenizer(folder, gguf_file, cache_dir)
        backend = _plain_backend(hf)
        if backend is not None:
            saved = {"format": CACHE_FORMAT, "backend": backend.to_str(), "eos_token_id": hf.eos_token_id}
            try:
                _write_atomic(cache_file, json.dumps(saved))
            except OSError as exc:
                logger.warning("not caching the tokenizer of %s (%s)", folder, exc)
        return cls(folder, backend, hf.eos_token_id, hf, gguf_file, cache_dir)

    @property
    def hf(self) -> Any:
        """The transformers AutoTokenizer (loaded on first use)."""
        if self._hf is None:
            self._hf = load_auto_tokenizer(self.folder, self.gguf_file, self.cache_dir)
        return self._hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._backend is None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if self._backend is None:
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        """The override if one was set, else the AutoTokenizer's template."""
        return self._chat_template if self._chat_template is not None else self.hf.chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        if self._chat_template is not None:
            kwargs.setdefault("chat_template", self._chat_template)
        return self.hf.apply_chat_template(*args, **kwargs)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        if self._backend is None:
            return list(self.hf.convert_ids_to_tokens(list(token_ids)))
        return [self._backend.id_to_token(int(i)) or "" for i in token_ids]

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)


def _plain_backend(hf: Any) -> tokenizers.Tokenizer | None:
    """The AutoTokenizer's backend when encode/decode are the backend's alone."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or getattr(hf, "clean_up_tokenization_spaces", False):
        return None
    return backend


def _cache_file(folder: Path, cache_dir: Path, gguf_file: str | None = None) -> Path:
    """Cache file for the tokenizer in `folder`: named by a hash of its files'
    contents and of the transformers version that built it. A GGUF's tokenizer
    is named by the file's path, size and modification time (hashing a
    multi-gigabyte file would cost more than reading the tokenizer again)."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    try:
        digest.update(importlib.metadata.version("transformers").encode())
    except importlib.metadata.PackageNotFoundError:
        pass  # load_auto_tokenizer will say transformers is missing
    if gguf_file is not None:
        stat = (folder / gguf_file).stat()
        digest.update(f"{(folder / gguf_file).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return cache_dir / f"tokenizer-{digest.hexdigest()[:16]}.json"
    files = sorted({f for pattern in _TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file()})
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return cache_dir / f"tokenizer-{digest.hexdigest()[:16]}.json"


def _save_atomic(hf: Any, folder: Path) -> None:
    """`hf.save_pretrained` into a temporary folder beside `folder`, then
    renamed into place: a concurrent reader sees no folder or the whole one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    try:
        hf.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp.exists():  # another process renamed its copy in first
            shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a
    concurrent reader sees no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
