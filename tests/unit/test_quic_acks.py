"""When the QUIC lane answers a received packet at once and when it lets the reply carry the ACK."""
from common.quic.acks import ACK_DELAY_S, answer_now

QUIET = dict(handshake_done=True, unanswered_datagrams=1, queued_bytes=0, bytes_in_flight=0)


def test_a_lone_request_on_an_idle_connection_waits_for_its_reply() -> None:
    assert answer_now(**QUIET) is False


def test_the_wait_stays_inside_the_max_ack_delay_qh3_advertises() -> None:
    assert 0 < ACK_DELAY_S <= 0.025 / 2  # room for a late timer before the peer's PTO counts it


def test_every_second_packet_is_answered_at_once_so_a_bulk_sender_keeps_its_window() -> None:
    assert answer_now(**{**QUIET, "unanswered_datagrams": 2}) is True
    assert answer_now(**{**QUIET, "unanswered_datagrams": 40}) is True


def test_a_side_with_data_queued_or_in_flight_answers_at_once() -> None:
    # a received ACK may free window for queued data, or reveal a loss to repair
    assert answer_now(**{**QUIET, "queued_bytes": 1}) is True
    assert answer_now(**{**QUIET, "bytes_in_flight": 1200}) is True


def test_the_handshake_is_never_kept_waiting() -> None:
    assert answer_now(**{**QUIET, "handshake_done": False}) is True
