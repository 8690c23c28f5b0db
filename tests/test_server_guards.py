"""Safe by default: without an API key the server answers only JSON POSTs and
only Host names of its own (a web page cannot drive it, DNS rebinding
cannot reach it); with a key, the key is the rule, for /docs and
/openapi.json too. The key can come from the environment, and serving beyond
loopback without one prints a warning."""

from __future__ import annotations

import json

import httpx
import pytest

from paged_attention import LLM
from paged_attention.config import API_KEY_ENV
from paged_attention.engine.builder import STORIES260K
from paged_attention.entrypoints.guards import host_name
from paged_attention.entrypoints.server import (
    allowed_hosts_for,
    create_app,
    exposure_warning,
    resolve_api_key,
)
from tests.server_utils import error_of, serve_in_thread

BODY = json.dumps({"prompt": "Once upon a time", "max_tokens": 2})
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(STORIES260K), dtype="float32", num_kv_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def open_url(llm) -> str:
    with serve_in_thread(create_app(llm, served_model_name="m", warm_up=False)) as url:
        yield url


def _post(url: str, headers: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", content=BODY, headers=headers, timeout=60)


def test_without_a_key_only_this_servers_host_names_are_answered(open_url):
    port = open_url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST."):
        assert _post(open_url, {**JSON, "Host": host}).status_code == 200, host
    rebound = _post(open_url, {**JSON, "Host": f"attacker.example:{port}"})
    message = error_of(rebound, 421)
    assert f"Host 'attacker.example:{port}' is not this server's" in message
    assert "127.0.0.1, ::1, localhost" in message
    get = httpx.get(f"{open_url}/v1/models", headers={"Host": "attacker.example"}, timeout=30)
    assert get.status_code == 421
    # Probes and scrapers are not turned away.
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{open_url}{path}", headers={"Host": "10.0.0.7:80"}, timeout=30).status_code == 200


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_without_a_key_a_post_must_be_json(open_url, content_type):
    """A page may send these cross-origin without a preflight; JSON it may not."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    message = error_of(_post(open_url, headers), 415)
    assert f"Content-Type must be application/json, got {content_type or 'none'!r}" in message


def test_json_with_parameters_is_json(open_url):
    assert _post(open_url, {"Content-Type": "Application/JSON; charset=utf-8"}).status_code == 200


def test_docs_follow_the_apis_rule(open_url, llm):
    assert httpx.get(f"{open_url}/openapi.json", timeout=30).json()["info"]["title"] == "paged-attention"
    assert "swagger" in httpx.get(f"{open_url}/docs", timeout=30).text.lower()
    assert httpx.get(f"{open_url}/docs", headers={"Host": "evil.example"}, timeout=30).status_code == 421
    assert httpx.get(f"{open_url}/redoc", timeout=30).status_code == 404

    keyed = create_app(llm, served_model_name="m", api_key="sekret", warm_up=False)
    with serve_in_thread(keyed) as url:
        for path in ("/docs", "/openapi.json", "/v1/models"):
            assert "missing API key" in error_of(httpx.get(f"{url}{path}", timeout=30), 401)
            ok = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer sekret"}, timeout=30)
            assert ok.status_code == 200, path
        # With a key, the key is the rule: no Host or Content-Type check.
        headers = {"Authorization": "Bearer sekret", "Host": "gateway.example", "Content-Type": "text/plain"}
        assert _post(url, headers).status_code == 200


def test_allowed_hosts_add_names_or_turn_the_check_off(llm):
    app = create_app(llm, served_model_name="m", warm_up=False, allowed_hosts=["127.0.0.1", "box.lan"])
    with serve_in_thread(app) as url:
        assert _post(url, {**JSON, "Host": "box.lan:8000"}).status_code == 200
        assert _post(url, {**JSON, "Host": "localhost"}).status_code == 421
    anyone = create_app(llm, served_model_name="m", warm_up=False, allowed_hosts=None)
    with serve_in_thread(anyone) as url:
        assert _post(url, {**JSON, "Host": "whatever.example"}).status_code == 200


def test_the_allowed_names_follow_the_bound_address():
    assert allowed_hosts_for("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts_for("0.0.0.0") == {"localhost", "127.0.0.1", "::1"}  # clients never send 0.0.0.0
    assert allowed_hosts_for("::") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts_for("192.168.1.5") == {"localhost", "127.0.0.1", "::1", "192.168.1.5"}
    assert allowed_hosts_for("0.0.0.0", ["box.lan", " ", "[fe80::1]:8000"]) >= {"box.lan", "fe80::1"}
    assert allowed_hosts_for("0.0.0.0", ["*"]) is None
    assert [host_name(h) for h in ("[::1]:80", "a.b:1", "A.B.", "::1")] == ["::1", "a.b", "a.b", "::1"]


def test_the_key_comes_from_the_flag_or_the_environment():
    assert resolve_api_key("from-flag", {API_KEY_ENV: "from-env"}) == "from-flag"
    assert resolve_api_key(None, {API_KEY_ENV: "from-env"}) == "from-env"
    assert resolve_api_key(None, {API_KEY_ENV: ""}) is None
    assert resolve_api_key(None, {}) is None


def test_serving_beyond_loopback_without_a_key_warns():
    hosts = allowed_hosts_for("0.0.0.0")
    warning = exposure_warning("0.0.0.0", None, hosts)
    assert warning is not None and "without an API key" in warning and API_KEY_ENV in warning
    assert "127.0.0.1, ::1, localhost" in warning
    assert exposure_warning("0.0.0.0", "key", hosts) is None
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert exposure_warning(loopback, None, hosts) is None, loopback
    assert exposure_warning("box.lan", None, hosts) is not None
