"""Reach across NATs, in network namespaces (tests/support/nat_lab.py): real coturn as the STUN
servers and TURN relay on a "public" segment, home sites behind nftables masquerade routers that
drop unsolicited inbound traffic. Nodes are real `meshctl up` processes inside the namespaces; a
rendezvous node on the public segment (a lite client) prints the token the others join with.
The `nat:` lines print join -> serving times, decode rates per path and the relay's bytes."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Node
from tests.support import nat_lab
from tests.support.nat_lab import (RELAY_URL, STUN_ENV, TURN_PASS, TURN_USER, ask, in_netns, mesh, relay_bytes,
                                   wait_split_serving)
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow
RELAY_ENV = STUN_ENV | {"MESH_RELAY": RELAY_URL}


def open_lab(tmp_path: Path, *, relay: bool):
    why = nat_lab.available()
    if why:
        pytest.skip(why)
    lab = nat_lab.NatLab()
    try:
        lab.start_servers(tmp_path, relay=relay)
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture
def lab(tmp_path):
    with contextlib.closing(open_lab(tmp_path, relay=False)) as lab:
        yield lab


@pytest.fixture
def relay_lab(tmp_path):
    with contextlib.closing(open_lab(tmp_path, relay=True)) as lab:
        yield lab


def peer(node: Node, other: Node) -> dict | None:
    for p in node.status().get("meshd", {}).get("peers", []):
        if p["announcement"]["node_id"] == other.node_id():
            return p
    return None


def http_get(node: Node, path: str) -> str:
    """GET on the node's API, from inside its namespace (the API listens on that loopback)."""
    code = "import httpx,sys; r=httpx.get(sys.argv[1], timeout=10); r.raise_for_status(); print(r.text)"
    out = in_netns(node, "-c", code, f"{node.api}{path}", timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def status_path(status: dict, other_id: str) -> str | None:
    """The path one node's status (Node.status()) reports for its connection to `other_id`."""
    p = next((p for p in status.get("meshd", {}).get("peers", []) if p["announcement"]["node_id"] == other_id), None)
    return (p.get("path") or {}).get("path") if p and p["connected"] else None


def lane_path(status: dict, other_id: str) -> str | None:
    """The path of the QUIC data lane's connection to `other_id` in one node's status."""
    return next((t["path"] for t in status.get("gatewayd", {}).get("tunnels", []) if t["node_id"] == other_id), None)


def path_of(node: Node, other: Node) -> str | None:
    p = peer(node, other)
    return (p.get("path") or {}).get("path") if p and p["connected"] else None


def answers(node: Node, max_tokens: int = 8) -> dict | None:
    answer = ask(node, max_tokens)
    return answer if answer["status"] == 200 and answer["tokens"] > 0 else None


def decode_tok_s(node: Node, max_tokens: int = 48) -> float | None:
    """llama-server's own decode speed for one answer asked at `node`'s :9337 (None if no answer)."""
    answer = answers(node, max_tokens)
    return None if answer is None else (answer["server_tok_s"] or -1.0)


def test_two_homes_behind_cone_nats_get_a_punched_path(lab, tmp_path):
    public = lab.public_site("pub", 2)
    home_a, home_b = lab.home_site("a", 1), lab.home_site("b", 2)
    with mesh(tmp_path, public, ("a", home_a, ["--client"], STUN_ENV), ("b", home_b, ["--client"], STUN_ENV)) \
            as (started, (p, a, b)):
        nat = p.status()["meshd"]["nat"]
        assert nat["behaviour"] == "no NAT" and nat["public"][0] == public.address, nat
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


def test_symmetric_nat_is_reported(lab, tmp_path):
    public = lab.public_site("pub", 2)
    home = lab.home_site("s", 1, symmetric=True)
    with mesh(tmp_path, public, ("s", home, ["--client"], STUN_ENV)) as (_, (p, s)):
        wait_until(lambda: path_of(s, p) == "direct", timeout=60, interval=0.5, what="the NATed node joined")
        nat = s.status()["meshd"]["nat"]
        assert nat["behaviour"] == "symmetric" and "relay" in nat["detail"], nat
        me = s.status()["meshd"]["me"]
        assert me["public_addrs"] and me["public_addrs"][0][0] == home.public_ip  # its IP, for relays' permissions
        # Its mappings are offered for checks, after its public IP with its own port: they answer only once the
        # NAT keeps one mapping per socket (reconfigured), whichever of them it keeps (common.nat.candidates).
        mapped = [list(server["mapped"]) for server in nat["servers"] if server["mapped"]]
        predicted = me["mesh_addrs"].index([home.public_ip, me["mesh_addrs"][0][1]])
        assert mapped and predicted < min(me["mesh_addrs"].index(m) for m in mapped), me


def test_an_unanswering_stun_server_costs_seconds_and_says_so(lab, tmp_path):
    public = lab.public_site("pub", 2)
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env={"MESH_STUN": f"{nat_lab.STUN_IP}:3999"})
    try:
        started = time.monotonic()
        p.start()
        p.token()
        assert time.monotonic() - started < 30
        errors = p.status()["meshd"]["errors"]
        assert any("no answer from" in e and "3999" in e for e in errors), errors
    finally:
        p.stop()


def test_symmetric_and_cone_homes_meet_through_the_relay_which_sees_only_ciphertext(relay_lab, tmp_path):
    lab = relay_lab
    capture = tmp_path / "relay.frames"
    sniffer = subprocess.Popen(["ip", "netns", "exec", lab.relay_ns, sys.executable, "-m",
                                "tests.support.sniff", str(capture)], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert sniffer.stdout.readline().strip() == "capturing"
        public = lab.public_site("pub", 2)
        home_s, home_c = lab.home_site("s", 1, symmetric=True), lab.home_site("c", 2)
        with mesh(tmp_path, public, ("s", home_s, ["--client"], RELAY_ENV), ("c", home_c, ["--client"], RELAY_ENV)) \
                as (started, (p, s, c)):
            wait_until(lambda: path_of(s, c) == "relayed" and path_of(c, s) == "relayed", timeout=120, interval=0.5,
                       what="the symmetric and the cone home connected through the relay")
            print(f"nat: join -> relayed path in {time.monotonic() - started:.1f} s")
            relays = s.status()["meshd"]["relays"]
            assert relays and relays[0]["relayed"][0] == nat_lab.STUN_IP and not relays[0]["error"], relays
            wait_until(lambda: relay_bytes([s, c]) > 2000, timeout=30, interval=0.5, what="gossip through the relay")
            print(f"nat: the two nodes' relays carried {relay_bytes([s, c])} bytes of QUIC so far")
            assert TURN_PASS not in json.dumps(s.status())  # the status names the relay, never its password
            secret = json.loads((p.home / "mesh.json").read_text())["secret"]
            ids = [s.node_id(), c.node_id()]
    finally:
        sniffer.terminate()
        sniffer.wait(timeout=30)
    from tests.support.sniff import read_frames
    seen = b"".join(read_frames(str(capture)))
    assert TURN_USER.encode() in seen, "the capture saw the relay's own (plaintext) TURN requests"
    assert len(seen) > 20000, len(seen)
    for marker in (secret, *ids, '"gossip"'):
        assert marker.encode() not in seen, f"{marker!r} crossed the relay in plaintext"
    print(f"nat: the relay's segment carried {len(seen)} bytes; no secret, node id or gossip text in them")


def test_split_between_two_cone_homes_serves_everywhere(lab, tmp_path):
    """Two hosts behind separate cone NATs split the model over a punched path (no weights move);
    a lite client behind a third NAT and the public rendezvous node answer too."""
    public = lab.public_site("pub", 2)
    homes = [lab.home_site(name, i) for i, name in ((1, "a"), (2, "b"), (3, "c"))]
    with mesh(tmp_path, public, ("a", homes[0], ["--split", "--max-vram", "8G"], STUN_ENV),
              ("b", homes[1], ["--split", "--max-vram", "4G"], STUN_ENV),
              ("c", homes[2], ["--client"], STUN_ENV)) as (started, (p, a, b, c)):
        wait_split_serving(a, {a.node_id(), b.node_id()})
        speed = wait_until(lambda: decode_tok_s(a), timeout=120, interval=1.0, what="an answer at the host")
        served_at = time.monotonic() - started
        speed = max(speed, *(decode_tok_s(a) or 0 for _ in range(2)))  # the first answer also warms the path up
        print(f"nat: join -> split serving across two cone NATs in {served_at:.1f} s; "
              f"decode {speed:.1f} tok/s at the host over the punched QUIC lane")
        for n in (b, c, p):
            assert wait_until(lambda: answers(n), timeout=120, interval=1.0, what=f"{n.home.name} answering")
        assert path_of(a, b) == "punched" and path_of(b, a) == "punched"
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == b.node_id())
        assert tunnel["lane"] == "quic" and tunnel["path"] == "direct" and tunnel["bytes_out"] > 0, tunnel
        weights = {w["node_id"]: w for w in a.runner().get("weights", [])}
        assert weights[b.node_id()]["sent_bytes"] == 0 and weights[b.node_id()]["local_bytes"] > 0, weights


def test_a_public_host_that_drops_unsolicited_inbound_joins_outbound_and_serves(lab, tmp_path):
    """The firewalled node is the restricted side: it joins (dials out) and the reachable side waits.
    Here the firewalled node hosts the model and the reachable one is a lite client."""
    open_site = lab.public_site("pub", 2)
    walled = lab.public_site("fw", 5, drop_inbound=True)
    with mesh(tmp_path, open_site, ("f", walled, [], STUN_ENV)) as (started, (p, f)):
        wait_until(lambda: answers(p), timeout=240, interval=1.0, what="the lite client answering")
        print(f"nat: join -> serving with a firewalled public host in {time.monotonic() - started:.1f} s")
        assert answers(f)
        assert path_of(f, p) == "direct" and path_of(p, f) == "direct"
        assert f.status()["meshd"]["nat"]["behaviour"] == "no NAT"
        tunnel = next(t for t in p.status()["gatewayd"]["tunnels"] if t["node_id"] == f.node_id())
        assert tunnel["lane"] == "quic", tunnel  # TCP to the firewalled host cannot connect; its UDP hole can


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
    assert len(failed) == 1 and "cannot reach the inviting node" in failed[0] and "keeps retrying" in failed[0], up.stderr
    assert took < 45, took  # the dials give up after seconds, not a hang
    print(f"nat: a token with only dead addresses: `meshctl up -d --join` failed in {took:.1f} s: {failed[0]}")


def test_a_node_started_before_its_inviter_keeps_retrying_and_joins_once_the_inviter_starts(tmp_path):
    """The laptop starts before the home desktop: `meshctl up --join` whose inviter is down runs alone,
    says in `meshctl status` that it retries the token's address, and joins once the inviter is up."""
    from tests.integration.harness import meshctl
    from tests.support.procs import free_port
    port = free_port()
    inviter = Node(tmp_path / "desktop", extra=["--client", "--bind-port", str(port)])  # the token's port, again
    laptop = Node(tmp_path / "laptop", extra=["--client"])
    try:
        inviter.start()
        token, inviter_id = inviter.token(), inviter.node_id()
        inviter.stop()
        laptop.start("--join", token)

        def retrying() -> dict | None:
            return next((j for j in laptop.status().get("meshd", {}).get("joining", [])
                         if j["node_id"] == inviter_id and j.get("retry_in_s") is not None), None)
        first = wait_until(retrying, timeout=90, interval=0.5, what="the laptop retrying the join")
        text = meshctl("status", home=laptop.home, timeout=30).stdout
        assert "joining: retrying " in text and f":{port}" in text and "failed)" in text, text
        assert path_of(laptop, inviter) is None
        inviter.start()
        back = time.monotonic()
        wait_until(lambda: any(p["announcement"]["node_id"] == inviter_id and p["connected"]
                               for p in laptop.status().get("meshd", {}).get("peers", [])),
                   timeout=90, interval=0.5, what="the laptop joined once the inviter is up")
        took = time.monotonic() - back
        mesh = laptop.status()["meshd"]
        assert mesh["mesh_id"] == inviter.status()["meshd"]["mesh_id"] and not mesh.get("joining"), mesh
        print(f"nat: a node started before its inviter retried ({first['attempts']} failed, next in "
              f"{first['retry_in_s']:.0f} s) and joined {took:.1f} s after the inviter started")
    finally:
        laptop.stop()
        inviter.stop()


def rpc_arg(pid: int) -> str:
    """llama-server's --rpc value (the host's local forward ports, one per worker)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return args[args.index("--rpc") + 1]


def test_losing_the_relay_spares_punched_paths_and_relayed_requests_fail_cleanly_until_it_returns(relay_lab, tmp_path):
    """Host A behind a cone NAT serves alone; lite clients: P on the public segment (direct path to A),
    C behind another cone NAT (punched), S behind a symmetric NAT (only the relay reaches A). The
    decode rate each client sees is printed per path. Then the relay dies: A, P and C answer as before
    over their own paths; S's requests wait, then fail with a clear error (no hang), and its status says
    why; the relay comes back and S answers through it again."""
    lab = relay_lab
    public = lab.public_site("pub", 2)
    home_a, home_c, home_s = lab.home_site("a", 1), lab.home_site("c", 2), lab.home_site("s", 3, symmetric=True)
    s_env = RELAY_ENV | {"MESH_WAIT_FOR_HOST": "10"}  # how long S's gateway waits for a host before it says no
    with mesh(tmp_path, public, ("a", home_a, [], RELAY_ENV), ("c", home_c, ["--client"], RELAY_ENV),
              ("s", home_s, ["--client"], s_env)) as (started, (p, a, c, s)):
        served = {}
        for n in (a, p, c, s):
            wait_until(lambda: answers(n), timeout=300, interval=1.0, what=f"{n.home.name} answering")
            served[n.home.name] = time.monotonic() - started
        wait_until(lambda: path_of(c, a) == "punched" and path_of(s, a) == "relayed", timeout=60, interval=0.5,
                   what="C punched and S relayed to the host")
        assert path_of(p, a) == "direct"
        rates: dict[str, float] = {}
        for _ in range(2):  # interleaved, so a change in the machine's load hits every path alike
            for n, kind in ((p, "direct"), (c, "punched"), (s, "relayed")):
                got = answers(n, 48)
                rates[kind] = max(rates.get(kind, 0.0), (got or {}).get("client_tok_s") or 0.0)
        host_rate = max(x for x in (decode_tok_s(a) for _ in range(2)) if x)
        print("nat: join -> serving: " + ", ".join(f"{k} {v:.1f} s" for k, v in served.items()) +
              "; decode seen by a lite client of the same host: " +
              ", ".join(f"{k} {v:.1f} tok/s" for k, v in rates.items()) + f" (at the host {host_rate:.1f} tok/s)")
        print(f"nat: the relay carried {relay_bytes([a, c, s]) + relay_bytes([a, c, s], 'gatewayd')} bytes so far")

        lab.kill_relay()
        for n in (a, p, c):  # their paths never used the relay
            assert answers(n), f"{n.home.name} stopped answering when the relay died"
        assert path_of(c, a) == "punched" and path_of(a, c) == "punched"

        refused = ask(s, timeout=120)
        assert refused["status"] >= 400 and refused["seconds"] < 90, refused
        assert "error" in json.loads(refused["error"]), refused  # an OpenAI-style error, not a cut connection
        wait_until(lambda: any("allocating again" in e for e in s.status()["meshd"]["errors"]), timeout=30,
                   interval=0.5, what="S's status saying the relay is lost")
        print(f"nat: relay killed: A, P and C kept answering; S's request ended after {refused['seconds']:.1f} s with "
              f"{refused['status']}: {json.loads(refused['error'])['error'].get('message', '')[:120]}")

        lab.start_relay()
        back = time.monotonic()
        wait_until(lambda: answers(s), timeout=150, interval=1.0, what="S answering once the relay is back")
        print(f"nat: relay back: S answering again {time.monotonic() - back:.1f} s later")
        assert path_of(s, a) == "relayed" and answers(c)


def test_split_with_a_host_behind_a_symmetric_nat_serves_through_the_relay_then_moves_to_a_punch(relay_lab, tmp_path):
    """The worker S behind a symmetric NAT serves its part of a split through the relay. Then its
    router starts keeping ports: the pair moves to a punched path within seconds while requests
    keep going at the host, none lost, and the host's llama-server keeps running with the same
    --rpc forward ports."""
    lab = relay_lab
    public = lab.public_site("pub", 2)
    # S's router keeps an idle mapping 120 s (RFC 4787's least), so the mappings its STUN queries got are
    # still alive at the flip, whenever it comes: a new flow may then reuse one of those instead of the relay's.
    home_a, home_s = lab.home_site("a", 1), lab.home_site("s", 2, symmetric=True, udp_timeout=120)
    with mesh(tmp_path, public, ("a", home_a, ["--split", "--max-vram", "8G"], RELAY_ENV),
              ("s", home_s, ["--split", "--max-vram", "4G"], RELAY_ENV)) as (started, (p, a, s)):
        wait_split_serving(a, {a.node_id(), s.node_id()})
        speed = wait_until(lambda: decode_tok_s(a), timeout=120, interval=1.0, what="an answer at the host")
        served_at = time.monotonic() - started
        speed = max(speed, *(decode_tok_s(a) or 0 for _ in range(2)))
        print(f"nat: join -> split serving through the relay in {served_at:.1f} s; decode {speed:.1f} tok/s")
        assert wait_until(lambda: answers(s), timeout=120, interval=1.0, what="the relayed worker answering")
        assert answers(p)
        assert path_of(a, s) == "relayed" and path_of(s, a) == "relayed"
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == s.node_id())
        assert tunnel["lane"] == "quic" and tunnel["path"] == "relayed" and tunnel["bytes_out"] > 0, tunnel
        weights = {w["node_id"]: w for w in a.runner().get("weights", [])}
        assert weights[s.node_id()]["sent_bytes"] == 0, weights
        print(f"nat: the data lanes' relays carried {relay_bytes([a, s], 'gatewayd')} bytes")

        llama = a.runner()["llama"]
        forwards = rpc_arg(llama["pid"])
        results: list[dict] = []
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                results.append(ask(a, 16, timeout=120))
        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            wait_until(lambda: results, timeout=120, interval=0.2, what="a first request under way")
            a_id, s_id = a.node_id(), s.node_id()
            flipping = time.monotonic()
            lab.keep_ports(home_s)  # S's flows but the relay's are cut meanwhile (a NAT rebinding)
            flipped = time.monotonic()
            print(f"nat: {time.strftime('%H:%M:%S')} S's router keeps ports from now on (the flip took "
                  f"{flipped - flipping:.1f} s)")

            # One status of each node per poll, both at once: a poll of six `meshctl status` runs (path_of and
            # node_id each ask) took 10-30 s on a loaded machine, longer than the move it was timing.
            took = lane_took = None
            seen: list[str] = []
            with ThreadPoolExecutor(2) as pool:
                while time.monotonic() - flipped < 60 and (took is None or lane_took is None):
                    sa, ss = pool.map(lambda n: n.status(), (a, s))
                    state = (status_path(sa, s_id), status_path(ss, a_id), lane_path(sa, s_id))
                    now = time.monotonic() - flipped
                    if not seen or seen[-1].split(" ", 1)[1] != str(state):
                        seen.append(f"{now:.1f}s {state}")
                    if took is None and state[:2] == ("punched", "punched"):
                        took = now
                    if lane_took is None and state[2] == "direct":
                        lane_took = now
            print(f"nat: paths (A->S, S->A, data lane) after the flip: {'; '.join(seen)}")
            relayed_then, asked_then = relay_bytes([a, s], "gatewayd"), len(results)
            wait_until(lambda: len(results) >= asked_then + 2, timeout=120, interval=0.2,
                       what="two more answers after the move")
        finally:
            stop.set()
            asker.join(timeout=200)
        assert all(r["status"] == 200 and r["tokens"] > 0 for r in results), results
        now_serving = a.runner()["llama"]["pid"]
        assert rpc_arg(now_serving) == forwards  # the host's --rpc forward ports stay the same either way
        after = relay_bytes([a, s], "gatewayd") - relayed_then
        print(f"nat: NAT started keeping ports: mesh connection {'relayed -> punched in %.1f s' % took if took else 'still relayed'}, data lane "
              f"{'in %.1f s' % lane_took if lane_took else 'still relayed'}; {len(results)} requests at the host "
              f"during the move, none lost; llama-server kept --rpc {forwards}; data relay bytes after: {after}")
        assert took is not None, f"the mesh connection stayed on the relay for 60 s after the flip: {seen}"
        assert lane_took is not None, f"the QUIC data lane stayed on the relay for 60 s after the flip: {seen}"
        assert after < 20000, after  # the RPC traffic of two answers no longer crosses the relay
        assert now_serving == llama["pid"], "llama-server restarted: the mesh link dropped during the NAT flip"
