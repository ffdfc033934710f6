"""When the QUIC lane acknowledges: the policy (pure), driven by `QuicPeerConnection`.

qh3 acknowledges at once whenever two ack-eliciting packets arrived (RFC 9000's SHOULD), so in
the data plane's request/response pattern each burst costs an ACK-only datagram, and a wake-up
of the other end for it, on top of the reply that follows a few milliseconds later. A small
burst's ACK therefore waits for the next packet we send anyway (the reply carries it), at most
ACK_DEFER_S: well below the max_ack_delay we advertise (qh3's 25 ms), which the peer's loss
recovery already allows for (its PTO adds max_ack_delay; RFC 9000 13.2.1 lets a receiver delay
ACKs that long). Bulk is acknowledged as before: once ACK_DEFER_MAX_BYTES arrived unacknowledged,
which is below a sender's initial congestion window (RFC 9002: 14,720 bytes), so a sender whose
window is at least that never waits on a deferred ACK.
"""
from __future__ import annotations

ACK_DEFER_S = 0.015
ACK_DEFER_MAX_BYTES = 12 * 1024
ACK_TIMER = "ack_application"  # qh3's timer kind for acknowledging 1-RTT packets


def may_defer_ack(authenticated: bool, received_unacked: int, *, send_backlog: bool, new_losses: bool) -> bool:
    """Whether we may leave qh3 unpolled after a receive, so that what it owes the peer (an ACK)
    waits for our next packet. Not when data of ours waits for the window that what just
    arrived may have opened (`send_backlog`), nor when it showed a packet of ours lost
    (`new_losses`): the retransmission goes at once, as before."""
    return authenticated and received_unacked < ACK_DEFER_MAX_BYTES and not send_backlog and not new_losses


def timer_deadline(kind: str, at: float, ack_owed_since: float | None) -> float:
    """When to run qh3's timer of `kind` due `at`, while an ACK is owed since `ack_owed_since`
    (None: none deferred): qh3's ACK timer is put off to the deferral's end, others are not."""
    if kind == ACK_TIMER and ack_owed_since is not None:
        return max(at, ack_owed_since + ACK_DEFER_S)
    return at
