"""No client can stall the others: body size and read-time limits (checked
before anything is parsed), tokenizing off the event loop, caps on what one
request may queue (prompts, sequences, stop strings), a waiting-queue limit
that a burst cannot overshoot, and connections that send half a request are
closed instead of holding the server."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from paged_attention import LLM
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.limits import ServerLimits, flag
from paged_attention.entrypoints.server import create_app
from tests.server_utils import (
    Served,
    error_of,
    gate_steps,
    memory,
    metric_value,
    post,
    raw_connection,
    serve_in_thread,
    wait_until,
)

PROMPT = "Once upon a time"
LIMITS = ServerLimits(
    max_request_bytes=64 * 1024,
    max_prompts_per_request=4,
    max_seqs_per_request=8,
    max_stop_strings=4,
    max_stop_string_chars=32,
    body_read_timeout_s=1.0,
)


def _llm(**kwargs) -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=128, block_size=16, **kwargs)


@pytest.fixture(scope="module")
def limited() -> Served:
    llm = _llm()
    steps = gate_steps(llm)
    app = create_app(llm, served_model_name="m", limits=LIMITS)
    with serve_in_thread(app) as url:
        yield Served(url, steps, app)


def _completion(url: str, **body) -> httpx.Response:
    return post(url, "/v1/completions", json.dumps({"max_tokens": 2, **body}))


def _read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ------------------------------------------------------------------- body
def test_declared_body_over_the_limit_is_413_before_reading(limited):
    body = json.dumps({"prompt": "x" * (70 * 1024), "max_tokens": 2})
    message = error_of(post(limited.url, "/v1/completions", body), 413)
    assert f"is {len(body)} bytes; the limit is 65536 bytes (--max-request-bytes)" in message
    # The connection stays usable: the server read the rest off it and discarded it.
    with httpx.Client(base_url=limited.url, timeout=60) as http:
        first = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        second = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert first.status_code == 413 and second.status_code == 200


def test_streamed_body_over_the_limit_is_counted_and_refused(limited):
    """No Content-Length (chunked): the body is counted as it arrives."""

    def chunks():
        for _ in range(20):
            yield b" " * 8192

    response = httpx.post(
        f"{limited.url}/v1/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert "more than 65536 bytes; the limit is 65536 bytes" in error_of(response, 413)


def test_a_body_that_stops_arriving_is_408_and_closed(limited):
    sock = raw_connection(limited.url)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": '
    )
    # The event loop is free meanwhile.
    assert httpx.get(f"{limited.url}/health", timeout=30).status_code == 200
    answer = _read_all(sock)  # the server closes the connection after answering
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert "did not arrive within 1 s (11 bytes received; --body-read-timeout)" in body.decode()


def test_tokenizing_runs_off_the_event_loop(limited, monkeypatch):
    """A prompt whose tokenizing never ends (held here) stalls neither
    /health nor other requests' answers."""
    app_prompts = limited.app.state.ctx.prompts
    held, entered = threading.Event(), threading.Event()
    real_encode = app_prompts.encode

    def slow_encode(text, *args, **kwargs):
        if text == "held":
            entered.set()
            held.wait(60)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(app_prompts, "encode", slow_encode)
    with httpx.Client(base_url=limited.url, timeout=60) as http:
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(
                r=http.post("/v1/completions", json={"prompt": "held", "max_tokens": 2})
            )
        )
        worker.start()
        try:
            assert entered.wait(30)
            for _ in range(5):
                assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/v1/models").status_code == 200
        finally:
            held.set()
            worker.join(60)
    assert result["r"].status_code == 200


# ------------------------------------------------------------ amplification
@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"prompt": [PROMPT] * 5}, "prompt", "prompt has 5 prompts; at most 4 are allowed per request "
         "(--max-prompts-per-request)"),
        ({"prompt": [PROMPT] * 3, "n": 3}, "n", "asks for 9 sequences (3 prompt(s) x n 3); at most 8 "
         "are allowed per request (--max-seqs-per-request)"),
        ({"prompt": PROMPT, "best_of": 9}, "best_of", "asks for 9 sequences (1 prompt(s) x best_of 9)"),
        ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop has 5 strings; at most 4 "
         "are allowed (--max-stop-strings)"),
        ({"prompt": PROMPT, "stop": "z" * 33}, "stop", "has 33 characters; at most 32 are allowed "
         "(--max-stop-string-chars)"),
    ],
)  # fmt: skip
def test_what_one_request_may_queue_is_capped(limited, body, param, words):
    assert words in error_of(_completion(limited.url, **body), 400, param)


def test_chat_amplification_is_capped_before_the_template_runs(limited):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 9}
    message = error_of(post(limited.url, "/v1/chat/completions", json.dumps(body)), 400, "n")
    assert "(--max-seqs-per-request)" in message


def test_requests_at_the_caps_are_served(limited):
    ok = _completion(limited.url, prompt=[PROMPT] * 4, n=2, stop=["a" * 32, "b", "c", "d"])
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 8


def test_a_huge_prompt_is_refused_from_its_head():
    """A prompt far past the context is refused after tokenizing its first
    max_model_len x 16 characters, not all of them."""
    from paged_attention.entrypoints.openai_protocol import RequestError
    from paged_attention.entrypoints.prompts import PromptBuilder

    calls: list[int] = []

    class Counting:
        def encode(self, text, add_special_tokens=True):
            calls.append(len(text))
            return list(range(len(text) // 4))

    builder = PromptBuilder(Counting(), max_model_len=512)
    with pytest.raises(RequestError) as err:
        builder.encode("word " * 800_000, "prompt")
    assert calls == [512 * 16]
    assert err.value.code == "context_length_exceeded" and "max_model_len is 512" in err.value.message
    # A head that compresses well is no proof: then the whole prompt is tokenized.
    calls.clear()

    class Compressing(Counting):
        def encode(self, text, add_special_tokens=True):
            calls.append(len(text))
            return list(range(len(text) // 100))

    assert len(PromptBuilder(Compressing(), 512).encode(" " * 100_000, "prompt")) == 1000
    assert calls == [512 * 16, 100_000]


# ---------------------------------------------------------- waiting queue
def test_a_burst_fills_exactly_the_free_room_of_the_waiting_queue():
    """--max-waiting 4, the engine held: of 30 requests sent at once exactly 4
    are queued, 26 get 503 with Retry-After; released, the 4 complete."""
    llm = _llm()
    steps = gate_steps(llm)
    app = create_app(llm, served_model_name="m", max_waiting=4)
    with serve_in_thread(app) as url:
        steps.clear()

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                tasks = [
                    asyncio.ensure_future(
                        http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
                    )
                    for _ in range(30)
                ]
                while sum(t.done() for t in tasks) < 26:
                    await asyncio.sleep(0.05)
                done = [t.result() for t in tasks if t.done()]
                queued = metric_value(url, "paged_attention_num_requests_waiting")
                steps.set()
                rest = await asyncio.gather(*(t for t in tasks if not t.done()))
                return done, queued, rest

        try:
            rejected, queued, accepted = asyncio.run(burst())
        finally:
            steps.set()
        assert len(rejected) == 26 and len(accepted) == 4 and queued == 4
        for response in rejected:
            assert "(limit --max-waiting 4)" in error_of(response, 503)
            assert response.headers["Retry-After"] == "1"
        assert all(r.status_code == 200 for r in accepted)
        refused = metric_value(url, "paged_attention_rejected_requests_total", {"reason": "queue_full"})
        assert refused == 26
        # More prompts in one request than the queue holds can never be queued: 400, not 503.
        message = error_of(_completion(url, prompt=[PROMPT] * 5), 400, "prompt")
        assert "more than the waiting queue holds (--max-waiting 4)" in message
        wait_until(lambda: memory(url)["num_free_blocks"] == memory(url)["num_blocks"])


# ------------------------------------------------------------- slow clients
def test_half_sent_requests_do_not_hold_the_server():
    """300 connections: 150 stop inside their headers, 150 inside their body.
    The server keeps answering others meanwhile, and closes every one of them
    (header deadline; 408 for the bodies) instead of holding them forever."""
    llm = _llm()
    limits = ServerLimits(header_read_timeout_s=1.0, body_read_timeout_s=1.0)
    with serve_in_thread(create_app(llm, served_model_name="m", limits=limits)) as url:
        socks = []
        for i in range(300):
            sock = raw_connection(url)
            if i % 2:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            else:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{"
                )
            socks.append(sock)
        assert _completion(url, prompt=PROMPT).status_code == 200
        answers = [_read_all(sock) for sock in socks]  # each returns once the server closes it
        for sock in socks:
            sock.close()
        assert all(a == b"" for a in answers[1::2])  # headers never finished: closed, no answer
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers[::2])
        assert _completion(url, prompt=PROMPT).status_code == 200
        assert memory(url)["num_free_blocks"] == memory(url)["num_blocks"]


def test_limit_flags_name_their_fields():
    assert flag("header_read_timeout_s") == "--header-read-timeout"
    assert flag("max_request_bytes") == "--max-request-bytes"
    with pytest.raises(ValueError, match=r"--max-seqs-per-request must be >= 1, got 0"):
        ServerLimits(max_seqs_per_request=0)
    with pytest.raises(ValueError, match=r"--request-timeout must be > 0, got -1"):
        ServerLimits(request_timeout_s=-1)


def test_oversized_headers_are_refused_by_h11(limited):
    """Incomplete headers are buffered up to 32 KiB (lifecycle.MAX_HEADER_BYTES),
    then refused: a client cannot make the server hold an endless header."""
    sock = raw_connection(limited.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 40_000)  # never ends
    answer = _read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{limited.url}/health", timeout=30).status_code == 200
