"""meshd's reach: its public address (STUN on the mesh socket), dialing a peer's candidates in
parallel, hole punching, and the path each peer connection took.

Hole punching, the ICE way, with gossip as the rendezvous: every member announces its candidates
(interface addresses and STUN's public mapping) in its announcement, which reaches every other
member through the members both already reach. A member then sends connectivity checks (STUN
Binding requests on its QUIC socket) to every candidate of every peer it has no connection to, once
a second; the peer does the same toward us, so both NATs open toward each other within about a
second, and the QUIC dial (which retransmits its Initial meanwhile) gets through. Checks that
answered put their address first in the dial order.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from common.messages import Announcement, PeerPath
from common.nat.candidates import behind_nat, gather, path_kind, plain_address, socket_mappings, through_relay
from common.nat.reach import EndpointReach, NatState, follow_answered_check
from common.nat.turn import TurnAllocation
from common.quic import QuicPeerConnection


PUNCH_INTERVAL_S = 1.0


def stun_errors(state: NatState) -> list[str]:
    return [f"stun: {s.error}" for s in state.servers if s.error]


def my_candidates(host_addrs: list[tuple[str, int]], state: NatState) -> list[tuple[str, int]]:
    return gather(host_addrs, state.public, state.behaviour)


def announcement_fields(state: NatState, relays: list[TurnAllocation], data_relays: list | None = None) -> dict:
    """What the announcement says about our reach (`nat`, `public_addrs`, `relay_addrs`)."""
    # Even a symmetric NAT's mapping is announced: its IP is the one a member's relay must let in (mesh_addrs
    # offers it for checks only after the predicted port: mapped_candidates).
    public = [state.public] if state.public is not None else []
    return {"nat": state.behaviour if state.servers else "", "public_addrs": public,
            "relay_addrs": [a.relayed for a in relays if a.relayed is not None] +
                           [tuple(r.relayed) for r in data_relays or [] if r.relayed is not None]}


def mapped_candidates(state: NatState, relays: list, exclude: list | None = None) -> list[tuple[str, int]]:
    """Behind a symmetric NAT: how each relay and each STUN server saw our socket (see
    common.nat.candidates.socket_mappings), so that peers' checks there open their NATs toward us
    once the NAT keeps one mapping per socket, whichever of them it keeps."""
    return socket_mappings(state.behaviour, [a.mapped for a in relays] + [s.mapped for s in state.servers],
                           exclude or [])


def relay_candidates(relays: list[TurnAllocation]) -> list[tuple[str, int]]:
    return [a.relayed for a in relays if a.relayed is not None]


def permitted_ips(announcements: list[Announcement], relays: list[TurnAllocation]) -> list[str]:
    """Whom our relayed addresses let in: every member's candidate IPs, and the relays' own relayed
    IPs (a member that is itself relayed reaches us from its allocation there)."""
    ips = {h for ann in announcements for h, _ in [*ann.mesh_addrs, *ann.data_quic, *ann.public_addrs]}
    ips |= {a.relayed[0] for a in relays if a.relayed is not None}
    return sorted(ip for ip in ips if not ip.startswith("127."))  # a relay never reaches our loopback


def relayed(conn: QuicPeerConnection, ann: Announcement | None) -> bool:
    """Through a relay: ours (our sending path), or the peer's (we reach it at its relayed address)."""
    return through_relay(conn.path_kind == "relayed", conn.remote_address,
                         {tuple(a) for a in ann.relay_addrs} if ann is not None else set())


def migrate_relayed(conns: list[QuicPeerConnection], reach: EndpointReach,
                    announcements: dict[str, Announcement] | None = None) -> None:
    """A relayed connection we dialed moves to a direct path as soon as a connectivity check
    answers on our own socket: through our relay, to the same peer address (a QUIC migration);
    to the peer's relay, to the peer's direct candidate that answered (`move_to`). The dialer
    moves, so the two ends never move at once."""
    for conn in conns:
        ann = (announcements or {}).get(conn.peer_node_id)
        peer_relays = {plain_address(a) for a in ann.relay_addrs} if ann is not None else set()
        follow_answered_check(conn, reach, peer_relays, ann.mesh_addrs if ann is not None else None, "path to")


async def punch_forever(reach: EndpointReach, unconnected: Callable[[], list[list]]) -> None:
    """Checks toward every candidate of every peer we have no connection to, each second."""
    while True:
        await asyncio.sleep(PUNCH_INTERVAL_S)
        targets = {(h, int(p)) for addrs in unconnected() for h, p in addrs}
        if targets:
            asyncio.ensure_future(reach.check_all(sorted(targets)))


def peer_path(conn: QuicPeerConnection, ann: Announcement | None, my_nat: NatState) -> PeerPath:
    public_ips = {a[0] for a in ann.public_addrs} if ann is not None else set()  # its NAT's (also a predicted port)
    host_addrs = [tuple(a) for a in ann.mesh_addrs if a[0] not in public_ips] if ann is not None else []
    via_peer_relay = ann is not None and tuple(conn.remote_address) in {tuple(a) for a in ann.relay_addrs}
    kind = path_kind(conn.remote_address, host_addrs, behind_nat(ann.nat) if ann is not None else False,
                     behind_nat(my_nat.behaviour), conn.path_kind == "relayed" or via_peer_relay)
    rtt = conn.rtt()
    via = f"{conn.remote_address[0]}:{conn.remote_address[1]}"
    if conn.path_kind == "relayed":
        via = f"relay {conn.path.label}"
    elif via_peer_relay:
        via = f"the peer's relay address {via}"
    return PeerPath(path=kind, via=via, rtt_ms=None if rtt is None else round(rtt * 1000, 3),
                    bytes_sent=conn.bytes_sent, bytes_received=conn.bytes_received)
