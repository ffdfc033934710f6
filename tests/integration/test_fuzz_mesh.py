"""Hostile bytes at a running node's QUIC port: random datagrams from anyone, and malformed,
oversized or lying gossip from a peer that holds the secret. Its meshd must neither crash nor
restart, and the node keeps serving."""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.identity import NodeIdentity
from common.quic import QuicEndpoint
from common.tokens import admission_proof, decode_token
from services.meshd.main import ALPN, MAX_GOSSIP_FRAME
from tests.integration.harness import Node

pytestmark = pytest.mark.slow
FUZZ_CASES = 200


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("fuzz") / "a", extra=["--bind-host", "127.0.0.1"])
    try:
        n.start()
        n.wait_serving()
        yield n
    finally:
        n.stop()


def still_serving(node: Node, meshd_pid: int) -> None:
    assert node.service_pid("meshd") == meshd_pid, "meshd restarted: something crashed it"
    assert node.chat("Say hi.", max_tokens=2) is not None
    assert node.status()["meshd"]["node_id"]


def json_values():
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=12)


def announcement_like():
    """Dicts shaped like an announcement, with fields of every wrong type and size."""
    return st.fixed_dictionaries({}, optional={
        "kind": st.sampled_from(["announcement", "plan", ""]) | st.text(max_size=10),
        "node_id": st.text(max_size=70) | st.integers(), "seq": st.integers() | st.text(max_size=5),
        "role": st.sampled_from(["worker", "client", "host"]), "version": st.text(max_size=10),
        "memory_bytes": st.integers(min_value=-(1 << 70), max_value=1 << 70), "model_fingerprint": st.text(max_size=80),
        "mesh_addrs": st.lists(st.lists(json_values(), max_size=3), max_size=3), "data_tcp": json_values()})


def gossip_frames():
    return st.one_of(
        st.binary(max_size=300).map(lambda b: ("raw", b)),
        json_values().map(lambda v: ("json", v)),
        st.fixed_dictionaries({"t": st.sampled_from(["gossip", "leave", "x"]),
                               "anns": st.lists(announcement_like(), max_size=3) | json_values(),
                               "secret": json_values()}).map(lambda v: ("json", v)))


def encode(kind: str, value) -> bytes:
    body = value if kind == "raw" else json.dumps(value).encode()
    return struct.pack(">I", len(body)) + body


def test_well_formed_lies_from_a_member_are_not_believed(node, tmp_path):
    """A member that holds the secret sends signed-looking announcements for nodes it is not, its own
    announcement altered, replays, garbage rotations: none is believed, all are counted."""
    import base64

    from common.messages import Announcement
    from services.meshd.gossip import sign_announcement, sign_rotation

    meshd_pid = node.service_pid("meshd")
    token = decode_token(node.token())
    me = NodeIdentity.load_or_create(tmp_path / "liar")
    victim = NodeIdentity.load_or_create(tmp_path / "victim")  # a node that never joined

    def mine(seq: int, **kw) -> dict:
        return sign_announcement(Announcement(node_id=me.node_id, seq=seq, role="worker", version="t", **kw),
                                 token.mesh_id, me).model_dump(mode="json")
    genuine = mine(10)
    forged = sign_announcement(Announcement(node_id=victim.node_id, seq=5, role="worker", version="t",
                                            memory_bytes=1 << 45, host_ready=True), token.mesh_id, me)
    forged = forged.model_dump(mode="json")
    altered = dict(mine(11), memory_bytes=1 << 45, host_ready=True)
    victim_fake_key = dict(forged, public_key=base64.b64encode(victim.public_key_der).decode())
    frames = [
        {"t": "gossip", "anns": [genuine]},
        {"t": "gossip", "anns": [genuine, forged, victim_fake_key]},
        {"t": "gossip", "anns": [altered]},
        {"t": "gossip", "anns": [genuine], "secret": sign_rotation(token.mesh_id, 99, "zz" * 32, me)},
        {"t": "gossip", "anns": [genuine], "secret": {"mesh": token.mesh_id, "gen": 99, "secret": "ab" * 32}},
        {"t": "gossip", "anns": [genuine], "secret": sign_rotation(token.mesh_id, 99, "cd" * 32, victim)},
    ]

    async def lie() -> None:
        endpoint = QuicEndpoint(me, alpn=ALPN, host="127.0.0.1")
        await endpoint.start()
        try:
            claims = lambda nonce, server_id: {"mesh": token.mesh_id,  # noqa: E731
                                               "proof": admission_proof(token.secret, nonce, me.node_id, server_id)}
            conn = await endpoint.dial(tuple(token.addrs[0]), expected_node_id=token.node_id, claims_for=claims)
            _, writer = await conn.open_stream()
            for frame in frames:
                writer.write(encode("json", frame))
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        finally:
            await endpoint.close()
    asyncio.run(lie())
    status = node.status()["meshd"]
    believed = {p["announcement"]["node_id"]: p["announcement"] for p in status["peers"]}
    assert victim.node_id not in believed
    assert believed.get(me.node_id, {}).get("memory_bytes", 0) == 0
    dropped = status["gossip_dropped"]
    # forged: the victim's id under the liar's key; altered: the victim's key over a body it never signed,
    # and the liar's own announcement changed after signing
    assert dropped.get("forged", 0) >= 1 and dropped.get("altered", 0) >= 2 and dropped.get("bad_rotation", 0) >= 3
    assert decode_token(node.token()).secret == token.secret, "a garbage rotation changed the mesh secret"
    still_serving(node, meshd_pid)


def capped(value):
    """Any object body gets a tiny max_tokens: the default model is a base model that would otherwise
    write to the end of its context on every case."""
    return dict(value, max_tokens=1) if isinstance(value, dict) else value


def http_bodies():
    return st.one_of(st.binary(max_size=200), json_values().map(lambda v: json.dumps(capped(v)).encode()),
                     st.fixed_dictionaries({}, optional={
                         "model": json_values(), "messages": json_values() | st.lists(
                             st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | json_values(),
                                                    "content": json_values()}), max_size=3),
                         "prompt": json_values(), "max_tokens": st.integers(0, 4),
                         "stream": json_values(), "input": json_values(), "n_probs": json_values(),
                         "temperature": json_values()}).map(lambda v: json.dumps({"max_tokens": 1, **v}).encode()))


def test_random_bodies_at_every_http_route(node):
    """Every route of the API, any body: an answer (an OpenAI-style error when it is wrong), never a hang,
    a crash or a 500 of ours."""
    import httpx

    meshd_pid, gatewayd_pid = node.service_pid("meshd"), node.service_pid("gatewayd")
    routes = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
              ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/mesh/status"), ("GET", "/metrics"),
              ("POST", "/mesh/status"), ("PUT", "/v1/chat/completions"), ("GET", "/nope")]
    seen: dict[int, int] = {}
    with httpx.Client(base_url=node.api, timeout=120) as client:
        @settings(max_examples=FUZZ_CASES // 2, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(routes), http_bodies(),
               st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
        def fuzz(route, body, content_type):
            method, path = route
            r = client.request(method, path, content=body, headers={"content-type": content_type} if content_type else {})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500 or (r.headers.get("content-type", "").startswith("application/json")
                                           and "error" in r.json()), (method, path, body, r.status_code, r.text[:200])
            if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                assert isinstance(r.json(), dict)
        fuzz()
    print(f"HTTP fuzz: status codes {dict(sorted(seen.items()))}")
    assert node.service_pid("gatewayd") == gatewayd_pid
    still_serving(node, meshd_pid)


def test_random_datagrams_at_the_quic_port(node):
    meshd_pid = node.service_pid("meshd")
    host, port = node.status()["meshd"]["listen"][0]
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(FUZZ_CASES * 5):
            size = rng.choice([1, 20, 1200, 1252, 1500, rng.randint(1, 1500)])
            datagram = bytearray(os.urandom(size))
            if i % 2:  # looks like a QUIC long-header Initial so it gets past the first checks
                datagram[0] = 0xC0 | (datagram[0] & 0x0F)
                datagram[1:5] = b"\x00\x00\x00\x01"
            s.sendto(bytes(datagram), (host, port))
    still_serving(node, meshd_pid)


def test_malformed_gossip_from_a_member(node, tmp_path):
    """The worst a member can send: any bytes, any JSON, wrong shapes, a frame claiming 100 MB."""
    meshd_pid = node.service_pid("meshd")
    token = decode_token(node.token())
    me = NodeIdentity.load_or_create(tmp_path / "member")
    sent = {"cases": 0}

    async def connect(endpoint: QuicEndpoint):
        claims = lambda nonce, server_id: {"mesh": token.mesh_id,  # noqa: E731
                                           "proof": admission_proof(token.secret, nonce, me.node_id, server_id)}
        conn = await endpoint.dial(tuple(token.addrs[0]), expected_node_id=token.node_id, claims_for=claims)
        return conn, *(await conn.open_stream())

    async def send_all(frames: list[tuple[str, object]]) -> None:
        endpoint = QuicEndpoint(me, alpn=ALPN, host="127.0.0.1")
        await endpoint.start()
        try:
            conn, _, writer = await connect(endpoint)
            for kind, value in frames:
                writer.write(encode(kind, value))
                sent["cases"] += 1
            await asyncio.sleep(0.05)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass  # meshd hung up on us: fine, as long as it is alive
        finally:
            await endpoint.close()

    @settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(gossip_frames(), min_size=1, max_size=4))
    def fuzz(frames):
        asyncio.run(send_all(frames))
    fuzz()
    # A header that claims more than meshd accepts, and one that claims the maximum then stops.
    oversized = struct.pack(">I", 100 << 20) + b"{" * 1000
    stalled = struct.pack(">I", MAX_GOSSIP_FRAME) + b"{"

    async def raw(data: bytes) -> None:
        endpoint = QuicEndpoint(me, alpn=ALPN, host="127.0.0.1")
        await endpoint.start()
        try:
            _, _, writer = await connect(endpoint)
            writer.write(data)
            await asyncio.sleep(0.2)
        finally:
            await endpoint.close()
    asyncio.run(raw(oversized))
    asyncio.run(raw(stalled))
    print(f"gossip fuzz: {sent['cases']} frames from an admitted member")
    still_serving(node, meshd_pid)
    # The lying member is not part of the plan: it never offered a model or memory that adds up.
    plan = node.status()["electd"]
    assert plan["state"] == "solo" and plan["host"] == node.node_id()
