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
import logging
from typing import Callable

from common.messages import Announcement, PeerPath
from common.nat.candidates import behind_nat, gather, path_kind
from common.nat.reach import EndpointReach, NatState
from common.quic import QuicPeerConnection

log = logging.getLogger("meshd")

PUNCH_INTERVAL_S = 1.0


def stun_errors(state: NatState) -> list[str]:
    return [f"stun: {s.error}" for s in state.servers if s.error]


def my_candidates(host_addrs: list[tuple[str, int]], state: NatState) -> list[tuple[str, int]]:
    return gather(host_addrs, state.public, state.behaviour)


def announcement_fields(state: NatState) -> dict:
    """What the announcement says about our reach (`nat`, `public_addrs`)."""
    public = [state.public] if state.public is not None and state.behaviour != "symmetric" else []
    return {"nat": state.behaviour if state.servers else "", "public_addrs": public}


async def punch_forever(reach: EndpointReach, unconnected: Callable[[], list[list]]) -> None:
    """Checks toward every candidate of every peer we have no connection to, each second."""
    while True:
        await asyncio.sleep(PUNCH_INTERVAL_S)
        targets = {(h, int(p)) for addrs in unconnected() for h, p in addrs}
        if targets:
            asyncio.ensure_future(reach.check_all(sorted(targets)))


def peer_path(conn: QuicPeerConnection, ann: Announcement | None, my_nat: NatState) -> PeerPath:
    public = {tuple(a) for a in ann.public_addrs} if ann is not None else set()
    host_addrs = [tuple(a) for a in ann.mesh_addrs if tuple(a) not in public] if ann is not None else []
    kind = path_kind(conn.remote_address, host_addrs, behind_nat(ann.nat) if ann is not None else False,
                     behind_nat(my_nat.behaviour), conn.path_kind == "relayed")
    rtt = conn.rtt()
    via = conn.path.label if conn.path_kind == "relayed" else f"{conn.remote_address[0]}:{conn.remote_address[1]}"
    return PeerPath(path=kind, via=via, rtt_ms=None if rtt is None else round(rtt * 1000, 3),
                    bytes_sent=conn.bytes_sent, bytes_received=conn.bytes_received)
