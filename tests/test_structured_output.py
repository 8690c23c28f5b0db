"""Structured output: GuidedDecodingParams, the grammar compiler and matchers,
and the engine enforcing them (choice, regex, EBNF, JSON schema) through n /
best_of forks and recompute preemption. Fast tests run the tiny stories260K
model; the JSON-schema property test runs the default SmolLM2 (slow)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from paged_attention.guided import GuidedDecodingParams
from paged_attention.guided.bitmask import allocate_bitmask, unpack_bitmask
from paged_attention.guided.grammar import choice_grammar
from tests.engine_utils import drain
from tests.profiles import examples

xgrammar = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(STORIES260K), num_kv_blocks=256, block_size=4, seed=0)


def _run(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list:
    """Generate through `drain`: engine invariants (grammar in step with each
    sequence's outputs included) are checked after every step."""
    ids = llm.add_requests(prompts, params)
    done = drain(llm.engine)
    return [done[i] for i in ids]


# ------------------------------------------------------------------ params
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": [1, 2]}, "JSON schema object"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", ""]}, "non-empty strings"),
        ({"choice": ["a", 3]}, "non-empty strings"),
        ({"regex": ""}, "non-empty string"),
        ({"grammar": 5}, "non-empty string"),
        ({"json_object": True, "disable_any_whitespace": "yes"}, "disable_any_whitespace"),
    ],
)
def test_guided_params_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GuidedDecodingParams(**kwargs)


def test_sampling_params_take_a_dict_and_refuse_beam_search() -> None:
    p = SamplingParams(guided_decoding={"regex": "[ab]+"})
    assert p.guided == GuidedDecodingParams(regex="[ab]+")
    assert SamplingParams().guided is None
    with pytest.raises(ValueError, match="use_beam_search"):
        SamplingParams(use_beam_search=True, best_of=2, guided_decoding={"choice": ["a"]})
    with pytest.raises(ValueError, match="guided_decoding must be"):
        SamplingParams(guided_decoding="json")  # type: ignore[arg-type]


def test_schema_text_keeps_property_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "integer"}}}
    assert GuidedDecodingParams(json=schema).schema_text() == json.dumps(schema)


def test_choice_grammar_escapes_quotes_and_backslashes() -> None:
    assert choice_grammar(['say "hi"', "a\\b"]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


# ----------------------------------------------------------------- bitmask
def test_unpack_bitmask_matches_xgrammar_apply() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly used
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, words)
    allowed = unpack_bitmask(words, vocab)
    assert allowed.shape == (3, vocab)
    assert torch.equal(logits.masked_fill(~allowed, float("-inf")), expected)
    assert bool(unpack_bitmask(allocate_bitmask(2, vocab), vocab).all())
    with pytest.raises(ValueError, match=r"\[rows, 4\]"):
        unpack_bitmask(words[:, :3], vocab)


# ---------------------------------------------------------- engine: fast
def test_choice_with_forked_samples(llm: LLM) -> None:
    choices = ["yes", "no", 'say "maybe"', "ünïcode"]
    guided = GuidedDecodingParams(choice=choices)
    params = [
        SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=20, guided_decoding=guided)
        for seed in range(3)
    ] + [SamplingParams(temperature=0, max_tokens=20, guided_decoding=guided)]
    outs = _run(llm, ["Once upon a time"] * 4, params)
    for out in outs:
        for c in out.outputs:
            assert c.text in choices, c.text
            assert c.finish_reason == "stop"
    # best_of > n ranks forked samples; each still satisfies the grammar.
    (ranked,) = _run(
        llm,
        ["The cat"],
        SamplingParams(n=2, best_of=5, temperature=1.0, seed=7, max_tokens=20, guided_decoding=guided),
    )
    assert len(ranked.outputs) == 2 and all(c.text in choices for c in ranked.outputs)


@pytest.mark.parametrize(
    "pattern",
    [r"[a-z]+ [0-9]{3}", r"(cat|dog)s? (ran|sat)\.", r"[A-Z][a-z]{2,5}", r"-?(0|[1-9][0-9]{0,3})"],
)
def test_regex_output_fullmatches(llm: LLM, pattern: str) -> None:
    params = [
        SamplingParams(temperature=t, seed=s, max_tokens=40, guided_decoding={"regex": pattern})
        for t, s in ((0.0, None), (1.0, 1), (1.5, 2))
    ]
    for out in _run(llm, ["Lily", "One day", "The sun"], params):
        (c,) = out.outputs
        assert c.finish_reason == "stop", (pattern, c.text)
        assert re.fullmatch(pattern, c.text), (pattern, c.text)


def test_ebnf_grammar_and_ignore_eos(llm: LLM) -> None:
    grammar = 'root ::= "(" item ("," item)? ("," item)? ")"\nitem ::= [a-c] | [0-9] [0-9]?'
    pattern = r"\((?:[a-c]|[0-9]{1,2})(?:,(?:[a-c]|[0-9]{1,2})){0,2}\)"
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=60, ignore_eos=True, guided_decoding={"grammar": grammar}
    )
    (out,) = _run(llm, ["Once"], params)
    (c,) = out.outputs
    # The grammar ends the request at its end, ignore_eos or not.
    assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text


def test_guided_and_plain_requests_share_a_batch(llm: LLM) -> None:
    plain = SamplingParams(temperature=0, max_tokens=12)
    (alone,) = llm.generate(["Once upon a time"], plain, use_tqdm=False)
    mixed = _run(
        llm,
        ["Once upon a time", "Once upon a time"],
        [plain, SamplingParams(temperature=0, max_tokens=12, guided_decoding={"choice": ["x", "y"]})],
    )
    assert mixed[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert mixed[1].outputs[0].text in ("x", "y")


def test_bad_spec_fails_before_queueing(llm: LLM) -> None:
    with pytest.raises(ValueError, match="guided regex cannot be compiled"):
        llm.add_requests(
            ["a", "b"], [SamplingParams(), SamplingParams(guided_decoding={"regex": "(unclosed"})]
        )
    with pytest.raises(ValueError, match="guided grammar cannot be compiled"):
        llm.generate("a", SamplingParams(guided_decoding={"grammar": "root ::= undefined_rule"}))
    assert not llm.engine.has_unfinished()


def test_grammar_survives_recompute_preemption() -> None:
    # 24 blocks of 4 tokens for 6 requests that each grow to ~50 tokens: the
    # scheduler must preempt (recompute) while sequences are mid-grammar.
    small = LLM(
        str(STORIES260K), num_kv_blocks=24, block_size=4, max_model_len=96, preemption_mode="recompute"
    )
    pattern = r"[a-z ]{20,40}\."
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=60, guided_decoding={"regex": pattern})
    outs = _run(small, ["Once upon a time"] * 6, params)
    assert small.memory_stats()["num_preemptions"] > 0
    for out in outs:
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text


def test_logprobs_of_guided_rows_are_over_allowed_tokens(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=10, logprobs=20, guided_decoding={"choice": ["no", "yes"]}
    )
    (out,) = llm.generate("Once upon a time", params, use_tqdm=False)
    (c,) = out.outputs
    first = c.logprobs[0]
    # Only tokens that can start "no" or "yes" are listed, and they hold all the mass.
    assert 1 <= len(first) < 20
    assert abs(sum(torch.tensor(list(first.values())).exp().tolist()) - 1.0) < 1e-4
    assert all(v > float("-inf") for lp in c.logprobs for v in lp.values())


# ------------------------------------------------- JSON schema: default model
_NAMES = st.sampled_from(["id", "name", "ok", "size", "tags", "kind", "score"])


def _leaf() -> st.SearchStrategy[dict]:
    return st.one_of(
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 100),
        ),
        st.just({"type": "boolean"}),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
        st.builds(
            lambda opts: {"enum": opts},
            st.lists(st.sampled_from(["red", "green", "blue", 1, None]), min_size=1, max_size=3, unique=True),
        ),
    )


def _object(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.dictionaries(_NAMES, children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props)}
    )


_SCHEMAS = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        _object(inner), st.builds(lambda items: {"type": "array", "items": items, "maxItems": 3}, inner)
    ),
    max_leaves=5,
).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {"type": "object", "properties": {"value": s}, "required": ["value"]}
    )
)


@pytest.fixture(scope="module")
def smollm() -> LLM:
    from paged_attention.model.gguf import DefaultModelNotInstalledError, default_gguf_path

    try:
        default_gguf_path()
    except DefaultModelNotInstalledError as err:
        pytest.skip(str(err))
    return LLM(kv_cache_memory="256MiB", max_model_len=1024)


@pytest.mark.slow
@settings(
    max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=_SCHEMAS, seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 0.7, 1.0]))
def test_json_schema_output_parses_and_validates(
    smollm: LLM, schema: dict, seed: int, temperature: float
) -> None:
    import jsonschema

    prompt = smollm.chat_prompt(
        [{"role": "user", "content": f"Reply with JSON matching {json.dumps(schema)}"}]
    )
    params = SamplingParams(
        temperature=temperature, seed=seed, max_tokens=300, guided_decoding={"json": schema}
    )
    (out,) = _run(smollm, [prompt], params)
    (c,) = out.outputs
    assert c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.slow
def test_json_object_on_default_model(smollm: LLM) -> None:
    prompt = smollm.chat_prompt([{"role": "user", "content": "Give a JSON object with a name and an age."}])
    params = SamplingParams(
        n=2, temperature=0.8, seed=1, max_tokens=300, guided_decoding={"json_object": True}
    )
    (out,) = _run(smollm, [prompt], params)
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        assert isinstance(json.loads(c.text), dict)
