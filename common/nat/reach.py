"""STUN on a QUIC endpoint's own socket: public address discovery, answers to peers' checks, and
connectivity checks (hole punching) toward peers' candidate addresses.

The endpoint hands us every datagram whose first byte is 0-3 (RFC 7983). What we send goes out on
the same socket, so the mapping a NAT gives our checks is the one our QUIC packets use.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field

from common.addresses import parse_host_port
from typing import Callable

from common.identity import AuthError
from common.messages import NatReport, StunServerState
from common.nat import stun
from common.nat.candidates import MOVE_USE_SOCKET, dial_order, home_network, plain_address, plan_move
from common.nat.transactions import answered_with_retransmits
from common.quic import DatagramPath, PeerIdentityMismatch, QuicEndpoint, QuicPeerConnection

log = logging.getLogger("mesh.nat")

STUN_TIMEOUT_S = 2.0          # the most a silent STUN server delays start-up
RETRANSMIT_AT_S = (0.0, 0.25, 0.75, 1.5)
CHECK_TIMEOUT_S = 1.0
VALID_FOR_S = 15.0            # a check that answered counts this long
DIAL_STAGGER_S = 0.25         # between starting dials to a peer's successive candidates
DIAL_TIMEOUT_S = 5.0
RELAY_AFTER_S = 1.5           # a relayed dial starts only if no direct or punched one got through by then


@dataclass
class StunResult:
    server: str
    mapped: tuple[str, int] | None = None
    error: str = ""


@dataclass
class CheckResult:
    rtt: float
    at: float
    mapped: tuple[str, int] | None = None  # how the peer saw us


@dataclass
class NatState:
    behaviour: str = stun.MAPPING_UNKNOWN
    public: tuple[str, int] | None = None
    detail: str = "no STUN server configured (--stun HOST:PORT)"
    servers: list[StunResult] = field(default_factory=list)


class EndpointReach:
    """STUN client, STUN responder and connectivity checker bound to one QuicEndpoint."""

    def __init__(self, endpoint: QuicEndpoint):
        self.endpoint = endpoint
        self.nat = NatState()
        self.checks: dict[tuple[str, int], CheckResult] = {}
        self._pending: dict[bytes, tuple[asyncio.Future, float]] = {}
        endpoint.on_stun = self._on_stun

    # -- sending / receiving --------------------------------------------------------------------

    def _send(self, data: bytes, addr: tuple, path: DatagramPath | None = None) -> None:
        path = path or self.endpoint.socket_path
        if path is not None:
            path.send([(data, addr)])

    def _on_stun(self, data: bytes, addr: tuple, path: DatagramPath) -> None:
        message = stun.parse(data)
        if message is None:
            return
        if message.message_class == stun.BINDING_REQUEST_CLASS:
            answer = stun.binding_response(message, _plain(addr))
            if answer is not None:
                self._send(answer, addr, path)  # back the way it came (through a relay, maybe)
            return
        pending = self._pending.pop(message.transaction_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((stun.mapped_address(message), time.monotonic() - pending[1]))

    async def _transact(self, addr: tuple, timeout: float) -> tuple[tuple[str, int] | None, float] | None:
        """One Binding transaction with retransmits; (mapped address, rtt) or None on timeout."""
        loop = asyncio.get_running_loop()
        transaction_id, request = stun.binding_request()
        future = loop.create_future()
        self._pending[transaction_id] = (future, time.monotonic())
        try:
            answered = await answered_with_retransmits(future, lambda: self._send(request, addr), RETRANSMIT_AT_S,
                                                       timeout)
            return future.result() if answered else None
        finally:
            self._pending.pop(transaction_id, None)
            if not future.done():
                future.cancel()

    # -- discovery --------------------------------------------------------------------------------

    async def discover(self, servers: list[str], timeout: float = STUN_TIMEOUT_S) -> NatState:
        """Ask every STUN server (in parallel, `timeout` at most) for our public address."""
        if not servers:
            self.nat = NatState()
            return self.nat
        results = await asyncio.gather(*(self._ask(server, timeout) for server in servers))
        local_port = self.endpoint.local_address[1]
        report = stun.classify_mapping(_local_hosts(self.endpoint.local_address[0]), local_port,
                                       {r.server: r.mapped for r in results})
        self.nat = NatState(report.behaviour, report.public, report.detail, list(results))
        for r in results:
            if r.error:
                log.warning("STUN %s: %s", r.server, r.error)
        log.info("NAT: %s", report.detail)
        return self.nat

    async def _ask(self, server: str, timeout: float) -> StunResult:
        try:
            host, port = parse_host_port(server)
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), timeout)
        except (ValueError, OSError, asyncio.TimeoutError) as exc:
            return StunResult(server, error=f"cannot resolve {server}: {exc or type(exc).__name__}; "
                                            f"fix --stun (HOST:PORT of a STUN server)")
        answer = await self._transact(self._sockaddr(infos[0][4]), timeout)
        if answer is None or answer[0] is None:
            return StunResult(server, error=f"no answer from {server} within {timeout:g} s; check that it is a "
                                            f"STUN server and that UDP to it is allowed (working without it)")
        return StunResult(server, mapped=answer[0])

    def _sockaddr(self, addr: tuple) -> tuple:
        if self.endpoint._family == socket.AF_INET6:  # noqa: SLF001
            return (f"::ffff:{addr[0]}", addr[1], 0, 0)
        return (addr[0], addr[1])

    # -- connectivity checks (hole punching) -----------------------------------------------------

    async def check(self, addr: tuple[str, int], timeout: float = CHECK_TIMEOUT_S) -> CheckResult | None:
        """A Binding request to a peer's candidate: opens our NAT toward it and tells whether the
        peer's side lets us in. Both sides checking each other at once is the hole punch."""
        answer = await self._transact(self._sockaddr(addr), timeout)
        if answer is None:
            return None
        result = CheckResult(rtt=answer[1], at=time.monotonic(), mapped=answer[0])
        if self.answered(addr) is None:  # newly reachable (a punch got through): worth a line
            log.info("check to %s:%d answered (%.1f ms; it sees us at %s)", addr[0], int(addr[1]), answer[1] * 1000,
                     answer[0])
        self.checks[(addr[0], int(addr[1]))] = result
        return result

    def answered(self, addr: tuple[str, int]) -> CheckResult | None:
        result = self.checks.get((addr[0], int(addr[1])))
        if result is None or time.monotonic() - result.at > VALID_FOR_S:
            return None
        return result

    def best_answered(self, candidates: list, excluded: set) -> tuple[str, int] | None:
        """Of `candidates` not in `excluded` (a peer's relayed addresses), the one whose check
        answered fastest lately. Never loopback: our own socket may answer there."""
        answered = [(r.rtt, (h, int(p))) for h, p in candidates
                    if (h, int(p)) not in excluded and not h.startswith("127.")
                    and (r := self.answered((h, int(p)))) is not None]
        return min(answered)[1] if answered else None

    async def check_all(self, addrs: list[tuple[str, int]], timeout: float = CHECK_TIMEOUT_S) -> list[tuple[str, int]]:
        """Check every candidate at once; the ones that answered, fastest first."""
        results = await asyncio.gather(*(self.check(a, timeout) for a in addrs))
        ok = [(r.rtt, (a[0], int(a[1]))) for a, r in zip(addrs, results) if r is not None]
        return [a for _, a in sorted(ok)]


async def race_dial(endpoint: QuicEndpoint, reach: EndpointReach, node_id: str | None, addrs: list,
                    claims_for: Callable = lambda nonce, server_id: {},
                    timeout: float = DIAL_TIMEOUT_S, relays: list | None = None) -> QuicPeerConnection:
    """Dial the candidates, one more every DIAL_STAGGER_S (answered checks first), then, from
    RELAY_AFTER_S on, the same candidates through each of our relays (`relays`: TurnAllocations);
    the first that authenticates wins and the others are closed. AuthError as soon as the peer
    itself refuses."""
    order = dial_order([(h, int(p)) for h, p in addrs],
                       {a: r.rtt for a in map(tuple, addrs) if (r := reach.answered(a)) is not None})
    if not order:
        raise ConnectionError("no addresses to dial")
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue: list[tuple[float, tuple[str, int], DatagramPath | None]] = \
        [(i * DIAL_STAGGER_S, addr, None) for i, addr in enumerate(order)]
    for relay in relays or []:
        through = [a for a in order if relay_can_reach(relay, a)]
        queue += [(RELAY_AFTER_S + i * DIAL_STAGGER_S, addr, relay) for i, addr in enumerate(through)]
    queue.sort(key=lambda item: item[0])
    pending: dict[asyncio.Task, str] = {}
    errors: list[str] = []
    mismatches = 0
    winner: QuicPeerConnection | None = None
    try:
        while (queue or pending) and winner is None:
            while queue and queue[0][0] <= loop.time() - start:
                _, addr, path = queue.pop(0)
                task = asyncio.ensure_future(endpoint.dial(addr, expected_node_id=node_id, claims_for=claims_for,
                                                           timeout=timeout, path=path))
                pending[task] = f"{addr[0]}:{addr[1]}" + (f" via relay {path.label}" if path is not None else "")
            wait = max(queue[0][0] - (loop.time() - start), 0.0) if queue else None
            if not pending:
                await asyncio.sleep(wait or 0)
                continue
            done, _ = await asyncio.wait(set(pending), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                where = pending.pop(task)
                exc = task.exception()
                if exc is None:
                    if winner is None:
                        winner = task.result()
                    else:
                        await task.result().close()
                elif isinstance(exc, AuthError) and not isinstance(exc, PeerIdentityMismatch):
                    raise exc  # the peer answered and refused: other addresses reach the same peer
                else:
                    mismatches += isinstance(exc, PeerIdentityMismatch)
                    errors.append(f"{where}: {getattr(exc, 'reason', None) or exc or type(exc).__name__}")
    finally:
        for task in pending:
            task.cancel()
            task.add_done_callback(_close_late_winner)
    if winner is None and errors and mismatches == len(errors):
        raise PeerIdentityMismatch("; ".join(errors))  # every address answered, as another node
    if winner is None:
        raise ConnectionError(f"no address answered ({'; '.join(errors) or 'no addresses'})")
    return winner


def relay_can_reach(relay, addr: tuple[str, int]) -> bool:
    """Not our loopback, not the relay's own addresses (coturn refuses a peer on its own IP, relay
    to relay: 400/403, so a peer's relayed address is dialed from our socket instead), and not a
    private address from a relay that is not on a private network itself (coturn closes the whole
    allocation when its relayed socket cannot send there)."""
    host = addr[0]
    server = _plain(relay.server)[0] if relay.server else ""
    own = {relay.relayed[0] if relay.relayed else None, server}
    if host.startswith("127.") or host in own:
        return False
    return not (home_network(host) and not home_network(server))



def _close_late_winner(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        asyncio.ensure_future(task.result().close())


def nat_report(state: NatState) -> NatReport:
    return NatReport(behaviour=state.behaviour, public=state.public, detail=state.detail,
                     servers=[StunServerState(server=s.server, mapped=s.mapped, error=s.error) for s in state.servers])


def _plain(addr: tuple) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]
    return host, int(addr[1])


def _local_hosts(bound: str) -> set[str]:
    try:
        if not ipaddress.ip_address(bound).is_unspecified:
            return {bound}
    except ValueError:
        return {bound}
    try:
        import psutil
        return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    except Exception:
        return set()


def follow_answered_check(conn: QuicPeerConnection, reach: EndpointReach, peer_relays: set,
                          peer_candidates: list | None, what: str) -> None:
    """Move a relayed connection we dialed to a direct path once a connectivity check answered
    (common.nat.candidates.plan_move): through our relay, to the same peer address on our own socket
    (a QUIC migration); to the peer's relay, to its direct candidate that answered (`move_to`)."""
    socket_path = reach.endpoint.socket_path
    if conn.is_closed or socket_path is None:
        return
    remote = plain_address(conn.remote_address)
    move = plan_move(conn.dialed, conn.path_kind == "relayed", remote, peer_relays,
                     reach.answered(remote) is not None,
                     reach.best_answered(peer_candidates, peer_relays) if peer_candidates is not None else None)
    if move is None:
        return
    if move[0] == MOVE_USE_SOCKET:
        log.info("%s %s: relayed -> direct (a check through the NAT answered)", what, conn.peer_node_id[:8])
        conn.use_path(socket_path)
    else:
        log.info("%s %s: its relay -> direct at %s:%d (a check answered)", what, conn.peer_node_id[:8], *move[1])
        conn.move_to(reach.endpoint.sockaddr(*move[1]), socket_path)
