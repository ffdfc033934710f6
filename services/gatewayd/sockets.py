"""Sockets of the data plane's tunnels: accepting on the event loop, connecting to a peer (racing its
addresses) or a local service, and the addresses a wildcard bind is reached at."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, Callable

log = logging.getLogger("mesh.tunnels")

RACE_STAGGER = 0.25           # between attempts at a peer's successive addresses

Target = tuple[str, int] | str  # a local service: (host, port) on TCP, or a Unix socket path

def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass



def accept_on_loop(listener: socket.socket, on_accept: Callable[[socket.socket], Any]) -> None:
    """Accept from the event loop's reader callback. Not loop.sock_accept: cancelling that while the
    kernel hands over a connection drops the connection (InvalidStateError in asyncio), and its
    client then waits for a reply that never comes."""
    def readable() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accepting a tunnel connection failed: %s", exc)
                return
            sock.setblocking(False)
            set_nodelay(sock)
            on_accept(sock)
    asyncio.get_running_loop().add_reader(listener.fileno(), readable)


def stop_accepting(listener: socket.socket) -> None:
    asyncio.get_running_loop().remove_reader(listener.fileno())
    listener.close()



async def race_tcp_connect(addrs: list[tuple[str, int]], timeout: float) -> tuple[socket.socket, tuple[str, int]]:
    """Connect to the first of `addrs` that answers, starting one attempt every RACE_STAGGER s."""
    async def attempt(addr: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
        return await connect_tcp(addr, timeout), addr

    pending: set[asyncio.Task] = set()
    errors: list[str] = []
    queue = list(addrs)
    winner: tuple[socket.socket, tuple[str, int]] | None = None
    try:
        while (queue or pending) and winner is None:
            if queue:
                pending.add(asyncio.ensure_future(attempt(queue.pop(0))))
            done, pending = await asyncio.wait(pending, timeout=RACE_STAGGER if queue else None,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(str(exc) or type(exc).__name__)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result()[0].close()  # a second connection that finished at the same time
    finally:
        for task in pending:
            task.cancel()
            task.add_done_callback(_close_raced_socket)
    if winner is not None:
        return winner
    raise ConnectionError("TCP: " + ("; ".join(errors) or "no address"))


def describe_target(target: Target | None) -> str:
    return target if isinstance(target, str) else f"{target[0]}:{target[1]}" if target else "?"


async def connect_local(target: Target, timeout: float) -> socket.socket:
    """A connected non-blocking socket to a local service: (host, port) over TCP, or a Unix socket path."""
    if not isinstance(target, str):
        return await connect_tcp(target, timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_tcp(addr: tuple[str, int], timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY, to the first of addr's addresses."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        set_nodelay(sock)
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_raced_socket(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def announce_hosts(bind_host: str) -> list[str]:
    """Addresses peers may use for us: the bound one, or for a wildcard bind every interface
    address (routable ones first, loopback last)."""
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        return [bind_host]
    if not ip.is_unspecified:
        return [bind_host]
    hosts: list[str] = []
    try:
        import psutil
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family == socket.AF_INET or (ip.version == 6 and address.family == socket.AF_INET6):
                    host = address.address.split("%", 1)[0]
                    if host not in hosts:
                        hosts.append(host)
    except Exception:  # psutil missing or failing: fall back to what the resolver knows
        try:
            hosts = socket.gethostbyname_ex(socket.gethostname())[2]
        except OSError:
            hosts = []
    def loopback_or_link_local(host: str) -> bool:
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_link_local
    hosts.sort(key=loopback_or_link_local)
    if not any(ipaddress.ip_address(h).is_loopback for h in hosts):
        hosts.append("127.0.0.1")
    return hosts
