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


REPORTED_ERRORS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)


class UdpSocketPath:
    """Sends on the endpoint's UDP socket; queues (and waits for writability) when it is full."""

    kind = "direct"
    label = "udp"

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket):
        self._loop = loop
        self.sock: socket.socket | None = sock
        self._send_queue: Datagrams = []

    def send(self, datagrams: Datagrams) -> None:
        sock = self.sock
        if sock is None:
            return
        if self._send_queue:
            self._send_queue.extend(datagrams)
            return
        sendto = sock.sendto
        for index, (data, addr) in enumerate(datagrams):
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._send_queue.extend(datagrams[index:])
                self._loop.add_writer(sock.fileno(), self.flush)
                return
            except OSError as exc:
                if exc.errno in REPORTED_ERRORS:
                    # Most likely an ICMP error left by an earlier datagram to another address (the
                    # socket reports it on the next call and sends nothing): this one still goes.
                    try:
                        sendto(data, addr)
                    except OSError:
                        pass
                elif exc.errno not in (errno.EMSGSIZE, errno.EPERM):
                    log.debug("sendto %s failed: %s", addr, exc)

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
