"""Admission over QUIC with real meshd processes (lite clients: no llama.cpp needed)."""
from __future__ import annotations

import base64
import json

import pytest

from tests.integration.harness import Node, meshctl
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.slow


def client_node(path, name: str) -> Node:
    return Node(path / name, extra=["--client", "--bind-host", "127.0.0.1"])


def tamper(token: str, **changes) -> str:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body.update(changes)
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def peers_of(node: Node) -> set[str]:
    return {p["announcement"]["node_id"] for p in node.status().get("meshd", {}).get("peers", []) if p["connected"]}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("adm")
    started = [client_node(root, name).start() for name in ("a", "b", "c")]
    try:
        yield started
    finally:
        for n in started:
            n.stop()


def test_join_rotate_and_refusals(nodes):
    a, b, c = nodes
    token = a.token()
    b.node_id(), c.node_id()

    # An address and node id alone get nobody in: a wrong secret is refused with the reason.
    wrong = tamper(token, secret="0" * 64)
    out = meshctl("join", wrong, home=b.home, timeout=60)
    assert out.returncode == 2 and "refused" in out.stderr and "secret" in out.stderr
    assert "secret" in " ".join(b.status()["meshd"]["errors"])

    out = meshctl("join", "definitely-not-a-token", home=b.home, timeout=30)
    assert out.returncode == 2 and "not valid" in out.stderr

    unreachable = tamper(token, addrs=[["127.0.0.1", free_port()]])
    out = meshctl("join", unreachable, home=b.home, timeout=60)
    assert out.returncode == 2 and "cannot reach" in out.stderr

    out = meshctl("join", token, home=b.home, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: b.node_id() in peers_of(a) and a.node_id() in peers_of(b), timeout=30, what="A and B peered")

    # Rotation: the old token stops admitting new nodes; members stay; the new token works.
    rotated = meshctl("token", "--rotate", home=a.home).stdout.strip()
    assert rotated and rotated != token
    out = meshctl("join", token, home=c.home, timeout=60)
    assert out.returncode == 2 and "refused" in out.stderr
    assert b.node_id() in peers_of(a)
    out = meshctl("join", rotated, home=c.home, timeout=60)
    assert out.returncode == 0, out.stderr
    # Gossip makes every node know every other, and each pair connects directly.
    wait_until(lambda: peers_of(c) == {a.node_id(), b.node_id()} and c.node_id() in peers_of(b), timeout=60,
               what="full mesh of three")
    # B learned the rotated secret from gossip: its own token now admits new nodes too.
    b_token = json.loads(base64.urlsafe_b64decode(meshctl("token", home=b.home).stdout.strip() + "==="))
    a_token = json.loads(base64.urlsafe_b64decode(rotated + "==="))
    assert b_token["secret"] == a_token["secret"]


def test_leave_is_noticed_at_once(nodes):
    a, b, c = nodes
    c_id = c.node_id()
    wait_until(lambda: c_id in peers_of(a), timeout=60, what="C known to A")
    c.stop()
    wait_until(lambda: c_id not in peers_of(a), timeout=8, what="A noticing C left")
