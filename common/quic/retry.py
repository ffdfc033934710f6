"""Address validation (RFC 9000 §8.1): stateless Retry tokens, and the caps on handshakes that
have not authenticated yet. Pure: no sockets, no clock of its own.

A stranger's first Initial gets a Retry whose token binds the address the endpoint saw (for a
relayed peer: its address on the relay) to the connection ids, under a key that never leaves the
process. Only an Initial that echoes a valid, fresh token gets connection state, so a spoofed
source costs one small datagram and nothing is kept.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

TOKEN_LIFETIME_S = 10.0
_MAC_BYTES = 16
_HEAD = struct.Struct("!QB")  # issued at (ms), length of the original destination connection id

T = TypeVar("T", bound=Hashable)


def _address_bytes(addr: tuple) -> bytes:
    return f"{addr[0]}|{addr[1]}".encode()


class RetryTokens:
    """Issues and checks Retry tokens: issued-at, original DCID, Retry SCID and a MAC over those
    and the client's address."""

    def __init__(self, key: bytes | None = None, lifetime: float = TOKEN_LIFETIME_S):
        self._key = key or os.urandom(32)
        self.lifetime = lifetime

    def _mac(self, addr: tuple, body: bytes) -> bytes:
        return hmac.new(self._key, _address_bytes(addr) + body, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, addr: tuple, original_cid: bytes, retry_cid: bytes, now: float) -> bytes:
        body = _HEAD.pack(int(now * 1000), len(original_cid)) + original_cid + retry_cid
        return body + self._mac(addr, body)

    def check(self, addr: tuple, token: bytes, now: float) -> tuple[bytes, bytes] | None:
        """(original DCID, Retry SCID) of a valid token from `addr`, issued less than `lifetime`
        ago; None for anything else (another address, expired, forged, or not ours)."""
        if len(token) < _HEAD.size + _MAC_BYTES:
            return None
        body, mac = token[:-_MAC_BYTES], token[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        issued_ms, length = _HEAD.unpack_from(body)
        if not 0 <= now * 1000 - issued_ms <= self.lifetime * 1000:
            return None
        original_cid = body[_HEAD.size:_HEAD.size + length]
        retry_cid = body[_HEAD.size + length:]
        if len(original_cid) != length or not retry_cid:
            return None
        return original_cid, retry_cid


class HandshakeSlots(Generic[T]):
    """Handshakes that have not authenticated yet, oldest first: at most `per_source` from one
    source and `total` in all. `admit` returns what must be dropped to make room (the source's
    oldest past its cap, then the oldest of all past the total)."""

    def __init__(self, *, per_source: int, total: int):
        self.per_source = per_source
        self.total = total
        self._all: OrderedDict[T, str] = OrderedDict()
        self._by_source: dict[str, OrderedDict[T, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, item: object) -> bool:
        return item in self._all

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(self, item: T, source: str) -> list[T]:
        evicted = []
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.per_source:
            evicted.append(next(iter(mine)))
            self.release(evicted[-1])
        if len(self._all) >= self.total:
            evicted.append(next(iter(self._all)))
            self.release(evicted[-1])
        self._all[item] = source
        self._by_source.setdefault(source, OrderedDict())[item] = None
        return evicted

    def release(self, item: T) -> None:
        source = self._all.pop(item, None)
        if source is None:
            return
        mine = self._by_source[source]
        del mine[item]
        if not mine:
            del self._by_source[source]
