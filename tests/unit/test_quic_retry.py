"""Retry tokens and the caps on unauthenticated handshakes (common/quic/retry.py), sans-I/O."""
from __future__ import annotations

from common.quic.retry import HandshakeSlots, RetryTokens

ADDR = ("192.0.2.7", 40000)


def test_a_token_is_good_only_for_its_address_its_ids_and_a_while() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDR, b"original", b"retry-id", now=100.0)
    assert tokens.check(ADDR, token, now=105.0) == (b"original", b"retry-id")
    assert tokens.check(("192.0.2.8", 40000), token, now=105.0) is None   # another host
    assert tokens.check(("192.0.2.7", 40001), token, now=105.0) is None   # another port (a NAT rebinding)
    assert tokens.check(ADDR, token, now=110.5) is None                   # expired
    assert tokens.check(ADDR, token, now=99.0) is None                    # from the future
    forged = bytearray(token)
    forged[10] ^= 1
    assert tokens.check(ADDR, bytes(forged), now=105.0) is None
    assert RetryTokens().check(ADDR, token, now=105.0) is None            # another endpoint's key
    assert tokens.check(ADDR, b"", now=105.0) is None and tokens.check(ADDR, b"\x00" * 40, now=105.0) is None


def test_slots_cap_each_source_and_the_total_dropping_the_oldest() -> None:
    slots: HandshakeSlots[str] = HandshakeSlots(per_source=2, total=3)
    assert slots.admit("a1", "A") == [] and slots.admit("a2", "A") == []
    assert slots.admit("a3", "A") == ["a1"]          # A's oldest goes, not B's
    assert slots.admit("b1", "B") == []
    assert slots.admit("c1", "C") == ["a2"]          # the total: the oldest of all
    assert len(slots) == 3 and slots.count("A") == 1 and "a2" not in slots
    slots.release("b1")
    slots.release("b1")                              # twice is harmless
    assert slots.count("B") == 0 and slots.admit("c2", "C") == []
