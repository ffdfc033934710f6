"""Datagram paths: the ways a QUIC connection's datagrams leave this node.

A connection sends through one path at a time (`QuicPeerConnection.path`), chosen per connection:
  * `UdpSocketPath` — the endpoint's own UDP socket, straight to the peer's address (a direct
    path, or a hole-punched one: to the socket they are the same);
  * a TURN allocation (`common.nat.turn.TurnAllocation`) — wrapped in ChannelData/Send indications
    to the relay, which forwards them from its relayed address (a relayed path).
Receiving needs no path object: the endpoint demultiplexes what its socket reads (QUIC, STUN,
or datagrams from a relay server that carry a peer's datagram inside).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from typing import Protocol

from common.quic.limits import RECEIVE_BATCH, SOCKET_BUFFER_BYTES

log = logging.getLogger("mesh.quic")

Datagrams = list[tuple[bytes, tuple]]


class DatagramPath(Protocol):
    kind: str    # "direct" or "relayed"
    label: str   # for status: "udp", or "turn 203.0.113.5:3478"

    def send(self, datagrams: Datagrams) -> None: ...


UDP_SEGMENT = 103          # Linux: send one buffer as several datagrams of this size (GSO)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000      # below the 64 KiB a UDP send may carry
REPORTED_ERRORS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)


class UdpSocketPath:
    """Sends on the endpoint's UDP socket; queues (and waits for writability) when it is full.

    A burst to one peer (qh3 hands back a list of equal-sized datagrams and a shorter last one)
    goes out in one system call where Linux offers UDP GSO, instead of one sendto per datagram:
    per-datagram work, not bytes, is what a QUIC lane's bulk costs here."""

    kind = "direct"
    label = "udp"

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket):
        self._loop = loop
        self.sock: socket.socket | None = sock
        self._send_queue: Datagrams = []
        self.gso = sys.platform.startswith("linux")

    def send(self, datagrams: Datagrams) -> None:
        sock = self.sock
        if sock is None:
            return
        if self._send_queue:
            self._send_queue.extend(datagrams)
            return
        index, count, retried = 0, len(datagrams), False
        while index < count:
            data, addr = datagrams[index]
            end = index + 1
            if self.gso and count - index > 1:
                size, total = len(data), len(data)
                while (end < count and end - index < GSO_MAX_SEGMENTS and datagrams[end][1] == addr
                       and len(datagrams[end][0]) <= size and total + len(datagrams[end][0]) <= GSO_MAX_BYTES):
                    total += len(datagrams[end][0])
                    end += 1
                    if len(datagrams[end - 1][0]) < size:
                        break  # only the last segment may be shorter
            try:
                if end - index > 1:
                    try:
                        sock.sendmsg([b"".join(d for d, _ in datagrams[index:end])],
                                     [(socket.SOL_UDP, UDP_SEGMENT, len(data).to_bytes(2, sys.byteorder))], 0, addr)
                    except OSError as exc:
                        if exc.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                            raise
                        self.gso = False  # no GSO on this socket or device: one datagram at a time
                        continue
                else:
                    sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._send_queue.extend(datagrams[index:])
                self._loop.add_writer(sock.fileno(), self.flush)
                return
            except OSError as exc:
                if exc.errno in REPORTED_ERRORS and not retried:
                    # Most likely an ICMP error left by an earlier datagram to another address (the
                    # socket reports it on the next call and sends nothing): send these again, once.
                    retried = True
                    continue
                if exc.errno not in (*REPORTED_ERRORS, errno.EMSGSIZE, errno.EPERM):
                    log.debug("sendto %s failed: %s", addr, exc)
            index, retried = end, False

    def flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        queue = self._send_queue
        sent = 0
        try:
            for data, addr in queue:
                try:
                    sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in REPORTED_ERRORS:
                        try:
                            sock.sendto(data, addr)  # as in send: an earlier datagram's ICMP error
                        except OSError:
                            pass
                sent += 1
        finally:
            del queue[:sent]
            if not queue:
                self._loop.remove_writer(sock.fileno())

    def close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.flush()
        if self._send_queue:
            self._loop.remove_writer(sock.fileno())
            self._send_queue.clear()
        self.sock = None


def open_udp_socket(sockaddr: tuple, family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _enlarge_buffers(sock)
        sock.setblocking(False)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


UDP_GRO = 104
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


def enable_gro(sock: socket.socket) -> bool:
    """Ask Linux to hand over bursts from one peer in one read (UDP GRO); see gro_segment_size."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The size of each datagram in a coalesced read (the last may be shorter); 0: one datagram."""
    for level, kind, value in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 2:
            return int.from_bytes(value[:4] if len(value) >= 4 else value[:2], sys.byteorder)
    return 0


def read_icmp_errors(sock: socket.socket) -> list[tuple[tuple, int]]:
    """ICMP errors queued on the socket (IP_RECVERR): (address, errno) pairs."""
    out = []
    for _ in range(RECEIVE_BATCH):
        try:
            _, ancillary, _, addr = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        error = 0
        for _level, _type, data in ancillary:
            if len(data) >= 4:  # struct sock_extended_err begins with ee_errno
                error = int.from_bytes(data[:4], sys.byteorder)
        if addr and error:
            out.append((addr, error))
    return out


def icmp_error_text(error: int) -> str:
    return f"{os.strerror(error).lower()} (ICMP)"


def enable_icmp_errors(sock: socket.socket, family: int) -> bool:
    """Ask Linux to queue ICMP errors on this unconnected socket (IP_RECVERR / IPV6_RECVERR)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "MSG_ERRQUEUE"):
        return False
    ip_recverr, ipv6_recverr = getattr(socket, "IP_RECVERR", 11), getattr(socket, "IPV6_RECVERR", 25)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, ipv6_recverr, 1)
            try:  # IPv4-mapped peers on a dual-stack socket
                sock.setsockopt(socket.IPPROTO_IP, ip_recverr, 1)
            except OSError:
                pass
        else:
            sock.setsockopt(socket.IPPROTO_IP, ip_recverr, 1)
    except OSError:
        return False
    return True


def _enlarge_buffers(sock: socket.socket) -> None:
    """Bursts of large datagrams overflow Linux's default ~208 KiB UDP buffers; as root we can
    exceed net.core.rmem_max, otherwise we get what the kernel allows."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
                continue
            except OSError:
                pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
