"""Reach across NATs, in network namespaces (tests/support/nat_lab.py): real coturn as the STUN
servers on a "public" segment, home sites behind nftables masquerade routers that drop unsolicited
inbound traffic. Nodes are real `meshctl up` processes inside the namespaces."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.integration.harness import Node
from tests.support import nat_lab
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow
STUN_PORTS = (3478, 3479)


@pytest.fixture
def lab(tmp_path):
    why = nat_lab.available()
    if why:
        pytest.skip(why)
    lab = nat_lab.NatLab()
    try:
        stun_site = lab.public_site("stun", 3)
        for port in STUN_PORTS:
            lab.start_coturn(stun_site.ns, port, tmp_path)
        yield lab
    finally:
        lab.close()


STUN_ENV = {"MESH_STUN": ",".join(f"{nat_lab.STUN_IP}:{port}" for port in STUN_PORTS)}  # = --stun A --stun B


def peer(node: Node, other: Node) -> dict | None:
    for p in node.status().get("meshd", {}).get("peers", []):
        if p["announcement"]["node_id"] == other.node_id():
            return p
    return None


def http_get(node: Node, path: str) -> str:
    """GET on the node's API, from inside its namespace (the API listens on that loopback)."""
    code = "import httpx,sys; r=httpx.get(sys.argv[1], timeout=10); r.raise_for_status(); print(r.text)"
    out = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-c", code, f"{node.api}{path}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def path_of(node: Node, other: Node) -> str | None:
    p = peer(node, other)
    return (p.get("path") or {}).get("path") if p and p["connected"] else None


def test_two_homes_behind_cone_nats_get_a_punched_path(lab, tmp_path):
    public = lab.public_site("pub", 2)
    home_a, home_b = lab.home_site("a", 1), lab.home_site("b", 2)
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
    a = Node(tmp_path / "a", netns=home_a.ns, extra=["--client"], env=STUN_ENV)
    b = Node(tmp_path / "b", netns=home_b.ns, extra=["--client"], env=STUN_ENV)
    try:
        p.start()
        token = p.token()
        nat = p.status()["meshd"]["nat"]
        assert nat["behaviour"] == "no NAT" and nat["public"][0] == public.address, nat
        started = time.monotonic()
        a.start("--join", token)
        b.start("--join", token)
        wait_until(lambda: path_of(a, b) == "punched" and path_of(b, a) == "punched", timeout=90, interval=0.5,
                   what="a punched path between the two homes")
        print(f"nat: join -> punched path between two cone NATs in {time.monotonic() - started:.1f} s")
        a_nat = a.status()["meshd"]["nat"]
        assert a_nat["behaviour"] == "endpoint-independent" and a_nat["public"][0] == home_a.public_ip, a_nat
        b_to_a = peer(b, a)["path"]
        assert b_to_a["via"].startswith(home_a.public_ip + ":"), b_to_a  # through A's NAT, not a relay
        assert path_of(a, p) == "direct" and path_of(p, a) == "direct"  # the restricted side dialed out
        metrics = http_get(a, "/metrics")
        assert f'mesh_peer_path{{peer="{b.node_id()}",path="punched"}} 1' in metrics, metrics
        api_view = json.loads(http_get(b, "/mesh/status"))["mesh"]["peers"]
        assert {q["announcement"]["node_id"]: q["path"]["path"] for q in api_view if q["path"]}[a.node_id()] == "punched"
    finally:
        for n in (a, b, p):
            n.stop()


def test_symmetric_nat_is_reported(lab, tmp_path):
    public = lab.public_site("pub", 2)
    home = lab.home_site("s", 1, symmetric=True)
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
    s = Node(tmp_path / "s", netns=home.ns, extra=["--client"], env=STUN_ENV)
    try:
        p.start()
        s.start("--join", p.token())
        wait_until(lambda: path_of(s, p) == "direct", timeout=60, interval=0.5, what="the NATed node joined")
        nat = s.status()["meshd"]["nat"]
        assert nat["behaviour"] == "symmetric" and "relay" in nat["detail"], nat
        assert not s.status()["meshd"]["me"]["public_addrs"]  # its STUN mapping is useless to peers
    finally:
        for n in (s, p):
            n.stop()


def test_an_unanswering_stun_server_costs_seconds_and_says_so(lab, tmp_path):
    public = lab.public_site("pub", 2)
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"],
             env={"MESH_STUN": f"{nat_lab.STUN_IP}:3999"})
    try:
        started = time.monotonic()
        p.start()
        p.token()
        assert time.monotonic() - started < 30
        errors = p.status()["meshd"]["errors"]
        assert any("no answer from" in e and "3999" in e for e in errors), errors
    finally:
        p.stop()
