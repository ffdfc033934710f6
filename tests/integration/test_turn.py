"""The TURN client against a real coturn on loopback: credentials, a QUIC connection through the
relay (both directions), the move from the relayed path to the direct one without a new
connection (through our relay, and to the peer's relayed address), and a relay that restarts."""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess

import pytest

from common.identity import NodeIdentity
from common.nat.reach import EndpointReach
from common.nat.turn import TurnError, open_allocation
from common.quic import QuicEndpoint
from tests.support.procs import free_port, kill_process_tree, wait_until

pytestmark = pytest.mark.timeout(120)


def start_coturn(tmp_path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["turnserver", "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
                             "-p", str(port), "--allow-loopback-peers", "--lt-cred-mech", "--user", "mesh:pw",
                             "--realm", "mesh.test", "--no-tls", "--no-dtls", "--no-cli", "--log-file",
                             str(tmp_path / "coturn.log"), "--pidfile", str(tmp_path / "coturn.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: f"127.0.0.1:{port}" in subprocess.run(["ss", "-Hlun"], capture_output=True,
                                                             text=True).stdout, timeout=20, what="coturn")
    return proc


@pytest.fixture
def coturn(tmp_path):
    if shutil.which("turnserver") is None:
        pytest.skip("needs coturn (apt-get install -y coturn)")
    port = free_port()
    procs = [start_coturn(tmp_path, port)]
    try:
        yield port, procs  # a test may kill procs[0] and append a new one
    finally:
        for proc in procs:
            kill_process_tree(proc, grace=2)


async def echo(reader, writer):
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


@contextlib.asynccontextmanager
async def two_endpoints(tmp_path):
    """Nodes a and b, each with a QUIC endpoint on loopback that echoes every stream: (a, b, ea, eb, b's address)."""
    a, b = NodeIdentity.load_or_create(tmp_path / "a"), NodeIdentity.load_or_create(tmp_path / "b")
    serve = lambda c: setattr(c, "on_stream", echo)  # noqa: E731
    ea = QuicEndpoint(a, alpn="t/1", host="127.0.0.1", on_connection=serve)
    eb = QuicEndpoint(b, alpn="t/1", host="127.0.0.1", on_connection=serve)
    await ea.start()
    addr_b = await eb.start()
    try:
        yield a, b, ea, eb, addr_b
    finally:
        await ea.close()
        await eb.close()


async def exchange(connection, payload: bytes) -> bytes:
    reader, writer = await connection.open_stream()
    writer.write(payload)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), 30)


def test_quic_through_the_relay_then_direct(coturn, tmp_path):
    coturn, _ = coturn

    async def main():
        async with two_endpoints(tmp_path) as (a, b, ea, eb, addr_b):
            EndpointReach(ea), EndpointReach(eb)
            with pytest.raises(TurnError, match="refused the credentials"):
                await open_allocation(ea, f"turn:mesh:wrong@127.0.0.1:{coturn}")
            relay = await open_allocation(ea, f"turn:mesh:pw@127.0.0.1:{coturn}")
            assert relay.relayed[0] == "127.0.0.1" and relay.relayed[1] != coturn

            relayed = await ea.dial(addr_b, expected_node_id=b.node_id, path=relay)
            assert relayed.path_kind == "relayed"
            payload = b"through the relay " * 20000
            assert await exchange(relayed, payload) == payload
            assert relay.bytes_out > len(payload) and relay.bytes_in > 0
            seen_by_b = next(c for c in eb.connections if c.peer_node_id == a.node_id)
            assert tuple(seen_by_b.remote_address) == relay.relayed  # b only ever sees the relay

            inbound = await eb.dial(relay.relayed, expected_node_id=a.node_id)  # b dials a's relayed address
            assert await exchange(inbound, b"hello") == b"hello"
            seen_by_a = next(c for c in ea.connections if c.peer_node_id == b.node_id and not c.dialed)
            assert seen_by_a.path_kind == "relayed"  # a answers through its allocation
            before = relay.bytes_out + relay.bytes_in
            inbound.move_to(ea.local_address, eb.socket_path)  # a's direct address answered a check: b moves there
            assert await exchange(inbound, b"moved" * 2000) == b"moved" * 2000
            assert seen_by_a.path_kind == "direct"  # a answers the way b's datagrams now come
            assert relay.bytes_out + relay.bytes_in - before < 3000  # at most what was in flight at the move

            before = relay.bytes_out
            relayed.use_path(ea.socket_path)  # a punch succeeded: same connection, direct path
            assert await exchange(relayed, b"direct now" * 1000) == b"direct now" * 1000
            assert relay.bytes_out - before < 2000  # at most what was in flight at the switch
            assert tuple(seen_by_b.remote_address) == ea.local_address  # b follows the migration
            await relay.close()

    asyncio.run(main())


def test_an_allocation_comes_back_when_its_relay_restarts(coturn, tmp_path):
    """The relay dies (its allocations with it): the client says so within seconds, allocates again
    once the relay is back, tells its owner (a new relayed address to announce), and connections
    through the new allocation work."""
    port, procs = coturn

    async def main():
        async with two_endpoints(tmp_path) as (a, b, ea, eb, addr_b):
            relay = await open_allocation(ea, f"turn:mesh:pw@127.0.0.1:{port}")
            changes = []
            relay.on_change = lambda: changes.append(relay.relayed)
            kill_process_tree(procs.pop(), grace=2)
            lost_at = asyncio.get_running_loop().time()
            while relay.relayed is not None:
                await asyncio.sleep(0.1)
            assert asyncio.get_running_loop().time() - lost_at < 15  # a probe every few seconds
            assert "allocating again" in relay.error and changes == [None]
            procs.append(await asyncio.to_thread(start_coturn, tmp_path, port))
            while relay.relayed is None:
                await asyncio.sleep(0.1)
            assert changes[-1] == relay.relayed and not relay.error
            relayed = await ea.dial(addr_b, expected_node_id=b.node_id, path=relay)
            assert await exchange(relayed, b"back again" * 500) == b"back again" * 500
            await relay.close()

    asyncio.run(main())
