"""Reach across NATs, in network namespaces (tests/support/nat_lab.py): real coturn as the STUN
servers on a "public" segment, home sites behind nftables masquerade routers that drop unsolicited
inbound traffic. Nodes are real `meshctl up` processes inside the namespaces."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Node
from tests.support import nat_lab
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow
STUN_SERVERS = (f"{nat_lab.STUN_IP}:3478", f"{nat_lab.STUN2_IP}:3478")  # two, to tell cone from symmetric


@pytest.fixture
def lab(tmp_path):
    why = nat_lab.available()
    if why:
        pytest.skip(why)
    lab = nat_lab.NatLab()
    try:
        lab.start_coturn(lab.public_site("stun", 3).ns, 3478, tmp_path, listen_ip=nat_lab.STUN_IP)
        lab.start_coturn(lab.public_site("stun2", 4).ns, 3478, tmp_path, listen_ip=nat_lab.STUN2_IP)
        yield lab
    finally:
        lab.close()


STUN_ENV = {"MESH_STUN": ",".join(STUN_SERVERS)}  # = --stun A --stun B


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
        paths = {(s.labels["peer"], s.labels["path"]): s.value for f in text_string_to_metric_families(metrics)
                 for s in f.samples if s.name == "mesh_peer_path"}
        assert paths.get((b.node_id(), "punched")) == 1, metrics
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
        me = s.status()["meshd"]["me"]
        assert me["public_addrs"] and me["public_addrs"][0][0] == home.public_ip  # its IP, for relays' permissions
        assert me["public_addrs"][0] not in me["mesh_addrs"]  # but not to be dialed: a new port per destination
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


TURN_USER = "meshuser"
TURN_PASS = "s3cret-relay-pass"


def test_symmetric_and_cone_homes_meet_through_the_relay_which_sees_only_ciphertext(tmp_path):
    why = nat_lab.available()
    if why:
        pytest.skip(why)
    lab = nat_lab.NatLab()
    sniffer = None
    nodes: list[Node] = []
    try:
        relay_site = lab.public_site("turn", 3)
        lab.start_coturn(relay_site.ns, 3478, tmp_path, user=f"{TURN_USER}:{TURN_PASS}")  # TURN, and STUN too
        lab.start_coturn(lab.public_site("stun2", 4).ns, 3478, tmp_path, listen_ip=nat_lab.STUN2_IP)
        capture = tmp_path / "relay.frames"
        sniffer = subprocess.Popen(["ip", "netns", "exec", relay_site.ns, sys.executable, "-m", "tests.support.sniff",
                                    str(capture)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert sniffer.stdout.readline().strip() == "capturing"
        env = STUN_ENV | {"MESH_RELAY": f"turn:{TURN_USER}:{TURN_PASS}@{nat_lab.STUN_IP}:3478"}
        public = lab.public_site("pub", 2)
        home_s, home_c = lab.home_site("s", 1, symmetric=True), lab.home_site("c", 2)
        p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
        s = Node(tmp_path / "s", netns=home_s.ns, extra=["--client"], env=env)
        c = Node(tmp_path / "c", netns=home_c.ns, extra=["--client"], env=env)
        nodes = [s, c, p]
        p.start()
        token = p.token()
        started = time.monotonic()
        s.start("--join", token)
        c.start("--join", token)
        wait_until(lambda: path_of(s, c) == "relayed" and path_of(c, s) == "relayed", timeout=120, interval=0.5,
                   what="the symmetric and the cone home connected through the relay")
        print(f"nat: join -> relayed path in {time.monotonic() - started:.1f} s")
        relays = s.status()["meshd"]["relays"]
        assert relays and relays[0]["relayed"][0] == nat_lab.STUN_IP and not relays[0]["error"], relays
        relayed_bytes = lambda: sum(r["bytes_out"] + r["bytes_in"] for n in (s, c)  # noqa: E731
                                    for r in n.status()["meshd"]["relays"])
        wait_until(lambda: relayed_bytes() > 2000, timeout=30, interval=0.5, what="gossip through the relay")
        print(f"nat: the two nodes' relays carried {relayed_bytes()} bytes of QUIC so far")
        assert TURN_PASS not in json.dumps(s.status())  # the status names the relay, never its password
        secret = json.loads((p.home / "mesh.json").read_text())["secret"]
        ids = [s.node_id(), c.node_id()]
    finally:
        for n in nodes:
            n.stop()
        if sniffer is not None:
            sniffer.terminate()
            sniffer.wait(timeout=30)
        lab.close()
    from tests.support.sniff import read_frames
    seen = b"".join(read_frames(str(capture)))
    assert TURN_USER.encode() in seen, "the capture saw the relay's own (plaintext) TURN requests"
    assert len(seen) > 20000, len(seen)
    for marker in (secret, *ids, '"gossip"'):
        assert marker.encode() not in seen, f"{marker!r} crossed the relay in plaintext"
    print(f"nat: the relay's segment carried {len(seen)} bytes; no secret, node id or gossip text in them")


def decode_tok_s(node: Node, max_tokens: int = 48) -> float | None:
    """llama-server's own decode speed for one answer asked at `node`'s :9337 (None if no answer)."""
    body = {"model": "any", "messages": [{"role": "user", "content": "Count from one to twenty."}],
            "temperature": 0, "seed": 1, "max_tokens": max_tokens}
    code = ("import httpx,json,sys; r=httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=180);"
            "r.raise_for_status(); print(json.dumps(r.json()))")
    out = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-c", code,
                          f"{node.api}/v1/chat/completions", json.dumps(body)], capture_output=True, text=True,
                         timeout=200)
    if out.returncode != 0:
        return None
    answer = json.loads(out.stdout)
    return (answer.get("timings") or {}).get("predicted_per_second") or -1.0


def test_split_between_two_cone_homes_serves_everywhere(lab, tmp_path):
    """Two hosts behind separate cone NATs split the model over a punched path (no weights move);
    a lite client behind a third NAT and the public rendezvous node answer too."""
    public = lab.public_site("pub", 2)
    homes = [lab.home_site(name, i) for i, name in ((1, "a"), (2, "b"), (3, "c"))]
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
    a = Node(tmp_path / "a", netns=homes[0].ns, extra=["--split", "--max-vram", "8G"], env=STUN_ENV)
    b = Node(tmp_path / "b", netns=homes[1].ns, extra=["--split", "--max-vram", "4G"], env=STUN_ENV)
    c = Node(tmp_path / "c", netns=homes[2].ns, extra=["--client"], env=STUN_ENV)
    try:
        p.start()
        token = p.token()
        started = time.monotonic()
        for n in (a, b, c):
            n.start("--join", token)
        ids = {a.node_id(), b.node_id()}
        wait_until(lambda: {m["node_id"] for m in a.status().get("electd", {}).get("members", [])} == ids
                   and a.runner().get("llama", {}).get("state") == "ready", timeout=300, interval=1.0,
                   what="the split over the two homes serving")
        speed = wait_until(lambda: decode_tok_s(a), timeout=120, interval=1.0, what="an answer at the host")
        served_at = time.monotonic() - started
        speed = max(speed, *(decode_tok_s(a) or 0 for _ in range(2)))  # the first answer also warms the path up
        print(f"nat: join -> split serving across two cone NATs in {served_at:.1f} s; "
              f"decode {speed:.1f} tok/s at the host over the punched QUIC lane")
        for n in (b, c, p):
            assert wait_until(lambda: decode_tok_s(n, 8), timeout=120, interval=1.0, what=f"{n.home.name} answering")
        assert path_of(a, b) == "punched" and path_of(b, a) == "punched"
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == b.node_id())
        assert tunnel["lane"] == "quic" and tunnel["path"] == "direct" and tunnel["bytes_out"] > 0, tunnel
        weights = {w["node_id"]: w for w in a.runner().get("weights", [])}
        assert weights[b.node_id()]["sent_bytes"] == 0 and weights[b.node_id()]["local_bytes"] > 0, weights
    finally:
        for n in (c, b, a, p):
            n.stop()


def test_a_public_host_that_drops_unsolicited_inbound_joins_outbound_and_serves(lab, tmp_path):
    """The firewalled node is the restricted side: it joins (dials out) and the reachable side waits.
    Here the firewalled node hosts the model and the reachable one is a lite client."""
    open_site = lab.public_site("pub", 2)
    walled = lab.public_site("fw", 5, drop_inbound=True)
    p = Node(tmp_path / "p", netns=open_site.ns, extra=["--client"], env=STUN_ENV)
    f = Node(tmp_path / "f", netns=walled.ns, env=STUN_ENV)
    try:
        p.start()
        started = time.monotonic()
        f.start("--join", p.token())
        wait_until(lambda: decode_tok_s(p, 8), timeout=240, interval=1.0, what="the lite client answering")
        print(f"nat: join -> serving with a firewalled public host in {time.monotonic() - started:.1f} s")
        assert decode_tok_s(f, 8)
        assert path_of(f, p) == "direct" and path_of(p, f) == "direct"
        assert f.status()["meshd"]["nat"]["behaviour"] == "no NAT"
        tunnel = next(t for t in p.status()["gatewayd"]["tunnels"] if t["node_id"] == f.node_id())
        assert tunnel["lane"] == "quic", tunnel  # TCP to the firewalled host cannot connect; its UDP hole can
    finally:
        for n in (f, p):
            n.stop()


def test_split_with_a_host_behind_a_symmetric_nat_serves_through_the_relay(tmp_path):
    why = nat_lab.available()
    if why:
        pytest.skip(why)
    lab = nat_lab.NatLab()
    nodes: list[Node] = []
    try:
        relay_site = lab.public_site("turn", 3)
        lab.start_coturn(relay_site.ns, 3478, tmp_path, user=f"{TURN_USER}:{TURN_PASS}")
        lab.start_coturn(lab.public_site("stun2", 4).ns, 3478, tmp_path, listen_ip=nat_lab.STUN2_IP)
        env = STUN_ENV | {"MESH_RELAY": f"turn:{TURN_USER}:{TURN_PASS}@{nat_lab.STUN_IP}:3478"}
        public = lab.public_site("pub", 2)
        home_a, home_s = lab.home_site("a", 1), lab.home_site("s", 2, symmetric=True)
        p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
        a = Node(tmp_path / "a", netns=home_a.ns, extra=["--split", "--max-vram", "8G"], env=env)
        s = Node(tmp_path / "s", netns=home_s.ns, extra=["--split", "--max-vram", "4G"], env=env)
        nodes = [s, a, p]
        p.start()
        token = p.token()
        started = time.monotonic()
        a.start("--join", token)
        s.start("--join", token)
        ids = {a.node_id(), s.node_id()}
        wait_until(lambda: {m["node_id"] for m in a.status().get("electd", {}).get("members", [])} == ids
                   and a.runner().get("llama", {}).get("state") == "ready", timeout=300, interval=1.0,
                   what="the split through the relay serving")
        speed = wait_until(lambda: decode_tok_s(a), timeout=120, interval=1.0, what="an answer at the host")
        served_at = time.monotonic() - started
        speed = max(speed, *(decode_tok_s(a) or 0 for _ in range(2)))
        print(f"nat: join -> split serving through the relay in {served_at:.1f} s; decode {speed:.1f} tok/s")
        assert wait_until(lambda: decode_tok_s(s, 8), timeout=120, interval=1.0, what="the relayed worker answering")
        assert path_of(a, s) == "relayed" and path_of(s, a) == "relayed"
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == s.node_id())
        assert tunnel["lane"] == "quic" and tunnel["path"] == "relayed" and tunnel["bytes_out"] > 0, tunnel
        weights = {w["node_id"]: w for w in a.runner().get("weights", [])}
        assert weights[s.node_id()]["sent_bytes"] == 0, weights
        carried = sum(r["bytes_out"] + r["bytes_in"] for n in (a, s) for r in n.status()["gatewayd"]["relays"])
        print(f"nat: the data lanes' relays carried {carried} bytes")
    finally:
        for n in nodes:
            n.stop()
        lab.close()


def test_a_token_whose_addresses_are_all_unreachable_says_so_in_bounded_time(tmp_path):
    """`meshctl up -d --join` waits for the join's outcome: a token pointing only at addresses where
    nothing answers (bound UDP sockets that never read) ends in one clear line and a non-zero exit."""
    import socket

    from common.identity import NodeIdentity
    from common.tokens import InviteToken, encode_token, new_mesh_id, new_secret
    from tests.integration.harness import meshctl
    from tests.support.procs import free_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole1, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole2:
        hole1.bind(("127.0.0.1", 0))
        hole2.bind(("127.0.0.1", 0))
        inviter = NodeIdentity.load_or_create(tmp_path / "gone").node_id
        token = encode_token(InviteToken(new_mesh_id(), new_secret(), inviter,
                                         (("127.0.0.1", hole1.getsockname()[1]), ("127.0.0.1", hole2.getsockname()[1]))))
        home = tmp_path / "j"
        started = time.monotonic()
        try:
            up = meshctl("up", "-d", "--client", "--port", str(free_port()), "--join", token, home=home, timeout=90)
            took = time.monotonic() - started
        finally:
            meshctl("down", home=home, timeout=60)
    assert up.returncode != 0, up.stdout + up.stderr
    failed = [line for line in up.stderr.splitlines() if "join failed" in line]
    assert len(failed) == 1 and "cannot reach the inviting node" in failed[0] and "meshctl join" in failed[0], up.stderr
    assert took < 45, took  # the dials give up after seconds, not a hang
    print(f"nat: a token with only dead addresses: `meshctl up -d --join` failed in {took:.1f} s: {failed[0]}")
