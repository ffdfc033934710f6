"""Candidate addresses and path choice — pure functions.

A node's candidates for one UDP endpoint: its interface ("host") addresses, the server-reflexive
address STUN reported ("srflx": its NAT's public mapping), and later relayed ones. A dialer tries
them in the order `dial_order` gives; `path_kind` names the path a live connection took.
"""
from __future__ import annotations

import ipaddress

Address = tuple[str, int]

PATH_DIRECT = "direct"
PATH_PUNCHED = "punched"
PATH_RELAYED = "relayed"


def gather(host_addrs: list[Address], public: Address | None, behaviour: str) -> list[Address]:
    """Our candidates, most direct first: host addresses, then the public mapping. Behind a
    symmetric NAT the mapping STUN saw is the STUN server's alone; we offer our public IP with our
    own port instead (a prediction): it answers once the NAT keeps ports for new flows or the
    port is forwarded, and until then peers' checks to it just go unanswered."""
    out = [(h, int(p)) for h, p in host_addrs]
    if public is not None and behaviour == "symmetric":
        port = next((p for h, p in out if not _is_loopback(h)), None)
        public = (public[0], port) if port is not None else None
    if public is not None and tuple(public) not in out:
        out.append((public[0], int(public[1])))
    return out


def dial_order(candidates: list[Address], answered: dict[Address, float]) -> list[Address]:
    """Candidates in the order to try: those whose connectivity check answered (fastest first),
    then the rest as given, loopback last unless it answered."""
    def rank(index_addr: tuple[int, Address]) -> tuple:
        index, addr = index_addr
        rtt = answered.get((addr[0], int(addr[1])))
        return (0, rtt, index) if rtt is not None else (1, _is_loopback(addr[0]), index)
    return [addr for _, addr in sorted(enumerate(candidates), key=rank)]


def path_kind(remote: Address, peer_host_addrs: list[Address], peer_behind_nat: bool, me_behind_nat: bool,
              relayed: bool) -> str:
    """direct / punched / relayed for a live connection whose far end we see at `remote`.
    Punched: packets cross a NAT on both sides (a mapping the peer's NAT made, and ours), which
    only works because both sides opened their NAT toward each other."""
    if relayed:
        return PATH_RELAYED
    remote_host = remote[0][7:] if remote[0].startswith("::ffff:") else remote[0]
    translated = peer_behind_nat and all(remote_host != h for h, _ in peer_host_addrs)
    return PATH_PUNCHED if translated and me_behind_nat else PATH_DIRECT


def through_relay(sending_relayed: bool, remote: Address, relay_addrs: set[Address]) -> bool:
    """A connection goes through a relay: ours (we send through our allocation), or a peer's (we
    reach the peer at one of `relay_addrs`, members' relayed addresses). One rule for meshd's mesh
    connections and gatewayd's QUIC lane (which punch and move while it holds)."""
    return sending_relayed or plain_address(remote) in {(h, int(p)) for h, p in relay_addrs}


def plain_address(addr) -> Address:
    """An address as candidates and checks name it: IPv4 without the dual-stack socket's ::ffff: prefix."""
    host = str(addr[0])
    return (host[7:] if host.startswith("::ffff:") else host), int(addr[1])


def behind_nat(behaviour: str) -> bool:
    """From a NatReport.behaviour: STUN saw a public mapping that is not our own address."""
    return behaviour not in ("", "unknown", "no NAT")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOME_NETWORKS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                     "169.254.0.0/16", "100.64.0.0/10")]


def home_network(host: str) -> bool:
    """RFC 1918, link-local or carrier-grade NAT space: reachable only from inside that network."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == 4 and any(ip in n for n in _HOME_NETWORKS)


MOVE_USE_SOCKET = "use_socket"  # same peer address, from our own socket instead of through our relay
MOVE_TO_DIRECT = "move_to"      # to the peer's direct candidate instead of its relayed address


def plan_move(dialed: bool, sending_relayed: bool, remote: Address, peer_relay_addrs: set[Address],
              remote_answered: bool, best_direct: Address | None) -> tuple[str, Address | None] | None:
    """How a relayed connection moves to a direct path once a connectivity check got through, or
    None. Only the dialer moves (QUIC's client migrates; the server answers the way it is reached),
    so the two ends never move at once; every connection we dialed is considered, not only the one
    a service reports (two that crossed each other each carry streams)."""
    if not dialed:
        return None
    if sending_relayed:
        return (MOVE_USE_SOCKET, None) if remote_answered else None
    if (remote[0], int(remote[1])) in peer_relay_addrs and best_direct is not None:
        return MOVE_TO_DIRECT, best_direct
    return None


def socket_mappings(behaviour: str, seen_by: list[Address | None], exclude: list[Address]) -> list[Address]:
    """Behind a symmetric NAT, every public mapping our socket's flows got (`seen_by`: how each
    relay and each STUN server saw us), for peers to check beside `gather`'s prediction. Useless
    while the NAT maps per destination; right once it keeps one mapping per socket (reconfigured):
    Linux, and NATs like it, then give a socket's new flows the mapping of one of its live flows,
    any of them (a NAT keeps an idle mapping 2 minutes or more, RFC 4787), so a STUN server's
    mapping may be the one our checks leave with, not the relay's."""
    if behaviour != "symmetric":
        return []
    out: list[Address] = []
    for addr in seen_by:
        if addr is not None and (addr[0], int(addr[1])) not in out and (addr[0], int(addr[1])) not in exclude:
            out.append((addr[0], int(addr[1])))
    return out
