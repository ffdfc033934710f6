"""Nodes on another mesh protocol are refused with one line on both sides, over real QUIC on loopback.

The in-process tests pair QuicEndpoints that say different protocols (or none, as the aioquic builds
did); the node test dials a real node's meshd from such an endpoint, and has the node join one, and
reads both outcomes in `meshctl status` / `meshctl join`.
"""
from __future__ import annotations

import asyncio

import pytest

from common.identity import AuthError, NodeIdentity
from common.messages import MESH_PROTOCOL
from common.quic import QuicEndpoint
from common.quic.auth import MISMATCHES, ProtocolMismatch
from common.tokens import InviteToken, encode_token, new_secret
from tests.integration.harness import Node, meshctl
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(120)
ALPN = "mesh-test/1"
MESHD_ALPN = "mesh-inference/1"  # services/meshd/main.py
OTHER = MESH_PROTOCOL + 1  # a later release


def line(peer: str, theirs: int, ours: int) -> str:
    return f"peer {peer} runs mesh protocol {theirs}, this node runs {ours}: upgrade both to the same release"


@pytest.fixture
def identities(tmp_path):
    return tuple(NodeIdentity.load_or_create(tmp_path / name) for name in ("a", "b"))


def endpoints(a: NodeIdentity, b: NodeIdentity, protocol_a, protocol_b, admitted: list):
    ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1", on_connection=lambda c: admitted.append(("a", c.peer_node_id)))
    eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", on_connection=lambda c: admitted.append(("b", c.peer_node_id)))
    ea.protocol, eb.protocol = protocol_a, protocol_b  # the class says this build's; one instance plays another
    return ea, eb


def test_endpoints_on_the_same_protocol_connect_and_on_another_are_refused_both_ways(identities) -> None:
    a, b = identities

    async def main():
        admitted: list = []
        ea, eb = endpoints(a, b, MESH_PROTOCOL, MESH_PROTOCOL, admitted)
        addr_b = await eb.start()
        await ea.start()
        connection = await ea.dial(addr_b, expected_node_id=b.node_id)
        assert connection.authenticated
        await ea.close()
        await eb.close()

        ea, eb = endpoints(a, b, MESH_PROTOCOL, OTHER, admitted)
        addr_a, addr_b = await ea.start(), await eb.start()
        with pytest.raises(ProtocolMismatch) as a_dialing:
            await asyncio.wait_for(ea.dial(addr_b, expected_node_id=b.node_id), 20)
        assert a_dialing.value.reason == line(b.node_id, OTHER, MESH_PROTOCOL)
        with pytest.raises(ProtocolMismatch) as b_dialing:
            await asyncio.wait_for(eb.dial(addr_a, expected_node_id=a.node_id), 20)
        assert b_dialing.value.reason == line(a.node_id, MESH_PROTOCOL, OTHER)
        # and each server said so too (both ends share this process's record here)
        assert {line(a.node_id, MESH_PROTOCOL, OTHER), line(b.node_id, OTHER, MESH_PROTOCOL)} <= set(MISMATCHES.lines())
        assert admitted == [("b", a.node_id)]  # only the first pair's connection was ever admitted
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_a_peer_that_says_no_protocol_is_refused_as_the_aioquic_build(identities) -> None:
    a, old = identities

    async def main():
        admitted: list = []
        ea, eo = endpoints(a, old, MESH_PROTOCOL, None, admitted)  # None: says nothing, checks nothing
        addr_a, addr_o = await ea.start(), await eo.start()
        with pytest.raises(ProtocolMismatch) as dialing_old:
            await asyncio.wait_for(ea.dial(addr_o, expected_node_id=old.node_id), 20)
        assert dialing_old.value.reason == line(old.node_id, 1, MESH_PROTOCOL)
        with pytest.raises(AuthError) as old_dialing:  # the old build hears why, in the new node's words
            await asyncio.wait_for(eo.dial(addr_a, expected_node_id=a.node_id), 20)
        assert line(old.node_id, 1, MESH_PROTOCOL) in old_dialing.value.reason
        assert not [n for n, _ in admitted if n == "a"]  # the new node admitted nothing
        await ea.close()
        await eo.close()
    asyncio.run(main())


@pytest.mark.slow
def test_a_node_says_in_its_status_and_join_that_a_peer_runs_another_protocol(tmp_path) -> None:
    node = Node(tmp_path / "n", extra=["--client", "--bind-host", "127.0.0.1"])
    other = NodeIdentity.load_or_create(tmp_path / "other")
    node.start()
    try:
        me = node.node_id()
        listen = wait_until(lambda: node.status().get("meshd", {}).get("listen"), timeout=60, what="meshd listening")

        async def dial_and_be_dialed() -> tuple[str, str]:
            ep = QuicEndpoint(other, alpn=MESHD_ALPN, host="127.0.0.1")
            ep.protocol = OTHER
            addr = await ep.start()
            try:
                with pytest.raises(ProtocolMismatch) as refused:  # the node, as server, refuses us
                    await asyncio.wait_for(ep.dial(tuple(listen[0]), expected_node_id=me), 20)
                # The node as server: its status shows the peer it refused, and its log says so.
                status = await asyncio.to_thread(wait_until, lambda: (out := meshctl(
                    "status", home=node.home, timeout=30).stdout) and expected in out and out, timeout=30,
                    what="the refusal in meshctl status")
                token = encode_token(InviteToken(mesh_id="ab" * 8, secret=new_secret(), node_id=other.node_id,
                                                 addrs=(addr,)))
                joined = await asyncio.to_thread(meshctl, "join", token, home=node.home, timeout=60)
                return refused.value.reason, status, joined
            finally:
                await ep.close()
        expected = f"mesh error: {line(other.node_id, OTHER, MESH_PROTOCOL)}"
        refused, status, joined = asyncio.run(dial_and_be_dialed())
        assert refused == line(me, MESH_PROTOCOL, OTHER)
        assert status.count(line(other.node_id, OTHER, MESH_PROTOCOL)) == 1, status
        assert line(other.node_id, OTHER, MESH_PROTOCOL) in (node.home / "logs" / "meshd.log").read_text(errors="replace")
        # The node as dialer: `meshctl join` fails with that one line (not "the mesh refused this node").
        assert joined.returncode != 0
        assert f"join failed: {line(other.node_id, OTHER, MESH_PROTOCOL)}" in joined.stdout + joined.stderr, joined
    finally:
        node.stop()
