"""Block sharing: parallel sampling (n, best_of) and beam search with
copy-on-write, checked against transformers and against the block pool."""

from __future__ import annotations

import pytest
import torch

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from tests.engine_utils import drive, save_random_model


@pytest.fixture(scope="module")
def hf_stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(STORIES260K), dtype=torch.float32).eval()


def hf_beams(
    hf, prompt_ids: list[int], k: int, max_new: int, lp: float, eos: int | list[int] | None
) -> list[list[int]]:
    ids = torch.tensor([prompt_ids])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        early_stopping=True,
        length_penalty=lp,
        max_new_tokens=max_new,
        pad_token_id=0,
        eos_token_id=eos,
    )
    ends = [] if eos is None else [eos] if isinstance(eos, int) else eos
    beams = []
    for row in out[:, len(prompt_ids) :].tolist():
        cut = [row.index(e) for e in ends if e in row]
        beams.append(row[: min(cut) + 1] if cut else row)  # the rest is padding
    return beams


def beam_params(k: int, max_tokens: int, lp: float, **kw) -> SamplingParams:
    return SamplingParams(
        use_beam_search=True, best_of=k, n=k, max_tokens=max_tokens, length_penalty=lp, **kw
    )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("lp", [1.0, 0.0, 2.0])
def test_beam_search_equals_transformers_on_stories260k(hf_stories, k, lp):
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=4, max_model_len=128)
    tok = llm.get_tokenizer()
    prompts = ["Once upon a time", "The cat sat"]
    outs = llm.generate(prompts, beam_params(k, 24, lp), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        want = hf_beams(hf_stories, tok.encode(prompt), k, 24, lp, eos=2)
        assert [o.token_ids for o in out.outputs] == want
    assert llm.memory_stats()["num_free_blocks"] == 128


def test_beam_search_with_hypotheses_that_end_equals_transformers(hf_stories):
    """'.' as an extra end token makes beams finish inside the search (stories260K
    seldom emits </s>), exercising the finished-hypothesis ranking."""
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=256, block_size=8, max_model_len=512)
    tok = llm.get_tokenizer()
    dot = tok.convert_tokens_to_ids(".")
    ids = tok.encode("Lily and Tom went to the park")
    for k, lp in [(3, 1.0), (4, 2.0), (5, 0.0)]:
        params = beam_params(k, 30, lp, stop_token_ids=[dot])
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        assert [o.token_ids for o in out.outputs] == hf_beams(hf_stories, ids, k, 30, lp, eos=[2, dot])
        assert any(o.finish_reason == "stop" and o.token_ids[-1] == dot for o in out.outputs)


@pytest.mark.parametrize("k,lp", [(2, 1.0), (4, 0.5), (6, 2.0)])
def test_beam_search_equals_transformers_on_random_llama(tmp_path, k, lp):
    path, hf = save_random_model(
        tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1
    )
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)
    prompt = [1, 17, 99, 4, 200, 31, 5]
    params = beam_params(k, 16, lp, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == hf_beams(hf, prompt, k, 16, lp, eos=None)


def test_beam_search_beside_other_requests_and_under_preemption(hf_stories):
    """Beams share a small pool with ordinary requests; preemption happens;
    the beams and the greedy outputs are unchanged."""
    roomy = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=256, block_size=4, max_model_len=128)
    tok = roomy.get_tokenizer()
    beam_prompt = "Once upon a time"
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    others = ["The dog ran", "Tom had a big red ball. He", "Lily"]
    want_beams = hf_beams(hf_stories, tok.encode(beam_prompt), 4, 40, 1.0, eos=2)
    want_greedy = [o.outputs[0].token_ids for o in roomy.generate(others, greedy, use_tqdm=False)]

    tight = LLM(
        str(STORIES260K), dtype="float32", num_kv_blocks=40, block_size=4, max_model_len=128, max_num_seqs=5
    )
    outs = drive(
        tight,
        [others[0], beam_prompt, others[1], others[2]],
        [greedy, beam_params(4, 40, 1.0), greedy, greedy],
    )
    assert tight.memory_stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs[1].outputs] == want_beams
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 3)] == want_greedy


def test_beam_forks_share_blocks_and_copy_only_the_partial_last_block():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)
    engine = llm.engine
    ids = llm.get_tokenizer().encode("The cat sat down")  # not a multiple of 4
    llm.add_requests({"prompt_token_ids": ids}, beam_params(3, 2, 1.0))
    engine.step()  # prefill; the group expands to 3 beams sharing the prompt blocks
    beams = engine.scheduler.running + engine.scheduler.waiting
    assert len(beams) == 3
    full_blocks = len(ids) // 4
    for block in beams[0].block_table.block_ids[: full_blocks + 1]:
        assert engine.allocator.ref_count(block) == 3  # shared, not copied
    batch = engine.scheduler.schedule()
    # Two of the three beams copy the partly filled last block; the third writes
    # in place; full blocks are never copied.
    assert len(batch.copies) == 2
    assert all(c.src == batch.copies[0].src for c in batch.copies)
    for b in beams:
        assert b.block_table.block_ids[:full_blocks] == beams[0].block_table.block_ids[:full_blocks]
    engine.runner.execute(batch)  # keep the engine consistent for clean-up
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
    for group_id in list(engine._groups):
        engine.abort(group_id)
    assert engine.allocator.num_free_blocks == 64


# ------------------------------------------------------------ parallel sampling
def test_parallel_sampling_prefills_once_and_seed_reproduces_all_n():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=4, max_model_len=128)
    ids = llm.get_tokenizer().encode("Once upon a time, there was a")
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    before = llm.engine.stats.num_prompt_tokens
    first = drive(llm, [{"prompt_token_ids": ids}], params)[0]
    assert llm.engine.stats.num_prompt_tokens - before == len(ids)  # the prompt ran once
    assert len(first.outputs) == 4 and [o.index for o in first.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1  # samples differ
    again = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    assert llm.memory_stats()["num_free_blocks"] == 128


def test_parallel_samples_copy_on_first_write_only():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)
    engine = llm.engine
    ids = llm.get_tokenizer().encode("The cat sat down")
    llm.add_requests({"prompt_token_ids": ids}, SamplingParams(n=3, seed=0, max_tokens=8))
    engine.step()  # prefill once, fork into 3 samples (no copy yet)
    seqs = list(engine.scheduler.requests())
    assert len(seqs) == 3
    assert len({tuple(s.block_table.block_ids) for s in seqs}) == 1  # all blocks shared
    batch = engine.scheduler.schedule()
    assert len(batch.copies) == 2  # first write: two copies, the last sample keeps the original
    engine.abort(next(iter(engine._groups)))
    assert engine.allocator.num_free_blocks == 64


def test_best_of_returns_the_n_most_likely():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=16, max_model_len=128)
    params = SamplingParams(n=2, best_of=5, seed=3, max_tokens=12, ignore_eos=True)
    out = llm.generate("The dog", params, use_tqdm=False)[0]
    every = llm.generate(
        "The dog", SamplingParams(n=5, seed=3, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0]
    ranked = sorted(every.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked]


def test_streaming_n_samples_yields_per_sample_deltas():
    llm = LLM(
        str(STORIES260K),
        dtype="float32",
        num_kv_blocks=128,
        block_size=4,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    # Seed 5: the samples stop at '.' at different steps.
    params = SamplingParams(n=3, seed=5, max_tokens=16, stop=["."])
    whole = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
    before = llm.engine.stats.num_prompt_tokens
    deltas = list(llm.generate_stream("Once upon a time", params))
    assert llm.engine.stats.num_prompt_tokens - before == len(deltas[0].prompt_token_ids)  # prefilled once
    texts, tokens, ends = [""] * 3, [[]] * 3, [None] * 3
    for delta in deltas:
        indexes = [o.index for o in delta.outputs]
        assert indexes == sorted(set(indexes)), "one entry per sample that got a token, by index"
        for o in delta.outputs:
            assert ends[o.index] is None, f"sample {o.index} reported after it finished"
            texts[o.index] += o.text
            tokens[o.index], ends[o.index] = o.token_ids, o.finish_reason
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert any(o.finish_reason for d in deltas[:-1] for o in d.outputs)  # one ended early
    assert texts == [o.text for o in whole]
    assert tokens == [o.token_ids for o in whole]
    assert ends == [o.finish_reason for o in whole]
    assert llm.memory_stats()["num_free_blocks"] == 128


def test_streaming_refuses_best_of_above_n_and_beam_search():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match=r"best_of \(3\) must equal n \(2\) when streaming"):
        next(llm.generate_stream("The cat", SamplingParams(n=2, best_of=3)))
    with pytest.raises(ValueError, match="beam search cannot stream"):
        next(llm.generate_stream("The cat", beam_params(2, 4, 1.0)))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"use_beam_search": True, "best_of": 1}, "beam"),
        ({"use_beam_search": True, "best_of": 3, "temperature": 0.7}, "deterministic"),
        ({"use_beam_search": True, "best_of": 3, "top_p": 0.9}, "deterministic"),
        ({"use_beam_search": True, "best_of": 3, "length_penalty": float("nan")}, "length_penalty"),
    ],
)
def test_bad_sharing_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


# ------------------------------------------------------------ prefix caching
SYSTEM = "Once upon a time, there was a little girl named Lily. She loved to"


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefix_caching_never_changes_outputs(block_size):
    # Prompts share a prefix and diverge inside a block; some arrive after others are cached.
    first = [SYSTEM + " play", SYSTEM + " run in the park"]
    later = [SYSTEM + " sing", SYSTEM + " play with her dog", "Tom had a ball"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kwargs = dict(dtype="float32", block_size=block_size, num_kv_blocks=512 // block_size, max_model_len=128)
    off = LLM(str(STORIES260K), enable_prefix_caching=False, **kwargs)
    want = [o.outputs[0].token_ids for o in off.generate(first + later, params, use_tqdm=False)]
    on = LLM(str(STORIES260K), **kwargs)
    got = [o.outputs[0].token_ids for o in drive(on, first, params)]
    outs = drive(on, later, params)  # invariants (cache included) after every step
    got += [o.outputs[0].token_ids for o in outs]
    assert got == want
    prefix_len = len(on.get_tokenizer().encode(SYSTEM))
    for out in outs[:2]:  # at least the shared system prompt's full blocks
        assert out.num_cached_tokens >= (prefix_len // block_size) * block_size
    assert outs[2].num_cached_tokens <= 1  # an unrelated prompt shares at most <s>
    stats = on.memory_stats()
    assert stats["num_cached_blocks"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert stats["num_free_blocks"] == stats["num_blocks"]  # cached blocks are evictable, not used


def test_a_cached_prompt_computes_only_its_new_tokens():
    llm = LLM(str(STORIES260K), dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate(SYSTEM, params, use_tqdm=False)
    before = llm.engine.stats.num_prompt_tokens
    out = llm.generate(SYSTEM + " dance", params, use_tqdm=False)[0]
    computed = llm.engine.stats.num_prompt_tokens - before
    assert computed == len(out.prompt_token_ids) - out.num_cached_tokens
    assert out.num_cached_tokens >= 12


def test_chunked_prefill_under_prefix_caching():
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [SYSTEM + " play", SYSTEM + " jump high"]
    off = LLM(
        str(STORIES260K),
        dtype="float32",
        block_size=4,
        num_kv_blocks=128,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params, use_tqdm=False)]
    on = LLM(
        str(STORIES260K),
        dtype="float32",
        block_size=4,
        num_kv_blocks=128,
        max_model_len=128,
        max_num_batched_tokens=7,
    )
    got = [drive(on, [p], params)[0].outputs[0].token_ids for p in prompts]
    assert got == want
