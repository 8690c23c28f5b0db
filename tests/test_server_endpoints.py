"""The server's structured output (response_format, vLLM's guided_* and
structured_outputs) and utility routes (/tokenize, /detokenize, /version,
/v1/models' max_model_len) over real HTTP, on the tiny stories260K model."""

from __future__ import annotations

import json
import re
import threading

import httpx
import openai
import pytest

from paged_attention import LLM, SamplingParams
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
def app(llm: LLM):
    return create_app(llm, served_model_name=MODEL, chat_template=CHAT_TEMPLATE, warm_up=False)


@pytest.fixture(scope="module")
def server(app) -> str:
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def reference() -> LLM:
    """Expected values: the served engine belongs to the server's thread."""
    return LLM(
        str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=16, max_model_len=MAX_MODEL_LEN
    )


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


class _ThreadRecorder:
    """A tokenizer that notes the thread of every call it serves."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.threads: set[str] = set()

    def __getattr__(self, name: str):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def recorded(*args, **kwargs):
            self.threads.add(threading.current_thread().name)
            return value(*args, **kwargs)

        return recorded


def test_tokenize_routes_run_off_the_event_loop(app, server: str, llm: LLM) -> None:
    ctx = app.state.ctx
    routes, prepare = _ThreadRecorder(ctx.tokenizer), _ThreadRecorder(ctx.prompts.tokenizer)
    ctx.tokenizer, ctx.prompts.tokenizer = routes, prepare
    try:
        ids = _post(server, "/tokenize", {"prompt": "Once upon a time"}).json()["tokens"]
        messages = [{"role": "user", "content": "Hi"}]
        assert _post(server, "/tokenize", {"messages": messages}).json()["count"] > 0
        assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "<s> Once upon a time"}
        assert _post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 1}).status_code == 200
    finally:
        ctx.tokenizer, ctx.prompts.tokenizer = routes._tokenizer, prepare._tokenizer
    assert ids == llm.get_tokenizer().encode("Once upon a time")
    # The completions' preparation thread, never the event loop's (test-uvicorn).
    assert routes.threads and routes.threads == prepare.threads
    assert "test-uvicorn" not in routes.threads and threading.main_thread().name not in routes.threads


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


# ------------------------------------------------------- prompt log-probs
PROMPT = "Once upon a time"


def _at_their_offsets(text: str, logprobs: dict) -> None:
    """Every token sits in `text` where its text_offset says, one after the other."""
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert len(tokens) == len(offsets) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def _stream_choices(server: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event)["choices"][0] for event in events[:-1]]


def _expected_echo(reference: LLM, prompt, k: int, max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=k, prompt_logprobs=k)
    (want,) = reference.generate(prompt, params, use_tqdm=False)
    completion = want.outputs[0]
    ids = want.prompt_token_ids + completion.token_ids
    entries = want.prompt_logprobs + completion.logprobs
    return want, completion, ids, entries


def _same_numbers(logprobs: dict, ids: list[int], entries: list, k: int) -> None:
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["token_logprobs"]) == len(ids)
    for token, entry, got, top in zip(
        ids[1:], entries[1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
    ):
        assert got == pytest.approx(entry[token], abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(
            sorted(entry.values(), reverse=True), abs=1e-4
        )
        assert len(top) <= k + 1


def test_echo_with_logprobs_lists_the_prompt_first(server: str, reference: LLM) -> None:
    k, max_tokens = 2, 6
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "echo": True, "logprobs": k}
    got = _post(server, "/v1/completions", body).json()
    (choice,) = got["choices"]
    want, completion, ids, entries = _expected_echo(reference, PROMPT, k, max_tokens)
    assert choice["text"] == PROMPT + completion.text
    assert choice["prompt_logprobs"] is None  # vLLM's field only when asked for
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][:2] == ["", "Once"]  # BOS is not in the echoed text
    _same_numbers(logprobs, ids, entries, k)
    _at_their_offsets(choice["text"], logprobs)
    assert got["usage"]["prompt_tokens"] == len(want.prompt_token_ids)

    # Streamed: the prompt's part comes with the first chunk, and the whole equals the above.
    chunks = _stream_choices(server, {**body, "stream": True})
    assert chunks[0]["text"].startswith(PROMPT)
    assert len(chunks[0]["logprobs"]["tokens"]) > len(want.prompt_token_ids) - 1
    joined = {key: [v for c in chunks for v in c["logprobs"][key]] for key in logprobs}
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert joined["tokens"] == logprobs["tokens"] and joined["text_offset"] == logprobs["text_offset"]
    assert joined["token_logprobs"][1:] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-4)
    _idle(server)


def test_echo_with_logprobs_of_token_ids_and_several_choices(server: str, reference: LLM, llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 0, "n": 2}
    choices = _post(server, "/v1/completions", body).json()["choices"]
    want, completion, all_ids, entries = _expected_echo(reference, {"prompt_token_ids": ids}, 0, 4)
    for choice in choices:
        # Token ids are echoed as their decode, special tokens included (vLLM's echo).
        assert choice["text"] == "<s> Once upon a time" + completion.text
        assert choice["logprobs"]["tokens"][:2] == ["<s>", " Once"]
        _same_numbers(choice["logprobs"], all_ids, entries, 0)
        _at_their_offsets(choice["text"], choice["logprobs"])
    _idle(server)


def test_echo_of_a_completion_that_starts_a_word(server: str) -> None:
    body = {"prompt": "Lily went", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1}
    (choice,) = _post(server, "/v1/completions", body).json()["choices"]
    _at_their_offsets(choice["text"], choice["logprobs"])


def test_vllm_prompt_logprobs_field(server: str, reference: LLM) -> None:
    prompts = [PROMPT, "Lily went to the park"]
    body = {"prompt": prompts, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    choices = _post(server, "/v1/completions", body).json()["choices"]
    wants = reference.generate(
        prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False
    )
    for choice, want in zip(choices, wants):
        assert choice["logprobs"] is None and choice["text"] == want.outputs[0].text
        got = choice["prompt_logprobs"]
        assert got[0] is None and len(got) == len(want.prompt_token_ids)
        for token, entry, shown in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:], got[1:]):
            assert set(shown) == {str(t) for t in entry}  # JSON keys: the token ids
            assert next(iter(shown)) == str(token)  # the prompt's token first
            for t, value in entry.items():
                item = shown[str(t)]
                assert set(item) == {"logprob", "rank", "decoded_token"}
                assert item["logprob"] == pytest.approx(value, abs=1e-4)
                assert isinstance(item["decoded_token"], str)
                if len(entry) == 3 or t != token:  # ranked: in the top 3 (else not computed)
                    assert item["rank"] == 1 + sum(v > value for v in entry.values())
                else:
                    assert item["rank"] is None

    # With echo and logprobs too: each shows its own number of alternatives.
    body = {
        "prompt": PROMPT,
        "max_tokens": 2,
        "temperature": 0,
        "prompt_logprobs": 3,
        "echo": True,
        "logprobs": 1,
    }
    (choice,) = _post(server, "/v1/completions", body).json()["choices"]
    assert all(len(entry) in (3, 4) for entry in choice["prompt_logprobs"][1:])
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"][1:])
    _at_their_offsets(choice["text"], choice["logprobs"])
    _idle(server)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"prompt_logprobs": 1, "stream": True}, "not available with stream=true"),
        ({"prompt_logprobs": 21}, "between 0 and 20"),
        ({"prompt_logprobs": -1}, "between 0 and 20"),
    ],
)
def test_bad_prompt_logprobs_get_400(server: str, extra: dict, words: str) -> None:
    message = _error(
        _post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 2, **extra}), "prompt_logprobs"
    )
    assert words in message, message
