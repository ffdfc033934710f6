"""Item: secrets stay put. An API key guards every route; an API beyond loopback needs one however
it was asked for (flag, MESH_* variable, config file)."""
from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from pydantic import ValidationError

from common.settings import load_settings
from services.gatewayd.api import Upstream, build_app

KEY = "k3y-for-tests"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("MESH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MESH_HOME", str(tmp_path))


@pytest.mark.parametrize("how", ["flag", "env", "config", "listen_all"])
def test_an_api_beyond_loopback_needs_a_key_however_it_was_asked_for(how, monkeypatch, tmp_path):
    if how == "flag":
        ask = lambda **kw: load_settings(api_host="0.0.0.0", **kw)  # noqa: E731
    elif how == "env":
        monkeypatch.setenv("MESH_API_HOST", "192.0.2.7")
        ask = load_settings
    elif how == "config":
        (tmp_path / "config.toml").write_text('api_host = "0.0.0.0"\n')
        ask = load_settings
    else:
        ask = lambda **kw: load_settings(listen_all=True, **kw)  # noqa: E731
    with pytest.raises(ValidationError, match="api-key"):
        ask()
    assert ask(api_key="x").api_key == "x"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_needs_no_key(host):
    assert load_settings(api_host=host).api_key is None


def routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            if method in ("GET", "POST"):
                out.append((method, route.path))
    return out


def make_app(api_key: str | None):
    status = {"mesh": {"node_id": "n", "mesh_id": "m"}}
    return build_app(Upstream(), wait_for_host=0, api_key=api_key, status=lambda: status,
                     metrics=lambda: "mesh_peers 0\n", counters={"served": 0, "failed": 0})


def call(app, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, headers=headers, json={} if method == "POST" else None)
    return asyncio.run(go())


def test_with_a_key_every_route_requires_it():
    app = make_app(KEY)
    found = routes(app)
    assert {("GET", "/mesh/status"), ("GET", "/metrics"), ("GET", "/health"), ("POST", "/v1/chat/completions")} <= set(found)
    for method, path in found:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
            r = call(app, method, path, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, headers)
        r = call(app, method, path, {"Authorization": f"Bearer {KEY}"})
        assert r.status_code != 401, (method, path)
    # Unknown paths too: nothing answers a stranger but the refusal.
    assert call(app, "GET", "/nope").status_code == 401


def test_without_a_key_routes_answer():
    app = make_app(None)
    assert call(app, "GET", "/mesh/status").status_code == 200
    assert call(app, "POST", "/v1/chat/completions").status_code == 503


def test_the_members_api_serves_only_the_openai_routes():
    members = build_app(Upstream(), wait_for_host=0, api_key=None, status=None, metrics=None,
                        counters={"served": 0, "failed": 0})
    paths = {path for _, path in routes(members)}
    assert "/mesh/status" not in paths and "/metrics" not in paths and "/v1/chat/completions" in paths
    r = call(members, "POST", "/v1/chat/completions")
    assert r.status_code == 503 and r.headers.get("x-mesh-retry") == "1"  # the asking gateway retries


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.sampled_from(["public", "keyed", "members"]), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
                             "/mesh/status", "/metrics", "/", "/v1/", "/v1/chat/completions/../../mesh/status"]),
       body=st.binary(max_size=300) | st.text(max_size=100).map(str.encode),
       auth=st.sampled_from([None, f"Bearer {KEY}", "Bearer", "", "Basic x"]))
def test_fuzz_random_requests_at_every_route_get_an_answer(which, method, path, body, auth):
    app = {"public": lambda: make_app(None), "keyed": lambda: make_app(KEY),
           "members": lambda: build_app(Upstream(), wait_for_host=0, api_key=None, status=None, metrics=None,
                                        counters={"served": 0, "failed": 0})}[which]()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, content=body, headers={"authorization": auth} if auth else {})
    r = asyncio.run(go())
    assert r.status_code in (200, 400, 401, 404, 405, 413, 422, 503), (r.status_code, r.text[:200])
    if which == "keyed" and auth != f"Bearer {KEY}":
        assert r.status_code == 401
