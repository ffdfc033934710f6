"""The mesh protocol version in the authenticated challenge exchange (common/quic/auth.py)."""
import asyncio
import json

import pytest

from common.identity import AuthError, NodeIdentity
from common.messages import MESH_PROTOCOL
from common.quic.auth import (MISMATCHES, ProtocolMismatch, ProtocolMismatches, answer_server, challenge_dialer,
                              check_verdict, protocol_refusal, verdict_frame)


def test_the_refusal_names_the_peer_and_both_versions():
    assert protocol_refusal("ab" * 32, MESH_PROTOCOL, MESH_PROTOCOL) is None
    assert protocol_refusal("ab" * 32, 1, 2) == \
        f"peer {'ab' * 32} runs mesh protocol 1, this node runs 2: upgrade both to the same release"
    assert "runs mesh protocol ?," in protocol_refusal("x", "2", 2)  # not a number: refused all the same
    assert "runs mesh protocol ?," in protocol_refusal("x", True, 1)


def test_refusals_are_shown_for_a_while_and_news_only_once():
    seen = ProtocolMismatches()
    assert seen.note("p", "line", now=100.0)
    assert not seen.note("p", "line", now=110.0)  # redialled: logged once
    assert seen.lines(now=110.0 + seen.KEEP_S) == ["line"]
    assert seen.lines(now=111.0 + seen.KEEP_S) == []
    seen.forget("p")
    assert seen.note("p", "line", now=120.0)


def run_exchange(tmp_path, server_protocol, dialer_protocol):
    """One exchange over two queues (JSON-encoded, as on the wire): (server's outcome, dialer's outcome)."""
    server, dialer = NodeIdentity.load_or_create(tmp_path / "s"), NodeIdentity.load_or_create(tmp_path / "d")

    async def main():
        to_server, to_dialer = asyncio.Queue(), asyncio.Queue()

        def sender(queue):
            async def send(*frames):
                for frame in frames:
                    await queue.put(json.loads(json.dumps(frame)))
            return send

        async def serve():
            try:
                node_id, _, _ = await challenge_dialer(server, "ctx", to_server.get, sender(to_dialer), timeout=5,
                                                       protocol=server_protocol)
            except AuthError as exc:
                await to_dialer.put(verdict_frame(False, exc.reason))  # the connection's close, in short
                return exc
            await to_dialer.put(verdict_frame(True))
            return node_id

        async def dial():
            try:
                check_verdict(await answer_server(dialer, "ctx", server.node_id, to_dialer.get, sender(to_server),
                                                  protocol=dialer_protocol))
            except AuthError as exc:
                return exc
            return "admitted"
        return await asyncio.gather(serve(), dial())
    return asyncio.run(main()), server.node_id, dialer.node_id


def test_the_same_protocol_is_admitted(tmp_path):
    (served, dialed), _, dialer_id = run_exchange(tmp_path, MESH_PROTOCOL, MESH_PROTOCOL)
    assert (served, dialed) == (dialer_id, "admitted")


def test_another_protocol_is_refused_with_one_line_on_both_sides(tmp_path, caplog):
    (served, dialed), server_id, dialer_id = run_exchange(tmp_path, 2, 3)
    assert isinstance(served, ProtocolMismatch) and isinstance(dialed, ProtocolMismatch)
    assert served.reason == f"peer {dialer_id} runs mesh protocol 3, this node runs 2: upgrade both to the same release"
    assert dialed.reason == f"peer {server_id} runs mesh protocol 2, this node runs 3: upgrade both to the same release"
    assert served.reason in MISMATCHES.lines() and dialed.reason in MISMATCHES.lines()  # for meshd's status
    assert served.reason in caplog.text and dialed.reason in caplog.text


@pytest.mark.parametrize("old", ["server", "dialer"])
def test_a_peer_that_says_no_protocol_is_an_aioquic_build_and_is_refused(tmp_path, old):
    # protocol=None: frames without the field, as the builds before it sent them (they check nothing)
    (served, dialed), server_id, dialer_id = run_exchange(tmp_path, None if old == "server" else MESH_PROTOCOL,
                                                          None if old == "dialer" else MESH_PROTOCOL)
    new_side = dialed if old == "server" else served
    assert isinstance(new_side, ProtocolMismatch)
    other = server_id if old == "server" else dialer_id
    assert new_side.reason == (f"peer {other} runs mesh protocol 1, this node runs {MESH_PROTOCOL}: "
                               f"upgrade both to the same release")
    if old == "dialer":  # the old dialer reads the new server's refusal as the reason it was refused
        assert isinstance(dialed, AuthError) and "runs mesh protocol 1" in dialed.reason
