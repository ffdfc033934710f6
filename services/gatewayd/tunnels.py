"""The data-plane tunnels between gateways: each local TCP connection to a forward port becomes a
tunnel to a peer's loopback service (its ggml-rpc-server or its llama-server).

Two lanes, same framing:
  * tls-tcp — the fast lane: TLS 1.3 over a direct TCP connection per tunnel. The dialer pins the
    server certificate's key to the peer's node id; the server authenticates the dialer in-band
    with a signed challenge (`common.identity`), since `ssl` cannot verify self-signed client
    certificates by pinning.
  * quic — one authenticated `QuicEndpoint` connection per peer, one stream per tunnel; the
    fallback when TCP does not get through.
After authentication the dialer sends {"type": "open", "kind": ...}; the far side checks that the
dialer is a member and that it serves that kind, connects to the target, and answers with a
verdict frame; then both sides splice raw bytes.

Setup runs on the event loop. An established TLS tunnel is then pumped by two blocking threads
(`TlsPump`), which cuts the per-message cost of the two Python hops; TLS runs on `ssl.SSLObject`
over the raw socket, since close_notify is a half-close in TLS 1.3 and asyncio's SSL transport
cannot half-close. The QUIC lane's splice is protocol-based (asyncio Protocol callbacks writing
straight into the other transport; no coroutine per chunk). Both carry half-close and apply
backpressure both ways.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from common.frames import FrameError, encode_frame, read_frame
from common.identity import AuthError, NodeIdentity
from common.quic import PeerIdentityMismatch, QuicEndpoint, QuicPeerConnection
from common.nat.candidates import gather, socket_mappings, through_relay
from common.nat.reach import EndpointReach, follow_answered_check, race_dial
from common.nat.turn import open_relays
from common.quic.auth import answer_server, challenge_dialer
from common.quic.retry import HandshakeSlots
from services.gatewayd.sockets import (Target, accept_on_loop, announce_hosts, connect_local, describe_target,
                                       race_tcp_connect, stop_accepting)
from services.gatewayd.splice import PeerStats, Splice
from services.gatewayd.tls_lane import HANDSHAKE_FRAME_MAX, TlsSetup

log = logging.getLogger("mesh.tunnels")

QUIC_ALPN = "mesh-tunnel/1"
TLS_AUTH_CONTEXT = "mesh-tunnel-tls/1"
LANE_TCP = "tls-tcp"
LANE_QUIC = "quic"
TCP_CONNECT_TIMEOUT = 1.5     # auto mode falls back to QUIC after this
SETUP_TIMEOUT = 5.0           # TLS handshake + auth + verdict, and a QUIC dial
STRANGER_TIMEOUT = 3.0        # TLS handshake + the dialer's signed answer (the server side)
MAX_UNAUTHENTICATED = 64      # TLS-lane connections still proving themselves, all sources together
MAX_UNAUTHENTICATED_PER_SOURCE = 16
TARGET_CONNECT_TIMEOUT = 5.0
TCP_RETRY_AFTER = 60.0        # a peer that needed QUIC gets TCP tried again after this


@dataclass
class PeerDataAddrs:
    node_id: str
    tcp: list[tuple[str, int]] = field(default_factory=list)
    quic: list[tuple[str, int]] = field(default_factory=list)


# --- the service ---------------------------------------------------------------------------------

class TunnelService:
    """Forward ports on 127.0.0.1 to peers' loopback services, and serve peers' tunnels to ours."""

    def __init__(self, identity: NodeIdentity, *, is_member: Callable[[str], bool],
                 local_target: Callable[[str], Target | None],
                 allow: Callable[[str, str], str | None | Awaitable[str | None]] | None = None,
                 bind_host: str = "0.0.0.0", tcp_port: int = 0, quic_port: int = 0, prefer: str = "auto",
                 stun: list[str] | None = None, relays: list[str] | None = None):
        if prefer not in ("auto", "tcp", "quic"):
            raise ValueError(f"prefer must be auto, tcp or quic, not {prefer!r}")
        self.identity = identity
        self.is_member = is_member
        self.local_target = local_target
        self.allow = allow  # (dialer node id, kind) -> refusal reason or None
        self.bind_host = bind_host
        self.tcp_port = tcp_port
        self.quic_port = quic_port
        self.stun = list(stun or [])
        self.reach: EndpointReach | None = None
        self.direct_quic: list[tuple[str, int]] = []
        self.relay_urls = list(relays or [])
        self.relays: list = []   # TURN allocations on the QUIC lane's socket
        self.relay_failures: list[tuple[str, str]] = []
        self.prefer = prefer
        self._stats: dict[str, PeerStats] = {}
        self._lane: dict[str, str] = {}
        self._tcp_failed_at: dict[str, float] = {}
        self._good_tcp_addr: dict[str, tuple[str, int]] = {}
        self._quic_connections: dict[str, QuicPeerConnection] = {}
        self._quic_dial_locks: dict[str, asyncio.Lock] = {}
        self._forwards: dict[int, socket.socket] = {}  # port -> its listening socket
        self._splices: set[Splice] = set()
        self._tasks: set[asyncio.Task] = set()
        self._tcp_listener: socket.socket | None = None
        self._unauthenticated: HandshakeSlots[socket.socket] = HandshakeSlots(
            per_source=MAX_UNAUTHENTICATED_PER_SOURCE, total=MAX_UNAUTHENTICATED)
        self._stranger_tasks: dict[socket.socket, asyncio.Task] = {}  # their _serve_tls
        self.strangers_dropped = 0
        self._quic: QuicEndpoint | None = None
        self._closing = False
        self._server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self._server_tls.load_cert_chain(identity.cert_path, identity.key_path)
        self._server_tls.num_tickets = 0  # no resumption: saves post-handshake messages
        self._client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client_tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self._client_tls.check_hostname = False
        self._client_tls.verify_mode = ssl.CERT_NONE  # self-signed: pinned to the node id instead

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.bind_host, self.tcp_port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(sockaddr)
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._tcp_listener = listener
        accept_on_loop(listener, self._accept_tls)
        self._quic = QuicEndpoint(self.identity, alpn=QUIC_ALPN, host=self.bind_host, port=self.quic_port,
                                  authorize=self._authorize_quic, on_connection=self._on_quic_connection,
                                  defer_acks=True)  # request/response: ACKs ride the replies
        await self._quic.start()
        self.reach = EndpointReach(self._quic)  # STUN + hole punching on the QUIC lane's socket
        await self.reach.discover(self.stun)
        tcp_port = listener.getsockname()[1]
        quic_port = self._quic.local_address[1]
        hosts = announce_hosts(self.bind_host)
        quic = gather([(h, quic_port) for h in hosts], self.reach.nat.public, self.reach.nat.behaviour)
        self.relays, self.relay_failures = await open_relays(self._quic, self.relay_urls)
        self.direct_quic = quic
        return [(h, tcp_port) for h in hosts], self.quic_candidates()

    def quic_candidates(self) -> list[tuple[str, int]]:
        """The QUIC lane's candidates: direct ones, behind a symmetric NAT how our relays and STUN
        servers saw us (common.nat.candidates.socket_mappings says why), then our relays' relayed
        addresses."""
        mapped = socket_mappings(self.reach.nat.behaviour, [a.mapped for a in self.relays] +
                                 [s.mapped for s in self.reach.nat.servers], self.direct_quic) \
            if self.reach is not None else []
        return self.direct_quic + mapped + [a.relayed for a in self.relays if a.relayed is not None]

    def punch(self, peers: list[PeerDataAddrs], public_ips: list[str] | None = None,
              relay_addrs: set[tuple[str, int]] | None = None) -> None:
        """Connectivity checks toward the QUIC candidates of peers we hold no direct QUIC
        connection to (none, or one through our relay or to their relayed address, `relay_addrs`):
        our NAT opens toward them while theirs opens toward us (they do the same)."""
        if self.reach is None:
            return
        relay_addrs = relay_addrs or set()

        def relayed(c: QuicPeerConnection) -> bool:
            return through_relay(c.path_kind == "relayed", c.remote_address, relay_addrs)
        # Every live connection to a peer counts: two that crossed (both ends dialed at once) both carry
        # tunnels, whichever of them _quic_connections names.
        live = self._quic.connections if self._quic is not None else []
        by_peer: dict[str, list[QuicPeerConnection]] = {}
        for c in live:
            by_peer.setdefault(c.peer_node_id, []).append(c)
        targets = sorted({(h, int(p)) for peer in peers for h, p in peer.quic
                          if not by_peer.get(peer.node_id) or any(relayed(c) for c in by_peer[peer.node_id])})
        if targets:
            self._spawn(self.reach.check_all(targets))
        if self.relays:
            ips = sorted({h for peer in peers for h, _ in peer.quic} | set(public_ips or [])
                         | {a.relayed[0] for a in self.relays if a.relayed})
            for allocation in self.relays:
                allocation.permit([ip for ip in ips if not ip.startswith("127.")])
        candidates = {peer.node_id: peer.quic for peer in peers}
        for connection in live:
            if connection.peer_node_id in candidates:
                follow_answered_check(connection, self.reach, relay_addrs, candidates[connection.peer_node_id],
                                      "QUIC lane to")

    async def close(self) -> None:
        self._closing = True
        for port in list(self._forwards):
            await self.close_forward(port)
        for splice in list(self._splices):
            splice.close(abort=True)
        for task in list(self._tasks):
            task.cancel()
        for allocation in self.relays:
            await allocation.close()
        if self._tcp_listener is not None:
            stop_accepting(self._tcp_listener)
            self._tcp_listener = None
        if self._quic is not None:
            await self._quic.close()
        await asyncio.sleep(0)  # let transports deliver connection_lost

    def stats(self) -> dict:
        out = {}
        for node_id, s in self._stats.items():
            connection = self._reported_connection(node_id)
            rtt = connection.rtt() if connection is not None and not connection.is_closed else None
            out[node_id] = {"node_id": node_id, "lane": s.lane, "bytes_in": s.bytes_in,
                            "path": "" if connection is None or connection.is_closed else connection.path_kind,
                            "remote": None if connection is None or connection.is_closed else connection.remote_address,
                            "bytes_out": s.bytes_out, "streams": s.streams, "open_streams": s.streams,
                            "last_error": s.last_error,
                            "rtt_ms": None if rtt is None else round(rtt * 1000, 3)}
        return out

    def _reported_connection(self, node_id: str) -> QuicPeerConnection | None:
        """The QUIC lane's connection to a peer that status describes: of the live ones (two may have
        crossed), one carrying tunnels, relayed first (so a connection left behind on a relay shows)."""
        named = self._quic_connections.get(node_id)
        live = [c for c in (self._quic.connections if self._quic is not None else []) if c.peer_node_id == node_id]
        busy = [c for c in live if c.stream_count() > 0]
        if not busy:
            return named if named is not None and not named.is_closed else (live[0] if live else None)
        return max(busy, key=lambda c: (c.path_kind == "relayed", c is named))

    def lane_for(self, node_id: str) -> str | None:
        """The lane that last carried a tunnel to this peer."""
        return self._lane.get(node_id)

    def _peer_stats(self, node_id: str) -> PeerStats:
        stats = self._stats.get(node_id)
        if stats is None:
            stats = self._stats[node_id] = PeerStats()
        return stats

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- forwards (dialing side) -----------------------------------------------------------------

    async def open_forward(self, peer: PeerDataAddrs, kind: str) -> int:
        # A plain socket, not an asyncio server: the TLS lane's pump takes the accepted sockets over.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        port = listener.getsockname()[1]

        def new_local_connection(sock: socket.socket) -> None:
            splice = Splice(self, peer.node_id, self._peer_stats(peer.node_id), port)
            splice.local_sock = sock  # not read until the tunnel is up: the kernel buffers it
            self._splices.add(splice)
            splice.setup_task = self._spawn(self._connect_splice(splice, peer, kind))

        accept_on_loop(listener, new_local_connection)
        self._forwards[port] = listener
        return port

    async def close_forward(self, port: int) -> None:
        listener = self._forwards.pop(port, None)
        if listener is None:
            return
        stop_accepting(listener)
        for splice in [s for s in self._splices if s.forward_port == port]:
            splice.close(abort=True)

    def drop_served(self, kind: str, keep: Callable[[str], bool]) -> int:
        """Close the `kind` tunnels peers opened to us whose dialer `keep` refuses now. A tunnel whose path
        died stays open otherwise (nothing is in flight to notice), and a ggml-rpc-server serves one client
        at a time: after a heal, the host's new llama-server would wait behind the stale one."""
        stale = [s for s in self._splices if s.forward_port is None and s.kind == kind and not keep(s.peer_id)]
        for splice in stale:
            splice.close(abort=True)
        return len(stale)

    async def _connect_splice(self, splice: Splice, peer: PeerDataAddrs, kind: str) -> None:
        try:
            await self._open_tunnel(splice, peer, kind)
        except asyncio.CancelledError:
            splice.close(abort=True)
            raise
        except Exception as exc:  # already recorded in last_error; the local client sees a reset
            log.info("tunnel to %s (%s) failed: %s", peer.node_id, kind, exc)
            splice.close(abort=True)

    def _lane_order(self, peer: PeerDataAddrs) -> list[str]:
        if self.prefer == "tcp":
            return [LANE_TCP]
        if self.prefer == "quic":
            return [LANE_QUIC]
        lanes = []
        if peer.tcp:
            lanes.append(LANE_TCP)
        if peer.quic:
            lanes.append(LANE_QUIC)
        failed_at = self._tcp_failed_at.get(peer.node_id)
        if (self._lane.get(peer.node_id) == LANE_QUIC and failed_at is not None
                and time.monotonic() - failed_at < TCP_RETRY_AFTER and len(lanes) == 2):
            lanes.reverse()  # TCP failed recently: go straight to QUIC, TCP only as fallback
        return lanes

    async def _open_tunnel(self, splice: Splice, peer: PeerDataAddrs, kind: str) -> None:
        stats = splice.stats
        errors = []
        lanes = self._lane_order(peer)
        if not lanes:
            stats.last_error = f"peer {peer.node_id} announced no data addresses"
            raise ConnectionError(stats.last_error)
        for lane in lanes:
            try:
                if lane == LANE_TCP:
                    await self._open_tls_tunnel(splice, peer, kind)
                else:
                    await self._open_quic_tunnel(splice, peer, kind)
            except AuthError as exc:
                # The peer itself said no (or no address reached the right node): not a
                # transport problem, so another lane would not help.
                stats.last_error = f"{lane}: {exc.reason}"
                if not isinstance(exc, PeerIdentityMismatch):
                    raise
                errors.append(stats.last_error)
                continue
            except (OSError, asyncio.TimeoutError, FrameError) as exc:
                detail = str(exc) or type(exc).__name__
                errors.append(f"{lane}: {detail}")
                stats.last_error = errors[-1]
                if lane == LANE_TCP:
                    self._tcp_failed_at[peer.node_id] = time.monotonic()
                continue
            self._lane[peer.node_id] = lane
            stats.lane = lane
            return
        raise ConnectionError(f"no lane reached {peer.node_id}: " + "; ".join(errors))

    async def _open_tls_tunnel(self, splice: Splice, peer: PeerDataAddrs, kind: str) -> None:
        addrs = list(peer.tcp)
        good = self._good_tcp_addr.get(peer.node_id)
        if good in addrs:
            addrs.remove(good)
            addrs.insert(0, good)
        mismatches = []
        while addrs:
            sock, addr = await race_tcp_connect(addrs, TCP_CONNECT_TIMEOUT)
            addrs.remove(addr)
            setup = TlsSetup(sock, self._client_tls, server_side=False)

            async def authenticate() -> dict:
                await setup.handshake()
                server_id = setup.peer_node_id()
                if server_id != peer.node_id:
                    raise PeerIdentityMismatch(f"peer presented node id {server_id}, expected {peer.node_id}")
                return await answer_server(self.identity, TLS_AUTH_CONTEXT, server_id, setup.read_frame, setup.send,
                                           then=({"type": "open", "kind": kind},))

            try:
                verdict = await asyncio.wait_for(authenticate(), SETUP_TIMEOUT)
            except PeerIdentityMismatch as exc:
                setup.close()
                mismatches.append(f"{addr[0]}:{addr[1]}: {exc.reason}")
                continue
            except BaseException:
                setup.close()
                raise
            if verdict.get("type") != "verdict" or verdict.get("ok") is not True:
                setup.close()
                raise AuthError(str(verdict.get("reason") or "refused by the peer"))
            self._good_tcp_addr[peer.node_id] = addr
            if splice.closed:
                setup.close()
                return
            splice.attach_pump(setup)
            return
        raise PeerIdentityMismatch("; ".join(mismatches))

    async def _quic_connection(self, peer: PeerDataAddrs) -> QuicPeerConnection:
        connection = self._quic_connections.get(peer.node_id)
        if connection is not None and not connection.is_closed:
            return connection
        lock = self._quic_dial_locks.setdefault(peer.node_id, asyncio.Lock())
        async with lock:
            connection = self._quic_connections.get(peer.node_id)
            if connection is not None and not connection.is_closed:
                return connection
            assert self._quic is not None and self.reach is not None
            await self.reach.check_all([tuple(a) for a in peer.quic], timeout=0.5)  # punch, and learn what answers
            try:
                connection = await race_dial(self._quic, self.reach, peer.node_id, list(peer.quic),
                                             timeout=SETUP_TIMEOUT, relays=self.relays)
            except ConnectionError as exc:
                raise ConnectionError(f"QUIC: {exc}") from None
            self._adopt_quic_connection(connection)
            return connection

    def _adopt_quic_connection(self, connection: QuicPeerConnection) -> None:
        connection.on_stream = lambda reader, writer: self._serve_quic_stream(connection, reader, writer)
        current = self._quic_connections.get(connection.peer_node_id)
        if current is None or current.is_closed:
            self._quic_connections[connection.peer_node_id] = connection

    async def _open_quic_tunnel(self, splice: Splice, peer: PeerDataAddrs, kind: str) -> None:
        if splice.local_sock is not None:
            # The QUIC lane splices asyncio transports: the local one stays paused until attach
            # (connection_made). Cancelled meanwhile, asyncio closes it; splice.close cancels us.
            local, splice.local_sock = splice.local_sock, None
            await asyncio.get_running_loop().connect_accepted_socket(lambda: splice.local_side, local)
        connection = await self._quic_connection(peer)
        reader, writer = await connection.open_stream()
        try:
            writer.write(encode_frame({"type": "open", "kind": kind}))
            verdict = await read_frame(reader, HANDSHAKE_FRAME_MAX, timeout=SETUP_TIMEOUT)
        except BaseException:
            writer.transport.abort()
            raise
        if verdict.get("type") != "verdict" or verdict.get("ok") is not True:
            writer.transport.abort()
            raise AuthError(str(verdict.get("reason") or "refused by the peer"))
        if splice.closed:
            writer.transport.abort()
            return
        transport = writer.transport
        splice.attach(transport)  # type: ignore[arg-type]
        transport.set_protocol(splice.remote_side)  # replays bytes that came with the verdict

    # -- serving side ----------------------------------------------------------------------------

    async def _refusal(self, dialer_id: str, header: object) -> tuple[str | None, Target | None]:
        if not self.is_member(dialer_id):
            return f"node {dialer_id} is not a member of this mesh", None
        if not isinstance(header, dict) or header.get("type") != "open" or not isinstance(header.get("kind"), str):
            return "malformed tunnel header", None
        kind = header["kind"]
        if self.allow is not None:
            # Least privilege: which member may open which kind (e.g. RPC only from the plan's host).
            reason = self.allow(dialer_id, kind)
            if inspect.isawaitable(reason):
                reason = await reason
            if reason is not None:
                return reason, None
        target = self.local_target(kind)
        if target is None:
            return f"no local service for tunnel kind {kind[:40]!r}", None
        return None, target

    async def _connect_target(self, splice: Splice, target: Target) -> None:
        loop = asyncio.get_running_loop()
        # connection_made pauses reading until the tunnel is attached
        if isinstance(target, str):
            connecting = loop.create_unix_connection(lambda: splice.local_side, target)
        else:
            connecting = loop.create_connection(lambda: splice.local_side, target[0], target[1])
        await asyncio.wait_for(connecting, TARGET_CONNECT_TIMEOUT)

    def _accept_tls(self, sock: socket.socket) -> None:
        """Bound what strangers cost: connections not yet authenticated are capped per source address and
        in all; past a cap the oldest such connection is dropped (a member needs milliseconds to
        authenticate, a flood's connections sit there), and each has STRANGER_TIMEOUT to prove itself."""
        try:
            ip = sock.getpeername()[0]
        except OSError:
            sock.close()
            return
        for oldest in self._unauthenticated.admit(sock, ip):
            self.strangers_dropped += 1
            self._stranger_tasks.pop(oldest).cancel()  # _serve_tls closes the socket
        self._stranger_tasks[sock] = self._spawn(self._serve_tls(sock))

    def _release_stranger(self, sock: socket.socket) -> None:
        """Its stranger's slot is free: it authenticated, or it is gone."""
        self._unauthenticated.release(sock)
        self._stranger_tasks.pop(sock, None)

    async def _serve_tls(self, sock: socket.socket) -> None:
        setup = TlsSetup(sock, self._server_tls, server_side=True)
        splice: Splice | None = None
        try:
            verdict = await asyncio.wait_for(self._authenticate_tls_dialer(setup), SETUP_TIMEOUT)
            if verdict is None:
                return
            splice, stats = verdict
        except asyncio.CancelledError:
            setup.close()
            if splice is not None:
                splice.close(abort=True)
            raise
        except (AuthError, FrameError, OSError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
            log.info("refused a TLS tunnel: %s", exc or type(exc).__name__)
            setup.close()
            if splice is not None:
                splice.close(abort=True)
            return
        finally:
            self._release_stranger(sock)
        stats.lane = LANE_TCP
        splice.attach_pump(setup)

    async def _authenticate_tls_dialer(self, setup: TlsSetup) -> tuple[Splice, PeerStats] | None:
        """Challenge the dialer, check the tunnel header, connect the target, send the verdict."""
        async def prove() -> tuple[str, dict]:
            await setup.handshake()
            dialer_id, claims, _nonce = await challenge_dialer(self.identity, TLS_AUTH_CONTEXT, setup.read_frame,
                                                               setup.send, timeout=STRANGER_TIMEOUT)
            return dialer_id, claims
        dialer_id, _claims = await asyncio.wait_for(prove(), STRANGER_TIMEOUT)
        self._release_stranger(setup.sock)  # a known key from here on: no longer a stranger's slot
        header = await setup.read_frame()
        reason, target = await self._refusal(dialer_id, header)
        if reason is not None:
            self._note_refusal(dialer_id, reason)
            await setup.send({"type": "verdict", "ok": False, "reason": reason})
            setup.close()
            return None
        stats = self._peer_stats(dialer_id)
        splice = Splice(self, dialer_id, stats, None)
        splice.kind = header["kind"]  # type: ignore[index]
        self._splices.add(splice)
        try:
            splice.local_sock = await connect_local(target, TARGET_CONNECT_TIMEOUT)  # type: ignore[arg-type]
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"local {header['kind']} service at {describe_target(target)} is not reachable: {exc}"  # type: ignore[index]
            stats.last_error = reason
            splice.close(abort=True)
            await setup.send({"type": "verdict", "ok": False, "reason": reason})
            setup.close()
            return None
        except BaseException:
            splice.close(abort=True)
            raise
        try:
            await setup.send({"type": "verdict", "ok": True})
        except BaseException:
            splice.close(abort=True)
            raise
        return splice, stats

    def _note_refusal(self, dialer_id: str, reason: str) -> None:
        # Only members get a stats entry: strangers could otherwise grow the table without end.
        if dialer_id in self._stats or self.is_member(dialer_id):
            self._peer_stats(dialer_id).last_error = f"refused: {reason}"
        log.info("refused a tunnel from %s: %s", dialer_id, reason)

    def _authorize_quic(self, node_id: str, claims: dict, nonce: bytes) -> str | None:
        if not self.is_member(node_id):
            reason = f"node {node_id} is not a member of this mesh"
            self._note_refusal(node_id, reason)
            return reason
        return None

    def _on_quic_connection(self, connection: QuicPeerConnection) -> None:
        self._adopt_quic_connection(connection)

    async def _serve_quic_stream(self, connection: QuicPeerConnection, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        dialer_id = connection.peer_node_id
        try:
            header = await read_frame(reader, HANDSHAKE_FRAME_MAX, timeout=SETUP_TIMEOUT)
        except (FrameError, asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        reason, target = await self._refusal(dialer_id, header)
        if reason is not None:
            self._note_refusal(dialer_id, reason)
            writer.write(encode_frame({"type": "verdict", "ok": False, "reason": reason}))
            writer.close()
            return
        stats = self._peer_stats(dialer_id)
        splice = Splice(self, dialer_id, stats, None)
        splice.kind = header["kind"]  # type: ignore[index]
        self._splices.add(splice)
        try:
            await self._connect_target(splice, target)  # type: ignore[arg-type]
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"local {header['kind']} service at {describe_target(target)} is not reachable: {exc}"  # type: ignore[index]
            stats.last_error = reason
            writer.write(encode_frame({"type": "verdict", "ok": False, "reason": reason}))
            writer.close()
            splice.close(abort=True)
            return
        except asyncio.CancelledError:
            splice.close(abort=True)
            raise
        writer.write(encode_frame({"type": "verdict", "ok": True}))
        stats.lane = LANE_QUIC
        transport = writer.transport
        splice.attach(transport)  # type: ignore[arg-type]
        transport.set_protocol(splice.remote_side)
