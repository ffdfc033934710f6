"""A TURN client (RFC 8656, UDP, long-term credentials) on the QUIC endpoint's own socket.

A `TurnAllocation` is a datagram path (common/quic/paths.py): a connection that sends through it
has its datagrams wrapped (ChannelData once a channel is bound, a Send indication until then) and
forwarded by the relay from its relayed address; what the relay sends back arrives from the relay
server's address and is unwrapped by `unwrap`. The relay sees QUIC packets only: TLS 1.3 inside
QUIC, pinned to node ids end to end.

Used from aioice: `aioice.stun.Message` (codec, MESSAGE-INTEGRITY, FINGERPRINT) and
`aioice.turn.make_integrity_key`. Not used: `aioice.turn.TurnClientUdpProtocol` /
`create_turn_endpoint` — they open a socket of their own, so the relay could not share the port
(and the NAT mapping) that STUN, hole punching and direct QUIC use, and a connection could not move
between relayed and direct without a new socket.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from typing import Callable

from aioice import stun
from aioice.turn import make_integrity_key

from common.nat.candidates import home_network
from common.nat.transactions import answered_with_retransmits

log = logging.getLogger("mesh.nat")

ALLOCATE_TIMEOUT_S = 3.0
REQUEST_RETRANSMITS = (0.0, 0.3, 0.9, 1.8)
LIFETIME_S = 600
REFRESH_EVERY_S = 240          # allocations live LIFETIME_S, permissions 300 s, channels 600 s
PROBE_EVERY_S = 5.0            # a Refresh this often tells a relay that died or restarted (allocation gone)
REALLOCATE_EVERY_S = 2.0       # while the allocation is lost, allocate again this often
MAX_QUEUED = 256               # datagrams waiting for a permission, per peer
RELAYED_DATAGRAM = 1200        # what one QUIC datagram may be on a relayed path (room for TURN's header)
UDP = 17
REFUSED_RETRY_S = 60.0


class TurnError(Exception):
    """The relay refused or did not answer; the message says what to do."""


def parse_relay_url(text: str) -> tuple[str, str, str, int]:
    """'turn:USER:PASS@HOST[:PORT]' (also 'turn://…') -> (user, password, host, port)."""
    from common.addresses import parse_host_port
    hint = "expected turn:USER:PASSWORD@HOST:PORT, e.g. turn:mesh:secret@relay.example.org:3478"
    raw = text.strip()
    scheme, sep, rest = raw.partition(":")
    if not sep or scheme.lower() != "turn":
        raise ValueError(f"relay URL {redact(raw)!r} does not start with turn: ({hint})")
    rest = rest[2:] if rest.startswith("//") else rest
    credentials, at, where = rest.rpartition("@")
    if not at:
        raise ValueError(f"relay URL {redact(raw)!r} has no credentials ({hint})")
    user, colon, password = credentials.partition(":")
    if not colon or not user or not password:
        raise ValueError(f"relay URL {redact(raw)!r} needs both a user and a password ({hint})")
    try:
        host, port = parse_host_port(where.split("?", 1)[0])
    except ValueError as exc:
        raise ValueError(f"relay URL {redact(raw)!r}: {exc} ({hint})") from None
    return user, password, host, port


def redact(text: str) -> str:
    """The relay URL without its password, for logs and status."""
    head, at, tail = text.rpartition("@")
    if not at:
        return text
    scheme_user = head.rsplit(":", 1)[0]
    return f"{scheme_user}:***@{tail}"


def channel_data(channel: int, payload: bytes) -> bytes:
    return struct.pack("!HH", channel, len(payload)) + payload


def parse_channel_data(data: bytes) -> tuple[int, bytes] | None:
    if len(data) < 4 or not 0x40 <= data[0] <= 0x4F:
        return None
    channel, length = struct.unpack("!HH", data[:4])
    if len(data) < 4 + length:
        return None
    return channel, data[4:4 + length]


def _plain(addr: tuple) -> tuple[str, int]:
    host = str(addr[0])
    return (host[7:] if host.startswith("::ffff:") else host), int(addr[1])


class TurnAllocation:
    """One allocation on one TURN server, shared by every connection of an endpoint that uses it."""

    kind = "relayed"
    max_datagram = RELAYED_DATAGRAM

    def __init__(self, send_raw: Callable[[bytes, tuple], None], server: tuple, sockaddr: Callable[[str, int], tuple],
                 *, username: str, password: str, label: str):
        self._send_raw = send_raw     # to the relay server, on the endpoint's socket
        self.server = server           # its address as the socket reports it (recvfrom's form)
        self._sockaddr = sockaddr      # (host, port) -> the endpoint's address form
        self.username, self._password = username, password
        self.label = label
        self._server_host = _plain(server)[0]
        self.relayed: tuple[str, int] | None = None
        self.mapped: tuple[str, int] | None = None
        self.error = ""
        self._realm = ""
        self._nonce = b""
        self._key = b""
        self._pending: dict[bytes, asyncio.Future] = {}
        self._permitted: dict[str, float] = {}          # peer IP -> when permitted
        self._permitting: dict[str, asyncio.Task] = {}
        self._refused: dict[str, float] = {}            # peer IP -> when the relay refused it (asked again later)
        self._channels: dict[tuple[str, int], int] = {}  # peer -> bound channel
        self._peers_by_channel: dict[int, tuple[str, int]] = {}
        self._binding: set[tuple[str, int]] = set()
        self._queued: dict[str, list[tuple[bytes, tuple[str, int]]]] = {}
        self._next_channel = 0x4000
        self._tasks: set[asyncio.Task] = set()
        self._upkeep: asyncio.Task | None = None
        self.on_change: Callable[[], None] = lambda: None  # the relayed address changed (lost, or a new one)
        self.bytes_out = 0   # QUIC bytes we sent through the relay
        self.bytes_in = 0    # QUIC bytes the relay brought us

    def _may_reach(self, ip: str) -> bool:
        """Loopback only from a relay on loopback, a home network only from a relay inside one."""
        if ip.startswith("127."):
            return self._server_host.startswith("127.")
        return not home_network(ip) or home_network(self._server_host)

    # -- transactions ---------------------------------------------------------------------------

    def _signed(self, method: int, attributes: dict) -> stun.Message:
        message = stun.Message(message_method=method, message_class=stun.Class.REQUEST,
                               transaction_id=secrets.token_bytes(12))
        message.attributes.update(attributes)
        if self._key:
            message.attributes["USERNAME"] = self.username
            message.attributes["REALM"] = self._realm
            message.attributes["NONCE"] = self._nonce
            message.add_message_integrity(self._key)
        else:
            message.add_fingerprint()
        return message

    async def _request(self, method: int, attributes: dict, timeout: float = ALLOCATE_TIMEOUT_S) -> stun.Message:
        """A request, authenticated once we know realm and nonce; retried once on 401/438."""
        for attempt in range(3):
            message = self._signed(method, attributes)
            response = await self._transact(message, timeout)
            if response.message_class == stun.Class.RESPONSE:
                return response
            code = response.error_code
            if code in (401, 438) and attempt < 2 and "NONCE" in response.attributes:
                had_key = bool(self._key)
                self._realm = response.attributes.get("REALM", self._realm)
                self._nonce = response.attributes["NONCE"]
                self._key = make_integrity_key(self.username, self._realm, self._password)
                if code == 401 and had_key:
                    break  # our signed request was refused: wrong credentials
                continue
            reason = response.attributes.get("ERROR-CODE", (code, ""))[1]
            raise TurnError(f"relay {self.label} refused: {code} {reason}")
        raise TurnError(f"relay {self.label} refused the credentials (401 Unauthorized); check USER:PASSWORD "
                        f"in --relay")

    async def _transact(self, message: stun.Message, timeout: float) -> stun.Message:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[message.transaction_id] = future
        data = bytes(message)
        try:
            if await answered_with_retransmits(future, lambda: self._send_raw(data, self.server), REQUEST_RETRANSMITS,
                                               timeout):
                return future.result()
            raise TurnError(f"relay {self.label} did not answer within {timeout:g} s; check its address and that "
                            f"UDP to it is allowed")
        finally:
            self._pending.pop(message.transaction_id, None)

    # -- allocation -------------------------------------------------------------------------------

    async def allocate(self) -> tuple[str, int]:
        response = await self._request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP << 24,
                                                               "LIFETIME": LIFETIME_S})
        self.relayed = _plain(response.attributes["XOR-RELAYED-ADDRESS"])
        if "XOR-MAPPED-ADDRESS" in response.attributes:
            self.mapped = _plain(response.attributes["XOR-MAPPED-ADDRESS"])
        self.error = ""
        self._refused.clear()  # refusals while the relay was away were timeouts
        if self._upkeep is None:
            self._upkeep = self._spawn(self._upkeep_forever())
        log.info("relay %s: allocated %s:%d", self.label, *self.relayed)
        return self.relayed

    async def _upkeep_forever(self) -> None:
        """Refresh the allocation (a probe every PROBE_EVERY_S, permissions and channels every
        REFRESH_EVERY_S); when the relay stops answering or no longer knows the allocation (it
        restarted), allocate again until it answers. The new relayed address is announced anew."""
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(PROBE_EVERY_S if self.relayed is not None else REALLOCATE_EVERY_S)
            try:
                if self.relayed is None:
                    self._realm, self._nonce, self._key = "", b"", b""  # a restarted relay has new nonces
                    await self.allocate()
                    log.info("relay %s: allocation restored", self.label)
                    self.on_change()
                    continue
                await self._request(stun.Method.REFRESH, {"LIFETIME": LIFETIME_S})
                if time.monotonic() - refreshed >= REFRESH_EVERY_S:
                    refreshed = time.monotonic()
                    for ip in list(self._permitted):
                        await self._request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 0)})
                    for peer, channel in list(self._channels.items()):
                        await self._request(stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": channel,
                                                                       "XOR-PEER-ADDRESS": peer})
                self.error = ""
            except TurnError as exc:
                if self.relayed is not None:
                    log.warning("relay %s lost its allocation (%s); allocating again every %g s", self.label, exc,
                                REALLOCATE_EVERY_S)
                    self._forget_allocation()
                    self.on_change()
                self.error = f"{exc} (allocating again every {REALLOCATE_EVERY_S:g} s; relayed paths wait)"

    def _forget_allocation(self) -> None:
        """The relay no longer holds our allocation: its permissions and channels went with it."""
        self.relayed = None
        self._permitted.clear()
        self._refused.clear()
        self._channels.clear()
        self._peers_by_channel.clear()
        self._binding.clear()
        self._queued.clear()

    def permit(self, ips: list[str]) -> None:
        """Let these peers' datagrams in through our relayed address (TURN permissions are per IP)."""
        if self.relayed is None:
            return  # lost: permissions wait for the new allocation
        now = time.monotonic()
        for ip in ips:
            if not self._may_reach(ip):
                continue  # coturn would close the whole allocation (403 for loopback, unreachable LANs)
            if ip in self._permitted or ip in self._permitting or now - self._refused.get(ip, -1e9) < REFUSED_RETRY_S:
                continue
            self._permitting[ip] = self._spawn(self._permit(ip))

    async def _permit(self, ip: str) -> None:
        try:
            await self._request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 0)})
            self._permitted[ip] = time.monotonic()
        except TurnError as exc:
            self._refused[ip] = time.monotonic()
            log.info("relay %s: no permission for %s: %s", self.label, ip, exc)
        finally:
            self._permitting.pop(ip, None)
        for data, peer in self._queued.pop(ip, []):
            if ip in self._permitted:
                self._send_one(data, peer)

    async def _bind(self, peer: tuple[str, int]) -> None:
        channel = self._next_channel
        self._next_channel = 0x4000 + (self._next_channel - 0x4000 + 1) % 0x1000
        try:
            await self._request(stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer})
            self._channels[peer] = channel
            self._peers_by_channel[channel] = peer
        except TurnError as exc:
            log.info("relay %s: channel for %s:%d not bound: %s", self.label, *peer, exc)
        finally:
            self._binding.discard(peer)

    # -- DatagramPath ---------------------------------------------------------------------------

    def send(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        if self.relayed is None:
            return  # the relay lost our allocation; QUIC retransmits once it is back
        for data, addr in datagrams:
            peer = _plain(addr)
            if not self._may_reach(peer[0]):
                continue  # never through this relay (see permit)
            if peer[0] not in self._permitted:
                queue = self._queued.setdefault(peer[0], [])
                if len(queue) < MAX_QUEUED:
                    queue.append((data, peer))
                self.permit([peer[0]])
                continue
            self._send_one(data, peer)

    def _send_one(self, data: bytes, peer: tuple[str, int]) -> None:
        self.bytes_out += len(data)
        channel = self._channels.get(peer)
        if channel is not None:
            self._send_raw(channel_data(channel, data), self.server)
            return
        indication = stun.Message(message_method=stun.Method.SEND, message_class=stun.Class.INDICATION,
                                  transaction_id=secrets.token_bytes(12))
        indication.attributes["XOR-PEER-ADDRESS"] = peer
        indication.attributes["DATA"] = data
        self._send_raw(bytes(indication), self.server)
        if peer not in self._binding and self.relayed is not None:
            self._binding.add(peer)
            self._spawn(self._bind(peer))

    # -- RelayReceiver ----------------------------------------------------------------------------

    def unwrap(self, data: bytes) -> list[tuple[bytes, tuple, "TurnAllocation"]]:
        framed = parse_channel_data(data)
        if framed is not None:
            peer = self._peers_by_channel.get(framed[0])
            if peer is None:
                return []
            self.bytes_in += len(framed[1])
            return [(framed[1], self._sockaddr(*peer), self)]
        try:
            message = stun.parse_message(data)
        except Exception:
            return []
        if message.message_class == stun.Class.INDICATION and message.message_method == stun.Method.DATA:
            payload, peer = message.attributes.get("DATA"), message.attributes.get("XOR-PEER-ADDRESS")
            if payload is None or peer is None:
                return []
            self.bytes_in += len(payload)
            return [(payload, self._sockaddr(*_plain(peer)), self)]
        future = self._pending.get(message.transaction_id)
        if future is not None and not future.done():
            future.set_result(message)
        return []

    # -- lifecycle --------------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.relayed is not None:
            try:
                await self._request(stun.Method.REFRESH, {"LIFETIME": 0}, timeout=0.5)
            except (TurnError, Exception):
                pass


async def open_allocation(endpoint, url: str) -> TurnAllocation:
    """Allocate on the relay `url` for `endpoint` (a started QuicEndpoint) and register it there."""
    user, password, host, port = parse_relay_url(url)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM),
                                       ALLOCATE_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise TurnError(f"cannot resolve relay {host}: {exc or type(exc).__name__}; fix --relay") from None
    server = endpoint.sockaddr(*infos[0][4][:2])
    allocation = TurnAllocation(lambda data, addr: endpoint.socket_path.send([(data, addr)]), server,
                                endpoint.sockaddr, username=user, password=password, label=f"{host}:{port}")
    endpoint.relay_servers[server] = allocation
    try:
        await allocation.allocate()
    except BaseException:
        endpoint.relay_servers.pop(server, None)
        raise
    return allocation


async def open_relays(endpoint, urls: list[str]) -> tuple[list[TurnAllocation], list[tuple[str, str]]]:
    """Allocations on every relay that answers; (redacted url, error line) for those that did not."""
    results = await asyncio.gather(*(open_allocation(endpoint, url) for url in urls), return_exceptions=True)
    allocations, failures = [], []
    for url, result in zip(urls, results):
        if isinstance(result, TurnAllocation):
            allocations.append(result)
        else:
            reason = str(result) if isinstance(result, (TurnError, ValueError)) else f"{type(result).__name__}: {result}"
            failures.append((redact(url), reason))
            log.error("relay %s: %s (working without it)", redact(url), reason)
    return allocations, failures


def relay_states(allocations: list[TurnAllocation], failures: list[tuple[str, str]]) -> list:
    from common.messages import RelayState
    return [RelayState(relay=a.label, relayed=a.relayed, error=a.error, bytes_out=a.bytes_out, bytes_in=a.bytes_in)
            for a in allocations] + [RelayState(relay=url, error=reason) for url, reason in failures]
