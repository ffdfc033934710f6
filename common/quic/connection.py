"""The connection driver: one qh3 connection to a peer node, fed datagrams by the endpoint,
sending through the datagram path it currently uses, running the auth exchange on its first
server-initiated stream before any user stream is served."""
from __future__ import annotations

import asyncio
import inspect
import logging
import struct
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from cryptography import x509
from qh3.quic import events
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode, stream_is_client_initiated

from common.frames import FrameError, encode_frame, read_frame
from common.quic.acks import may_defer_ack, timer_deadline
from common.identity import AuthError
from common.quic.auth import (answer_server, authorize_dialer, challenge_dialer, check_verdict, pinned_server_id,
                              verdict_frame)
from common.quic.limits import (AUTH_FRAME_MAX_BYTES, AUTH_STREAM_ID, CLOSE_AUTH_FAILED, CLOSE_AUTH_REJECTED,
                                CLOSE_NORMAL, CLOSE_PIN_MISMATCH, CLOSE_PROTOCOL, STREAM_READER_LIMIT, short_reason)

# Stream credit (see QuicPeerConnection): records of (stream id, bytes its reader consumed) on
# each side's first unidirectional stream; the first record, HELLO, says the sender reports them.
CREDIT_RECORD = struct.Struct("!QQ")
CREDIT_HELLO = (1 << 64) - 1
from common.quic.streams import QuicStreamTransport, StreamHandler

if TYPE_CHECKING:
    from common.quic.endpoint import QuicEndpoint
    from common.quic.paths import DatagramPath

log = logging.getLogger("mesh.quic")


class QuicPeerConnection:
    """One QUIC connection to an authenticated peer node (see module docstring).

    Stream credit: qh3's native core grants the peer flow-control credit as soon as it hands data
    to Python, whether or not a reader consumed it, so a slow reader would buffer without bound.
    Each side therefore tells the other, on its own unidirectional control stream, how many bytes
    each stream's reader consumed (every STREAM_CREDIT_STEP), and a writer pauses while more than
    STREAM_RECEIVE_WINDOW of what it wrote is unconsumed. A peer that never said HELLO (an older
    node) is not waited for."""

    def __init__(self, endpoint: "QuicEndpoint", quic: QuicConnection,
                 address: tuple, *, dialed: bool, path: "DatagramPath"):
        self._endpoint = endpoint
        self._loop = endpoint._loop
        self._quic = quic
        self.remote_address: tuple[str, int] = (address[0], address[1])
        self._send_address = address
        # After move_to: the peer address qh3 still knows (it cannot be told another); we translate.
        self._quic_peer_address: tuple | None = None
        # Where datagrams go out: `path` for the peer's current address; after a migration the
        # peer may be heard at an address that another path reaches (e.g. direct after relayed).
        self.path = path
        self._path_by_addr: dict[tuple, "DatagramPath"] = {address: path}
        self._last_addr = address
        self._inbox: list[bytes] = []  # datagrams of this read batch, from _last_addr
        self._credit_out: dict[int, int] = {}  # stream id -> consumed, not yet told to the peer
        self._control_stream: int | None = None
        self._control_in = b""
        self.peer_reports_credit = False
        self.bytes_sent = 0
        self.bytes_received = 0
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
        self._received_unacked = 0  # bytes received since we last sent (common.quic.acks)
        self._ack_owed_since: float | None = None  # an ACK deferred since then (common.quic.acks)
        self._send_backlog = False  # stream data left unsent by our last transmit (window or credit)
        self._losses_seen = 0  # qh3's count of our packets lost, at our last transmit
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
        core = self._quic._core  # noqa: SLF001 (qh3 exposes the RTT on its native core only)
        return None if core is None else core.smoothed_rtt

    def _allocate_stream(self) -> int:
        """A new locally opened stream id, on a live, authenticated connection."""
        if self.is_closed:
            raise ConnectionResetError(f"QUIC connection to {self._describe()} is closed: {self.close_reason}")
        if not self.authenticated:
            raise ConnectionError("QUIC connection is not authenticated yet")
        stream_id = self._quic.get_next_available_stream_id()
        # qh3 allocates the id only when data is first sent on it; an empty write does that.
        self._quic.send_stream_data(stream_id, b"")
        return stream_id

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return self._new_stream(self._allocate_stream())

    def open_stream_transport(self, protocol: asyncio.BaseProtocol) -> QuicStreamTransport:
        """Open a stream driven by an asyncio protocol instead of a reader/writer pair."""
        stream_id = self._allocate_stream()
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
            if stream_id & 2:
                if stream_is_client_initiated(stream_id) != self.dialed and (self.dialed or self.authenticated):
                    self._on_credit_records(event.data)
                return
            if stream_is_client_initiated(stream_id) == self.dialed:
                return  # late data for a stream of ours we closed
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

    def _datagram_received(self, data: bytes, addr: tuple, now: float, path: "DatagramPath") -> None:
        """Queue one datagram; the endpoint's batch hands them to qh3 at once (`_after_receive`)."""
        self._last_received = now
        self.bytes_received += len(data)
        self._received_unacked += len(data)
        self._note_source(addr, path)
        self._inbox.append(data)

    def _gro_received(self, buffer: bytes, segment: int, addr: tuple, now: float, path: "DatagramPath") -> None:
        """A burst of this connection's datagrams that UDP GRO read at once (`segment` bytes each,
        the last may be shorter): handed to qh3 whole, with no Python work per datagram."""
        self._last_received = now
        self.bytes_received += len(buffer)
        self._received_unacked += len(buffer)
        self._note_source(addr, path)
        self._feed()
        self._quic.receive_gro_buffer(buffer, segment, self._last_addr, now)
        self._follow_migration()

    def _note_source(self, addr: tuple, path: "DatagramPath") -> None:
        if addr == self._send_address:
            if self._quic_peer_address is not None:
                addr = self._quic_peer_address  # where qh3 believes the peer is (move_to)
            if path is not self.path and not self.dialed:
                # the peer now reaches us another way (it moved off a relay): answer that way. A dialer
                # picks its own path (use_path, move_to): replies still in flight on the old one don't count.
                log.info("%s: the peer now arrives %s: answering that way", self, path.label)
                self.path = path
        if addr != self._last_addr or self._path_by_addr.get(addr) is not path:
            self._feed()  # one address per qh3 call
            self._last_addr = addr
            self._path_by_addr[addr] = path

    def _feed(self) -> None:
        inbox = self._inbox
        if not inbox:
            return
        self._inbox = []
        addr = self._last_addr
        if len(inbox) == 1:
            self._quic.receive_datagram(inbox[0], addr, self._last_received)
        else:
            self._quic.receive_many_datagrams(inbox, addr, self._last_received)
        self._follow_migration()

    def _follow_migration(self) -> None:
        addr = self._last_addr
        if addr != (self._quic_peer_address or self._send_address):
            core = self._quic._core  # noqa: SLF001
            if core is not None and core.active_path[2] == addr:  # QUIC promoted the peer's new address (a migration)
                log.info("%s: the peer migrated to %s (%s)", self, addr, self._path_by_addr.get(addr, self.path).label)
                self._send_address = addr
                self.remote_address = (addr[0], addr[1])
                self.path = self._path_by_addr.get(addr, self.path)  # and answer it the way it came (direct, after a relay)

    def _after_receive(self) -> None:
        self._feed()
        self._process_events()
        if self._transmit_handle is not None or self._terminated:
            return  # the application already answered: the ACK goes with it
        core = self._quic._core  # noqa: SLF001
        if self._endpoint.defer_acks and core is not None and may_defer_ack(
                self.authenticated, self._received_unacked, send_backlog=self._send_backlog,
                new_losses=core.loss_total != self._losses_seen):
            # A small burst: its ACK waits for our next packet, within ACK_DEFER_S (common.quic.acks).
            if self._ack_owed_since is None:
                self._ack_owed_since = self._last_received
            self._arm_timer()
            return
        # Deferred by one loop step: a reply the application writes in that step (its reader's
        # task wakes up then) goes out in the same datagram, with the ACK, instead of two.
        self._transmit_handle = self._loop.call_soon(self._transmit)

    def _schedule_transmit(self) -> None:
        if self._transmit_handle is None and not self._terminated:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        """Send what qh3 has for the peer, in as few datagrams as fit, and re-arm its timer."""
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self._terminated:
            return
        quic = self._quic
        self._received_unacked = 0  # what qh3 sends now carries the ACK of it
        self._ack_owed_since = None
        if self._credit_out:
            self._send_credit()
        datagrams = quic.datagrams_to_send(now=self._loop.time())
        if datagrams and self._quic_peer_address is not None:
            moved = self._quic_peer_address
            datagrams = [(data, self._send_address if addr == moved else addr) for data, addr in datagrams]
        if datagrams:
            for data, _ in datagrams:
                self.bytes_sent += len(data)
            if len(self._path_by_addr) == 1:
                self.path.send(datagrams)
            else:
                self._send_by_path(datagrams)
            if self._drain_watch:  # qh3 counts a stream's unsent bytes: what just left frees writers
                for transport in list(self._drain_watch):
                    transport._on_sent()  # noqa: SLF001
        core = quic._core  # noqa: SLF001
        if core is not None and self._endpoint.defer_acks:  # what the next receive's may_defer_ack needs
            self._losses_seen = core.loss_total
            self._send_backlog = quic.get_send_buffer_size() > 0
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Run qh3's next timer when it is due (its ACK timer later while an ACK is deferred)."""
        core = self._quic._core  # noqa: SLF001 (the timer's kind is on the native core only)
        if core is not None:
            timer = core.get_timer()
            timer_at = None if timer is None else timer_deadline(timer[0], timer[1], self._ack_owed_since)
        else:
            timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    # -- stream credit (class docstring) -----------------------------------------------------

    def _say_hello(self) -> None:
        self._credit_out = {CREDIT_HELLO: 0, **self._credit_out}
        self._schedule_transmit()

    def _report_consumed(self, stream_id: int, consumed: int) -> None:
        self._credit_out[stream_id] = consumed
        self._schedule_transmit()

    def _send_credit(self) -> None:
        records, self._credit_out = self._credit_out, {}
        if self._control_stream is None:
            self._control_stream = self._quic.get_next_available_stream_id(is_unidirectional=True)
        try:
            self._quic.send_stream_data(self._control_stream,
                                        b"".join(CREDIT_RECORD.pack(sid, n) for sid, n in records.items()))
        except Exception:  # closing: nothing left to credit
            pass

    def _on_credit_records(self, data: bytes) -> None:
        data = self._control_in + data
        end = len(data) - len(data) % CREDIT_RECORD.size
        self._control_in = data[end:]
        for stream_id, consumed in CREDIT_RECORD.iter_unpack(data[:end]):
            if stream_id == CREDIT_HELLO:
                self.peer_reports_credit = True
                continue
            transport = self._streams.get(stream_id)
            if transport is not None:
                transport._on_credit(consumed)  # noqa: SLF001

    def _send_by_path(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        paths = self._path_by_addr
        for data, addr in datagrams:
            paths.get(addr, self.path).send([(data, addr)])

    def use_path(self, path: "DatagramPath") -> None:
        """Send through `path` from now on (e.g. a direct path once a punch succeeded, instead of
        the relay). The peer sees our datagrams arrive from a new address and QUIC validates it
        (a migration: the dialer's side moves, as RFC 9000 allows)."""
        if path is self.path:
            return
        self.path = path
        self._path_by_addr[self._send_address] = path
        if self.dialed:
            try:
                # a new path takes a fresh connection id (RFC 9000 9.5)
                self._quic.change_connection_id()
                self._quic.send_ping(0)
            except Exception:
                pass
        self._schedule_transmit()

    def move_to(self, address: tuple, path: "DatagramPath") -> None:
        """A dialed connection sends to the peer at `address` through `path` from now on: the peer
        was dialed at its relay's address and a check to one of its direct candidates answered.
        The peer (QUIC's server) sees the same client address arrive another way and answers that
        way; this side translates between `address` and the one qh3 keeps (it cannot be told another)."""
        address = tuple(address)
        if not self.dialed or address == tuple(self._send_address):
            return
        if self._quic_peer_address is None:
            self._quic_peer_address = tuple(self._send_address)
        elif address == self._quic_peer_address:
            self._quic_peer_address = None  # back where qh3 believes the peer is
        self._send_address = address
        self.remote_address = (address[0], address[1])
        self._path_by_addr = {self._quic_peer_address or address: path}
        self.path = path
        try:
            self._quic.send_ping(0)
        except Exception:
            pass
        self._schedule_transmit()

    @property
    def path_kind(self) -> str:
        """How this connection's datagrams reach the peer now: "direct" or "relayed" (by our
        own sending path; an accepted connection relayed by the *peer's* relay looks direct here)."""
        return self.path.kind

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
        reason = short_reason(reason)
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
        reader, writer = self._auth_reader, self._auth_writer
        try:
            node_id, claims, nonce = await challenge_dialer(
                endpoint.identity, endpoint.alpn, lambda: read_frame(reader, AUTH_FRAME_MAX_BYTES),
                lambda *frames: _send_frames(writer, frames), timeout=endpoint.auth_timeout,
                protocol=endpoint.protocol)
            verdict = await authorize_dialer(endpoint.authorize, node_id, claims, nonce)
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
            reason = short_reason(verdict)
            writer.write(encode_frame(verdict_frame(False, reason)))
            self._transmit()
            self._close(CLOSE_AUTH_REJECTED, reason)
            return
        self.peer_node_id, self.claims = node_id, claims
        self.authenticated = True  # before the verdict leaves, so the dialer's streams find us ready
        self._say_hello()
        writer.write(encode_frame(verdict_frame(True)))
        writer.close()
        endpoint._connection_authenticated(self)

    async def _dial_auth(self, expected_node_id: str | None,
                         claims_for: Callable[[bytes, str], dict]) -> None:
        """Dialer side: pin the server's key, then answer its challenge."""
        await asyncio.shield(self._handshake_done)
        certificate = self._quic.get_peercert()  # verify_mode is CERT_NONE: the pin is the check
        try:
            server_id = pinned_server_id(certificate_key(certificate.public_bytes()) if certificate is not None else None,
                                         expected_node_id)
        except AuthError as exc:
            self._close(CLOSE_PIN_MISMATCH, exc.reason)
            raise
        self.peer_node_id = server_id
        reader, writer = self._auth_reader, self._auth_writer
        try:
            verdict = await answer_server(
                self._endpoint.identity, self._endpoint.alpn, server_id,
                lambda: read_frame(reader, AUTH_FRAME_MAX_BYTES), lambda *frames: _send_frames(writer, frames),
                claims_for=claims_for, protocol=self._endpoint.protocol)
        except (FrameError, ConnectionError) as exc:
            if self.is_closed:
                raise self._closed_error() from None
            self._close(CLOSE_AUTH_FAILED, f"authentication exchange failed: {exc}")
            raise ConnectionError(f"authentication exchange with {self._describe()} failed: {exc}") from None
        except AuthError as exc:
            self._close(CLOSE_AUTH_FAILED, exc.reason)
            raise
        try:
            check_verdict(verdict)
        except AuthError as exc:
            self._close(CLOSE_AUTH_REJECTED, exc.reason)
            raise
        writer.close()
        self.authenticated = True
        self._say_hello()
        if self._on_stream is not None and self._incoming_queue:
            self.on_stream = self._on_stream  # dispatch what arrived with the verdict


class LeanQuicConnection(QuicConnection):
    """qh3's connection without its per-datagram packet logging: `datagrams_to_send` parses every
    packet header it sends in Python for a logger we never set (measured: most of a bulk sender's
    time outside the native core), and the receive calls slice each datagram for it."""

    def receive_many_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        if self._core is None or not self._handshake_complete or self._quic_logger is not None:
            super().receive_many_datagrams(datagrams, addr, now)
            return
        self._call_core(self._core.receive_many_datagrams, datagrams, self._normalize_address(addr), now)
        self._drain_core()

    def receive_gro_buffer(self, buffer: bytes, segment_size: int, addr: Any, now: float) -> None:
        # qh3's own slices a copy of every datagram for the logger, before the core gets the buffer
        if self._core is None or not self._handshake_complete or self._quic_logger is not None:
            super().receive_gro_buffer(buffer, segment_size, addr, now)
            return
        self._call_core(self._core.receive_gro_buffer, buffer, segment_size, self._normalize_address(addr), now)
        self._drain_core()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        poll = core.poll_transmit
        datagrams = []
        try:
            while (transmit := poll(now)) is not None:
                datagrams.append((transmit[0], transmit[1]))
        except RuntimeError as exc:  # what qh3's own wrapper turns into QuicConnectionError
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams


def certificate_key(der: bytes) -> object:
    return x509.load_der_x509_certificate(der).public_key()


async def _send_frames(writer: asyncio.StreamWriter, frames: tuple[dict, ...]) -> None:
    writer.write(b"".join(encode_frame(frame) for frame in frames))
    await writer.drain()
