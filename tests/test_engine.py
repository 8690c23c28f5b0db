"""End-to-end engine tests: token-for-token parity with transformers, batching
and preemption never changing outputs, blocks always returned."""

from __future__ import annotations

import pytest
import torch

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from tests.engine_utils import drive, hf_greedy, save_random_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]


LENGTHS = [5, 17, 1, 33, 8, 12, 40, 3, 21]


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}),
        (
            "llama",
            {
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "head_dim": 24,
                "tie_word_embeddings": False,
            },
        ),
        ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 2}),
        ("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 12}),
    ],
)
def test_greedy_matches_transformers_under_batching_and_preemption(tmp_path, arch, overrides):
    path, hf = save_random_model(tmp_path, arch, **overrides)
    prompts = _prompts(hf.config.vocab_size, LENGTHS)
    expected = [hf_greedy(hf, p["prompt_token_ids"], GREEDY.max_tokens) for p in prompts]

    # 9 prompts, at most 4 running, and a pool too small for them all: preemption must happen.
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=24, max_num_seqs=4, max_model_len=64)
    outputs = drive(llm, prompts, GREEDY)
    assert llm.memory_stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.memory_stats()["num_free_blocks"] == llm.memory_stats()["num_blocks"]

    # Each prompt alone gives the same tokens.
    alone = LLM(str(path), dtype="float32", block_size=16, num_kv_blocks=64, max_model_len=64)
    for prompt, want in zip(prompts[:3], expected[:3]):
        assert alone.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want


@pytest.fixture(scope="module")
def stories() -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=256, block_size=16)


def test_stories260k_text_matches_transformers(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(STORIES260K), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(STORIES260K))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    want = hf.generate(ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1] :]
    out = stories.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[
        0
    ]
    assert out.outputs[0].token_ids == want.tolist()
    assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
    assert out.outputs[0].text.startswith(", there was a little girl named Lily")


def test_stories260k_batch_with_invariants_every_step(stories):
    prompts = ["Once upon a time", "The cat", "Lily and Tom went to the park. They", "A big red"]
    alone = [stories.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched = drive(stories, prompts, GREEDY)  # drive() checks invariants after every step
    assert [o.outputs[0].token_ids for o in batched] == alone


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(stories):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    alone = stories.generate("The dog", seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = stories.generate(["A girl", "The dog", "Tom"], [others, seeded, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = stories.generate("The dog", others, use_tqdm=False)[0].outputs[0].token_ids
    assert unseeded != alone  # a different seed does change the draw


def test_top_k_one_equals_greedy(stories):
    greedy = stories.generate("Once upon", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    topk1 = SamplingParams(temperature=1.3, top_k=1, max_tokens=12, ignore_eos=True)
    assert stories.generate("Once upon", topk1, use_tqdm=False)[0].outputs[0].token_ids == greedy


def test_stop_strings_cut_the_text(stories):
    full = stories.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[
        0
    ].outputs[0]
    assert "Lily" in full.text
    cut = stories.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["Lily"]), use_tqdm=False
    )
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "Lily"
    assert out.text == full.text[: full.text.index("Lily")]
    assert len(out.token_ids) < len(full.token_ids)


def test_logprobs_are_log_probabilities(stories):
    params = SamplingParams(temperature=0.8, max_tokens=8, logprobs=5, seed=3)
    out = stories.generate("The sun", params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for token, top in zip(out.token_ids, out.logprobs):
        assert token in top
        assert all(v <= 0 for v in top.values())
        assert sum(torch.tensor(list(top.values())).exp()) <= 1 + 1e-5


def test_finish_reasons_and_max_model_len(tmp_path):
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=8, block_size=4, max_model_len=24)
    out = llm.generate(
        {"prompt_token_ids": [1] + [300] * 20},
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3  # 21 + 3 = max_model_len


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": [1] * 600}, SamplingParams(), "max_model_len"),
        ({"prompt_token_ids": [1, 99999]}, SamplingParams(), "vocabulary"),
    ],
)
def test_bad_prompts_raise_and_the_engine_keeps_going(stories, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        stories.generate(["Once upon a time", prompt], params, use_tqdm=False)
    assert stories.memory_stats()["num_free_blocks"] == stories.memory_stats()["num_blocks"]
    assert not stories.engine.has_unfinished()
    ok = stories.generate("Once upon a time", GREEDY, use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize(
    "prompts,params,priority,error,match",
    [
        # A bad entry late in a list queues none of the earlier ones.
        (["a", "b", "c"], [GREEDY, GREEDY, None], None, TypeError, "SamplingParams"),
        (["a", "b"], GREEDY, [0, "high"], TypeError, "priority must be an int"),
        (["a", "b"], GREEDY, [0, True], TypeError, "priority must be an int"),
        (["a", {"prompt_token_ids": [1, 2.7]}], GREEDY, None, TypeError, "must be ints, got 2.7"),
        (["a", {"prompt_token_ids": [1, True]}], GREEDY, None, TypeError, "must be ints, got True"),
        (["a", {"prompt_token_ids": "123"}], GREEDY, None, TypeError, "list of ints, got str"),
        (["a", 42], GREEDY, None, TypeError, "a prompt must be a string or a dict"),
    ],
)
def test_bad_request_in_a_batch_queues_nothing_and_leaves_the_llm_usable(
    stories, prompts, params, priority, error, match
):
    with pytest.raises(error, match=match):
        stories.generate(prompts, params, use_tqdm=False, priority=priority)
    assert not stories.engine.has_unfinished()
    assert stories.memory_stats()["num_free_blocks"] == stories.memory_stats()["num_blocks"]
    ok = stories.generate(["Once upon a time", "A dog"], GREEDY, use_tqdm=False, priority=[1, 0])
    assert [len(o.outputs[0].token_ids) for o in ok] == [GREEDY.max_tokens] * 2


def test_streaming_checks_run_before_anything_is_queued(stories):
    with pytest.raises(ValueError, match="must equal n"):
        next(iter(stories.generate_stream("Once upon a time", SamplingParams(n=1, best_of=2))))
    assert not stories.engine.has_unfinished()


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="missing model.safetensors"):
        LLM(str(tmp_path))
    from safetensors.torch import save_file

    save_file({"wte": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_pool_too_small_for_max_model_len_says_what_fits():
    with pytest.raises(ValueError, match=r"max_model_len <= 64"):
        LLM(str(STORIES260K), num_kv_blocks=4, block_size=16, max_model_len=512)


def test_streaming_yields_the_same_text_and_abort_frees_blocks(stories):
    params = SamplingParams(temperature=0, max_tokens=30)
    full = stories.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].text
    pieces = [d.outputs[0].text for d in stories.generate_stream("Once upon a time", params)]
    assert "".join(pieces) == full and len(pieces) > 1
    stream = stories.generate_stream("Once upon a time", params)
    next(stream)
    assert stories.memory_stats()["num_free_blocks"] < stories.memory_stats()["num_blocks"]
    stream.close()  # stopping early aborts the request
    assert stories.memory_stats()["num_free_blocks"] == stories.memory_stats()["num_blocks"]
    assert not stories.engine.has_unfinished()


def test_chat_uses_the_template():
    llm = LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64)
    tok = llm.get_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    out = llm.chat(
        [{"role": "user", "content": "Once upon a time"}],
        SamplingParams(temperature=0, max_tokens=5),
        use_tqdm=False,
    )[0]
    assert out.prompt == "Once upon a time "
    assert len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_continues_the_prompt_text(stories, stream):
    """prompt text + completion text == the decode of prompt + completion tokens:
    a completion that starts a word keeps its leading space (vLLM's rule), in
    full outputs and in stream deltas alike."""
    tok = stories.engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt in ["Lily went", "The cat", "Once upon a time"]:
        if stream:
            pieces = stories.generate_stream(prompt, params)
            text = "".join(d.outputs[0].text for d in pieces)
            token_ids = stories.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        else:
            out = stories.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            text, token_ids = out.text, out.token_ids
        prompt_ids = tok.encode(prompt)
        whole = tok.decode(prompt_ids + token_ids, skip_special_tokens=True)
        assert whole == tok.decode(prompt_ids, skip_special_tokens=True) + text, prompt
    assert stories.generate("Lily went", params, use_tqdm=False)[0].outputs[0].text.startswith(" ")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_cpu_pool_reuses_freed_blocks_before_untouched_ones(prefix_caching):
    """On the CPU freed KV blocks go out again before never-used ones (their
    pages are resident): a second round of the same load touches no new
    block. With prefix caching the full blocks of finished prompts stay
    cached (evictable) and are not taken while never-used blocks remain."""
    llm = LLM(
        str(STORIES260K),
        dtype="float32",
        num_kv_blocks=256,
        block_size=16,
        enable_prefix_caching=prefix_caching,
    )
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def round_of(seed: int) -> None:
        prompts = [
            {"prompt_token_ids": [(seed * 31 + i * 7 + j) % 500 + 3 for j in range(37)]} for i in range(4)
        ]
        llm.generate(prompts, params, use_tqdm=False)

    pool = llm.engine.allocator
    round_of(1)
    touched = pool.num_touched_blocks
    assert pool.num_used_blocks == 0 and touched >= 4 * 3
    round_of(2)
    if prefix_caching:  # the first round's 8 full prompt blocks are still cached
        assert pool.num_cached_blocks >= 8 and pool.num_touched_blocks > touched
    else:
        assert pool.num_touched_blocks == touched
