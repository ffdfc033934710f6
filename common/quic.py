"""One authenticated QUIC endpoint per node: a single UDP socket that both accepts and dials.

Owns: the datagram demultiplexer (aioquic's `connect()` opens a socket of its own, so we route
datagrams by destination connection id to per-connection state, as aioquic's `QuicServer` does,
for server *and* client connections); peer authentication (the dialer pins the server's
certificate key to the node id it expects; the server authenticates the dialer with a signed
challenge on the first server-initiated stream before any user stream is served); and the
stream transports that carry user data (asyncio `Transport`s, wrapped in StreamReader/StreamWriter
pairs by default).

Why not aioquic's own asyncio layer: it reads one datagram per loop iteration, has no write
backpressure, doubles its receive windows regardless of whether the application reads, and paces
with timers that, at epoll's millisecond resolution, throttle low-RTT paths. Here datagrams are
read in batches and answered with one transmit per batch, writes pause their producer above a
high-water mark, receive windows slide with what the application consumed, and pacing is off
(loopback/LAN paths with enlarged socket buffers). Larger datagrams are used on loopback and on
private networks: per-packet Python cost dominates aioquic's throughput.
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import logging
import os
import socket
import ssl
import sys
import weakref
from typing import Any, Awaitable, Callable

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, stream_is_client_initiated
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from common.frames import FrameError, encode_frame, read_frame, send_frame
from common.identity import (
    AuthError,
    NodeIdentity,
    answer_challenge,
    check_answer,
    make_challenge,
    node_id_of_public_key,
    parse_challenge,
)

__all__ = ["AuthError", "PeerIdentityMismatch", "QuicEndpoint", "QuicPeerConnection",
           "QuicStreamTransport", "datagram_size_for"]

log = logging.getLogger("mesh.quic")

CONNECTION_ID_LENGTH = 8
SMALLEST_DATAGRAM = 1200
# Per-packet Python work dominates aioquic's cost, so carry as much per datagram as the path
# allows. Loopback's MTU is 64 KiB, but aioquic 1.7 writes STREAM frame lengths as 2-byte
# varints (< 16384), so 16 KiB is its ceiling: 63 MB/s vs 9 MB/s at 1200 bytes (measured).
LOOPBACK_DATAGRAM = 16384
LAN_DATAGRAM = 1452           # 1500-byte Ethernet MTU minus IP/UDP headers, with margin
STREAM_RECEIVE_WINDOW = 4 << 20
CONNECTION_RECEIVE_WINDOW = 16 << 20
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
STREAM_READER_LIMIT = 256 << 10   # StreamReader pauses the QUIC stream above twice this
SOCKET_BUFFER_BYTES = 8 << 20
RECEIVE_BATCH = 128
MAX_UNAUTHENTICATED = 256         # concurrent handshakes a server side accepts
AUTH_FRAME_MAX_BYTES = 64 << 10
AUTH_STREAM_ID = 1                # the first server-initiated bidirectional stream
CLOSE_NORMAL = 0x0
CLOSE_AUTH_REJECTED = 0x4D01      # application error codes (sent with APPLICATION_CLOSE)
CLOSE_AUTH_FAILED = 0x4D02
CLOSE_PIN_MISMATCH = 0x4D03
CLOSE_PROTOCOL = 0x4D04
STREAM_ABORTED = 0x4D10
_MAX_REASON_CHARS = 300

_SUPPORTED_VERSIONS = QuicConfiguration().supported_versions

Authorize = Callable[[str, dict, bytes], "str | None | Awaitable[str | None]"]


def datagram_size_for(host: str) -> int:
    """Largest datagram we send to `host` without path-MTU discovery: the loopback MTU is
    64 KiB; on private/link-local networks we assume Ethernet; elsewhere QUIC's minimum."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return SMALLEST_DATAGRAM
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK_DATAGRAM
    if ip.is_private or ip.is_link_local:
        return LAN_DATAGRAM
    return SMALLEST_DATAGRAM


class PeerIdentityMismatch(AuthError):
    """The server's certificate key is not the node we meant to reach (wrong address, or worse)."""


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


class _WindowedQuicConnection(QuicConnection):
    """aioquic grows receive windows by doubling them as data arrives, whether or not the
    application has read it, so a slow reader buffers without bound. Here the windows slide:
    a stream's credit is what was delivered plus `stream_window`, and it stops growing while the
    stream's reader is paused. (Overrides two private methods of aioquic 1.7.)"""

    def __init__(self, *args: Any, stream_window: int, connection_window: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.read_paused: set[int] = set()

    def _write_stream_limits(self, builder, space, stream) -> None:  # noqa: ANN001 (aioquic types)
        local = stream.max_stream_data_local
        if local and stream.stream_id not in self.read_paused:
            delivered = stream.receiver.starting_offset()
            if local - delivered < self.stream_window // 2:
                stream.max_stream_data_local = delivered + self.stream_window
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(0x11,  # MAX_STREAM_DATA
                                      capacity=1 + 8 + 8,
                                      handler=self._on_max_stream_data_delivery,
                                      handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder, space) -> None:  # noqa: ANN001
        max_data = self._local_max_data
        if max_data.value - max_data.used < self.connection_window // 2:
            max_data.value = max_data.used + self.connection_window
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue  # batch MAX_STREAMS, as aioquic does
            if limit.value != limit.sent:
                buf = builder.start_frame(limit.frame_type, capacity=1 + 8,
                                          handler=self._on_connection_limit_delivery,
                                          handler_args=(limit,))
                buf.push_uint_var(limit.value)
                limit.sent = limit.value


class QuicStreamTransport(asyncio.Transport):
    """One bidirectional QUIC stream as an asyncio Transport.

    Half-close works as with TCP (`write_eof`); `pause_reading` withholds flow-control credit
    from the peer; the protocol's `pause_writing`/`resume_writing` follow the amount of data
    written but not yet acknowledged. `set_protocol` may switch a stream that was handed out as
    a StreamReader/StreamWriter pair to a protocol (bytes the reader still held are replayed
    into the new protocol) — the tunnels splice that way, without a coroutine per chunk.
    """

    def __init__(self, connection: "QuicPeerConnection", stream_id: int, protocol: asyncio.BaseProtocol):
        super().__init__()
        self._connection = connection
        self._quic = connection._quic
        self.stream_id = stream_id
        self._protocol = protocol
        self._reader: asyncio.StreamReader | None = None
        self._high_water = WRITE_HIGH_WATER
        self._low_water = WRITE_LOW_WATER
        self._writing_paused = False
        self._reading_paused = False
        self._eof_sent = False
        self._eof_received = False
        self._write_broken = False    # peer stopped reading / stream reset: writes are dropped
        self._closing = False
        self._lost = False
        self._quic_stream: Any = None  # aioquic's QuicStream, once it exists
        self._writer_ref: weakref.ref | None = None
        self._writer_keepalive: asyncio.StreamWriter | None = None

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self.stream_id
        if name == "peername":
            return self._connection.remote_address
        if name == "peer_node_id":
            return self._connection.peer_node_id
        if name == "quic_connection":
            return self._connection
        return default

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        reader, self._reader = self._reader, None
        self._protocol = protocol
        # asyncio's StreamWriter closes its transport when garbage-collected; once a protocol
        # drives the stream, the writer that was handed out must not do that.
        self._writer_keepalive = self._writer_ref() if self._writer_ref is not None else None
        if reader is None:
            return
        # Replay what the StreamReader held but nobody read (asyncio keeps it in `_buffer`).
        leftover = bytes(reader._buffer)  # noqa: SLF001
        reader._buffer.clear()  # noqa: SLF001
        if leftover:
            protocol.data_received(leftover)  # type: ignore[attr-defined]
        if reader.at_eof() or self._eof_received:
            protocol.eof_received()  # type: ignore[attr-defined]
        if self._reading_paused:
            self.resume_reading()  # the StreamReader's pause no longer applies

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._write_broken or not data:
            return  # like asyncio's transports: writes after close/loss are dropped
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        try:
            self._quic.send_stream_data(self.stream_id, data)
        except (ValueError, RuntimeError):  # the stream was reset or finished under us
            self._write_broken = True
            return
        self._connection._schedule_transmit()
        if not self._writing_paused and self.get_write_buffer_size() > self._high_water:
            self._writing_paused = True
            self._connection._drain_watch.add(self)
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._lost:
            return
        self._eof_sent = True
        if not self._write_broken:
            try:
                self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
            except (ValueError, RuntimeError):
                self._write_broken = True
            self._connection._schedule_transmit()

    def close(self) -> None:
        """Send FIN (queued data still goes out) and stop receiving; the protocol is told
        `connection_lost(None)` right away."""
        if self._closing or self._lost:
            return
        self._closing = True
        if not self._eof_sent:
            self.write_eof()
        if not self._eof_received:
            self._stop_receiving()
        self._connection._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        try:
            self._quic.reset_stream(self.stream_id, STREAM_ABORTED)
        except (ValueError, RuntimeError):
            pass
        if not self._eof_received:
            self._stop_receiving()
        self._connection._schedule_transmit()
        self._lose(None)

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._quic.read_paused.add(self.stream_id)

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._quic.read_paused.discard(self.stream_id)
            self._connection._schedule_transmit()  # so the MAX_STREAM_DATA goes out now

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = WRITE_HIGH_WATER if high is None else high
        self._low_water = min(self._high_water, self._high_water // 4 if low is None else low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        if self._write_broken:
            return 0
        stream = self._quic_stream
        if stream is None:
            stream = self._quic_stream = self._quic._streams.get(self.stream_id)  # noqa: SLF001
            if stream is None:
                return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start  # noqa: SLF001 (unacknowledged bytes)

    # -- driven by the connection ------------------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if self._lost or self._closing:
            return
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        if end_stream and not self._eof_received:
            self._eof_received = True
            self._protocol.eof_received()  # type: ignore[attr-defined]
            if self._write_broken:  # both directions are over
                self._connection._loop.call_soon(self._lose, None)

    def _on_acked(self) -> None:
        if self._writing_paused and self.get_write_buffer_size() <= self._low_water:
            self._writing_paused = False
            self._connection._drain_watch.discard(self)
            if not self._lost:
                self._protocol.resume_writing()

    def _on_reset(self) -> None:
        self._eof_received = True
        self._lose(ConnectionResetError(f"QUIC stream {self.stream_id} reset by the peer"))

    def _on_stop_sending(self) -> None:
        # aioquic has already reset our sending side: later writes are dropped (as asyncio does
        # for a closed socket) and a blocked drain() is released. Reading goes on: the peer may
        # still be sending, and its FIN or RESET ends the stream.
        self._write_broken = True
        if self._writing_paused:
            self._writing_paused = False
            self._connection._drain_watch.discard(self)
            self._protocol.resume_writing()
        if self._eof_received:
            self._connection._loop.call_soon(self._lose, None)

    def _on_connection_lost(self, reason: str) -> None:
        # A stream whose FIN arrived has all its data: end it cleanly so buffered bytes stay readable.
        self._lose(None if self._eof_received else ConnectionResetError(reason))

    def _stop_receiving(self) -> None:
        try:
            self._quic.stop_stream(self.stream_id, STREAM_ABORTED)
        except ValueError:
            pass
        self._quic.read_paused.discard(self.stream_id)
        self._connection._schedule_transmit()

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._reader = None
        self._writer_keepalive = None
        self._connection._drain_watch.discard(self)
        self._connection._forget_stream(self.stream_id)
        self._quic.read_paused.discard(self.stream_id)
        try:
            self._protocol.connection_lost(exc)
        except Exception:  # a user protocol's bug must not take the connection down
            log.exception("stream protocol failed in connection_lost")


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]


class QuicPeerConnection:
    """One QUIC connection to an authenticated peer node (see module docstring)."""

    def __init__(self, endpoint: "QuicEndpoint", quic: _WindowedQuicConnection,
                 address: tuple, *, dialed: bool):
        self._endpoint = endpoint
        self._loop = endpoint._loop
        self._quic = quic
        self.remote_address: tuple[str, int] = (address[0], address[1])
        self._send_address = address
        self.dialed = dialed
        self.peer_node_id: str = ""
        self.claims: dict = {}
        self.authenticated = False
        self._streams: dict[int, QuicStreamTransport] = {}
        self._drain_watch: set[QuicStreamTransport] = set()
        self._on_stream: StreamHandler | None = None
        self._incoming_queue: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._application_space: Any = None  # aioquic's 1-RTT packet space, once keys exist
        self._wrote = False  # the application queued something since the last transmit
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake_done: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._terminated = False
        self._last_received = self._loop.time()
        self.close_reason = ""
        self.close_code: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._auth_deadline: asyncio.TimerHandle | None = None
        # Peer stream ids already seen: all below the floor, plus those in the set. Late frames
        # for a stream we closed must not look like a new stream.
        self._peer_streams_floor = 1 if dialed else 0
        self._peer_streams_seen: set[int] = set()
        # the auth exchange runs on the first server-initiated stream, never handed to users
        self._auth_reader, self._auth_writer = self._new_stream(AUTH_STREAM_ID)
        if dialed:
            self._is_new_peer_stream(AUTH_STREAM_ID)

    def __repr__(self) -> str:
        return (f"<QuicPeerConnection {self.peer_node_id or '?'} {self.remote_address} "
                f"{'dialed' if self.dialed else 'accepted'}{' closed' if self.is_closed else ''}>")

    # -- public API --------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def on_stream(self) -> StreamHandler | None:
        return self._on_stream

    @on_stream.setter
    def on_stream(self, handler: StreamHandler | None) -> None:
        self._on_stream = handler
        if handler is not None and self._incoming_queue:
            queued, self._incoming_queue = self._incoming_queue, []
            for reader, writer in queued:
                self._dispatch_stream(reader, writer)

    def rtt(self) -> float | None:
        loss = self._quic._loss  # noqa: SLF001
        return loss._rtt_smoothed if loss._rtt_initialized else None  # noqa: SLF001

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.is_closed:
            raise ConnectionResetError(f"QUIC connection to {self._describe()} is closed: {self.close_reason}")
        if not self.authenticated:
            raise ConnectionError("QUIC connection is not authenticated yet")
        stream_id = self._quic.get_next_available_stream_id()
        # aioquic allocates the id only when data is first sent on it; an empty write does that.
        self._quic.send_stream_data(stream_id, b"")
        return self._new_stream(stream_id)

    def open_stream_transport(self, protocol: asyncio.BaseProtocol) -> QuicStreamTransport:
        """Open a stream driven by an asyncio protocol instead of a reader/writer pair."""
        if self.is_closed:
            raise ConnectionResetError(f"QUIC connection to {self._describe()} is closed: {self.close_reason}")
        if not self.authenticated:
            raise ConnectionError("QUIC connection is not authenticated yet")
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, b"")
        transport = QuicStreamTransport(self, stream_id, protocol)
        self._streams[stream_id] = transport
        protocol.connection_made(transport)
        return transport

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def close(self) -> None:
        self._close(CLOSE_NORMAL, "closed")

    def stream_count(self) -> int:
        return sum(1 for sid in self._streams if sid != AUTH_STREAM_ID)

    # -- streams -----------------------------------------------------------------------------

    def _new_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader(limit=STREAM_READER_LIMIT, loop=self._loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        transport = QuicStreamTransport(self, stream_id, protocol)
        transport._reader = reader  # noqa: SLF001
        self._streams[stream_id] = transport
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        transport._writer_ref = weakref.ref(writer)  # noqa: SLF001
        return reader, writer

    def _forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _dispatch_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = self._on_stream
        assert handler is not None
        try:
            result = handler(reader, writer)
        except Exception:
            log.exception("on_stream handler failed")
            writer.transport.abort()
            return
        if inspect.isawaitable(result):
            self._spawn(self._run_handler(result, writer))

    async def _run_handler(self, awaitable: Awaitable[None], writer: asyncio.StreamWriter) -> None:
        try:
            await awaitable
        except (ConnectionError, asyncio.IncompleteReadError, FrameError):
            writer.transport.abort()
        except Exception:
            log.exception("on_stream handler failed")
            writer.transport.abort()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        """Record a peer-initiated bidirectional stream id; False if it was seen before."""
        if stream_id < self._peer_streams_floor or stream_id in self._peer_streams_seen:
            return False
        seen = self._peer_streams_seen
        seen.add(stream_id)
        while self._peer_streams_floor in seen:
            seen.discard(self._peer_streams_floor)
            self._peer_streams_floor += 4
        return True

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        transport = self._streams.get(stream_id)
        if transport is None:
            if stream_is_client_initiated(stream_id) == self.dialed or stream_id & 2:
                return  # late data for a stream of ours we closed, or a unidirectional stream (unused)
            if not self._is_new_peer_stream(stream_id):
                return  # late data for a peer stream we already closed
            if not self.authenticated:
                if not self.dialed:
                    # Nothing but the auth exchange may happen before authentication.
                    self._close(CLOSE_PROTOCOL, "stream opened before authentication")
                    return
                # The server may open streams right after sending its verdict; hold them
                # until that verdict has been read.
            reader, writer = self._new_stream(stream_id)
            transport = self._streams[stream_id]
            if self.authenticated and self._on_stream is not None:
                transport._on_data(event.data, event.end_stream)  # noqa: SLF001
                self._dispatch_stream(reader, writer)
                return
            self._incoming_queue.append((reader, writer))
        transport._on_data(event.data, event.end_stream)  # noqa: SLF001

    # -- driving aioquic ---------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: tuple, now: float) -> None:
        self._last_received = now
        self._quic.receive_datagram(data, addr, now)

    def _after_receive(self) -> None:
        self._process_events()
        # Deferred by one loop step: a reply the application writes in that step (its reader's
        # task wakes up then) goes out in the same datagram, with the ACK, instead of two.
        if self._transmit_handle is None and not self._terminated:
            self._transmit_handle = self._loop.call_soon(self._transmit_written)
        if self._drain_watch:
            for transport in list(self._drain_watch):
                transport._on_acked()  # noqa: SLF001

    def _schedule_transmit(self) -> None:
        self._wrote = True
        if self._transmit_handle is None and not self._terminated:
            self._transmit_handle = self._loop.call_soon(self._transmit_written)

    def _transmit_written(self) -> None:
        """Send what the application wrote this loop iteration, in as few datagrams as fit.

        aioquic delays ACKs by 1 ms and adds one to a packet only once due; a reply that is sent
        anyway should carry the pending ACK instead (request/response traffic then needs no
        ACK-only packets and no ACK timers)."""
        self._transmit_handle = None
        if self._wrote:
            self._wrote = False
            space = self._application_space
            if space is None:
                spaces = getattr(self._quic, "_spaces", None)  # exists once the connection is initialised
                space = self._application_space = spaces.get(tls.Epoch.ONE_RTT) if spaces else None
            if space is not None and space.ack_at is not None:
                space.ack_at = self._loop.time()
        self._transmit()

    def _transmit(self) -> None:
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self._terminated:
            return
        datagrams = self._quic.datagrams_to_send(now=self._loop.time())
        if datagrams:
            self._endpoint._send_datagrams(datagrams)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process_events()
        self._transmit()

    def _send_keepalive(self) -> None:
        """Ping the peer regularly and give up on it `idle_timeout` after its last packet.

        aioquic restarts its own idle timer whenever it sends, so a keepalive PING to a dead
        peer would push detection out by one ping interval; this watchdog counts from the last
        packet received only."""
        self._keepalive = None
        if self._terminated or self.is_closed:
            return
        now = self._loop.time()
        idle_timeout = self._endpoint.idle_timeout
        silent_for = now - self._last_received
        if idle_timeout and silent_for >= idle_timeout:
            self._close(CLOSE_NORMAL, f"idle timeout: nothing heard for {silent_for:.1f}s")
            return
        self._quic.send_ping(0)
        self._transmit()
        delay = self._endpoint._keepalive_interval
        if idle_timeout:
            delay = min(delay, self._last_received + idle_timeout - now)
        self._keepalive = self._loop.call_later(max(delay, 0.01), self._send_keepalive)

    def _process_events(self) -> None:
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._on_stream_data(event)
            elif kind is events.ConnectionIdIssued:
                self._endpoint._by_cid[event.connection_id] = self
            elif kind is events.ConnectionIdRetired:
                if self._endpoint._by_cid.get(event.connection_id) is self:
                    del self._endpoint._by_cid[event.connection_id]
            elif kind is events.HandshakeCompleted:
                self._on_handshake_completed()
            elif kind is events.StreamReset:
                transport = self._streams.get(event.stream_id)
                if transport is not None:
                    transport._on_reset()  # noqa: SLF001
            elif kind is events.StopSendingReceived:
                transport = self._streams.get(event.stream_id)
                if transport is not None:
                    transport._on_stop_sending()  # noqa: SLF001
            elif kind is events.ConnectionTerminated:
                self._on_terminated(event)
            event = quic.next_event()

    # -- lifecycle ---------------------------------------------------------------------------

    def _describe(self) -> str:
        return f"{self.peer_node_id or 'peer'} at {self.remote_address[0]}:{self.remote_address[1]}"

    def _on_handshake_completed(self) -> None:
        if not self._handshake_done.done():
            self._handshake_done.set_result(None)
        self._keepalive = self._loop.call_later(self._endpoint._keepalive_interval, self._send_keepalive)
        if not self.dialed:
            self._spawn(self._serve_auth())

    def _close(self, code: int, reason: str) -> None:
        """Close locally: the peer gets CONNECTION_CLOSE with `reason`; streams fail now."""
        if self._closed.done():
            return
        reason = _short(reason)
        self._quic.close(error_code=code, reason_phrase=reason)
        self._transmit()
        self._mark_closed(code, reason)

    def _mark_closed(self, code: int, reason: str) -> None:
        if self._closed.done():
            return
        self.close_code, self.close_reason = code, reason
        self._closed.set_result(None)
        if not self._handshake_done.done():
            self._handshake_done.set_exception(self._closed_error())
            self._handshake_done.exception()  # retrieved: a dial may already have given up
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        message = f"QUIC connection to {self._describe()} closed: {reason or 'no reason given'}"
        for transport in list(self._streams.values()):
            transport._on_connection_lost(message)  # noqa: SLF001
        self._drain_watch.clear()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._endpoint._connection_closed(self)

    def _closed_error(self) -> Exception:
        if self.close_code in (CLOSE_AUTH_REJECTED, CLOSE_AUTH_FAILED, CLOSE_PIN_MISMATCH):
            return AuthError(self.close_reason)
        return ConnectionError(f"QUIC connection to {self._describe()} closed: {self.close_reason or 'no reason given'}")

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self._stop_timers()
        self._mark_closed(event.error_code, event.reason_phrase)
        self._endpoint._connection_terminated(self)

    def _abandon(self, reason: str) -> None:
        """Give up on a connection without telling the peer (there is none to tell)."""
        self._stop_timers()
        self._mark_closed(CLOSE_NORMAL, reason)
        self._endpoint._connection_terminated(self)

    def _stop_timers(self) -> None:
        self._terminated = True
        for handle in (self._timer, self._transmit_handle, self._keepalive, self._auth_deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._transmit_handle = self._keepalive = self._auth_deadline = None

    # -- authentication ----------------------------------------------------------------------

    async def _serve_auth(self) -> None:
        """Server side: challenge the dialer, check its answer, ask `authorize`, give the verdict."""
        endpoint = self._endpoint
        try:
            nonce, challenge = make_challenge(endpoint.identity)
            await send_frame(self._auth_writer, challenge)
            answer = await read_frame(self._auth_reader, AUTH_FRAME_MAX_BYTES, timeout=endpoint.auth_timeout)
            node_id, claims = check_answer(answer, nonce, endpoint.identity.node_id, endpoint.alpn)
            verdict = endpoint.authorize(node_id, claims, nonce)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except asyncio.CancelledError:
            raise
        except (AuthError, FrameError) as exc:
            self._close(CLOSE_AUTH_FAILED, f"authentication failed: {exc}")
            return
        except asyncio.TimeoutError:
            self._close(CLOSE_AUTH_FAILED, "authentication timed out")
            return
        except ConnectionError:
            return
        except Exception as exc:  # authorize() raised: refuse, say so locally
            log.exception("authorize() failed for a QUIC peer")
            self._close(CLOSE_AUTH_FAILED, f"authorization failed on the server: {type(exc).__name__}")
            return
        if self.is_closed:
            return
        if verdict is not None:
            reason = _short(str(verdict))
            self._auth_writer.write(_verdict_frame(False, reason))
            self._transmit()
            self._close(CLOSE_AUTH_REJECTED, reason)
            return
        self.peer_node_id, self.claims = node_id, claims
        self.authenticated = True  # before the verdict leaves, so the dialer's streams find us ready
        self._auth_writer.write(_verdict_frame(True, ""))
        self._auth_writer.close()
        endpoint._connection_authenticated(self)

    async def _dial_auth(self, expected_node_id: str | None,
                         claims_for: Callable[[bytes, str], dict]) -> None:
        """Dialer side: pin the server's key, then answer its challenge."""
        await asyncio.shield(self._handshake_done)
        certificate = self._quic.tls._peer_certificate  # noqa: SLF001 (aioquic has no verify hook)
        if certificate is None:
            self._close(CLOSE_PIN_MISMATCH, "server presented no certificate")
            raise AuthError("server presented no certificate")
        server_id = node_id_of_public_key(certificate.public_key())
        if expected_node_id is not None and server_id != expected_node_id:
            reason = f"peer presented node id {server_id}, expected {expected_node_id}"
            self._close(CLOSE_PIN_MISMATCH, reason)
            raise PeerIdentityMismatch(reason)
        self.peer_node_id = server_id
        try:
            challenge = await read_frame(self._auth_reader, AUTH_FRAME_MAX_BYTES)
            nonce, claimed_id = parse_challenge(challenge)
            if claimed_id != server_id:
                raise AuthError(f"server claims node id {claimed_id} but its certificate is {server_id}")
            claims = claims_for(nonce, server_id)
            await send_frame(self._auth_writer, answer_challenge(
                self._endpoint.identity, nonce, server_id, self._endpoint.alpn, claims))
            verdict = await read_frame(self._auth_reader, AUTH_FRAME_MAX_BYTES)
        except (FrameError, ConnectionError) as exc:
            if self.is_closed:
                raise self._closed_error() from None
            self._close(CLOSE_AUTH_FAILED, f"authentication exchange failed: {exc}")
            raise ConnectionError(f"authentication exchange with {self._describe()} failed: {exc}") from None
        except AuthError as exc:
            self._close(CLOSE_AUTH_FAILED, exc.reason)
            raise
        if verdict.get("type") != "verdict" or verdict.get("ok") is not True:
            reason = str(verdict.get("reason") or "refused by the peer")
            self._close(CLOSE_AUTH_REJECTED, reason)
            raise AuthError(reason)
        self._auth_writer.close()
        self.authenticated = True
        if self._on_stream is not None and self._incoming_queue:
            self.on_stream = self._on_stream  # dispatch what arrived with the verdict


def _verdict_frame(ok: bool, reason: str) -> bytes:
    return encode_frame({"type": "verdict", "ok": ok, "reason": reason})


class QuicEndpoint:
    """A UDP socket that accepts and dials authenticated QUIC connections (module docstring)."""

    def __init__(self, identity: NodeIdentity, *, alpn: str, host: str = "0.0.0.0", port: int = 0,
                 authorize: Authorize = lambda node_id, claims, nonce: None,
                 on_connection: Callable[[QuicPeerConnection], Awaitable[None] | None] | None = None,
                 idle_timeout: float = 10.0, max_datagram_size: int | None = None,
                 auth_timeout: float = 10.0):
        self.identity = identity
        self.alpn = alpn
        self.host = host
        self.port = port
        self.authorize = authorize
        self.on_connection = on_connection
        self.idle_timeout = idle_timeout
        self.auth_timeout = min(auth_timeout, idle_timeout) if idle_timeout else auth_timeout
        self.max_datagram_size = max_datagram_size
        self._keepalive_interval = max(idle_timeout / 4.0, 0.2)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._sock: socket.socket | None = None
        self._by_cid: dict[bytes, QuicPeerConnection] = {}
        self._connections: set[QuicPeerConnection] = set()
        self._send_queue: list[tuple[bytes, tuple]] = []
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.local_address: tuple[str, int] = (host, port)
        self._private_key = identity.private_key
        self._certificate = identity.certificate

    # -- public API --------------------------------------------------------------------------

    @property
    def connections(self) -> list[QuicPeerConnection]:
        """Open, authenticated connections (both directions)."""
        return [c for c in self._connections if c.authenticated and not c.is_closed]

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM,
                                             flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _enlarge_buffers(sock)
            sock.setblocking(False)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._family = family
        self._icmp_errors = _enable_icmp_errors(sock, family)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        bound = sock.getsockname()
        self.local_address = (bound[0], bound[1])
        return self.local_address

    async def dial(self, address: tuple[str, int], *, expected_node_id: str | None,
                   claims_for: Callable[[bytes, str], dict] = lambda nonce, server_id: {},
                   timeout: float = 5.0) -> QuicPeerConnection:
        if self._sock is None or self._closing:
            raise ConnectionError("QUIC endpoint is not running")
        host, port = address[0], int(address[1])
        sockaddr = await self._resolve(host, port)
        config = self._configuration(is_client=True, host=sockaddr[0])
        quic = _WindowedQuicConnection(configuration=config, stream_window=STREAM_RECEIVE_WINDOW,
                                       connection_window=CONNECTION_RECEIVE_WINDOW)
        self._tune(quic)
        connection = QuicPeerConnection(self, quic, sockaddr, dialed=True)
        self._connections.add(connection)
        self._by_cid[quic.host_cid] = connection
        quic.connect(sockaddr, now=self._loop.time())
        connection._transmit()
        try:
            await asyncio.wait_for(connection._dial_auth(expected_node_id, claims_for), timeout)
        except asyncio.TimeoutError:
            connection._close(CLOSE_NORMAL, "dial timed out")
            raise asyncio.TimeoutError(
                f"QUIC dial to {host}:{port} timed out after {timeout:g}s "
                f"({'handshake' if not connection._handshake_done.done() else 'authentication'})") from None
        except BaseException:
            connection._close(CLOSE_NORMAL, "dial failed")
            raise
        return connection

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for connection in list(self._connections):
            connection._close(CLOSE_NORMAL, "endpoint closing")
            connection._stop_timers()  # the socket goes away: no closing period to serve
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._flush_send_queue()
            self._loop.remove_reader(self._sock.fileno())
            if self._send_queue:
                self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._by_cid.clear()
        self._connections.clear()

    # -- connections ---------------------------------------------------------------------------

    def _configuration(self, *, is_client: bool, host: str, first_datagram: int | None = None) -> QuicConfiguration:
        size = min(self.max_datagram_size or datagram_size_for(host), LOOPBACK_DATAGRAM)
        if first_datagram is not None:
            # The client's padded Initial proves how large a datagram this path carries.
            size = min(size, first_datagram)
        config = QuicConfiguration(
            is_client=is_client, alpn_protocols=[self.alpn], idle_timeout=self.idle_timeout,
            max_datagram_size=max(SMALLEST_DATAGRAM, size), connection_id_length=CONNECTION_ID_LENGTH,
            max_data=CONNECTION_RECEIVE_WINDOW, max_stream_data=STREAM_RECEIVE_WINDOW,
            congestion_control_algorithm="cubic", initial_rtt=0.01,
        )
        if is_client:
            config.verify_mode = ssl.CERT_NONE  # self-signed: the node id is pinned after the handshake
        else:
            config.certificate = self._certificate
            config.private_key = self._private_key
        return config

    @staticmethod
    def _tune(quic: _WindowedQuicConnection) -> None:
        # Pacing timers fire at epoll's 1 ms granularity, which throttles sub-ms paths; the
        # socket buffers absorb the bursts instead.
        pacer = quic._loss._pacer  # noqa: SLF001
        pacer.update_rate = lambda congestion_window, smoothed_rtt: None  # type: ignore[method-assign]

    async def _resolve(self, host: str, port: int) -> tuple:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise ConnectionError(f"cannot resolve {host}") from None
            candidates = [info[4] for info in infos if info[0] == self._family] or [infos[0][4]]
            ip = ipaddress.ip_address(candidates[0][0])
        if self._family == socket.AF_INET6:
            if ip.version == 4:
                return (f"::ffff:{ip}", port, 0, 0)
            return (str(ip), port, 0, 0)
        if ip.version == 6:
            raise ConnectionError(f"cannot reach IPv6 address {ip} from an IPv4 endpoint")
        return (str(ip), port)

    def _accept(self, header: Any, data: bytes, addr: tuple) -> QuicPeerConnection | None:
        pending = sum(1 for c in self._connections if not c.authenticated)
        if pending >= MAX_UNAUTHENTICATED:
            return None
        config = self._configuration(is_client=False, host=addr[0], first_datagram=len(data))
        quic = _WindowedQuicConnection(configuration=config,
                                       original_destination_connection_id=header.destination_cid,
                                       stream_window=STREAM_RECEIVE_WINDOW,
                                       connection_window=CONNECTION_RECEIVE_WINDOW)
        self._tune(quic)
        connection = QuicPeerConnection(self, quic, addr, dialed=False)
        connection._auth_deadline = self._loop.call_later(
            self.auth_timeout, self._expire_unauthenticated, connection)
        self._connections.add(connection)
        self._by_cid[header.destination_cid] = connection
        self._by_cid[quic.host_cid] = connection
        return connection

    def _expire_unauthenticated(self, connection: QuicPeerConnection) -> None:
        if not connection.authenticated and not connection.is_closed:
            connection._close(CLOSE_AUTH_FAILED, "authentication timed out")

    def _connection_authenticated(self, connection: QuicPeerConnection) -> None:
        if connection._auth_deadline is not None:
            connection._auth_deadline.cancel()
            connection._auth_deadline = None
        if self.on_connection is None:
            return
        try:
            result = self.on_connection(connection)
        except Exception:
            log.exception("on_connection failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_connection failed", exc_info=task.exception())

    def _connection_closed(self, connection: QuicPeerConnection) -> None:
        if connection._auth_deadline is not None:
            connection._auth_deadline.cancel()
            connection._auth_deadline = None

    def _connection_terminated(self, connection: QuicPeerConnection) -> None:
        self._connections.discard(connection)
        for cid in [cid for cid, c in self._by_cid.items() if c is connection]:
            del self._by_cid[cid]

    # -- datagrams -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recvfrom = sock.recvfrom
        by_cid = self._by_cid
        now = self._loop.time()
        touched: dict[QuicPeerConnection, None] = {}
        socket_error = False
        for _ in range(RECEIVE_BATCH):
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                socket_error = True  # an ICMP error surfacing (see _drain_icmp_errors)
                continue
            if not data:
                continue
            if data[0] & 0x80 == 0:  # short header: the destination CID follows the first byte
                connection = by_cid.get(data[1:1 + CONNECTION_ID_LENGTH])
            else:
                connection = self._route_long_header(data, addr)
            if connection is None:
                continue
            try:
                connection._datagram_received(data, addr, now)
            except Exception:
                log.exception("dropping a datagram aioquic could not handle")
                continue
            touched[connection] = None
        if self._icmp_errors and (socket_error or not touched):
            self._drain_icmp_errors()
        for connection in touched:
            try:
                connection._after_receive()
            except Exception:
                log.exception("QUIC connection failed while processing input")
                connection._close(CLOSE_PROTOCOL, "internal error")

    def _drain_icmp_errors(self) -> None:
        """Read ICMP errors queued on the socket (IP_RECVERR). A dial whose handshake has not
        finished fails at once when its destination answers "port unreachable", instead of
        waiting for its timeout. Established connections ignore ICMP: it is unauthenticated, and
        their idle timeout already notices a dead peer."""
        sock = self._sock
        for _ in range(RECEIVE_BATCH):
            try:
                _, ancillary, _, addr = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            error = 0
            for _level, _type, data in ancillary:
                if len(data) >= 4:  # struct sock_extended_err begins with ee_errno
                    error = int.from_bytes(data[:4], sys.byteorder)
            if not addr or not error:
                continue
            for connection in list(self._connections):
                if (connection.dialed and not connection._handshake_done.done()
                        and connection._send_address[:2] == addr[:2]):
                    connection._abandon(f"{os.strerror(error).lower()} (ICMP)")

    def _route_long_header(self, data: bytes, addr: tuple) -> QuicPeerConnection | None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            return None
        connection = self._by_cid.get(header.destination_cid)
        if connection is not None:
            return connection
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            return None
        if header.version is not None and header.version not in _SUPPORTED_VERSIONS:
            self._send_datagrams([(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=_SUPPORTED_VERSIONS), addr)])
            return None
        if (header.packet_type == QuicPacketType.INITIAL and len(data) >= SMALLEST_DATAGRAM
                and not self._closing):
            return self._accept(header, data, addr)
        return None

    def _send_datagrams(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._send_queue:
            self._send_queue.extend(datagrams)
            return
        sendto = sock.sendto
        for index, (data, addr) in enumerate(datagrams):
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._send_queue.extend(datagrams[index:])
                self._loop.add_writer(sock.fileno(), self._flush_send_queue)
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH,
                                     errno.EMSGSIZE, errno.EPERM):
                    log.debug("sendto %s failed: %s", addr, exc)

    def _flush_send_queue(self) -> None:
        sock = self._sock
        if sock is None:
            return
        queue = self._send_queue
        sent = 0
        try:
            for data, addr in queue:
                try:
                    sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    pass
                sent += 1
        finally:
            del queue[:sent]
            if not queue:
                self._loop.remove_writer(sock.fileno())


def _enable_icmp_errors(sock: socket.socket, family: int) -> bool:
    """Ask Linux to queue ICMP errors on this unconnected socket (IP_RECVERR / IPV6_RECVERR)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "MSG_ERRQUEUE"):
        return False
    ip_recverr, ipv6_recverr = getattr(socket, "IP_RECVERR", 11), getattr(socket, "IPV6_RECVERR", 25)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, ipv6_recverr, 1)
            try:  # IPv4-mapped peers on a dual-stack socket
                sock.setsockopt(socket.IPPROTO_IP, ip_recverr, 1)
            except OSError:
                pass
        else:
            sock.setsockopt(socket.IPPROTO_IP, ip_recverr, 1)
    except OSError:
        return False
    return True


def _enlarge_buffers(sock: socket.socket) -> None:
    """Bursts of large datagrams overflow Linux's default ~208 KiB UDP buffers; as root we can
    exceed net.core.rmem_max, otherwise we get what the kernel allows."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
                continue
            except OSError:
                pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
