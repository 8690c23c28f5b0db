"""The engine's tokenizer: encode/decode on the cached `tokenizers` backend give
exactly what transformers' AutoTokenizer gives, and the cache is keyed and
rebuilt correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from paged_attention.engine.builder import DEFAULT_MODEL_ASSETS, STORIES260K
from paged_attention.tokenizer import Tokenizer, load_auto_tokenizer

TEXTS = [
    "Once upon a time",
    " hello  world\n\nfoo\tbar",
    "Tom's dog isn't here . , ! ?",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>Lily and </s> Ben",
    "ü日本語 😀 ❤️",
    "   leading spaces",
    "",
]


@pytest.mark.parametrize("folder", [DEFAULT_MODEL_ASSETS, STORIES260K], ids=["smollm2", "stories260K"])
def test_cached_backend_encodes_and_decodes_as_auto_tokenizer(folder: Path, tmp_path: Path) -> None:
    first = Tokenizer.load(folder, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenizer-*.json"))) == 1
    cached = Tokenizer.load(folder, cache_dir=tmp_path)
    assert cached._hf is None  # served from the cache file: transformers not touched
    hf = load_auto_tokenizer(folder)
    assert first.eos_token_id == cached.eos_token_id == hf.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            assert first.encode(text, add_special_tokens=special) == ids
            assert cached.encode(text, add_special_tokens=special) == ids
            for skip in (True, False):
                assert cached.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip
                )
    # Ids a model samples, not only ids the encoder makes: every single token.
    for token in range(0, len(hf), max(1, len(hf) // 500)):
        assert cached.decode([token]) == hf.decode([token])
    assert cached.hf.__class__ is hf.__class__  # loaded on demand


def test_cache_is_keyed_by_the_tokenizer_files(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(STORIES260K, folder, ignore=shutil.ignore_patterns("*.safetensors", "llama2c-original"))
    cache = tmp_path / "cache"
    Tokenizer.load(folder, cache_dir=cache)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<s>"  # a change that matters: a different eos id
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    changed = Tokenizer.load(folder, cache_dir=cache)
    assert len(list(cache.glob("tokenizer-*.json"))) == 2
    assert changed.eos_token_id == load_auto_tokenizer(folder).eos_token_id == 1


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Tokenizer.load(STORIES260K, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("tokenizer-*.json")
    cache_file.write_text('{"backend": "not a tokenizer"')
    tok = Tokenizer.load(STORIES260K, cache_dir=tmp_path)
    assert "ignoring the tokenizer cache" in caplog.text
    assert tok.encode("Once upon a time") == load_auto_tokenizer(STORIES260K).encode("Once upon a time")
    assert json.loads(cache_file.read_text())["eos_token_id"] == tok.eos_token_id  # rewritten whole


def test_clean_up_spaces_goes_through_transformers(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(STORIES260K, folder, ignore=shutil.ignore_patterns("*.safetensors", "llama2c-original"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(folder, cache_dir=tmp_path / "cache")
    assert tok._backend is None and not (tmp_path / "cache").exists()
    ids = tok.hf.encode("Tom's dog . , hi")
    assert tok.decode(ids) == tok.hf.decode(ids)


def test_server_calls_are_answered_as_the_auto_tokenizer_answers(tmp_path: Path) -> None:
    """The calls the server makes give the AutoTokenizer's answers, and the
    AutoTokenizer is loaded only when one needs it (not for encode/decode,
    token strings, or an overriding chat template)."""
    import copy

    tok = Tokenizer.load(DEFAULT_MODEL_ASSETS, cache_dir=tmp_path)
    hf = load_auto_tokenizer(DEFAULT_MODEL_ASSETS)
    server_copy = copy.deepcopy(Tokenizer.load(DEFAULT_MODEL_ASSETS, cache_dir=tmp_path))
    ids = hf.encode("Once upon a time, <|im_start|> a fox.")
    assert server_copy.encode("Once upon a time, <|im_start|> a fox.") == ids
    assert server_copy.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    server_copy.chat_template = "{{ messages[0]['content'] }}!"
    assert server_copy.chat_template == "{{ messages[0]['content'] }}!"
    assert server_copy._hf is None  # nothing so far needed it
    messages = [{"role": "user", "content": "hi"}]
    assert server_copy.apply_chat_template(messages, tokenize=False) == "hi!"
    assert tok.chat_template == hf.chat_template  # no override: the model's own
    assert tok.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
        messages, tokenize=False
    )
    assert tok.all_special_ids == hf.all_special_ids
