"""When the QUIC lane acknowledges (common/quic/acks.py), sans-I/O."""
from __future__ import annotations

from common.quic.acks import ACK_DEFER_MAX_BYTES, ACK_DEFER_S, ACK_TIMER, may_defer_ack, timer_deadline

# qh3 2.1 advertises max_ack_delay 25 ms; the peer's loss recovery allows for that much
PEER_ALLOWED_ACK_DELAY_S = 0.025
INITIAL_CONGESTION_WINDOW = 14_720  # RFC 9002 7.2 with 1472-byte datagrams


def test_a_small_burst_waits_for_the_reply_bulk_and_handshakes_do_not() -> None:
    assert may_defer_ack(True, 9_700, send_backlog=False, new_losses=False)          # a decode token's request
    assert not may_defer_ack(True, ACK_DEFER_MAX_BYTES, send_backlog=False, new_losses=False)  # bulk: ACK now
    assert not may_defer_ack(False, 100, send_backlog=False, new_losses=False)       # before authentication


def test_what_arrived_may_have_opened_our_window_or_shown_a_loss_so_we_send_at_once() -> None:
    assert not may_defer_ack(True, 100, send_backlog=True, new_losses=False)
    assert not may_defer_ack(True, 100, send_backlog=False, new_losses=True)


def test_a_sender_at_its_initial_window_never_waits_on_a_deferred_ack() -> None:
    assert ACK_DEFER_MAX_BYTES < INITIAL_CONGESTION_WINDOW


def test_only_the_ack_timer_is_put_off_and_never_past_what_the_peer_allows() -> None:
    assert timer_deadline(ACK_TIMER, 10.0, None) == 10.0                  # nothing deferred
    assert timer_deadline(ACK_TIMER, 10.0, 10.0) == 10.0 + ACK_DEFER_S    # deferred from 10.0
    assert timer_deadline(ACK_TIMER, 10.5, 10.0) == 10.5                  # qh3's own later deadline stands
    assert timer_deadline("loss_detection", 10.001, 10.0) == 10.001       # loss recovery is never put off
    assert timer_deadline("idle", 20.0, 10.0) == 20.0
    assert ACK_DEFER_S <= PEER_ALLOWED_ACK_DELAY_S - 0.005                # slack for a busy event loop
