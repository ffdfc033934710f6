"""QuicEndpoint: dialing both ways over one socket, pinning, admission, streams, dead peers.

Run as a script (`python test_quic.py peer HOME`), this module is the peer process used by the
two-process tests: an endpoint that echoes every stream and dials whatever it is told to on stdin.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.identity import NodeIdentity  # noqa: E402
from common.quic import AuthError, PeerIdentityMismatch, QuicEndpoint, QuicPeerConnection  # noqa: E402
from tests.support.procs import wait_for_condition

ALPN = "mesh-test/1"
pytestmark = pytest.mark.timeout(90)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


def serve_echo(connection: QuicPeerConnection) -> None:
    connection.on_stream = echo


async def exchange(connection: QuicPeerConnection, payload: bytes) -> bytes:
    reader, writer = await connection.open_stream()
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return data


@pytest.fixture
def identities(tmp_path: Path) -> tuple[NodeIdentity, NodeIdentity, NodeIdentity]:
    return tuple(NodeIdentity.load_or_create(tmp_path / name) for name in ("a", "b", "c"))  # type: ignore[return-value]


def test_both_sides_dial_each_other_at_once_in_one_process(identities) -> None:
    a, b, _ = identities

    async def main():
        seen: dict[str, list] = {"a": [], "b": []}
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1",
                          authorize=lambda n, claims, nonce: seen["a"].append((n, claims)),
                          on_connection=serve_echo)
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1",
                          authorize=lambda n, claims, nonce: seen["b"].append((n, claims)),
                          on_connection=serve_echo)
        addr_a, addr_b = await ea.start(), await eb.start()
        a_to_b, b_to_a = await asyncio.gather(
            ea.dial(addr_b, expected_node_id=b.node_id, claims_for=lambda nonce, sid: {"from": "a"}),
            eb.dial(addr_a, expected_node_id=a.node_id, claims_for=lambda nonce, sid: {"from": "b"}))
        for connection in (a_to_b, b_to_a):
            serve_echo(connection)
        assert a_to_b.peer_node_id == b.node_id and a_to_b.dialed and a_to_b.claims == {}
        assert b_to_a.peer_node_id == a.node_id and b_to_a.dialed
        assert seen["b"] == [(a.node_id, {"from": "a"})] and seen["a"] == [(b.node_id, {"from": "b"})]
        # the accepted sides, and streams opened in every direction over all four ends
        await wait_for_condition(lambda: len(ea.connections) == 2 and len(eb.connections) == 2, 5, "accepts")
        accepted_by_b = next(c for c in eb.connections if not c.dialed)
        assert accepted_by_b.peer_node_id == a.node_id and accepted_by_b.claims == {"from": "a"}
        assert accepted_by_b.remote_address == ea.local_address
        results = await asyncio.gather(*(exchange(c, f"via {i}".encode() * 100)
                                         for i, c in enumerate(ea.connections + eb.connections)))
        assert results == [f"via {i}".encode() * 100 for i in range(4)]
        assert a_to_b.rtt() is not None and 0 < a_to_b.rtt() < 1
        await a_to_b.close()
        await asyncio.wait_for(accepted_by_b.wait_closed(), 5)  # the peer learns of the close
        assert a_to_b.is_closed and accepted_by_b.is_closed
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_pin_mismatch_is_an_auth_error(identities) -> None:
    a, b, c = identities

    async def main():
        accepted = []
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", on_connection=accepted.append)
        await ea.start()
        addr_b = await eb.start()
        with pytest.raises(PeerIdentityMismatch) as info:
            await ea.dial(addr_b, expected_node_id=c.node_id)
        assert info.value.reason == f"peer presented node id {b.node_id}, expected {c.node_id}"
        assert isinstance(info.value, AuthError)
        await asyncio.sleep(0.2)
        assert accepted == [] and ea.connections == []
        # no pin at all is allowed (e.g. a first contact) and reports who answered
        connection = await ea.dial(addr_b, expected_node_id=None)
        assert connection.peer_node_id == b.node_id
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_authorize_rejection_reaches_the_dialer(identities) -> None:
    a, b, _ = identities

    async def main():
        nonces = []

        def authorize(node_id: str, claims: dict, nonce: bytes):
            nonces.append((nonce, claims))
            return None if claims.get("token") == "good" else "bad invite token: ask for a new one"

        accepted = []
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", authorize=authorize, on_connection=accepted.append)
        await ea.start()
        addr_b = await eb.start()
        claimed = []

        def claims_for(nonce: bytes, server_id: str) -> dict:
            claimed.append((nonce, server_id))
            return {"token": "bad"}
        with pytest.raises(AuthError) as info:
            await ea.dial(addr_b, expected_node_id=b.node_id, claims_for=claims_for)
        assert info.value.reason == "bad invite token: ask for a new one"
        assert not isinstance(info.value, PeerIdentityMismatch)
        assert claimed[0][1] == b.node_id and nonces[0] == (claimed[0][0], {"token": "bad"})
        assert accepted == []
        # the endpoint is unharmed: a good dial right after works
        connection = await ea.dial(addr_b, expected_node_id=b.node_id,
                                   claims_for=lambda nonce, sid: {"token": "good"})
        assert connection.peer_node_id == b.node_id
        await wait_for_condition(lambda: len(accepted) == 1, 5, "accept")

        async def async_authorize(node_id, claims, nonce):
            await asyncio.sleep(0.01)
            return "async no"
        eb.authorize = async_authorize
        with pytest.raises(AuthError, match="async no"):
            await ea.dial(addr_b, expected_node_id=b.node_id)
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_unauthenticated_quic_peer_cannot_reach_on_stream(identities) -> None:
    """A plain QUIC client (qh3's own) completes the TLS handshake but never answers the challenge."""
    from qh3.asyncio import connect
    from qh3.quic.configuration import QuicConfiguration
    a, b, _ = identities

    async def main():
        streams = []
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", auth_timeout=1.0,
                          on_connection=lambda c: setattr(c, "on_stream", lambda r, w: streams.append((r, w))))
        host, port = await eb.start()
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
        # 1) opens a stream and sends data before authenticating: the server closes it at once
        async with connect(host, port, configuration=config, wait_connected=True) as client:
            reader, writer = await client.create_stream()
            writer.write(b"GET / let me in")
            await asyncio.wait_for(client.wait_closed(), 5)
        # 2) answers the challenge with garbage
        async with connect(host, port, configuration=config, wait_connected=True) as client:
            reader, writer = await client.create_stream()  # opens stream 0; the challenge is on stream 1
            writer.write(b"\x00\x00\x00\x05{bad}")
            await asyncio.wait_for(client.wait_closed(), 5)
        # 3) just sits there: closed when the auth timeout runs out
        started = time.monotonic()
        async with connect(host, port, configuration=config, wait_connected=True) as client:
            await asyncio.wait_for(client.wait_closed(), 5)
        assert time.monotonic() - started < 3
        assert streams == [] and eb.connections == []
        # and a real node still gets in afterwards
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        await ea.start()
        connection = await ea.dial((host, port), expected_node_id=b.node_id)
        reader, writer = await connection.open_stream()
        writer.write(b"hi")
        await wait_for_condition(lambda: len(streams) == 1, 5, "the real stream")
        writer.close()
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_oversized_auth_answer_closes_only_that_connection(identities) -> None:
    """A dialer whose answer frame claims 100 MB is cut off without hurting the endpoint."""
    from qh3.asyncio import connect
    from qh3.asyncio.protocol import QuicConnectionProtocol
    from qh3.quic import events
    from qh3.quic.configuration import QuicConfiguration
    a, b, _ = identities

    class Liar(QuicConnectionProtocol):
        def quic_event_received(self, event):
            if isinstance(event, events.StreamDataReceived) and event.stream_id == 1:
                self._quic.send_stream_data(1, (100 << 20).to_bytes(4, "big") + b"{" * 1000)
                self.transmit()

    async def main():
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", on_connection=serve_echo)
        host, port = await eb.start()
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
        async with connect(host, port, configuration=config, create_protocol=Liar) as client:
            await asyncio.wait_for(client.wait_closed(), 5)
            assert "larger than" in client._quic._close_event.reason_phrase
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        await ea.start()
        connection = await ea.dial((host, port), expected_node_id=b.node_id)
        assert await exchange(connection, b"still fine") == b"still fine"
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_dial_to_a_closed_port_fails_fast(identities) -> None:
    a, _, _ = identities

    async def main():
        import socket
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        await ea.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="refused"):
            await ea.dial(("127.0.0.1", dead_port), expected_node_id=None, timeout=5)
        assert time.monotonic() - started < 1.0  # ICMP port-unreachable, not the 5 s timeout
        await ea.close()
    asyncio.run(main())


@pytest.mark.parametrize("defer_acks", [False, True], ids=["acks-at-once", "deferred-acks"])
def test_ten_megabytes_echo_intact(identities, defer_acks: bool) -> None:
    a, b, _ = identities

    async def main():
        async def on_connection(connection: QuicPeerConnection) -> None:
            await asyncio.sleep(0.05)  # an async on_connection; streams wait for its on_stream
            serve_echo(connection)
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1", defer_acks=defer_acks)
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", defer_acks=defer_acks, on_connection=on_connection)
        await ea.start()
        connection = await ea.dial(await eb.start(), expected_node_id=b.node_id)
        payload = os.urandom(10 << 20)
        reader, writer = await connection.open_stream()

        async def send():
            view = memoryview(payload)
            for i in range(0, len(payload), 300_000):  # odd-sized writes
                writer.write(view[i:i + 300_000])
                await writer.drain()
            writer.write_eof()
        sender = asyncio.create_task(send())
        received = await asyncio.wait_for(reader.read(), 60)
        await sender
        assert len(received) == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        await ea.close()
        await eb.close()
    asyncio.run(main())


@pytest.mark.parametrize("defer_acks", [False, True], ids=["acks-at-once", "deferred-acks"])
def test_writer_backpressure_and_receive_window(identities, defer_acks: bool) -> None:
    """A peer that does not read stalls the writer's drain() within bounded buffers; once it
    reads, everything arrives."""
    a, b, _ = identities

    async def main():
        incoming: asyncio.Queue = asyncio.Queue()
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1", defer_acks=defer_acks)
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", defer_acks=defer_acks,
                          on_connection=lambda c: setattr(c, "on_stream", lambda r, w: incoming.put_nowait((r, w))))
        await ea.start()
        connection = await ea.dial(await eb.start(), expected_node_id=b.node_id)
        reader, writer = await connection.open_stream()
        chunk = os.urandom(1 << 20)
        written = 0

        async def write_forever():
            nonlocal written
            while True:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()
        task = asyncio.create_task(write_forever())
        peer_reader, _ = await asyncio.wait_for(incoming.get(), 5)
        await asyncio.sleep(1.0)
        stalled_at = written
        await asyncio.sleep(0.5)
        assert written == stalled_at, "drain() should block while the peer does not read"
        # bounded: the receive window + reader limits + our high-water mark, not the 1 MB * forever
        assert written < 16 << 20
        assert writer.transport.get_write_buffer_size() <= 8 << 20
        task.cancel()
        writer.write_eof()
        data = await asyncio.wait_for(peer_reader.read(), 30)
        assert len(data) == written
        writer.close()
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_a_read_larger_than_the_readers_limit_completes(identities) -> None:
    """readexactly() of more than the StreamReader holds before pausing the stream: the reader
    resumes the stream, and what was held while paused must still reach it (once, in order)."""
    a, b, _ = identities
    payload = os.urandom(3 << 20)

    async def serve(reader, writer):
        await reader.readexactly(1)
        writer.write(payload)
        await writer.drain()

    async def main():
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", on_connection=lambda c: setattr(c, "on_stream", serve))
        await ea.start()
        connection = await ea.dial(await eb.start(), expected_node_id=b.node_id)
        reader, writer = await connection.open_stream()
        for _ in range(2):
            writer.write(b"x")
            await asyncio.sleep(0.2)  # the whole answer arrives while nobody reads
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
            reader, writer = await connection.open_stream()
        await ea.close()
        await eb.close()
    asyncio.run(main())


def test_stream_reset_and_half_close(identities) -> None:
    a, b, _ = identities

    async def main():
        served: asyncio.Queue = asyncio.Queue()
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1",
                          on_connection=lambda c: setattr(c, "on_stream", lambda r, w: served.put_nowait((r, w))))
        await ea.start()
        connection = await ea.dial(await eb.start(), expected_node_id=b.node_id)
        # half-close: our EOF arrives, the other direction keeps working
        reader, writer = await connection.open_stream()
        writer.write(b"request")
        writer.write_eof()
        peer_reader, peer_writer = await asyncio.wait_for(served.get(), 5)
        assert await asyncio.wait_for(peer_reader.read(), 5) == b"request"
        peer_writer.write(b"response after EOF")
        peer_writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"response after EOF"
        writer.close()
        peer_writer.close()
        # abort: the peer's pending read fails instead of hanging
        reader, writer = await connection.open_stream()
        writer.write(b"x")
        peer_reader, peer_writer = await asyncio.wait_for(served.get(), 5)
        await peer_reader.readexactly(1)
        writer.transport.abort()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(peer_reader.read(), 5)
        peer_writer.close()
        await ea.close()
        await eb.close()
    asyncio.run(main())


# --- two processes -------------------------------------------------------------------------------

def start_peer(home: Path, idle_timeout: float = 10.0) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, __file__, "peer", str(home), str(idle_timeout)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("peer process did not start")
    hello = json.loads(line)
    return proc, hello["node_id"], hello["port"]


def stop_peer(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdin.close()
    proc.stdout.close()


def test_two_processes_dial_each_other_at_once(identities, tmp_path: Path) -> None:
    a, _, _ = identities
    proc, peer_id, peer_port = start_peer(tmp_path / "peer")

    async def main():
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1", on_connection=serve_echo)
        _, port = await ea.start()
        # Tell the peer to dial us, and dial it, at the same moment.
        proc.stdin.write(json.dumps({"dial": port, "node_id": a.node_id}) + "\n")
        proc.stdin.flush()
        connection = await ea.dial(("127.0.0.1", peer_port), expected_node_id=peer_id)
        serve_echo(connection)
        assert await exchange(connection, b"parent to child" * 1000) == b"parent to child" * 1000
        loop = asyncio.get_running_loop()
        report = json.loads(await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30))
        assert report == {"echoed": True, "peer": a.node_id}
        await wait_for_condition(lambda: len(ea.connections) == 2, 5, "the peer's own connection")
        await ea.close()
    try:
        asyncio.run(main())
    finally:
        stop_peer(proc)


def test_killed_peer_is_noticed_within_the_idle_timeout(identities, tmp_path: Path) -> None:
    a, _, _ = identities
    proc, peer_id, peer_port = start_peer(tmp_path / "peer")

    async def main():
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1")  # the default idle timeout: 10 s
        await ea.start()
        connection = await ea.dial(("127.0.0.1", peer_port), expected_node_id=peer_id)
        reader, writer = await connection.open_stream()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await asyncio.sleep(4)  # idle, but kept alive by pings: still connected
        assert not connection.is_closed
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def write_into_the_void():
            chunk = b"z" * (1 << 20)
            while True:  # nothing is acknowledged any more: drain() blocks, then must fail
                writer.write(chunk)
                await writer.drain()
        blocked_writer = asyncio.create_task(write_into_the_void())
        await asyncio.wait_for(connection.wait_closed(), 15)
        noticed_after = time.monotonic() - killed_at
        assert noticed_after <= 11.5, noticed_after
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(blocked_writer, 2)
        with pytest.raises(ConnectionError):  # a pending reader fails instead of hanging
            await asyncio.wait_for(reader.read(), 1)
        with pytest.raises(ConnectionError):
            await connection.open_stream()
        await ea.close()
    try:
        asyncio.run(main())
    finally:
        stop_peer(proc)


async def _peer_main(home: str, idle_timeout: float) -> None:
    identity = NodeIdentity.load_or_create(Path(home))
    endpoint = QuicEndpoint(identity, alpn=ALPN, host="127.0.0.1", on_connection=serve_echo,
                            idle_timeout=idle_timeout)
    _, port = await endpoint.start()
    print(json.dumps({"node_id": identity.node_id, "port": port}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        order = json.loads(line)
        connection = await endpoint.dial(("127.0.0.1", order["dial"]), expected_node_id=order["node_id"])
        payload = b"child to parent" * 1000
        ok = await exchange(connection, payload) == payload
        print(json.dumps({"echoed": ok, "peer": connection.peer_node_id}), flush=True)
    await endpoint.close()


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "peer":
    asyncio.run(_peer_main(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 10.0))


class _LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay between one dialer and `target` that can drop every `drop_every`-th datagram
    each way, and counts the ACK-only datagrams (short-header packets too small to carry data)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.client: tuple | None = None
        self.drop_every = 0
        self.seen = 0
        self.dropped = 0
        self.ack_only = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        to = self.target if addr != self.target else self.client
        if addr != self.target:
            self.client = addr
        if to is None:
            return
        self.seen += 1
        if not data[0] & 0x80 and len(data) < 60:
            self.ack_only += 1
        if self.drop_every and self.seen % self.drop_every == 0:
            self.dropped += 1
            return
        self.transport.sendto(data, to)


def test_deferred_acks_ride_the_replies_and_losses_are_still_recovered(identities) -> None:
    """With defer_acks (the data lane), a request's ACK goes out with its reply instead of alone;
    with every 7th datagram lost each way, requests and a bulk echo still complete intact."""
    a, b, _ = identities
    request, reply = os.urandom(9_700), os.urandom(2_500)  # a decode token's RPC exchange

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            kind = await reader.readexactly(1)
            if kind == b"q":
                await reader.readexactly(len(request) - 1)
                await asyncio.sleep(0.003)  # the worker computes
                writer.write(reply)
            else:  # a bulk echo of the given size
                size = int.from_bytes(await reader.readexactly(4), "big")
                writer.write(await reader.readexactly(size))
            await writer.drain()

    async def main():
        loop = asyncio.get_running_loop()
        ea = QuicEndpoint(a, alpn=ALPN, host="127.0.0.1", defer_acks=True)
        eb = QuicEndpoint(b, alpn=ALPN, host="127.0.0.1", defer_acks=True,
                          on_connection=lambda c: setattr(c, "on_stream", serve))
        await ea.start()
        target = await eb.start()
        transport, relay = await loop.create_datagram_endpoint(lambda: _LossyRelay(target), local_addr=("127.0.0.1", 0))
        connection = await ea.dial(transport.get_extra_info("sockname")[:2], expected_node_id=b.node_id)
        reader, writer = await connection.open_stream()

        async def exchanges(n: int) -> None:
            for _ in range(n):
                writer.write(b"q" + request[1:])
                assert await asyncio.wait_for(reader.readexactly(len(reply)), 5) == reply
        await exchanges(3)
        before = relay.ack_only
        await exchanges(20)
        # without deferral each exchange costs two ACK-only datagrams (40); a busy loop may miss a few
        assert relay.ack_only - before < 10, relay.ack_only - before

        relay.drop_every = 7
        await exchanges(30)
        payload = os.urandom(2 << 20)
        writer.write(b"e" + len(payload).to_bytes(4, "big") + payload)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert relay.dropped > 100 and connection._quic._core.loss_total > 0  # noqa: SLF001
        writer.close()
        transport.close()
        await ea.close()
        await eb.close()
    asyncio.run(main())
