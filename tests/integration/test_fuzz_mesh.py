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
