"""TunnelService: forwards over both lanes, refusals, lane fallback, byte counters.

Run as a script (`python test_tunnels.py serve HOME ALLOWED_NODE_ID`), this module is the far
gateway of the two-process tests: a TunnelService whose "rpc" kind is a local echo server.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.identity import NodeIdentity  # noqa: E402
from services.gatewayd.tunnels import PeerDataAddrs, TunnelService  # noqa: E402
from tests.support.procs import wait_for_condition

pytestmark = pytest.mark.timeout(120)


async def start_echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
            writer.write_eof()  # half-close: echo everything, then EOF back
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_through(port: int, payload: bytes) -> bytes:
    """Send `payload` through a forward port, half-close, and collect the echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 100_000):
            writer.write(view[i:i + 100_000])
            await writer.drain()
        writer.write_eof()
    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(), 60)
    await sender
    writer.close()
    return received


async def refused_through(port: int) -> bytes:
    """A refused tunnel: the local client's connection is dropped without data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello?")
    try:
        data = await asyncio.wait_for(reader.read(), 15)
    except ConnectionError:
        data = b""
    writer.close()
    return data


@pytest.fixture
def identities(tmp_path: Path) -> tuple[NodeIdentity, NodeIdentity, NodeIdentity]:
    return tuple(NodeIdentity.load_or_create(tmp_path / name) for name in ("a", "b", "c"))  # type: ignore[return-value]


def start_far_gateway(home: Path, allowed: str) -> tuple[subprocess.Popen, PeerDataAddrs]:
    proc = subprocess.Popen([sys.executable, __file__, "serve", str(home), allowed], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("far gateway did not start")
    hello = json.loads(line)
    return proc, PeerDataAddrs(hello["node_id"], [tuple(a) for a in hello["tcp"]], [tuple(a) for a in hello["quic"]])


def far_stats(proc: subprocess.Popen) -> dict:
    proc.stdin.write("stats\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    proc.stdout.close()


@pytest.mark.parametrize("prefer, lane", [("tcp", "tls-tcp"), ("quic", "quic")])
def test_bytes_arrive_intact_across_processes(identities, tmp_path: Path, prefer: str, lane: str) -> None:
    a, _, _ = identities
    proc, far = start_far_gateway(tmp_path / "far", allowed=a.node_id)

    async def main():
        near = TunnelService(a, is_member=lambda n: n == far.node_id, local_target=lambda k: None,
                             bind_host="127.0.0.1", prefer=prefer)
        await near.start()
        port = await near.open_forward(far, "rpc")
        payloads = [os.urandom(3 << 20), b"x", os.urandom(70_000)]
        # concurrent tunnels over one forward port
        results = await asyncio.gather(*(echo_through(port, p) for p in payloads))
        for sent, got in zip(payloads, results):
            assert len(got) == len(sent) and hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
        total = sum(len(p) for p in payloads)
        stats = near.stats()[far.node_id]
        assert stats["lane"] == lane
        assert stats["bytes_out"] == total and stats["bytes_in"] == total
        await wait_for_condition(lambda: near.stats()[far.node_id]["streams"] == 0, 5, "tunnels to close")
        far_view = far_stats(proc)[a.node_id]
        assert far_view["bytes_in"] == total and far_view["bytes_out"] == total
        assert far_view["lane"] == lane and far_view["streams"] == 0
        await near.close()
    try:
        asyncio.run(main())
    finally:
        stop(proc)


@pytest.mark.parametrize("prefer", ["tcp", "quic"])
def test_refusals_carry_the_reason(identities, prefer: str) -> None:
    a, b, c = identities

    async def main():
        echo_server, echo_port = await start_echo_server()
        far = TunnelService(b, is_member=lambda n: n == a.node_id,
                            local_target=lambda kind: ("127.0.0.1", echo_port) if kind == "rpc" else None,
                            bind_host="127.0.0.1")
        tcp, quic = await far.start()
        far_addrs = PeerDataAddrs(b.node_id, tcp, quic)
        member = TunnelService(a, is_member=lambda n: True, local_target=lambda k: None,
                               bind_host="127.0.0.1", prefer=prefer)
        stranger = TunnelService(c, is_member=lambda n: True, local_target=lambda k: None,
                                 bind_host="127.0.0.1", prefer=prefer)
        await member.start()
        await stranger.start()
        # a non-member is refused
        port = await stranger.open_forward(far_addrs, "rpc")
        assert await refused_through(port) == b""
        await wait_for_condition(lambda: "not a member" in stranger.stats()[b.node_id]["last_error"], 5, "refusal")
        assert c.node_id not in far.stats()  # strangers get no entry (the table must stay bounded)
        # an unknown kind is refused
        port = await member.open_forward(far_addrs, "bogus")
        assert await refused_through(port) == b""
        await wait_for_condition(lambda: "no local service" in member.stats()[b.node_id]["last_error"], 5, "refusal")
        # a known kind works for the member, over the same service
        port = await member.open_forward(far_addrs, "rpc")
        assert await echo_through(port, b"still works") == b"still works"
        assert member.stats()[b.node_id]["bytes_out"] == len(b"still works")
        # a forward whose addresses lead to the wrong node fails the pin check
        port = await member.open_forward(PeerDataAddrs(c.node_id, tcp, quic), "rpc")
        assert await refused_through(port) == b""
        await wait_for_condition(lambda: "presented node id" in member.stats()[c.node_id]["last_error"], 10, "pin")
        for service in (member, stranger, far):
            await service.close()
        echo_server.close()
    asyncio.run(main())


@pytest.mark.parametrize("prefer", ["tcp", "quic"])
def test_allow_decides_who_opens_which_kind_and_unix_targets_work(identities, tmp_path: Path, prefer: str) -> None:
    """Least privilege: members pass `is_member`, then `allow` (which may take its time) says who may
    open what; an HTTP-style target can be a Unix socket, which other local users cannot reach."""
    a, b, c = identities

    async def main():
        echo_server, echo_port = await start_echo_server()
        unix_path = str(tmp_path / "api.sock")
        unix_server = await asyncio.start_unix_server(lambda r, w: echo_handle(r, w), unix_path)

        async def allow(dialer: str, kind: str):
            await asyncio.sleep(0.2)  # gatewayd waits a moment for its plan to agree with the host's
            return None if kind == "http" or dialer == a.node_id else f"node {dialer[:8]} is not the host"
        far = TunnelService(b, is_member=lambda n: True, allow=allow,
                            local_target=lambda kind: ("127.0.0.1", echo_port) if kind == "rpc" else unix_path,
                            bind_host="127.0.0.1")
        tcp, quic = await far.start()
        far_addrs = PeerDataAddrs(b.node_id, tcp, quic)
        host = TunnelService(a, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1",
                             prefer=prefer)
        other = TunnelService(c, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1",
                              prefer=prefer)
        await host.start()
        await other.start()
        port = await other.open_forward(far_addrs, "rpc")
        assert await refused_through(port) == b""
        await wait_for_condition(lambda: "not the host" in other.stats()[b.node_id]["last_error"], 5, "refusal")
        port = await other.open_forward(far_addrs, "http")
        assert await echo_through(port, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"
        port = await host.open_forward(far_addrs, "rpc")
        assert await echo_through(port, b"rpc from the host") == b"rpc from the host"
        for service in (host, other, far):
            await service.close()
        echo_server.close()
        unix_server.close()
    asyncio.run(main())


def test_a_flood_of_strangers_on_the_tls_lane_is_bounded_and_members_get_through(identities) -> None:
    """Strangers open many TCP connections to the TLS lane and sit on them (or finish TLS and never answer
    the challenge); the server keeps at most its cap of them, and a member's tunnels work throughout."""
    import socket
    import ssl
    from services.gatewayd.tunnels import MAX_UNAUTHENTICATED

    a, b, _ = identities
    flood_size = 4 * MAX_UNAUTHENTICATED

    async def main():
        echo_server, echo_port = await start_echo_server()
        far = TunnelService(b, is_member=lambda n: n == a.node_id, local_target=lambda k: ("127.0.0.1", echo_port),
                            bind_host="127.0.0.1")
        tcp, quic = await far.start()
        member = TunnelService(a, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1",
                               prefer="tcp")
        await member.start()
        port = await member.open_forward(PeerDataAddrs(b.node_id, tcp, quic), "rpc")
        loop = asyncio.get_running_loop()
        strangers = []
        for i in range(flood_size):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, tuple(tcp[0]))
            strangers.append(sock)
            if i % 16 == 0:  # a member keeps working while the flood goes on
                assert await asyncio.wait_for(echo_through(port, b"during"), 10) == b"during"
        # some strangers finish TLS and then say nothing
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        tls_strangers = [await asyncio.open_connection(*tcp[0], ssl=context) for _ in range(8)]
        assert await asyncio.wait_for(echo_through(port, b"after"), 10) == b"after"
        await asyncio.sleep(0.2)
        assert len(far._unauthenticated) <= MAX_UNAUTHENTICATED
        assert far.strangers_dropped >= flood_size - MAX_UNAUTHENTICATED

        def closed(sock: socket.socket) -> bool:
            try:
                return sock.recv(1) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True
        await wait_for_condition(lambda: sum(closed(s) for s in strangers) >= flood_size - MAX_UNAUTHENTICATED, 5,
                                 "the server to hang up on strangers past its cap")
        # and every stranger is gone once its time to prove itself is over
        await wait_for_condition(lambda: not far._unauthenticated, 10, "strangers timed out")
        for reader, writer in tls_strangers:  # they got the challenge, then the server hung up
            try:
                await asyncio.wait_for(reader.read(), 5)
            except (ConnectionError, ssl.SSLError):
                pass
            assert reader.at_eof() or reader.exception() is not None
            writer.close()
        for sock in strangers:
            sock.close()
        for service in (member, far):
            await service.close()
        echo_server.close()
    asyncio.run(main())


async def echo_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


def test_auto_falls_back_to_quic_and_remembers(identities) -> None:
    a, b, _ = identities

    async def main():
        echo_server, echo_port = await start_echo_server()
        far = TunnelService(b, is_member=lambda n: True, local_target=lambda k: ("127.0.0.1", echo_port),
                            bind_host="127.0.0.1")
        tcp, quic = await far.start()
        near = TunnelService(a, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1")
        await near.start()
        # The announced TCP address is dead (nothing listens there): auto must fall back to QUIC.
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        port = await near.open_forward(PeerDataAddrs(b.node_id, [("127.0.0.1", dead_port)], quic), "rpc")
        assert await echo_through(port, b"a" * 50_000) == b"a" * 50_000
        assert near.stats()[b.node_id]["lane"] == "quic" and near.lane_for(b.node_id) == "quic"
        tls_attempts = []
        open_tls = near._open_tls_tunnel

        async def counting_open_tls(*args):
            tls_attempts.append(args)
            return await open_tls(*args)
        near._open_tls_tunnel = counting_open_tls
        assert await echo_through(port, b"b" * 10) == b"b" * 10
        assert tls_attempts == []  # remembered: QUIC first, no TCP attempt
        # with a working TCP address, auto takes the fast lane
        port = await near.open_forward(PeerDataAddrs(b.node_id, tcp, quic), "http")
        near._tcp_failed_at.clear()
        assert await echo_through(port, b"c" * 10) == b"c" * 10
        assert near.stats()[b.node_id]["lane"] == "tls-tcp"
        await near.close()
        await far.close()
        echo_server.close()
    asyncio.run(main())


def test_close_forward_drops_its_tunnels(identities) -> None:
    a, b, _ = identities

    async def main():
        echo_server, echo_port = await start_echo_server()
        far = TunnelService(b, is_member=lambda n: True, local_target=lambda k: ("127.0.0.1", echo_port),
                            bind_host="127.0.0.1")
        tcp, quic = await far.start()
        near = TunnelService(a, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1")
        await near.start()
        port = await near.open_forward(PeerDataAddrs(b.node_id, tcp, quic), "rpc")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert near.stats()[b.node_id]["streams"] == 1
        await near.close_forward(port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await wait_for_condition(lambda: far.stats()[a.node_id]["streams"] == 0, 5, "far side to close")
        writer.close()
        await near.close()
        await far.close()
        echo_server.close()
    asyncio.run(main())


async def _serve_main(home: str, allowed: str) -> None:
    echo_server, echo_port = await start_echo_server()
    identity = NodeIdentity.load_or_create(Path(home))
    service = TunnelService(identity, is_member=lambda n: n == allowed,
                            local_target=lambda kind: ("127.0.0.1", echo_port) if kind == "rpc" else None,
                            bind_host="127.0.0.1")
    tcp, quic = await service.start()
    print(json.dumps({"node_id": identity.node_id, "tcp": tcp, "quic": quic}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "stats":
            print(json.dumps(service.stats()), flush=True)
    await service.close()
    echo_server.close()


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "serve":
    asyncio.run(_serve_main(sys.argv[2], sys.argv[3]))
