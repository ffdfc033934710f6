"""The local ZeroMQ bus: one PUB (state) and one ROUTER (control) per service under MESH_HOME/run.

Services publish their whole state on change and on a heartbeat, so a subscriber that joins late
(ZeroMQ's slow joiner) or restarts converges within a second. Requests that need an answer go
DEALER → ROUTER with a correlation id and a timeout — never REQ/REP, which wedges on a lost reply.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
from pydantic import ValidationError

from common import addresses
from common.messages import Message, Reply, decode, encode

HEARTBEAT_S = 1.0
log = logging.getLogger("bus")


def make_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: list[str] | None = None) -> zmq.Socket:
    """The one socket factory: no linger (a dead peer never blocks shutdown), bounded queues."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        sock.bind(bind)
        if bind.startswith("ipc://"):
            os.chmod(bind[len("ipc://"):], 0o600)
    for address in connect or []:
        sock.connect(address)
    return sock


class ServiceLock:
    """An flock held for the process lifetime: a second copy of a service fails loudly instead of
    silently stealing the first one's ipc sockets (a second bind on an ipc path takes it over)."""

    def __init__(self, home: Path, service: str):
        path = addresses.lock_path(home, service)
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: {service} is already running for MESH_HOME={home}; "
                             f"stop it with `meshctl down` or use another MESH_HOME") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())


Handler = Callable[[Message], Awaitable[Reply] | Reply]


class ServiceBus:
    """A service's own endpoints plus subscriptions to the services it listens to."""

    def __init__(self, home: Path, service: str, listens_to: tuple[str, ...]):
        addresses.ensure_dirs(home)
        self.home, self.service = home, service
        self._lock = ServiceLock(home, service)
        self.ctx = zmq.asyncio.Context()
        self.pub_to_bus = make_socket(self.ctx, zmq.PUB, bind=addresses.pub_address(home, service))
        self.ctl_from_clients = make_socket(self.ctx, zmq.ROUTER, bind=addresses.ctl_address(home, service))
        self.recv_from_services = make_socket(
            self.ctx, zmq.SUB, connect=[addresses.pub_address(home, s) for s in listens_to])
        self._changed = asyncio.Event()

    def state_changed(self) -> None:
        self._changed.set()

    async def publish_forever(self, current_state: Callable[[], Message]) -> None:
        """Publish on change, and on every heartbeat whether or not anything changed."""
        while True:
            self._changed.clear()
            await self.pub_to_bus.send(encode(current_state()))
            try:
                await asyncio.wait_for(self._changed.wait(), HEARTBEAT_S)
                await asyncio.sleep(0.02)  # coalesce bursts of changes into one publish
            except asyncio.TimeoutError:
                pass

    async def receive_forever(self, on_message: dict[type, Callable[[Message], None]]) -> None:
        """Dispatch subscribed state messages by type; unknown or malformed ones are dropped."""
        while True:
            data = await self.recv_from_services.recv()
            try:
                message = decode(data)
            except ValidationError as exc:
                log.warning("dropped malformed bus message: %s", exc.errors()[0].get("msg"))
                continue
            handler = on_message.get(type(message))
            if handler:
                handler(message)

    async def serve_control_forever(self, handlers: dict[type, Handler]) -> None:
        """Answer control requests; a slow one (a join dialing dead addresses) runs on its own task,
        so `status` is answered meanwhile."""
        in_flight: set[asyncio.Task] = set()
        while True:
            frames = await self.ctl_from_clients.recv_multipart()
            if len(frames) != 3:
                continue
            identity, correlation_id, payload = frames
            reply = self._handle(handlers, payload)
            if asyncio.iscoroutine(reply):
                task = asyncio.ensure_future(self._answer_later(identity, correlation_id, reply))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                continue
            await self.ctl_from_clients.send_multipart([identity, correlation_id, encode(reply)])

    def _handle(self, handlers: dict[type, Handler], payload: bytes):
        try:
            request = decode(payload)
            handler = handlers.get(type(request))
            if handler is None:
                return Reply(ok=False, error=f"{self.service} does not handle {request.kind!r}")
            return handler(request)
        except ValidationError as exc:
            return Reply(ok=False, error=f"malformed request: {exc.errors()[0].get('msg')}")
        except Exception as exc:  # a failed request must still get an answer
            log.exception("control request failed")
            return Reply(ok=False, error=f"{type(exc).__name__}: {exc}")

    async def _answer_later(self, identity: bytes, correlation_id: bytes, pending) -> None:
        try:
            reply = await pending
        except Exception as exc:
            log.exception("control request failed")
            reply = Reply(ok=False, error=f"{type(exc).__name__}: {exc}")
        await self.ctl_from_clients.send_multipart([identity, correlation_id, encode(reply)])

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def request(home: Path, service: str, message: Message, timeout: float = 3.0) -> Reply:
    """A blocking control request for CLIs; a service that does not answer in time is reported, not waited on."""
    ctx = zmq.Context()
    try:
        sock = make_socket(ctx, zmq.DEALER, connect=[addresses.ctl_address(home, service)])
        correlation_id = uuid.uuid4().hex.encode()
        sock.send_multipart([correlation_id, encode(message)])
        deadline_ms = int(timeout * 1000)
        while sock.poll(deadline_ms):
            frames = sock.recv_multipart()
            if len(frames) == 2 and frames[0] == correlation_id:
                reply = decode(frames[1])
                if isinstance(reply, Reply):
                    return reply
        return Reply(ok=False, error=f"{service} did not answer within {timeout:g} s (is the node running?)")
    finally:
        ctx.destroy(linger=0)
