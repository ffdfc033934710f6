"""What a running node exposes: llama-server and the bus on loopback / owner-only paths, ggml-rpc-server
on loopback or behind mutual TLS, the API on localhost unless --listen-all (which needs an API key),
secrets owner-only."""
from __future__ import annotations

import json
import stat

import httpx
import psutil
import pytest

from common import addresses
from tests.integration.harness import Node, meshctl

pytestmark = pytest.mark.slow
AUTHENTICATED_ENDPOINTS = {"meshd", "gatewayd"}  # QUIC admission / tunnel auth guard these


def listening_sockets(root_pid: int) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket and bound UDP socket in the node's tree."""
    out = []
    for proc in [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]:
        # the first two words name it; a TLS rpc-server adds its --tls-allow
        name = " ".join(proc.cmdline()[:2] + [a for a in proc.cmdline() if a == "--tls-allow"])
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN or (conn.type == 2 and not conn.raddr):
                out.append((name, conn.laddr.ip, conn.laddr.port))
    return out


def test_exposure_of_a_running_node(tmp_path):
    node = Node(tmp_path / "n").start()
    try:
        node.wait_serving()
        sockets = listening_sockets(node.proc.pid)
        assert sockets
        for name, ip, port in sockets:
            if "rpc-server" in name and "--tls-allow" in name:
                pass  # beyond loopback with mutual TLS, admitting only its plan's host (test_rpc_tls.py)
            elif "llama-server" in name or "rpc-server" in name:
                assert ip == "127.0.0.1", (name, ip, port)
            elif port == node.port:
                assert ip == "127.0.0.1", "the API must listen on localhost by default"
            elif ip not in ("127.0.0.1", "::1"):
                assert any(s in name for s in AUTHENTICATED_ENDPOINTS), (name, ip, port)
        home = node.home
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE(addresses.run_dir(home).stat().st_mode) == 0o700
        for secret in (home / "node_key.pem", home / "mesh.json"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        for sock in addresses.run_dir(home).glob("*.pub"):
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
    finally:
        node.stop()


def test_listen_all_requires_an_api_key(tmp_path):
    out = meshctl("up", "--listen-all", home=tmp_path / "x")
    assert out.returncode == 2 and "--api-key" in out.stderr
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "config.toml").write_text('api_host = "0.0.0.0"\n')  # the config file is no way around it
    out = meshctl("up", home=tmp_path / "y", env={"MESH_HOME": str(tmp_path / "y")})
    assert out.returncode == 2 and "--api-key" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    node = Node(tmp_path / "k", extra=["--listen-all", "--api-key", "s3cret"]).start()
    try:
        node.wait_serving()
        body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        denied = httpx.post(f"{node.api}/v1/chat/completions", json=body, timeout=30)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        allowed = httpx.post(f"{node.api}/v1/chat/completions", json=body, timeout=60,
                             headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        api = [s for s in listening_sockets(node.proc.pid) if s[2] == node.port]
        assert api and api[0][1] == "0.0.0.0"
        # The secret and the token leave only through `meshctl token`: no route, error or log holds them.
        secret = json.loads((node.home / "mesh.json").read_text())["secret"]
        token = node.token()
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/mesh/status", "/metrics", "/health", "/v1/models", "/nope"):
            assert httpx.get(f"{node.api}{path}", timeout=30).status_code == 401, path
            answer = httpx.get(f"{node.api}{path}", headers=key, timeout=30)
            assert secret not in answer.text and token not in answer.text, path
        assert httpx.get(f"{node.api}/mesh/status", headers=key, timeout=30).json()["mesh"]["node_id"]
        for log in (node.home / "logs").glob("*.log"):
            text = log.read_text(errors="replace")
            assert secret not in text and token not in text, log
    finally:
        node.stop()
