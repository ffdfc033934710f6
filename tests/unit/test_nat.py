"""STUN codec, NAT classification, candidate gathering and path choice: pure functions."""
from __future__ import annotations

import pytest
from aioice import stun as aioice_stun

from common.addresses import parse_host_port
from common.nat import stun
from common.nat.candidates import behind_nat, dial_order, gather, path_kind, socket_mappings, through_relay

LOCAL = {"10.0.0.2"}


def test_binding_request_and_response_round_trip() -> None:
    transaction_id, request = stun.binding_request()
    parsed = stun.parse(request)
    assert parsed is not None and parsed.transaction_id == transaction_id
    answer = stun.binding_response(parsed, ("203.0.113.7", 40001))
    response = stun.parse(answer)
    assert response.transaction_id == transaction_id
    assert stun.mapped_address(response) == ("203.0.113.7", 40001)


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, b"\x40" + b"\x00" * 40, b"\x01\x01\x00\x08" + b"\x00" * 30,
                                  bytes(range(256))])
def test_parse_rejects_what_is_not_stun(data: bytes) -> None:
    assert stun.parse(data) is None


def test_only_binding_requests_are_answered() -> None:
    message = aioice_stun.Message(message_method=aioice_stun.Method.ALLOCATE,
                                  message_class=aioice_stun.Class.REQUEST)
    assert stun.binding_response(message, ("1.2.3.4", 5)) is None


def test_two_servers_same_mapping_is_endpoint_independent() -> None:
    report = stun.classify_mapping(LOCAL, 5000, {"a": ("203.0.113.9", 5000), "b": ("203.0.113.9", 5000)})
    assert report.behaviour == stun.MAPPING_INDEPENDENT and report.public == ("203.0.113.9", 5000)


def test_two_servers_different_ports_is_symmetric() -> None:
    report = stun.classify_mapping(LOCAL, 5000, {"a": ("203.0.113.9", 40000), "b": ("203.0.113.9", 40001)})
    assert report.behaviour == stun.MAPPING_SYMMETRIC and "relay" in report.detail


def test_own_address_means_no_nat_and_one_server_cannot_tell() -> None:
    assert stun.classify_mapping(LOCAL, 5000, {"a": ("10.0.0.2", 5000)}).behaviour == stun.MAPPING_NONE
    one = stun.classify_mapping(LOCAL, 5000, {"a": ("203.0.113.9", 5000)})
    assert one.behaviour == stun.MAPPING_NAT_UNKNOWN and "second --stun" in one.detail


def test_silent_servers_are_named() -> None:
    report = stun.classify_mapping(LOCAL, 5000, {"a": None, "b": ("203.0.113.9", 5000)})
    assert "no answer from a" in report.detail
    assert stun.classify_mapping(LOCAL, 5000, {"a": None}).behaviour == stun.MAPPING_UNKNOWN


def test_gather_adds_the_public_mapping_except_for_symmetric_nat() -> None:
    host = [("10.0.0.2", 5000)]
    assert gather(host, ("203.0.113.9", 5000), "endpoint-independent") == [("10.0.0.2", 5000), ("203.0.113.9", 5000)]
    # symmetric: not the STUN server's mapping, but our public IP with our own port (a NAT that keeps ports
    # for new flows, or a forwarded port, answers there)
    assert gather(host, ("203.0.113.9", 41234), "symmetric") == [("10.0.0.2", 5000), ("203.0.113.9", 5000)]
    assert gather([("127.0.0.1", 5000)], ("203.0.113.9", 41234), "symmetric") == [("127.0.0.1", 5000)]
    assert gather(host, ("10.0.0.2", 5000), "no NAT") == host


def test_dial_order_puts_answered_checks_first_and_loopback_last() -> None:
    candidates = [("127.0.0.1", 1), ("10.0.0.2", 1), ("203.0.113.9", 1)]
    assert dial_order(candidates, {}) == [("10.0.0.2", 1), ("203.0.113.9", 1), ("127.0.0.1", 1)]
    assert dial_order(candidates, {("203.0.113.9", 1): 0.02, ("127.0.0.1", 1): 0.03})[:2] == \
        [("203.0.113.9", 1), ("127.0.0.1", 1)]


def test_path_kind() -> None:
    host = [("10.1.0.2", 5000)]
    assert path_kind(("10.1.0.2", 5000), host, True, True, False) == "direct"       # same LAN
    assert path_kind(("203.0.113.20", 5000), host, True, True, False) == "punched"  # both behind NAT
    assert path_kind(("203.0.113.20", 5000), host, True, False, False) == "direct"  # we are public: it dialed out
    assert path_kind(("203.0.113.20", 5000), host, True, True, True) == "relayed"
    assert behind_nat("symmetric") and behind_nat("endpoint-independent") and not behind_nat("no NAT")
    assert not behind_nat("") and not behind_nat("unknown")


@pytest.mark.parametrize("text,expected", [("stun.example:3478", ("stun.example", 3478)), ("h", ("h", 3478)),
                                           ("[2001:db8::1]:9", ("2001:db8::1", 9))])
def test_parse_host_port(text, expected) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "h:x", "h:0", "h:70000"])
def test_parse_host_port_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_relay_urls_parse_and_bad_ones_say_why_without_the_password() -> None:
    from common.nat.turn import parse_relay_url, redact
    assert parse_relay_url("turn:mesh:pw@relay.example:3478") == ("mesh", "pw", "relay.example", 3478)
    assert parse_relay_url("turn://mesh:p@ss@10.0.0.1") == ("mesh", "p@ss", "10.0.0.1", 3478)
    for bad in ("relay.example:3478", "turn:mesh@relay:3478", "turn:mesh:topsecret@relay:x", "stun:a:b@c"):
        with pytest.raises(ValueError) as info:
            parse_relay_url(bad)
        assert "topsecret" not in str(info.value) and "turn:USER:PASSWORD@HOST:PORT" in str(info.value)
    assert redact("turn:mesh:topsecret@relay:3478") == "turn:mesh:***@relay:3478"


def test_channel_data_framing() -> None:
    from common.nat.turn import channel_data, parse_channel_data
    framed = channel_data(0x4001, b"quic bytes")
    assert parse_channel_data(framed) == (0x4001, b"quic bytes")
    assert parse_channel_data(framed[:-1]) is None                # truncated
    assert parse_channel_data(b"\xc0" + framed[1:]) is None       # a QUIC long header, not a channel


def test_status_text_shows_each_peers_path_and_bytes_each_way() -> None:
    from common.messages import Announcement, PeerPath, PeerView
    from meshctl.cli import render_status
    ann = Announcement(node_id="b" * 64, seq=1, role="worker", version="x")
    peer = PeerView(announcement=ann, connected=True, status="connected", rtt_ms=4.5,
                    path=PeerPath(path="relayed", via="relay 203.0.113.3:3478", bytes_sent=1500, bytes_received=800))
    tunnel = {"node_id": "b" * 64, "lane": "quic", "bytes_out": 2_000_000, "bytes_in": 3_500_000}
    text = render_status({"meshd": {"node_id": "a" * 64, "peers": [peer.model_dump()]}, "electd": {}, "runnerd": {},
                          "gatewayd": {"tunnels": [tunnel]}})
    row = next(line for line in text.splitlines() if line.startswith("bbbbbbbb"))
    assert "relayed quic" in row and "2.0M/3.5M" in row, text  # control + tunnel bytes, sent/received
    assert "via relay 203.0.113.3:3478" in text


def test_a_relay_is_not_asked_to_reach_itself_or_our_loopback() -> None:
    from types import SimpleNamespace

    from common.nat.reach import relay_can_reach
    relay = SimpleNamespace(relayed=("203.0.113.3", 49200), server=("203.0.113.3", 3478))
    assert relay_can_reach(relay, ("203.0.113.101", 5000))
    assert not relay_can_reach(relay, ("203.0.113.3", 49300))  # another node's relayed address there: coturn refuses
    assert not relay_can_reach(relay, ("127.0.0.1", 5000))
    assert not relay_can_reach(relay, ("10.0.3.2", 5000))  # a public relay cannot reach a home LAN
    lan_relay = SimpleNamespace(relayed=("192.168.1.5", 49200), server=("192.168.1.5", 3478))
    assert relay_can_reach(lan_relay, ("192.168.1.20", 5000))


def test_only_the_dialer_moves_a_relayed_connection_and_only_once_a_check_got_through() -> None:
    from common.nat.candidates import MOVE_TO_DIRECT, MOVE_USE_SOCKET, plan_move
    relay = ("203.0.113.3", 49200)
    direct = ("203.0.113.102", 40000)
    # through our own relay: the same peer address from our socket, once a check to it answered
    assert plan_move(True, True, direct, set(), remote_answered=True, best_direct=None) == (MOVE_USE_SOCKET, None)
    assert plan_move(True, True, direct, set(), remote_answered=False, best_direct=None) is None
    # to the peer's relayed address: to its direct candidate that answered
    assert plan_move(True, False, relay, {relay}, False, direct) == (MOVE_TO_DIRECT, direct)
    assert plan_move(True, False, relay, {relay}, False, None) is None
    # the accepted end never moves (it answers the way it is reached); a direct connection stays
    assert plan_move(False, True, direct, set(), True, None) is None
    assert plan_move(False, False, relay, {relay}, True, direct) is None
    assert plan_move(True, False, direct, {relay}, True, ("203.0.113.102", 40001)) is None


def test_socket_mappings_offers_every_mapping_the_socket_got_behind_a_symmetric_nat() -> None:
    # A NAT reconfigured to keep one mapping per socket gives new flows the mapping of one of the
    # socket's live flows: the relay's or a STUN server's (seen in the NAT lab: the STUN server's).
    relay, stun_a, stun_b, predicted = ("203.0.113.9", 41234), ("203.0.113.9", 41234), ("203.0.113.9", 52000), \
        ("203.0.113.9", 5000)
    assert socket_mappings("symmetric", [relay, stun_a, None, stun_b], [predicted]) == [relay, stun_b]
    assert socket_mappings("symmetric", [predicted, stun_b], [predicted]) == [stun_b]
    assert socket_mappings("endpoint-independent", [relay, stun_b], []) == []  # gather's public mapping is the one


def test_through_relay_is_our_relayed_path_or_a_peers_relayed_address() -> None:
    peer_relay = ("203.0.113.3", 49974)
    assert through_relay(True, ("203.0.113.101", 4000), set())  # we send through our allocation
    assert through_relay(False, ("::ffff:203.0.113.3", 49974, 0, 0), {peer_relay})  # a dual-stack socket's form
    assert not through_relay(False, ("203.0.113.3", 49975), {peer_relay})
    assert not through_relay(False, ("203.0.113.101", 4000), {peer_relay})
