"""The UDP endpoint: one socket per node that both accepts and dials authenticated QUIC
connections, and the demultiplexer in front of it.

qh3's `connect()` opens a socket of its own, so datagrams are routed here by destination
connection id to per-connection drivers, as qh3's `QuicServer` does, for server *and* client
connections. What the socket reads is told apart by source and first byte (RFC 7983 / RFC 9443):
from a relay server's address -> that relay (which may hand back a peer's datagram, relayed);
first byte 0-3 -> STUN (binding requests and answers: address discovery, connectivity checks);
anything else -> QUIC. A connection sends through its own `DatagramPath`.

Strangers are bounded before they authenticate (`retry`): a new connection's first Initial gets a
Retry, and only an Initial that echoes the token bound to its source address gets state; at most
MAX_UNAUTHENTICATED_PER_SOURCE such handshakes per source IP and MAX_UNAUTHENTICATED in all (past a
cap the oldest goes), each with `auth_timeout` to authenticate.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import socket
import ssl
from typing import Awaitable, Callable, Protocol

from cryptography.hazmat.primitives import serialization
from qh3._hazmat import pull_quic_header  # noqa: PLC2701 (the tuple form: no dataclass per datagram)
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.packet import QuicPacketType, encode_quic_retry, encode_quic_version_negotiation
from qh3.tls import load_pem_private_key, load_pem_x509_certificates

from common.identity import NodeIdentity
from common.messages import MESH_PROTOCOL
from common.quic.auth import Authorize
from common.quic.connection import LeanQuicConnection as QuicConnection
from common.quic.connection import QuicPeerConnection
from common.quic.limits import (CLOSE_AUTH_FAILED, CLOSE_NORMAL, CLOSE_PROTOCOL, CONNECTION_ID_LENGTH,
                                CONNECTION_RECEIVE_WINDOW, MAX_UNAUTHENTICATED,
                                MAX_UNAUTHENTICATED_PER_SOURCE, QH3_SERVER_DATAGRAM, RECEIVE_BATCH, SMALLEST_DATAGRAM,
                                STREAM_RECEIVE_WINDOW, datagram_size_for)
from common.quic.paths import (GRO_CMSG_SPACE, DatagramPath, UdpSocketPath, enable_gro, enable_icmp_errors,
                               gro_segment_size, icmp_error_text, open_udp_socket, read_icmp_errors)
from common.quic.retry import HandshakeSlots, RetryTokens

log = logging.getLogger("mesh.quic")

_SUPPORTED_VERSIONS = QuicConfiguration().supported_versions
_INITIAL = int(QuicPacketType.INITIAL)
_VERSION_NEGOTIATION = int(QuicPacketType.VERSION_NEGOTIATION)


class RelayReceiver(Protocol):
    def unwrap(self, data: bytes) -> list[tuple[bytes, tuple, DatagramPath]]:
        """Handle a datagram from the relay server; return the peers' datagrams it carried,
        each with the peer's address and the path to answer through."""


class QuicEndpoint:
    """A UDP socket that accepts and dials authenticated QUIC connections (module docstring)."""
    protocol: int | None = MESH_PROTOCOL  # said and checked in every authentication exchange (common.quic.auth)

    def __init__(self, identity: NodeIdentity, *, alpn: str, host: str = "0.0.0.0", port: int = 0,
                 authorize: Authorize = lambda node_id, claims, nonce: None,
                 on_connection: Callable[[QuicPeerConnection], Awaitable[None] | None] | None = None,
                 idle_timeout: float = 10.0, max_datagram_size: int | None = None,
                 auth_timeout: float = 10.0, retry: bool = True, defer_acks: bool = False):
        self.identity = identity
        self.alpn = alpn
        self.host = host
        self.port = port
        self.authorize = authorize
        self.on_connection = on_connection
        self.idle_timeout = idle_timeout
        self.auth_timeout = min(auth_timeout, idle_timeout) if idle_timeout else auth_timeout
        self.max_datagram_size = max_datagram_size
        # A small burst's ACK waits for the reply (common.quic.acks): for request/response traffic
        # (the data lane). Off where the RTT qh3 measures matters (meshd reports it, and plans by it):
        # qh3 counts the deferral into its RTT samples.
        self.defer_acks = defer_acks
        self._keepalive_interval = max(idle_timeout / 4.0, 0.2)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._sock: socket.socket | None = None
        self._by_cid: dict[bytes, QuicPeerConnection] = {}
        self._connections: set[QuicPeerConnection] = set()
        self.socket_path: UdpSocketPath | None = None
        # Datagrams that are not QUIC: STUN (first byte 0-3, RFC 7983) and whatever arrives from
        # a relay server's address (its responses, and peers' datagrams it forwards).
        self.on_stun: Callable[[bytes, tuple, DatagramPath], None] | None = None
        self.relay_servers: dict[tuple, RelayReceiver] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._gro = False
        self.local_address: tuple[str, int] = (host, port)
        # qh3 takes its own key and certificate types
        self._private_key = load_pem_private_key(identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self._certificate = load_pem_x509_certificates(identity.certificate.public_bytes(serialization.Encoding.PEM))[0]
        # Address validation (Retry) and the caps on strangers (module docstring). `retry=False`
        # is for measuring what a Retry costs; a node always validates.
        self.retry = retry
        self._retry_tokens = RetryTokens()
        self._pending: HandshakeSlots[QuicPeerConnection] = HandshakeSlots(
            per_source=MAX_UNAUTHENTICATED_PER_SOURCE, total=MAX_UNAUTHENTICATED)
        self.retries_sent = 0
        self.handshakes_dropped = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def connections(self) -> list[QuicPeerConnection]:
        """Open, authenticated connections (both directions)."""
        return [c for c in self._connections if c.authenticated and not c.is_closed]

    @property
    def pending_handshakes(self) -> int:
        """Accepted connections that have not authenticated yet (each holds a slot)."""
        return len(self._pending)

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM,
                                             flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = open_udp_socket(sockaddr, family)
        self._sock = sock
        self._family = family
        self.socket_path = UdpSocketPath(self._loop, sock)
        self._icmp_errors = enable_icmp_errors(sock, family)
        self._gro = enable_gro(sock)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        bound = sock.getsockname()
        self.local_address = (bound[0], bound[1])
        return self.local_address

    async def dial(self, address: tuple[str, int], *, expected_node_id: str | None,
                   claims_for: Callable[[bytes, str], dict] = lambda nonce, server_id: {},
                   timeout: float = 5.0, path: DatagramPath | None = None) -> QuicPeerConnection:
        """Dial `address` and authenticate; through `path` (e.g. a TURN allocation) instead of the
        socket when given."""
        if self._sock is None or self._closing:
            raise ConnectionError("QUIC endpoint is not running")
        host, port = address[0], int(address[1])
        sockaddr = await self._resolve(host, port)
        config = self._configuration(is_client=True, host=sockaddr[0],
                                     path_limit=getattr(path, "max_datagram", None))
        quic = QuicConnection(configuration=config)
        connection = QuicPeerConnection(self, quic, sockaddr, dialed=True, path=path or self.socket_path)
        self._connections.add(connection)
        self._by_cid[quic.host_cid] = connection
        quic.connect(sockaddr, now=self._loop.time())
        connection._transmit()
        try:
            await asyncio.wait_for(connection._dial_auth(expected_node_id, claims_for), timeout)
        except asyncio.TimeoutError:
            stage = "authentication" if connection._handshake_done.done() else "handshake"  # before _close sets it
            connection._close(CLOSE_NORMAL, "dial timed out")
            raise asyncio.TimeoutError(f"QUIC dial to {host}:{port} timed out after {timeout:g}s ({stage})") from None
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
            assert self.socket_path is not None
            self.socket_path.close()
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._by_cid.clear()
        self._connections.clear()

    # -- connections ---------------------------------------------------------------------------

    def _configuration(self, *, is_client: bool, host: str, path_limit: int | None = None) -> QuicConfiguration:
        # qh3 also advertises this as max_udp_payload_size, which caps what the peer sends us:
        # bounded by the host's network and by the path (a relay's own limit), not by the
        # client's first Initial.
        size = min(self.max_datagram_size or datagram_size_for(host), QH3_SERVER_DATAGRAM)
        if path_limit is not None:
            size = min(size, path_limit)
        # (qh3's server never sends above 1472 bytes, and with a larger setting cannot open a path
        # to a peer's new address: "path allocation failed", relayed -> direct broke. A client's
        # larger setting bought nothing: the server advertises 1472, so the client keeps to it.)
        config = QuicConfiguration(
            is_client=is_client, alpn_protocols=[self.alpn], idle_timeout=self.idle_timeout,
            max_datagram_size=max(SMALLEST_DATAGRAM, size), connection_id_length=CONNECTION_ID_LENGTH,
            max_data=CONNECTION_RECEIVE_WINDOW, max_stream_data=STREAM_RECEIVE_WINDOW,
            # A cold first handshake takes tens of ms: a 10 ms initial RTT fired a PTO, after which
            # qh3 falls back to 1200-byte datagrams (halving loopback throughput).
            initial_rtt=0.1,
        )
        if is_client:
            config.verify_mode = ssl.CERT_NONE  # self-signed: the node id is pinned after the handshake
            # Spare connection ids from the server, so that a move to another path (relayed ->
            # direct, use_path) finds one: qh3 opens no path without.
            config.active_connection_id_limit = 8
        else:
            config.certificate = self._certificate
            config.private_key = self._private_key
        return config

    def sockaddr(self, host: str, port: int) -> tuple:
        """An IPv4 (host, port) in this socket's address form (IPv4-mapped on a dual-stack socket)."""
        if self._family == socket.AF_INET6:
            return (f"::ffff:{host}", int(port), 0, 0)
        return (host, int(port))

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

    def _accept(self, original_cid: bytes, retry_cid: bytes | None, destination_cid: bytes, data: bytes,
                addr: tuple, path: DatagramPath) -> QuicPeerConnection:
        config = self._configuration(is_client=False, host=addr[0], path_limit=getattr(path, "max_datagram", None))
        quic = QuicConnection(configuration=config, original_destination_connection_id=original_cid,
                              retry_source_connection_id=retry_cid)
        connection = QuicPeerConnection(self, quic, addr, dialed=False, path=path)
        for evicted in self._pending.admit(connection, addr[0]):
            self.handshakes_dropped += 1
            evicted._close(CLOSE_AUTH_FAILED, "too many unauthenticated handshakes")
            evicted._abandon("dropped: too many unauthenticated handshakes")
        connection._auth_deadline = self._loop.call_later(
            self.auth_timeout, self._expire_unauthenticated, connection)
        self._connections.add(connection)
        self._by_cid[destination_cid] = connection
        self._by_cid[quic.host_cid] = connection
        return connection

    def _expire_unauthenticated(self, connection: QuicPeerConnection) -> None:
        if not connection.authenticated and not connection.is_closed:
            connection._close(CLOSE_AUTH_FAILED, "authentication timed out")

    def _connection_authenticated(self, connection: QuicPeerConnection) -> None:
        self._pending.release(connection)
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
        self._pending.release(connection)
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
        recvfrom, recvmsg, gro = sock.recvfrom, sock.recvmsg, self._gro
        relays = self.relay_servers
        socket_path = self.socket_path
        now = self._loop.time()
        touched: dict[QuicPeerConnection, None] = {}
        socket_error = False
        for _ in range(RECEIVE_BATCH):
            try:
                if gro:  # one read may carry several datagrams of one peer (UDP GRO)
                    data, ancillary, _, addr = recvmsg(65536, GRO_CMSG_SPACE)
                    segment = gro_segment_size(ancillary)
                else:
                    data, addr = recvfrom(65536)
                    segment = 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                socket_error = True  # an ICMP error surfacing (see _drain_icmp_errors)
                continue
            if not data:
                continue
            if segment and len(data) > segment and not (relays and addr in relays):
                connection = self._gro_connection(data, segment)
                if connection is not None:
                    try:
                        connection._gro_received(data, segment, addr, now, socket_path)
                    except Exception:
                        log.exception("dropping datagrams qh3 could not handle")
                        continue
                    touched[connection] = None
                    continue
            for datagram in ([data] if not segment or len(data) <= segment else
                             [data[i:i + segment] for i in range(0, len(data), segment)]):
                if relays and addr in relays:
                    for inner, peer_addr, path in relays[addr].unwrap(datagram):
                        self._route_quic(inner, peer_addr, path, now, touched)
                    continue
                self._route_quic(datagram, addr, socket_path, now, touched)
        if self._icmp_errors and (socket_error or not touched):
            self._drain_icmp_errors()
        for connection in touched:
            try:
                connection._after_receive()
            except Exception:
                log.exception("QUIC connection %r failed while processing input", connection)
                connection._close(CLOSE_PROTOCOL, "internal error")

    def _gro_connection(self, data: bytes, segment: int) -> QuicPeerConnection | None:
        """The connection a GRO burst belongs to, if all of it is short-header packets of one
        connection (the usual case: one peer's burst); None: route it datagram by datagram (two
        connections between the same two sockets, a handshake, STUN)."""
        if data[0] & 0xC0 != 0x40:  # short header (fixed bit set); STUN and long headers go the slow way
            return None
        cid = data[1:1 + CONNECTION_ID_LENGTH]
        connection = self._by_cid.get(cid)
        if connection is None:
            return None
        end = 1 + CONNECTION_ID_LENGTH
        for offset in range(segment, len(data), segment):
            if data[offset] & 0xC0 != 0x40 or data[offset + 1:offset + end] != cid:
                return None
        return connection

    def _route_quic(self, data: bytes, addr: tuple, path: DatagramPath, now: float,
                    touched: dict[QuicPeerConnection, None]) -> None:
        """One datagram that came through `path` (the socket, or a relay that unwrapped it) to its connection."""
        if not data:
            return
        if data[0] < 4:  # STUN (RFC 7983): a connectivity check or its answer; QUIC always sets the fixed bit 0x40
            if self.on_stun is not None:
                self.on_stun(data, addr, path)
            return
        if data[0] & 0x80 == 0:  # short header: the destination CID follows the first byte
            connection = self._by_cid.get(data[1:1 + CONNECTION_ID_LENGTH])
        else:
            connection = self._route_long_header(data, addr, path)
        if connection is None:
            return
        try:
            connection._datagram_received(data, addr, now, path)
        except Exception:
            log.exception("dropping a datagram qh3 could not handle")
            return
        touched[connection] = None

    def _drain_icmp_errors(self) -> None:
        """Read ICMP errors queued on the socket (IP_RECVERR). A dial whose handshake has not
        finished fails at once when its destination answers "port unreachable", instead of
        waiting for its timeout. Established connections ignore ICMP: it is unauthenticated, and
        their idle timeout already notices a dead peer."""
        if self._sock is None:
            return
        for addr, error in read_icmp_errors(self._sock):
            for connection in list(self._connections):
                if (connection.dialed and not connection._handshake_done.done()
                        and connection.path is self.socket_path
                        and connection._send_address[:2] == addr[:2]):
                    connection._abandon(icmp_error_text(error))

    def _route_long_header(self, data: bytes, addr: tuple, path: DatagramPath) -> QuicPeerConnection | None:
        try:
            version, packet_type, _, destination_cid, source_cid, token = \
                pull_quic_header(data, 0, CONNECTION_ID_LENGTH)[:6]
        except ValueError:
            return None
        connection = self._by_cid.get(destination_cid)
        if connection is not None:
            return connection
        if packet_type == _VERSION_NEGOTIATION:
            return None
        if version is not None and version not in _SUPPORTED_VERSIONS:
            path.send([(encode_quic_version_negotiation(
                source_cid=destination_cid, destination_cid=source_cid,
                supported_versions=_SUPPORTED_VERSIONS), addr)])
            return None
        if packet_type != _INITIAL or len(data) < SMALLEST_DATAGRAM or self._closing:
            return None
        if not self.retry:
            return self._accept(destination_cid, None, destination_cid, data, addr, path)
        now = self._loop.time()
        checked = self._retry_tokens.check(addr, token, now) if token else None
        if checked is None:
            # Keep nothing: the token binds this address to the ids; only an echo gets state.
            retry_cid = os.urandom(CONNECTION_ID_LENGTH)
            path.send([(encode_quic_retry(
                version=version, source_cid=retry_cid, destination_cid=source_cid,
                original_destination_cid=destination_cid,
                retry_token=self._retry_tokens.issue(addr, destination_cid, retry_cid, now)), addr)])
            self.retries_sent += 1
            return None
        original_cid, retry_cid = checked
        if destination_cid != retry_cid:
            return None
        return self._accept(original_cid, retry_cid, destination_cid, data, addr, path)
