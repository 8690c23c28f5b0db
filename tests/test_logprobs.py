"""Log-probs are the log-softmax of the model's raw logits (vLLM's documented
meaning): checked against a direct transformers forward over prompt + output
on stories260K, for greedy and for sampled rows whose temperature and filters
must not change them."""

from __future__ import annotations

import pytest
import torch

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=16)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(STORIES260K), dtype=torch.float32).eval()


@torch.inference_mode()
def _reference_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """[len(output_ids), vocab]: log-softmax of the raw logits that predicted each output token."""
    ids = torch.tensor([prompt_ids + output_ids])
    logits = hf_model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True),
        # Temperature, top-k and top-p change which token is drawn, never its reported log-prob.
        SamplingParams(
            temperature=0.6, top_k=4, top_p=0.9, seed=3, max_tokens=16, logprobs=3, ignore_eos=True
        ),
        SamplingParams(temperature=1.8, seed=5, max_tokens=16, logprobs=0, ignore_eos=True),
    ],
)
def test_logprobs_equal_log_softmax_of_a_direct_forward(llm: LLM, hf_model, params: SamplingParams) -> None:
    (out,) = llm.generate(PROMPT, params, use_tqdm=False)
    (c,) = out.outputs
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 16
    ref = _reference_logprobs(hf_model, out.prompt_token_ids, c.token_ids)
    assert params.logprobs is not None
    total = 0.0
    for pos, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        top = ref[pos].topk(params.logprobs)
        want = dict(zip(top.indices.tolist(), top.values.tolist()))
        want[token] = ref[pos, token].item()
        assert entry.keys() == want.keys()
        for t, value in entry.items():
            assert value == pytest.approx(want[t], abs=1e-4)
        total += want[token]
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_n_samples_each_report_their_own_tokens(llm: LLM, hf_model) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, logprobs=1, ignore_eos=True)
    (out,) = llm.generate(PROMPT, params, use_tqdm=False)
    for c in out.outputs:
        ref = _reference_logprobs(hf_model, out.prompt_token_ids, c.token_ids)
        assert c.logprobs is not None
        for pos, token in enumerate(c.token_ids):
            assert c.logprobs[pos][token] == pytest.approx(ref[pos, token].item(), abs=1e-4)


def test_prompt_logprobs_is_refused_until_supported(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate(PROMPT, SamplingParams(prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs must be None or an int >= 0"):
        SamplingParams(prompt_logprobs=-1)
