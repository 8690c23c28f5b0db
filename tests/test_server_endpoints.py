"""The server's structured output (response_format, vLLM's guided_* and
structured_outputs) and utility routes (/tokenize, /detokenize, /version,
/v1/models' max_model_len) over real HTTP, on the tiny stories260K model."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from paged_attention import LLM
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.server import create_app
from paged_attention.entrypoints.tokenize_routes import package_version
from tests.server_utils import CHAT_TEMPLATE, memory, serve_in_thread, wait_until

pytest.importorskip("xgrammar")

MODEL = "stories260K"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=16, max_model_len=MAX_MODEL_LEN
    )


@pytest.fixture(scope="module")
def server(llm: LLM) -> str:
    app = create_app(llm, served_model_name=MODEL, chat_template=CHAT_TEMPLATE, warm_up=False)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120)


def _error(response: httpx.Response, param: str | None) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def _idle(server: str) -> None:
    stats = wait_until(lambda: (m := memory(server))["num_running"] == 0 and m["num_waiting"] == 0 and m)
    assert stats["num_free_blocks"] == stats["num_blocks"]


# ------------------------------------------------------------ utility routes
def test_tokenize_prompt_and_detokenize_round_trip(server: str, llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    got = _post(server, "/tokenize", {"model": MODEL, "prompt": "Once upon a time"}).json()
    ids = tokenizer.encode("Once upon a time")
    assert got == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None}
    bare = _post(server, "/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("Once upon a time", add_special_tokens=False)
    strs = _post(server, "/tokenize", {"prompt": "Once", "return_token_strs": True}).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])
    back = _post(server, "/detokenize", {"model": MODEL, "tokens": bare["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}


def test_tokenize_messages_applies_the_chat_template(server: str, llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    got = _post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("assistant:")
    assert got["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert got["count"] == len(got["tokens"])
    no_prompt = _post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < got["count"]


def test_utility_route_errors(server: str) -> None:
    assert "outside the vocabulary" in _error(_post(server, "/detokenize", {"tokens": [1, 10**6]}), "tokens")
    assert _post(server, "/tokenize", {"prompt": "a", "model": "other"}).status_code == 404
    assert _error(_post(server, "/tokenize", {"prompt": 5}), "prompt")
    assert "unrecognized" in _error(_post(server, "/tokenize", {"prompt": "a", "bogus": 1}), "bogus")


def test_version_and_models_max_model_len(server: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server}/version").json() == {"version": package_version()}
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == MAX_MODEL_LEN


# ---------------------------------------------------------- structured output
SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["mood", "count", "ok"],
}


def test_chat_response_format_json_schema(client: openai.OpenAI, server: str) -> None:
    import jsonschema

    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "How do you feel?"}],
        max_tokens=60,
        n=3,
        temperature=1.0,
        seed=4,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "mood", "schema": SCHEMA, "strict": True},
        },
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    _idle(server)


def test_completion_guided_choice_and_streamed_regex(client: openai.OpenAI, server: str) -> None:
    choices = ["red", "green", "light blue"]
    got = client.completions.create(
        model=MODEL,
        prompt="The sky is",
        max_tokens=10,
        n=4,
        temperature=1.0,
        seed=1,
        extra_body={"guided_choice": choices},
    )
    assert all(c.text in choices for c in got.choices)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    stream = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        stream=True,
        extra_body={"guided_regex": pattern},
    )
    assert re.fullmatch(pattern, "".join(chunk.choices[0].text for chunk in stream if chunk.choices))
    structured = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert structured.choices[0].text in ("yes", "no")
    grammar = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=20,
        temperature=0,
        extra_body={"guided_grammar": 'root ::= "[" [0-9] ("," [0-9])? "]"'},
    )
    assert re.fullmatch(r"\[[0-9](,[0-9])?\]", grammar.choices[0].message.content)
    _idle(server)


def test_json_object_on_completions(server: str) -> None:
    got = _post(
        server,
        "/v1/completions",
        {"prompt": "{", "max_tokens": 200, "temperature": 0, "response_format": {"type": "json_object"}},
    ).json()
    (choice,) = got["choices"]
    if choice["finish_reason"] == "stop":  # the tiny model may not close its object in time
        assert isinstance(json.loads(choice["text"]), dict)
    else:
        assert choice["text"].startswith("{")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured-output constraint"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one structured"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "'schema'"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
        ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml", "not supported"),
        ({"guided_regex": "(unclosed"}, "prompt", "cannot be compiled"),
    ],
)
def test_bad_structured_output_requests_get_400(server: str, body: dict, param: str, words: str) -> None:
    message = _error(_post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 4, **body}), param)
    assert words in message, message


# ------------------------------------------------------------------ logprobs
def test_streamed_logprobs_equal_the_full_response(client: openai.OpenAI, server: str) -> None:
    messages = [{"role": "user", "content": "Tell a story"}]
    args = dict(model=MODEL, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(messages=messages, **args).choices[0].logprobs.content
    streamed = [
        t
        for chunk in client.chat.completions.create(messages=messages, stream=True, **args)
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content
    ]
    # Equal up to float noise: the two requests may run in batches of other shapes.
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in full]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in full], abs=1e-4)
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [
        [a.token for a in t.top_logprobs] for t in full
    ]

    legacy = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**legacy).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **legacy) if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert "".join(tokens) == whole.text == "".join(c.text for c in chunks)
    _idle(server)


def test_prompt_logprobs_is_an_unknown_argument_for_now(server: str) -> None:
    body = {"prompt": "Once", "max_tokens": 2, "prompt_logprobs": 1}
    assert "unrecognized" in _error(_post(server, "/v1/completions", body), "prompt_logprobs")
