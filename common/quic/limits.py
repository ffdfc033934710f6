"""Sizes, windows, caps and close codes of the QUIC endpoint, and the datagram size per path."""
from __future__ import annotations

import ipaddress

CONNECTION_ID_LENGTH = 8
SMALLEST_DATAGRAM = 1200
# Per-packet work (Python's, around qh3's native core) dominates the cost, so carry as much per
# datagram as the path allows: on loopback that is qh3 2.1's own ceiling (a server never sends
# more, and advertises it, so neither side of a connection does).
QH3_SERVER_DATAGRAM = 1472   # qh3 2.1's server: its most per datagram (and what it advertises)
LAN_DATAGRAM = 1452           # 1500-byte Ethernet MTU minus IP/UDP headers, with margin
STREAM_RECEIVE_WINDOW = 4 << 20   # unconsumed bytes a writer may have outstanding per stream
STREAM_CREDIT_STEP = 1 << 20      # a reader reports what it consumed every this many bytes
CONNECTION_RECEIVE_WINDOW = 16 << 20
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
STREAM_READER_LIMIT = 256 << 10   # StreamReader pauses the QUIC stream above twice this
SOCKET_BUFFER_BYTES = 8 << 20
RECEIVE_BATCH = 128
MAX_UNAUTHENTICATED = 256         # concurrent handshakes a server side accepts, in all
MAX_UNAUTHENTICATED_PER_SOURCE = 16   # ... and from one source IP (past a cap the oldest goes)
AUTH_FRAME_MAX_BYTES = 64 << 10
AUTH_STREAM_ID = 1                # the first server-initiated bidirectional stream
CLOSE_NORMAL = 0x0
CLOSE_AUTH_REJECTED = 0x4D01      # application error codes (sent with APPLICATION_CLOSE)
CLOSE_AUTH_FAILED = 0x4D02
CLOSE_PIN_MISMATCH = 0x4D03
CLOSE_PROTOCOL = 0x4D04
STREAM_ABORTED = 0x4D10
MAX_REASON_CHARS = 300


def datagram_size_for(host: str) -> int:
    """Largest datagram we send to `host` without path-MTU discovery: on loopback qh3's ceiling
    (the MTU is 64 KiB); on private/link-local networks we assume Ethernet; elsewhere QUIC's minimum."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return SMALLEST_DATAGRAM
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return QH3_SERVER_DATAGRAM
    if ip.is_private or ip.is_link_local:
        return LAN_DATAGRAM
    return SMALLEST_DATAGRAM


def short_reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
