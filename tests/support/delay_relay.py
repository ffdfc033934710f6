"""A TCP relay that injects a one-way delay in each direction and counts the traffic it carries.

The kernel here has no `netem`, so this relay is how tests and benchmarks add network delay. Each
chunk read from one side is stamped with a release time (arrival + one-way delay) and written to
the other side once due; reading goes on meanwhile, so a delay adds latency without capping
throughput (FIFO order per direction, backpressure when the far side or the queue is full). TLS can
be terminated on either side (`listen_ssl`, `target_ssl`), which makes a hop of a TLS lane.

It counts bytes per direction and "round trips": the times data comes back from the server after
the client last sent (a client→server to server→client direction change, per connection).
A new connection to the target is made without delay; only the bytes are delayed.

In-process (async):   relay = DelayRelay(("127.0.0.1", 50052), rtt_ms=10); await relay.start()
                      (on a `precise_event_loop()` for sub-millisecond timer accuracy)
In-process (thread):  with DelayRelayThread(("127.0.0.1", 50052), rtt_ms=10) as relay: relay.address
CLI:                  python -m tests.support.delay_relay --target 127.0.0.1:50052 --rtt-ms 10

UDP (`UdpDelayRelay`, CLI `--udp`): the same for datagrams, as a QUIC lane needs. Each client
address gets its own socket towards the target (as a NAT would give it its own mapping); every
datagram is delayed by the one-way delay, in order, none dropped.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import errno
import selectors
import signal
import socket
import ssl
import sys
import threading
from typing import Any, Coroutine, TypeVar

Address = tuple[str, int]
T = TypeVar("T")

# Per direction: past this many bytes waiting out their delay, stop reading the source (backpressure).
MAX_QUEUED_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass
class TrafficStats:
    bytes_to_server: int = 0
    bytes_to_client: int = 0
    round_trips: int = 0
    connections: int = 0

    @property
    def total_bytes(self) -> int:
        return self.bytes_to_server + self.bytes_to_client

    def __add__(self, other: TrafficStats) -> TrafficStats:
        return TrafficStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __sub__(self, other: TrafficStats) -> TrafficStats:
        return TrafficStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class _Socket(asyncio.Protocol):
    """asyncio protocol for one of the two sockets of a relayed connection."""

    def __init__(self, conn: _RelayedConnection):
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.outgoing: _DelayedPipe | None = None  # carries what this socket receives
        self.incoming: _DelayedPipe | None = None  # writes into this socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.socket_made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.data_from(self, data)

    def eof_received(self) -> bool:
        if self.outgoing:
            self.outgoing.push_eof()
        # Keep our write side open, the other direction may still be delivering; TLS cannot.
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.incoming:
            self.incoming.discard()
        if self.outgoing:
            self.outgoing.push_eof()
        self.conn.socket_lost(self)

    def pause_writing(self) -> None:
        if self.incoming:
            self.incoming.set_destination_full(True)

    def resume_writing(self) -> None:
        if self.incoming:
            self.incoming.set_destination_full(False)


class _DelayedPipe:
    """One direction of one connection: a FIFO of (release time, chunk), written out when due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, src: _Socket, dst: _Socket):
        self.loop, self.delay_s, self.src, self.dst = loop, delay_s, src, dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.eof_pending = False
        self.done = False
        self.destination_full = False
        self.source_paused = False
        src.outgoing, dst.incoming = self, self

    def push(self, data: bytes) -> None:
        if self.done or self.eof_pending:
            return
        if self.delay_s <= 0 and not self.queue:
            self._write(data)
            return
        self.queue.append((self.loop.time() + self.delay_s, data))
        self.queued_bytes += len(data)
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._release_due)
        self._apply_backpressure()

    def push_eof(self) -> None:
        if self.done or self.eof_pending:
            return
        self.eof_pending = True
        if not self.queue:
            self._finish()

    def discard(self) -> None:
        """The destination is gone: drop what is queued and write nothing more."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0
        self.done = True

    def set_destination_full(self, full: bool) -> None:
        self.destination_full = full
        self._apply_backpressure()

    def _write(self, data: bytes) -> None:
        if not self.dst.closed and self.dst.transport is not None:
            self.dst.transport.write(data)

    def _release_due(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued_bytes -= len(data)
            self._write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._release_due)
        elif self.eof_pending:
            self._finish()
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        should_pause = self.destination_full or self.queued_bytes > MAX_QUEUED_BYTES
        if should_pause == self.source_paused or self.src.closed or self.src.transport is None:
            return
        self.source_paused = should_pause
        if should_pause:
            self.src.transport.pause_reading()
        else:
            self.src.transport.resume_reading()

    def _finish(self) -> None:
        """Pass the EOF on once every chunk before it is delivered; close when both ways are done.

        A TLS socket cannot half-close, so there an EOF closes the connection both ways.
        """
        self.done = True
        reverse = self.dst.outgoing
        if reverse is not None and not reverse.done and self.dst.transport.can_write_eof():
            self.dst.transport.write_eof()
            return
        for sock in (self.dst, self.src):
            if not sock.closed:
                sock.transport.close()  # close() still flushes what the transport has buffered


class _RelayedConnection:
    """A client connection accepted by the relay and its connection to the target."""

    def __init__(self, relay: DelayRelay):
        self.relay = relay
        self.client = _Socket(self)
        self.server = _Socket(self)
        self.last_direction_to_server = False

    def socket_made(self, sock: _Socket) -> None:
        if sock is self.client:
            sock.transport.pause_reading()  # until the target is connected
            self.relay._spawn(self._connect_to_target())
        else:
            loop = self.relay.loop
            _DelayedPipe(loop, self.relay.delay_to_server_ms / 1000, self.client, self.server)
            _DelayedPipe(loop, self.relay.delay_to_client_ms / 1000, self.server, self.client)
            if not self.client.closed:
                self.client.transport.resume_reading()

    async def _connect_to_target(self) -> None:
        relay = self.relay
        try:
            await asyncio.wait_for(relay.loop.create_connection(
                lambda: self.server, *relay.target, ssl=relay.target_ssl,
                server_hostname=relay.target_server_hostname if relay.target_ssl else None,
            ), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            if not self.client.closed:
                self.client.transport.close()
            return
        relay.stats.connections += 1
        if self.client.closed:
            self.server.transport.close()

    def data_from(self, sock: _Socket, data: bytes) -> None:
        stats = self.relay.stats
        if sock is self.client:
            stats.bytes_to_server += len(data)
            self.last_direction_to_server = True
        else:
            stats.bytes_to_client += len(data)
            if self.last_direction_to_server:
                stats.round_trips += 1
            self.last_direction_to_server = False
        sock.outgoing.push(data)

    def socket_lost(self, sock: _Socket) -> None:
        if self.client.closed and self.server.closed:
            self.relay.connections.discard(self)

    def abort(self) -> None:
        for sock in (self.client, self.server):
            if sock.transport is not None and not sock.closed:
                sock.transport.abort()


class DelayRelay:
    """Listen on `listen` (port 0: any free port), relay each connection to `target` with delay.

    `rtt_ms` sets half of it each way; `delay_to_server_ms` / `delay_to_client_ms` override one way.
    """

    def __init__(self, target: Address, *, rtt_ms: float = 0.0,
                 delay_to_server_ms: float | None = None, delay_to_client_ms: float | None = None,
                 listen: Address = ("127.0.0.1", 0), listen_ssl: ssl.SSLContext | None = None,
                 target_ssl: ssl.SSLContext | None = None, target_server_hostname: str | None = None):
        self.target = target
        self.delay_to_server_ms = rtt_ms / 2 if delay_to_server_ms is None else delay_to_server_ms
        self.delay_to_client_ms = rtt_ms / 2 if delay_to_client_ms is None else delay_to_client_ms
        self.listen = listen
        self.listen_ssl = listen_ssl
        self.target_ssl = target_ssl
        self.target_server_hostname = target_server_hostname or target[0]
        self.stats = TrafficStats()
        self.connections: set[_RelayedConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.address: Address | None = None

    async def start(self) -> Address:
        self.loop = asyncio.get_running_loop()

        def accept() -> _Socket:
            conn = _RelayedConnection(self)
            self.connections.add(conn)
            return conn.client

        self._server = await self.loop.create_server(accept, *self.listen, ssl=self.listen_ssl)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()
        for task in list(self._tasks):
            task.cancel()

    def snapshot(self) -> TrafficStats:
        return dataclasses.replace(self.stats)

    async def __aenter__(self) -> DelayRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)  # a task nobody references can be garbage-collected mid-run
        task.add_done_callback(self._tasks.discard)


class UdpDelayRelay:
    """Listen for datagrams on `listen`; relay each client's to `target` (and the answers back)
    with `rtt_ms / 2` of delay each way. Counts like the TCP relay: bytes per direction, and a
    round trip each time the target answers after the client last sent.

    A wire costs nothing per datagram; a Python relay does, so this one moves what each read
    returns as a batch: UDP GRO hands over a burst from one sender in one read, one timer per read
    delays it, and UDP GSO sends it on in one call with the same datagram boundaries. Its sockets'
    buffers are large (8 MiB), so a burst is not cut by the relay falling behind (a relay with
    Linux's default buffers dropped a third of a 1 MB QUIC burst: the bench then measured the
    relay, and QUIC's loss response to it). Without GRO/GSO it forwards datagram by datagram."""

    def __init__(self, target: Address, *, rtt_ms: float = 0.0, listen: Address = ("127.0.0.1", 0)):
        self.target = target
        self.delay_s = rtt_ms / 2000
        self.listen = listen
        self.stats = TrafficStats()
        self.address: Address | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._front: _UdpSocket | None = None
        self._sessions: dict[Address, _UdpSocket] = {}
        self._last_to_server: dict[Address, bool] = {}

    async def start(self) -> Address:
        self.loop = asyncio.get_running_loop()
        self._front = _UdpSocket(self.loop, self._from_client, bind=self.listen)
        self.address = self._front.sock.getsockname()[:2]
        return self.address

    async def stop(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        if self._front is not None:
            self._front.close()

    def snapshot(self) -> TrafficStats:
        return dataclasses.replace(self.stats)

    async def __aenter__(self) -> UdpDelayRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _later(self, sock: _UdpSocket, batch: list[tuple[bytes, int]], addr: Address | None) -> None:
        if self.delay_s > 0:
            self.loop.call_later(self.delay_s, sock.send, batch, addr)
        else:
            sock.send(batch, addr)

    def _from_client(self, batch: list[tuple[bytes, int]], client: Address) -> None:
        self.stats.bytes_to_server += sum(len(data) for data, _ in batch)
        self._last_to_server[client] = True
        session = self._sessions.get(client)
        if session is None:
            self.stats.connections += 1

            def back(answers: list[tuple[bytes, int]], _addr: Address) -> None:
                self.stats.bytes_to_client += sum(len(data) for data, _ in answers)
                if self._last_to_server.get(client):
                    self.stats.round_trips += 1
                self._last_to_server[client] = False
                if self._front is not None:
                    self._later(self._front, answers, client)

            session = self._sessions[client] = _UdpSocket(self.loop, back, connect=self.target)
        self._later(session, batch, None)


_UDP_SEGMENT, _UDP_GRO = 103, 104      # Linux socket options (SOL_UDP)
_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES = 64, 65000
UDP_RELAY_BUFFER_BYTES = 8 << 20


class _UdpSocket:
    """One socket of the UDP relay: each read's datagrams, as (buffer, segment size) pieces, go to
    `on_batch(pieces, addr)`; `send(pieces, addr)` sends such pieces on, keeping the boundaries."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_batch, *, bind: Address | None = None,
                 connect: Address | None = None):
        self.loop, self.on_batch = loop, on_batch
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                             (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
            for option in (force, plain):
                try:
                    if option is not None:
                        self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_RELAY_BUFFER_BYTES)
                        break
                except OSError:
                    continue
        self.gro = self.gso = sys.platform.startswith("linux")
        if self.gro:
            try:
                self.sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
            except OSError:
                self.gro = False
        if bind is not None:
            self.sock.bind(bind)
        if connect is not None:
            self.sock.bind(("127.0.0.1", 0) if connect[0].startswith("127.") else ("0.0.0.0", 0))
            self.sock.connect(connect)
        self.connected = connect
        self.closed = False
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        batches: dict[Address, list[tuple[bytes, int]]] = {}
        for _ in range(64):
            try:
                if self.gro:
                    data, ancillary, _, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4))
                    segment = 0
                    for level, kind, value in ancillary:
                        if level == socket.SOL_UDP and kind == _UDP_GRO:
                            segment = int.from_bytes(value[:4] if len(value) >= 4 else value[:2], sys.byteorder)
                else:
                    data, addr = self.sock.recvfrom(65536)
                    segment = 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error from an earlier send: nothing was read
            batches.setdefault(addr[:2], []).append((data, segment if segment and len(data) > segment else 0))
        for addr, batch in batches.items():
            self.on_batch(batch, addr)

    def send(self, pieces: list[tuple[bytes, int]], addr: Address | None) -> None:
        if self.closed:
            return
        for data, segment in pieces:
            try:
                if segment and self.gso:
                    step = segment * _GSO_MAX_SEGMENTS if segment * _GSO_MAX_SEGMENTS <= _GSO_MAX_BYTES \
                        else segment * (_GSO_MAX_BYTES // segment)
                    for i in range(0, len(data), step):
                        chunk = data[i:i + step]
                        option = [(socket.SOL_UDP, _UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))] \
                            if len(chunk) > segment else []
                        if addr is None:
                            self.sock.sendmsg([chunk], option)
                        else:
                            self.sock.sendmsg([chunk], option, 0, addr)
                    continue
                for i in range(0, len(data), segment or len(data) or 1):
                    datagram = data[i:i + segment] if segment else data
                    self.sock.send(datagram) if addr is None else self.sock.sendto(datagram, addr)
            except OSError as exc:
                if segment and self.gso and exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self.gso = False  # no GSO here: datagram by datagram
                    self.send([(data, segment)], addr)
                # else a full buffer or an unreachable peer: lost, as on a wire

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within ~0.1 ms instead of up to 1 ms late.

    The default epoll selector rounds every wait up to whole milliseconds, which would add ~0.5 ms
    to each delayed chunk (10-20% of a 5 ms RTT); select() takes microseconds. Its 1024-descriptor
    limit is no concern for a test relay.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class EventLoopThread:
    """An asyncio event loop in a daemon thread, so synchronous code can host async servers."""

    def __init__(self, name: str = "event-loop"):
        self.loop = precise_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> EventLoopThread:
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class DelayRelayThread:
    """A DelayRelay for synchronous code: on its own loop thread, or on a shared `loop_thread`."""

    def __init__(self, target: Address, *, loop_thread: EventLoopThread | None = None, **relay_kwargs: Any):
        self.relay = DelayRelay(target, **relay_kwargs)
        self._owns_loop = loop_thread is None
        self._loop_thread = loop_thread or EventLoopThread(name="delay-relay")

    @property
    def address(self) -> Address | None:
        return self.relay.address

    def start(self) -> Address:
        if self._owns_loop:
            self._loop_thread.start()
        return self._loop_thread.run(self.relay.start())

    def stop(self) -> None:
        try:
            self._loop_thread.run(self.relay.stop(), timeout=5.0)
        finally:
            if self._owns_loop:
                self._loop_thread.stop()

    def snapshot(self) -> TrafficStats:
        return self.relay.snapshot()

    def __enter__(self) -> DelayRelayThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve_cli(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    relay = (UdpDelayRelay if args.udp else DelayRelay)(args.target, rtt_ms=args.rtt_ms, listen=args.listen)
    host, port = await relay.start()
    print(f"relaying {'UDP' if args.udp else 'TCP'} {host}:{port} -> {args.target[0]}:{args.target[1]} "
          f"(one-way delay {args.rtt_ms / 2:g} ms each way)", flush=True)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.stats_every or None)
            except asyncio.TimeoutError:
                print(relay.snapshot(), flush=True)
    finally:
        await relay.stop()
        print(relay.snapshot(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP (or UDP) relay with injected delay (half the RTT each way).")
    parser.add_argument("--udp", action="store_true", help="relay UDP datagrams instead of TCP connections")
    parser.add_argument("--target", type=_parse_address, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--listen", type=_parse_address, default=("127.0.0.1", 0),
                        help="HOST:PORT to listen on (default 127.0.0.1:0, any free port)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip delay to add")
    parser.add_argument("--stats-every", type=float, default=0.0, help="print counters every N s")
    args = parser.parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=precise_event_loop) as runner:
            runner.run(_serve_cli(args))
    except OSError as e:
        print(f"delay_relay: cannot listen on {args.listen[0]}:{args.listen[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
