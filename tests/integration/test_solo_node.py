"""A solo node, end to end: the real supervisord, services and llama.cpp serve the default model."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.integration.harness import Node, meshctl
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("solo") / "home").start()
    try:
        n.wait_serving(timeout=300)
        yield n
    finally:
        n.stop()


def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key="none", timeout=120, max_retries=0)


def test_plain_and_streamed_chat_completions(node):
    reply = client(node).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert reply.choices[0].message.content.strip()
    chunks = list(client(node).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, temperature=0,
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text.strip()


def readme_curl_body() -> dict:
    """The JSON body of the README's first curl: what a newcomer sends first."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return json.loads(re.search(r"curl http://localhost:9337/v1/chat/completions.*?-d '(\{.*?\})'", readme, re.S).group(1))


def test_the_readmes_first_request_gets_an_answer_that_stops(node):
    """The default model is instruction-tuned: the README's "Hello!" (no max_tokens) ends on its own."""
    body = readme_curl_body()
    assert "max_tokens" not in body
    started = time.monotonic()
    r = httpx.post(f"{node.api}/v1/chat/completions", json=body, timeout=120)
    elapsed = time.monotonic() - started
    choice = r.json()["choices"][0]
    print(f"README curl: {elapsed:.2f} s, {r.json()['usage']['completion_tokens']} tokens: {choice['message']['content']!r}")
    assert r.status_code == 200 and choice["finish_reason"] == "stop" and choice["message"]["content"].strip()


def test_embeddings_of_a_chat_model_is_a_clear_error(node):
    r = httpx.post(f"{node.api}/v1/embeddings", json={"input": "hello", "model": "any"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "embeddings_not_supported", r.text
    assert "embedding GGUF" in r.json()["error"]["message"]


def test_chat_uses_the_models_turn_format(node):
    r = httpx.post(f"{node.api}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] >= 8  # wrapped in the model's turn markers, not sent bare


def test_completions_models_and_status(node):
    r = httpx.post(f"{node.api}/v1/completions", json={"prompt": "The sky is", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    models = httpx.get(f"{node.api}/v1/models", timeout=10).json()
    assert models["data"]
    status = httpx.get(f"{node.api}/mesh/status", timeout=10).json()
    assert status["plan"]["state"] == "solo" and status["runner"]["llama"]["state"] == "ready"
    text = meshctl("status", home=node.home).stdout
    assert "plan: solo" in text and "llama-server: ready" in text


def test_bad_requests_get_openai_errors(node):
    r = httpx.post(f"{node.api}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{node.api}/v1/chat/completions", content=b"x" * (33 << 20), timeout=30)
    assert r.status_code == 413 and "error" in r.json()


def test_llama_cpp_listens_on_loopback_only_or_behind_mutual_tls(node):
    runner = node.runner()
    for child in ("rpc", "llama"):
        proc = psutil.Process(runner[child]["pid"])
        listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == "LISTEN"]
        if child == "rpc" and "--tls-allow" in proc.cmdline():
            # a worker's rpc-server is for its plan's host, on the bind host: mutual TLS (test_rpc_tls.py)
            assert listening and runner["rpc_tls"], (child, listening)
            continue
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), (child, listening)


@pytest.mark.parametrize("victim", ["meshd", "electd", "runnerd", "gatewayd", "llama-server", "ggml-rpc-server"])
def test_kill_9_of_any_part_recovers(node, victim):
    if victim in ("llama-server", "ggml-rpc-server"):
        key = "llama" if victim == "llama-server" else "rpc"
        pid = node.runner()[key]["pid"]
    else:
        pid = node.service_pid(victim)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()

    def answered() -> bool:
        try:
            return bool(node.chat("Say yes.", max_tokens=4))
        except httpx.HTTPError:
            return False

    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # reaped already
            return True

    wait_until(dead, timeout=10, what="the victim to die")
    wait_until(answered, timeout=120, interval=0.5, what=f"serving again after killing {victim}")
    print(f"recovered from kill -9 of {victim} in {time.monotonic() - started:.1f} s")


def test_bad_input_is_one_clear_line(tmp_path):
    home = tmp_path / "bad"
    out = meshctl("up", "--model", str(tmp_path / "missing.gguf"), home=home)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "does not exist" in out.stderr
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    out = meshctl("up", "--model", str(notgguf), home=home)
    assert out.returncode == 2 and "not a GGUF" in out.stderr
    out = meshctl("up", "--bin-dir", str(tmp_path), home=home)
    assert out.returncode == 2 and "llama-server" in out.stderr and "not found" in out.stderr
    out = meshctl("up", "--join", "not-a-token", home=home)
    assert out.returncode == 2 and "token" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = meshctl("up", "--port", str(busy.getsockname()[1]), home=home)
    assert out.returncode == 2 and "unavailable" in out.stderr and "--port" in out.stderr


def test_a_request_arriving_while_llama_server_is_down_waits_and_succeeds(node):
    os.kill(node.runner()["llama"]["pid"], signal.SIGKILL)
    r = httpx.post(f"{node.api}/v1/chat/completions", timeout=120,
                   json={"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
