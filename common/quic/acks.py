"""When a connection answers what it just received: at once, or after a short delay that lets the
application's reply carry the ACK.

qh3's core puts an ACK into the next datagram it builds, and builds one whenever asked, so asking
right after every receive sent an ACK-only datagram for each request of a request/response
exchange (llama.cpp RPC: a command, then its reply some milliseconds later). Each costs a
sendto here and a wake-up, a read and qh3's work at the peer, for nothing the reply would not
have said. RFC 9000 13.2.1 lets a receiver delay an ACK of ack-eliciting packets up to the
max_ack_delay it advertised (qh3: 25 ms); we wait at most ACK_DELAY_S, well inside it even with a
loaded event loop's timer lateness, so the peer's loss timer (PTO includes max_ack_delay) never
fires for it.

It waits only when nothing can be lost by it: the handshake is over (no handshake packets wait on
our answer), fewer than two packets are unanswered (13.2.2: ACK every second ack-eliciting
packet, which keeps a bulk sender's window growing as before), and this side has nothing queued
or in flight (then a received ACK cannot free window for queued data or reveal a loss to repair).
"""
from __future__ import annotations

ACK_DELAY_S = 0.01   # < qh3's advertised max_ack_delay (25 ms), with room for a late timer


def answer_now(*, handshake_done: bool, unanswered_datagrams: int, queued_bytes: int,
               bytes_in_flight: int) -> bool:
    """True: send what qh3 has (the ACK) in this loop step; False: wait up to ACK_DELAY_S for the
    application to write something the ACK can ride on."""
    return (not handshake_done or unanswered_datagrams >= 2 or queued_bytes > 0 or bytes_in_flight > 0)
