"""The OpenAI-compatible server over real HTTP on loopback, with the official
`openai` client: results equal LLM.generate, n / seeds / stop / logprobs work,
64 concurrent streams complete, disconnects abort and free blocks, and bad
input gets OpenAI-shaped errors while the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from paged_attention import LLM, SamplingParams
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.limits import ServerLimits
from paged_attention.entrypoints.server import create_app
from tests.server_utils import (
    CHAT_TEMPLATE,
    Served,
    error_of,
    gate_steps,
    memory,
    metric_value,
    post,
    serve_in_thread,
    wait_until,
)

MODEL = "stories260K"
PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _llm(**kwargs) -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=256, block_size=16, **kwargs)


@pytest.fixture(scope="module")
def reference() -> LLM:
    """Same weights as the served model, for expected outputs."""
    llm = _llm()
    llm.get_tokenizer().chat_template = CHAT_TEMPLATE
    return llm


@pytest.fixture(scope="module")
def served() -> Served:
    llm = _llm(max_num_seqs=64)
    steps = gate_steps(llm)
    app = create_app(llm, served_model_name=MODEL, chat_template=CHAT_TEMPLATE)
    with serve_in_thread(app) as url:
        yield Served(url, steps)
    # Shutdown aborted anything left: the pool is whole again.
    stats = llm.memory_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


@pytest.fixture(scope="module")
def server(served: Served) -> str:
    return served.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _expected(reference: LLM, prompt, params: SamplingParams = GREEDY):
    return reference.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def _assert_idle(url: str) -> dict:
    stats = wait_until(lambda: (m := memory(url))["num_running"] == 0 and m["num_waiting"] == 0 and m)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert metric_value(url, "paged_attention_num_requests_running") == 0
    return stats


# --------------------------------------------------------------- happy paths
def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_greedy_equals_llm_generate(client, reference):
    want = _expected(reference, PROMPT)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert got.usage.completion_tokens == len(want.token_ids) == 24
    assert got.usage.prompt_tokens == len(reference.get_tokenizer().encode(PROMPT))

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_token_id_prompts_and_prompt_lists(client, reference):
    ids = reference.get_tokenizer().encode(PROMPT)
    other = "The little dog"
    got = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=8, temperature=0)
    params = SamplingParams(temperature=0, max_tokens=8)
    assert [c.text for c in got.choices] == [
        _expected(reference, {"prompt_token_ids": ids}, params).text,
        _expected(reference, {"prompt_token_ids": ids[:3]}, params).text,
    ]
    got = client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=8, temperature=0)
    assert [(c.index, c.text) for c in got.choices] == [
        (0, _expected(reference, PROMPT, params).text),
        (1, _expected(reference, other, params).text),
    ]


def test_echo_prepends_the_prompt(client, reference):
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    want = _expected(reference, PROMPT, SamplingParams(temperature=0, max_tokens=6)).text
    assert got.choices[0].text == PROMPT + want


def test_chat_greedy_equals_llm_generate(client, reference):
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    want = _expected(reference, reference.chat_prompt(messages), SamplingParams(temperature=0, max_tokens=20))
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(reference.chat_prompt(messages)["prompt_token_ids"])

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_n_choices_and_seed_reproducibility(client):
    def sample(**kw):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, **kw)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    three = sample(n=3, seed=7)
    assert len(three) == 3 and len(set(three)) > 1
    assert sample(n=3, seed=7) == three  # same seed, same choices
    # Choice i is the request with seed + i: reproducible on its own.
    assert [sample(seed=7 + i)[0] for i in range(3)] == three

    # Streaming interleaves the choices; each one assembles to the same text.
    texts = ["", "", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=7, stream=True
    ):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == three

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        seed=3,
        max_tokens=12,
        temperature=1.0,
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_best_of_keeps_the_most_likely_candidate(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.5)
    candidates = []
    for i in range(3):
        c = client.completions.create(seed=11 + i, logprobs=0, **kw).choices[0]
        lps = c.logprobs.token_logprobs
        candidates.append((sum(lps), c.text))  # cumulative log-prob: the engine's (and vLLM's) rule
    best = client.completions.create(seed=11, n=1, best_of=3, **kw)
    assert len(best.choices) == 1
    assert best.choices[0].text == max(candidates)[1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_n_and_best_of_choose_as_llm_generate_does(client, reference, temperature):
    """One request, one ranking (cumulative log-prob): HTTP returns the choices
    LLM.generate does. With seed 7 the samples stop at '.' after different
    lengths, so ranking per token would choose otherwise."""
    kw = dict(n=2, best_of=3, seed=7, temperature=temperature, max_tokens=16, stop=["."])
    want = reference.generate(PROMPT, SamplingParams(**kw), use_tqdm=False)[0].outputs
    got = client.completions.create(model=MODEL, prompt=PROMPT, **kw)
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == [
        (o.index, o.text, o.finish_reason) for o in want
    ]
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    if temperature:
        every = reference.generate(PROMPT, SamplingParams(**{**kw, "n": 3}), use_tqdm=False)[0].outputs
        per_token = sorted(every, key=lambda o: -o.cumulative_logprob / len(o.token_ids))[:2]
        assert [o.text for o in per_token] != [c.text for c in got.choices]

    # Streamed (best_of = n): every choice assembles to LLM.generate's text.
    kw["best_of"] = 2
    want = reference.generate(PROMPT, SamplingParams(**kw), use_tqdm=False)[0].outputs
    texts = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, stream=True, **kw):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [o.text for o in want]


def test_stop_strings(client, reference):
    full = _expected(reference, PROMPT).text
    stop = "Lily"
    assert stop in full
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzz"]
    )
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == full[: full.index(stop)]


def test_logprobs(client, reference):
    want = _expected(reference, PROMPT, SamplingParams(temperature=0, max_tokens=12, logprobs=3))
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text == want.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for token, token_lp, top, expected in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, want.logprobs):
        assert len(top) == 3
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the top one
        assert top[token] == pytest.approx(token_lp)
        assert sorted(top.values()) == pytest.approx(sorted(expected.values()))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    # The tokenizer drops the space that starts a decoded text; each token keeps its own.
    assert "".join(t.token for t in content).lstrip() == chat.choices[0].message.content.lstrip()
    for t in content:
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert bytes(t.bytes).decode() == t.token


# -------------------------------------------------------------- concurrency
def test_64_concurrent_streams_complete_correctly_and_free_everything(server, reference):
    names = ["Lily", "Tom", "Sue", "Ben", "Max", "Anna", "Sam", "Mia"]
    things = [
        "a red ball",
        "a big tree",
        "a little cat",
        "a shiny coin",
        "a blue boat",
        "a funny hat",
        "an old book",
        "a sad dog",
    ]
    prompts = [f"{n} saw {t}. {n}" for n in names for t in things]
    # Seeded sampling: reproducible like greedy, and every client's text differs.
    params = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=16) for i in range(len(prompts))]
    want = [o.outputs[0].text for o in reference.generate(prompts, params, use_tqdm=False)]
    assert len(set(want)) == len(prompts)
    steps_before = memory(server)["num_steps"]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        text, finish = "", None
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0.8, seed=100 + i, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(len(prompts))))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == want
    assert all(finish in ("length", "stop") for _, finish in results)
    stats = _assert_idle(server)
    # They ran batched, not one after another.
    assert stats["num_steps"] - steps_before < len(prompts) * 16 / 4


# -------------------------------------------------------------- disconnects
def _raw_request(server: str, body: dict) -> socket.socket:
    """Send a completion request on a raw socket, so the test controls exactly
    when the connection drops."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


ABORTED = "paged_attention_num_aborted_requests_total"


def test_disconnected_stream_is_aborted_and_its_blocks_freed(served):
    server = served.url
    aborted_before = memory(server)["num_aborted"]
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    socks = []
    for _ in range(3):
        sock = _raw_request(server, {**long, "stream": True})
        _read_until(sock, b"data: ")  # the stream has started: tokens are being generated
        socks.append(sock)
    assert memory(server)["num_used_blocks"] > 0
    served.steps.clear()  # none of them may finish before its client hangs up
    try:
        for sock in socks:
            sock.close()
        # /metrics reads the event loop's count (/debug/memory waits for a step).
        wait_until(lambda: metric_value(server, ABORTED) == aborted_before + 3)
    finally:
        served.steps.set()
    assert memory(server)["num_aborted"] == aborted_before + 3
    _assert_idle(server)


def test_disconnected_non_streaming_request_is_aborted(served):
    server = served.url
    aborted_before = memory(server)["num_aborted"]
    sock = _raw_request(
        server, {"model": MODEL, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    )
    wait_until(lambda: memory(server)["num_running"] == 1)
    served.steps.clear()
    try:
        sock.close()
        wait_until(lambda: metric_value(server, ABORTED) == aborted_before + 1)
    finally:
        served.steps.set()
    assert memory(server)["num_aborted"] == aborted_before + 1
    _assert_idle(server)


# ---------------------------------------------------------------- bad input
_post = post
_error = error_of


@pytest.mark.parametrize(
    "body,param,words",
    [
        ('{"model": "stories260K", "prompt": "x", ', None, "not valid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('{"prompt": "x", "max_tokens": "ten"}', "max_tokens", "integer"),
        ('{"prompt": 5}', "prompt", "a string, a list of strings"),
        ('{"prompt": "x", "temperature": "hot"}', "temperature", "number"),
        ('{"prompt": "x", "stream": "yes"}', "stream", "boolean"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens", "max_tokens must be an int >= 1, got 0"),
        ('{"prompt": "x", "temperature": -1}', "temperature", "temperature must be a finite number >= 0"),
        ('{"prompt": "x", "top_p": 0}', "top_p", "top_p must be in (0, 1]"),
        ('{"prompt": "x", "n": 2, "best_of": 1}', "best_of", "best_of must be an int >= n"),
        ('{"prompt": "x", "tempurature": 0}', "tempurature", "unrecognized request argument"),
        ('{"prompt": ""}', "prompt", "empty"),
        ('{"prompt": [[]]}', "prompt", "empty"),
        ('{"prompt": [1, 99999]}', "prompt", "outside the vocabulary"),
        ('{"prompt": "x", "presence_penalty": 0.5}', "presence_penalty", "not supported"),
        ('{"prompt": "x", "stream": true, "n": 1, "best_of": 2}', "best_of", "when streaming"),
        ('{"prompt": "x", "max_tokens": 600}', "max_tokens", "maximum context length is 512"),
    ],
)
def test_bad_completion_requests_get_400(server, body, param, words):
    assert words in _error(_post(server, "/v1/completions", body), 400, param)


def test_bad_chat_requests_get_400(server):
    def chat(body: dict) -> httpx.Response:
        return _post(server, "/v1/chat/completions", json.dumps(body))

    hi = [{"role": "user", "content": "Hi"}]
    assert "at least 1" in _error(chat({"messages": []}), 400, "messages")
    assert "role" in _error(chat({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role")
    assert "max_completion_tokens must be an int >= 1" in _error(
        chat({"messages": hi, "max_completion_tokens": 0}), 400, "max_completion_tokens"
    )
    assert "needs logprobs" in _error(chat({"messages": hi, "top_logprobs": 2}), 400, "top_logprobs")
    assert "<= 20" in _error(
        chat({"messages": hi, "logprobs": True, "top_logprobs": 50}), 400, "top_logprobs"
    )


def test_prompt_over_the_context_length(client, server):
    long_text = "the cat sat on the mat " * 200
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=long_text, max_tokens=4)
    assert err.value.status_code == 400
    assert err.value.code == "context_length_exceeded" and "max_model_len is 512" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert err.value.param == "messages"


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert err.value.param == "temperature" and "temperature" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert err.value.code == "model_not_found" and "gpt-4" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_unknown_route_is_an_openai_error(server):
    response = httpx.get(f"{server}/v1/nothing-here", timeout=30)
    _error(response, 404)


def test_server_keeps_serving_after_errors(client, server, reference):
    for _ in range(3):
        _post(server, "/v1/completions", "{oops")
        _post(server, "/v1/completions", '{"prompt": "x", "max_tokens": -5}')
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == _expected(reference, PROMPT).text
    _assert_idle(server)


# ------------------------------------------------------------------ metrics
def test_metrics_after_traffic(client, server):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
    ):
        assert metric_value(server, f"paged_attention_{name}_count") > 0
    assert metric_value(server, "paged_attention_generation_tokens_total") >= 5
    assert metric_value(server, "paged_attention_prompt_tokens_total") > 0
    assert metric_value(server, "paged_attention_request_success_total", {"finished_reason": "length"}) > 0
    assert metric_value(server, "paged_attention_kv_cache_usage_perc") == 0
    for name in (
        "num_requests_waiting",
        "num_requests_swapped",
        "num_preemptions_total",
        "prefix_cache_hit_rate",
    ):
        assert metric_value(server, f"paged_attention_{name}") >= 0
    # The host swap pool, as memory_stats reports it (capped at the device pool's size).
    stats = memory(server)
    assert stats["num_host_blocks"] == stats["num_blocks"] == 256
    assert metric_value(server, "paged_attention_num_host_kv_blocks") == stats["num_host_blocks"]
    for gauge, key in (("used", "num_host_used_blocks"), ("touched", "num_host_touched_blocks")):
        assert metric_value(server, f"paged_attention_num_host_kv_blocks_{gauge}") == stats[key]
    assert metric_value(server, "paged_attention_num_failed_requests_total") == 0


# ------------------------------------------- API key, queue limit, no template
@pytest.fixture(scope="module")
def guarded_server() -> Served:
    """One running sequence at most, one waiting at most, a key, no chat template."""
    llm = _llm(max_num_seqs=1)
    steps = gate_steps(llm)
    app = create_app(llm, served_model_name="tiny", api_key="sekret", max_waiting=1)
    with serve_in_thread(app) as url:
        yield Served(url, steps)


@pytest.fixture
def guarded(guarded_server: Served) -> str:
    return guarded_server.url


KEY = {"Authorization": "Bearer sekret"}


def test_api_key_is_required(guarded):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2})
    assert "missing API key" in _error(_post(guarded, "/v1/completions", body), 401)
    assert "invalid API key" in _error(
        _post(guarded, "/v1/completions", body, {"Authorization": "Bearer nope"}), 401
    )
    assert _post(guarded, "/v1/completions", body, KEY).status_code == 200
    assert httpx.get(f"{guarded}/v1/models", timeout=30).status_code == 401
    # Health and metrics stay open to probes and scrapers.
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200
    assert httpx.get(f"{guarded}/metrics", timeout=30).status_code == 200

    keyed = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sekret", max_retries=0, timeout=60)
    assert [m.id for m in keyed.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_without_a_template_is_a_clear_400(guarded):
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
    assert "--chat-template" in _error(_post(guarded, "/v1/chat/completions", body, KEY), 400, "messages")


def test_full_waiting_queue_answers_503_with_retry_after(guarded_server):
    guarded = guarded_server.url
    long = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=guarded, headers=KEY, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            next(running.iter_lines())  # the first chunk: this one occupies the only running slot
            # Held, it cannot finish (and free the slot) before the rejection below,
            # however fast stories260K runs on this machine.
            guarded_server.steps.clear()
            try:
                with http.stream("POST", "/v1/completions", json=long) as waiting:
                    assert waiting.status_code == 200  # queued: the one waiting place
                    rejected = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                    assert "overloaded" in _error(rejected, 503)
                    assert rejected.headers["Retry-After"] == "1"
            finally:
                guarded_server.steps.set()
    # Both streams were closed: aborted, and the server serves again.
    wait_until(lambda: memory(guarded, KEY)["num_free_blocks"] == memory(guarded, KEY)["num_blocks"])
    assert (
        _post(guarded, "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}), KEY).status_code
        == 200
    )


# ---------------------------------------------------------------------- CLI
def test_serve_parser_defaults_to_loopback():
    import argparse

    from paged_attention.entrypoints import cli

    parser = argparse.ArgumentParser()
    cli.add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(STORIES260K), "--max-waiting", "4"])
    assert (args.host, args.port, args.api_key, args.max_waiting) == ("127.0.0.1", 8000, None, 4)
    assert args.block_size == 16 and args.func is cli.cmd_serve  # engine options are there too


@pytest.mark.slow
def test_serve_command_runs_and_stops_cleanly(tmp_path):
    """The real entry point in a subprocess: binds loopback, prints the pool and
    the address, answers, and exits 0 on Ctrl-C."""
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paged_attention.entrypoints.server",
            "--model",
            str(STORIES260K),
            "--port",
            "0",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            "64",
            "--chat-template",
            str(template),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pool = proc.stdout.readline()
        listening = proc.stdout.readline()
        assert pool.startswith("KV pool: 64 blocks x 16 tokens = 1024 tokens"), pool
        assert "http://127.0.0.1:" in listening, listening
        url = listening.split(" at ")[1].split("/v1")[0]
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "server stopped" in out


def test_listening_socket_turns_nagle_off():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a
    plain socket() (proto 0) left Nagle on and cost ~40 ms per response."""
    from paged_attention.entrypoints.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_bad_serve_options_are_clear_errors():
    from paged_attention.entrypoints import server

    assert server.main(["--model", str(STORIES260K), "--max-waiting", "0"]) == 2
    with pytest.raises(ValueError, match="--port must be in 0..65535, got 70000"):
        server.bind_socket("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        server.read_chat_template("no-such-template.jinja")


def test_shutdown_with_a_stream_in_flight_frees_every_block():
    llm = _llm()
    app = create_app(llm, served_model_name=MODEL, limits=ServerLimits(shutdown_timeout_s=0.5))
    with serve_in_thread(app) as url:
        sock = _raw_request(
            url, {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
        )
        _read_until(sock, b"data: ")
    sock.close()
    stats = llm.memory_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.engine.has_unfinished()


def test_engine_failure_is_an_openai_500_and_serving_goes_on():
    llm = _llm()
    real_step, failures = llm.engine.step, [RuntimeError("simulated engine fault")]

    def flaky_step():
        if failures:
            raise failures.pop()
        return real_step()

    llm.engine.step = flaky_step
    # No warm-up: its generation would meet the fault before any client does.
    with serve_in_thread(create_app(llm, served_model_name=MODEL, warm_up=False)) as url:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 4})
        failed = _post(url, "/v1/completions", body)
        assert "simulated engine fault" in _error(failed, 500)
        assert _post(url, "/v1/completions", body).status_code == 200
        _assert_idle(url)


# -------------------------------------------------------------------- bench
def test_bench_serve_against_a_live_server(server, tmp_path):
    import argparse

    from paged_attention.bench import serve as bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--url",
            server,
            "--num-requests",
            "6",
            "--request-rate",
            "inf,50",
            "--input-words",
            "4,8",
            "--output-len",
            "4,8",
            "--output-dir",
            str(tmp_path),
            "--tag",
            "t",
        ]
    )
    results = args.func(args)
    assert [r["request_rate"] for r in results["runs"]] == [float("inf"), 50.0]
    for run in results["runs"]:
        assert run["completed"] == 6 and run["errors"] == 0
        assert run["output_tokens"] == results["workload"]["output_tokens"]
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"] <= run["e2e_s"]["p99"]
    saved = json.loads((tmp_path / "serve_t.json").read_text())
    assert [r["completed"] for r in saved["runs"]] == [6, 6]
    assert (tmp_path / "serve_t.png").stat().st_size > 0


def test_bench_percentiles_workload_and_slo():
    from paged_attention.bench.serve import highest_rate_within_slo, make_workload, percentiles

    def run(rate, p99, errors=0):
        return {"request_rate": rate, "errors": errors, "ttft_s": {"p99": p99}}

    runs = [run(16, 0.5), run(4, 0.1), run(8, 1.2), run(2, 0.05)]
    assert highest_rate_within_slo(runs, 1.0)["request_rate"] == 4  # 16 passed, but after 8 missed
    assert highest_rate_within_slo([run(1, 0.1, errors=1)], 1.0) is None

    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx({"p50": 3.0, "p90": 4.6, "p99": 4.96})
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    work = make_workload(5, (3, 3), (7, 9), seed=1)
    assert len({w.prompt for w in work}) == 5 and all(7 <= w.max_tokens <= 9 for w in work)
    assert make_workload(5, (3, 3), (7, 9), seed=1) == work
