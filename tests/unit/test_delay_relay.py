"""The delay relay: exact bytes, the configured delay, counters, and no throughput cap."""
from __future__ import annotations

import asyncio
import os
import socket
import time

from tests.support.delay_relay import DelayRelay, DelayRelayThread, precise_event_loop

# Timers on a loaded 2-core machine wake late, never early: allow lateness, not earliness.
LATE_TOLERANCE_S = 0.015


def _run(coro):
    with asyncio.Runner(loop_factory=precise_event_loop) as runner:
        return runner.run(coro)


async def _start_echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()  # after the client's EOF

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _address(server: asyncio.Server) -> tuple[str, int]:
    return server.sockets[0].getsockname()[:2]


def test_relay_preserves_bytes_exactly_both_ways_and_counts_them():
    payload = os.urandom(8 * 1024 * 1024)

    async def scenario() -> None:
        echo = await _start_echo_server()
        async with DelayRelay(_address(echo), rtt_ms=10) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)

            async def send() -> None:
                for i in range(0, len(payload), 100_003):  # odd sizes: no chunk boundary is special
                    writer.write(payload[i:i + 100_003])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(-1), 30)
            await sender
            writer.close()
            assert received == payload
            stats = relay.snapshot()
            assert stats.bytes_to_server == len(payload)
            assert stats.bytes_to_client == len(payload)
            assert stats.connections == 1
        echo.close()

    _run(scenario())


def test_relay_delays_each_round_trip_by_the_rtt_and_counts_round_trips():
    rtt_ms, exchanges = 40, 5

    async def scenario() -> None:
        echo = await _start_echo_server()
        async with DelayRelay(_address(echo), rtt_ms=rtt_ms) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)
            durations = []
            for _ in range(exchanges):
                started = time.monotonic()
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                durations.append(time.monotonic() - started)
            writer.close()
            assert min(durations) >= rtt_ms / 1000
            assert sorted(durations)[exchanges // 2] < rtt_ms / 1000 + LATE_TOLERANCE_S
            assert relay.snapshot().round_trips == exchanges
        echo.close()

    _run(scenario())


def test_one_way_delays_can_differ():
    async def scenario() -> None:
        echo = await _start_echo_server()
        async with DelayRelay(_address(echo), delay_to_server_ms=30, delay_to_client_ms=0) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)
            started = time.monotonic()
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 5)
            elapsed = time.monotonic() - started
            writer.close()
            assert 0.030 <= elapsed < 0.030 + LATE_TOLERANCE_S
        echo.close()

    _run(scenario())


def test_delay_adds_latency_without_capping_throughput():
    # 16 MB in 64 KB writes with 25 ms each way: a relay that slept per chunk would need seconds.
    payload = os.urandom(16 * 1024 * 1024)

    async def scenario() -> float:
        arrived = asyncio.get_running_loop().create_future()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = len(await reader.read(-1))
            arrived.set_result((size, time.monotonic()))
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        async with DelayRelay(_address(server), rtt_ms=50) as relay:
            _, writer = await asyncio.open_connection(*relay.address)
            started = time.monotonic()
            for i in range(0, len(payload), 65536):
                writer.write(payload[i:i + 65536])
                await writer.drain()
            writer.write_eof()
            size, finished = await asyncio.wait_for(arrived, 30)
            writer.close()
        server.close()
        assert size == len(payload)
        return finished - started

    elapsed = _run(scenario())
    assert 0.025 <= elapsed < 1.0


def test_thread_wrapper_relays_for_blocking_code():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        target = listener.getsockname()[:2]
        with DelayRelayThread(target, rtt_ms=20) as relay_thread:
            with socket.create_connection(relay_thread.address, timeout=5) as client:
                conn, _ = listener.accept()
                with conn:
                    started = time.monotonic()
                    client.sendall(b"hello")
                    assert conn.recv(5) == b"hello"
                    conn.sendall(b"world")
                    assert client.recv(5) == b"world"
                    elapsed = time.monotonic() - started
            stats = relay_thread.snapshot()
    assert 0.020 <= elapsed < 0.020 + LATE_TOLERANCE_S
    assert (stats.bytes_to_server, stats.bytes_to_client, stats.round_trips) == (5, 5, 1)


def test_udp_relay_delays_each_datagram_both_ways_and_keeps_them_all():
    from tests.support.delay_relay import UdpDelayRelay

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        echo_addr = echo_transport.get_extra_info("sockname")[:2]
        async with UdpDelayRelay(echo_addr, rtt_ms=40) as relay:
            got: asyncio.Queue = asyncio.Queue()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data, addr):
                    got.put_nowait((time.monotonic(), data))

            client, _ = await loop.create_datagram_endpoint(Client, remote_addr=relay.address)
            sent_at = time.monotonic()
            payloads = [os.urandom(1200) for _ in range(50)]
            for p in payloads:
                client.sendto(p)
            received = [await asyncio.wait_for(got.get(), 5) for _ in payloads]
            assert [data for _, data in received] == payloads  # all of them, in order, unchanged
            first_rtt = received[0][0] - sent_at
            assert 0.040 <= first_rtt < 0.040 + LATE_TOLERANCE_S * 2
            stats = relay.snapshot()
            assert stats.bytes_to_server == stats.bytes_to_client == 50 * 1200 and stats.connections == 1
            client.close()
        echo_transport.close()

    _run(scenario())
