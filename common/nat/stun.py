"""STUN (RFC 8489) Binding as sans-I/O functions, over aioice's message codec.

Used from aioice: `aioice.stun` — its `Message` encoder/parser (attributes, XOR-MAPPED-ADDRESS,
FINGERPRINT). Not used: aioice's `Transaction` and `StunProtocol`/`Connection` (they own an asyncio
datagram transport of their own; here STUN shares the QUIC endpoint's socket, so the public mapping
STUN learns is the very one QUIC uses), and aioice's ICE agent (it runs its own sockets and
candidate pairs, and cannot hand a checked path to aioquic's connection; the checks here are plain
Binding requests on the QUIC socket, the ICE way).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from aioice import stun

BINDING_REQUEST_CLASS = stun.Class.REQUEST
MAX_STUN_BYTES = 1024


def binding_request() -> tuple[bytes, bytes]:
    """(transaction id, datagram) of a Binding request."""
    transaction_id = secrets.token_bytes(12)
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST,
                           transaction_id=transaction_id)
    message.add_fingerprint()
    return transaction_id, bytes(message)


def parse(data: bytes) -> stun.Message | None:
    """A STUN message, or None for anything that is not one (checked, never raises)."""
    if len(data) < stun.HEADER_LENGTH or len(data) > MAX_STUN_BYTES or data[0] >= 4:
        return None
    try:
        return stun.parse_message(data)
    except Exception:  # aioice raises ValueError/struct.error/KeyError on malformed input
        return None


def binding_response(request: stun.Message, source: tuple) -> bytes | None:
    """Our answer to a peer's Binding request: where we saw it come from (what a STUN server says).
    None for anything else (we answer Binding requests only)."""
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None
    response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                            transaction_id=request.transaction_id)
    response.attributes["XOR-MAPPED-ADDRESS"] = (str(source[0]), int(source[1]))
    response.add_fingerprint()
    return bytes(response)


def mapped_address(response: stun.Message) -> tuple[str, int] | None:
    """The server-reflexive address a Binding success response reports."""
    if response.message_method != stun.Method.BINDING or response.message_class != stun.Class.RESPONSE:
        return None
    for name in ("XOR-MAPPED-ADDRESS", "MAPPED-ADDRESS"):
        value = response.attributes.get(name)
        if value:
            host = str(value[0])
            if host.startswith("::ffff:"):
                host = host[7:]
            return host, int(value[1])
    return None


# --- NAT mapping behaviour (RFC 5780's first test, with two servers) ------------------------------

MAPPING_NONE = "no NAT"                       # the mapped address is our own: a public address
MAPPING_INDEPENDENT = "endpoint-independent"  # one public port for every destination: punching works
MAPPING_SYMMETRIC = "symmetric"               # a new public port per destination: needs a relay
MAPPING_UNKNOWN = "unknown"
MAPPING_NAT_UNKNOWN = "NAT, mapping unknown"  # one server: translated, but cone or symmetric?


@dataclass(frozen=True)
class MappingReport:
    behaviour: str
    public: tuple[str, int] | None
    detail: str


def classify_mapping(local_hosts: set[str], local_port: int,
                     mapped: dict[str, tuple[str, int] | None]) -> MappingReport:
    """What STUN servers (name -> mapped address, None if it did not answer) say about our NAT,
    for a socket bound to `local_port` on `local_hosts` (its interface addresses)."""
    answered = {name: addr for name, addr in mapped.items() if addr is not None}
    silent = sorted(name for name, addr in mapped.items() if addr is None)
    note = f"; no answer from {', '.join(silent)}" if silent else ""
    if not mapped:
        return MappingReport(MAPPING_UNKNOWN, None, "no STUN server configured (--stun HOST:PORT)")
    if not answered:
        return MappingReport(MAPPING_UNKNOWN, None, f"no STUN server answered{note}")
    addrs = set(answered.values())
    first = next(iter(answered.values()))
    public = len(addrs) == 1 and first[0] in local_hosts and first[1] == local_port
    if public:
        return MappingReport(MAPPING_NONE, first, f"public address {first[0]}:{first[1]} (no NAT){note}")
    if len(answered) == 1:
        return MappingReport(MAPPING_NAT_UNKNOWN, first, f"behind NAT, public address {first[0]}:{first[1]}; "
                             f"a second --stun server tells cone from symmetric{note}")
    if len(addrs) == 1:
        return MappingReport(MAPPING_INDEPENDENT, first,
                             f"behind NAT, {first[0]}:{first[1]} for every destination: hole punching can work{note}")
    listed = ", ".join(f"{h}:{p}" for h, p in sorted(addrs))
    return MappingReport(MAPPING_SYMMETRIC, first,
                         f"symmetric NAT (a new public port per destination: {listed}): peers need a relay{note}")
