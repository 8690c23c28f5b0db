"""Log-probs are the log-softmax of the model's raw logits (vLLM's documented
meaning): checked against a direct transformers forward over prompt + output
on stories260K, for greedy and for sampled rows whose temperature and filters
must not change them; prompt log-probs likewise, through chunked prefill,
prefix-cache hits, forks, streaming and recompute preemption."""

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


@torch.inference_mode()
def _reference_prompt_logprobs(hf_model, prompt_ids: list[int]) -> torch.Tensor:
    """[len(prompt_ids) - 1, vocab]: row p predicts prompt token p + 1."""
    logits = hf_model(torch.tensor([prompt_ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _assert_prompt_logprobs(out, hf_model, num_top: int) -> None:
    ids = out.prompt_token_ids
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    ref = _reference_prompt_logprobs(hf_model, ids)
    for pos, entry in enumerate(entries[1:]):
        top = ref[pos].topk(num_top)
        want = dict(zip(top.indices.tolist(), top.values.tolist()))
        want[ids[pos + 1]] = ref[pos, ids[pos + 1]].item()
        assert entry is not None and entry.keys() == want.keys()
        for t, value in entry.items():
            assert value == pytest.approx(want[t], abs=1e-4)


LONG_PROMPT = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog"
)


def test_prompt_logprobs_equal_a_direct_forward(llm: LLM, hf_model) -> None:
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3)
    outs = llm.generate([PROMPT, LONG_PROMPT], params, use_tqdm=False)
    for out in outs:
        _assert_prompt_logprobs(out, hf_model, 3)
    # A prompt already in the prefix cache is computed again in full for them.
    (again,) = llm.generate(LONG_PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False)
    _assert_prompt_logprobs(again, hf_model, 0)
    (plain,) = llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_over_chunked_prefill_forks_and_streams(hf_model) -> None:
    chunked = LLM(
        str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=8
    )
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=2)
    (out,) = chunked.generate(LONG_PROMPT, params, use_tqdm=False)
    assert len(out.prompt_token_ids) > 8  # the prompt took several steps
    _assert_prompt_logprobs(out, hf_model, 2)
    deltas = list(chunked.generate_stream(LONG_PROMPT, SamplingParams(max_tokens=3, prompt_logprobs=1)))
    assert all(d.prompt_logprobs is deltas[0].prompt_logprobs for d in deltas)
    _assert_prompt_logprobs(deltas[-1], hf_model, 1)


def test_prompt_logprobs_survive_recompute_preemption(hf_model) -> None:
    from tests.engine_utils import drain

    small = LLM(
        str(STORIES260K),
        dtype="float32",
        num_kv_blocks=24,
        block_size=4,
        max_model_len=96,
        max_num_batched_tokens=16,
        preemption_mode="recompute",
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    ids = small.add_requests([LONG_PROMPT, PROMPT, LONG_PROMPT], params)
    done = drain(small.engine)
    assert small.memory_stats()["num_preemptions"] > 0
    for request_id in ids:
        _assert_prompt_logprobs(done[request_id], hf_model, 1)


def test_prompt_logprobs_validation() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be None or an int >= 0"):
        SamplingParams(prompt_logprobs=-1)


def test_echo_logprobs_put_the_prompt_first(llm: LLM) -> None:
    from paged_attention.entrypoints.logprobs import join_logprobs, prompt_logprobs_for_echo, prompt_pieces
    from paged_attention.entrypoints.openai_protocol import TokenText, completion_logprobs

    (out,) = llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=3), use_tqdm=False
    )
    tokenizer = llm.get_tokenizer()
    token_text = TokenText(tokenizer)
    assert out.prompt_logprobs is not None
    pieces, offsets = prompt_pieces(tokenizer, out.prompt_token_ids, PROMPT)
    assert pieces[:2] == ["", "Once"]  # BOS is not in the text; the first word has no leading space
    prompt_part = prompt_logprobs_for_echo(
        out.prompt_token_ids, out.prompt_logprobs, pieces, offsets, token_text, num_top=2
    )
    completion = out.outputs[0]
    joined = join_logprobs(prompt_part, completion_logprobs(completion, token_text, len(PROMPT)))
    n_prompt = len(out.prompt_token_ids)
    assert len(joined.tokens) == n_prompt + 4
    assert joined.token_logprobs[0] is None and joined.top_logprobs[0] is None  # BOS: nothing predicts it
    for i in range(1, n_prompt):
        token = out.prompt_token_ids[i]
        assert joined.token_logprobs[i] == out.prompt_logprobs[i][token]
        top = joined.top_logprobs[i]
        assert top is not None and top[joined.tokens[i]] == joined.token_logprobs[i]
        # The 2 asked for (the engine computed 3), plus the prompt's token.
        best = sorted(out.prompt_logprobs[i].values(), reverse=True)[:2]
        assert sorted(top.values(), reverse=True)[:2] == best and len(top) <= 3
    echoed = PROMPT + completion.text
    assert completion.text.startswith(",")  # see the server test on a completion that starts a word
    assert "".join(joined.tokens) == echoed
    assert joined.text_offset == [sum(len(t) for t in joined.tokens[:i]) for i in range(len(joined.tokens))]
    with pytest.raises(ValueError, match="one prompt log-prob entry, piece and offset per prompt token"):
        prompt_logprobs_for_echo(out.prompt_token_ids, out.prompt_logprobs[1:], pieces, offsets, token_text)


@pytest.mark.parametrize(
    "text",
    [
        "Once upon a time",
        "Hello\nworld  x",
        "Ünïcödé 🐱 café",  # characters split over byte tokens
        "  two spaces\tand a tab",
        " leading space",
        "Zebra",  # a lone "▁" first
        "<s> typed special a<s>b",  # special tokens written in the text
    ],
)
def test_prompt_pieces_make_up_the_echoed_text(llm: LLM, text: str) -> None:
    from paged_attention.entrypoints.logprobs import prompt_pieces, token_pieces

    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(text)
    for skip in (True, False):
        pieces = token_pieces(tokenizer, ids, skip_special_tokens=skip)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
    # A prompt sent as text is echoed as sent; one sent as ids as their full decode.
    for echoed in (text, tokenizer.decode(ids)):
        pieces, offsets = prompt_pieces(tokenizer, ids, echoed)
        assert len(pieces) == len(offsets) == len(ids)
        assert "".join(pieces) == echoed
        assert offsets == [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]


def test_align_pieces_where_the_decode_differs_from_the_text() -> None:
    from paged_attention.entrypoints.logprobs import align_pieces

    # An added BOS is not in the text; the word after it loses the space the decode gave it.
    assert align_pieces(["<s>", " Once", " upon"], [True, False, False], "Once upon") == (
        ["", "Once", " upon"],
        [0, 0, 4],
    )
    # Whitespace the decode dropped is skipped.
    assert align_pieces(["Once", " upon"], [False, False], " Once upon") == (["Once", " upon"], [1, 5])
    # Text the decode does not give back: placed where the previous piece ended.
    assert align_pieces(["a", "zz", "b"], [False] * 3, "ab") == (["a", "zz", "b"], [0, 1, 2])


@pytest.mark.parametrize(
    ("prompt", "computed_top", "num_top"), [(LONG_PROMPT, 4, 2), ("Zebra quantum sky", 1, 1)]
)
def test_vllm_prompt_logprobs_ranks(llm: LLM, hf_model, prompt: str, computed_top: int, num_top: int) -> None:
    from paged_attention.entrypoints.logprobs import prompt_pieces, vllm_prompt_logprobs
    from paged_attention.entrypoints.openai_protocol import TokenText

    params = SamplingParams(max_tokens=1, prompt_logprobs=computed_top)
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    ids, entries = out.prompt_token_ids, out.prompt_logprobs
    assert entries is not None
    pieces, _ = prompt_pieces(tokenizer, ids, prompt)
    token_text = TokenText(tokenizer)
    got = vllm_prompt_logprobs(ids, entries, pieces, token_text, num_top, computed_top)
    ref = _reference_prompt_logprobs(hf_model, ids)
    assert got[0] is None and len(got) == len(ids)
    outside = 0
    for pos, entry in enumerate(got[1:]):
        own = ids[pos + 1]
        assert entry is not None and next(iter(entry)) == own  # the prompt's token first
        # Its text in the prompt; one that shows nothing there ("Zebra"'s lone "▁") by TokenText's name.
        assert entry[own].decoded_token == (pieces[pos + 1] or token_text(own))
        assert entry[own].logprob == pytest.approx(ref[pos, own].item(), abs=1e-4)
        true_rank = int((ref[pos] > ref[pos, own]).sum()) + 1
        # A prompt token outside the engine's top N: its rank was not computed.
        assert entry[own].rank == (true_rank if true_rank <= computed_top else None)
        outside += true_rank > computed_top
        others = [t for t in entry if t != own]
        assert len(others) == num_top - (true_rank <= num_top)
        for t in others:
            assert entry[t].rank == int((ref[pos] > ref[pos, t]).sum()) + 1 <= num_top
            assert entry[t].logprob == pytest.approx(ref[pos, t].item(), abs=1e-4)
    assert outside or computed_top > 1  # an unlikely prompt has tokens outside the top 1
