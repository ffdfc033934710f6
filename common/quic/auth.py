"""The challenge exchange that authenticates a dialer to a server, once for every lane.

The server's key is pinned by the dialer (the TLS certificate it presented must hash to the node id
it meant to reach); the dialer proves its own key by signing the server's fresh nonce, bound to the
server's node id and the lane's context string, together with its claims (e.g. a mesh admission
proof). Written over two callables (`recv` a frame, `send` frames) so that the QUIC connection
driver and the TLS-TCP lane run the very same exchange.

Both frames also say the sender's mesh protocol (common.messages.MESH_PROTOCOL; absent: 1, the
aioquic builds). Each side checks the other's, so a peer on another protocol is refused before
anything it could not follow is sent, with one line on each side that names both versions.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Awaitable, Callable

from common.identity import (AuthError, NodeIdentity, answer_challenge, check_answer, make_challenge,
                             node_id_of_public_key, parse_challenge)
from common.messages import MESH_PROTOCOL

log = logging.getLogger("mesh.quic")
SILENT_PROTOCOL = 1  # the protocol of a peer whose frames say none: the aioquic builds said nothing
REFUSAL_WAIT_S = 3.0  # a dialer that refuses the server's protocol waits this long for the server's own refusal

Recv = Callable[[], Awaitable[dict]]
Send = Callable[..., Awaitable[None]]
Authorize = Callable[[str, dict, bytes], "str | None | Awaitable[str | None]"]
ClaimsFor = Callable[[bytes, str], dict]


class PeerIdentityMismatch(AuthError):
    """The server's certificate key is not the node we meant to reach (wrong address, or worse)."""


class ProtocolMismatch(AuthError):
    """The peer runs another mesh protocol: nothing after the exchange would be understood."""


def protocol_refusal(peer_id: str, theirs: object, ours: int) -> str | None:
    """The one line that refuses a peer on another mesh protocol than `ours`; None when it is the same."""
    number = isinstance(theirs, int) and not isinstance(theirs, bool)  # JSON true is no version
    if number and theirs == ours:
        return None
    shown = theirs if number else "?"
    return f"peer {peer_id} runs mesh protocol {shown}, this node runs {ours}: upgrade both to the same release"


class ProtocolMismatches:
    """The peers this process refused lately for another protocol, for its status. The exchange runs
    deep in the QUIC connection and the TLS lane, which pass no such detail upward; meshd shows these."""
    KEEP_S = 300.0  # shown this long after the last refusal (a refused peer is redialled far more often)

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}  # peer node id -> (line, when)

    def note(self, peer_id: str, line: str, now: float | None = None) -> bool:
        """Record a refusal; True when it is news (the caller logs it): a peer or a line not seen lately."""
        now = time.time() if now is None else now
        old = self._seen.get(peer_id)
        self._seen[peer_id] = (line, now)
        return old is None or old[0] != line or now - old[1] > self.KEEP_S

    def forget(self, peer_id: str) -> None:
        """`peer_id` now speaks our protocol (it upgraded): no longer worth a line."""
        self._seen.pop(peer_id, None)

    def lines(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return [line for line, at in self._seen.values() if now - at <= self.KEEP_S]


MISMATCHES = ProtocolMismatches()  # this process's: every exchange in it reports here


def with_protocol(frame: dict, protocol: int | None) -> dict:
    """`frame` saying `protocol` (None: saying nothing, as the aioquic builds did; for tests)."""
    return frame if protocol is None else {**frame, "protocol": protocol}


def refused_for_protocol(peer_id: str, frame: dict, protocol: int | None) -> ProtocolMismatch | None:
    """The error to raise when the peer's `frame` says another protocol than ours (noted and logged once)."""
    line = protocol_refusal(peer_id, frame.get("protocol", SILENT_PROTOCOL), protocol) if protocol is not None \
        else None
    if line is None:
        MISMATCHES.forget(peer_id)
        return None
    if MISMATCHES.note(peer_id, line):
        log.warning("%s", line)
    return ProtocolMismatch(line)


def pinned_server_id(public_key: object, expected_node_id: str | None) -> str:
    """The node id of the server's certificate key; PeerIdentityMismatch unless it is the expected one."""
    if public_key is None:
        raise AuthError("server presented no certificate")
    server_id = node_id_of_public_key(public_key)
    if expected_node_id is not None and server_id != expected_node_id:
        raise PeerIdentityMismatch(f"peer presented node id {server_id}, expected {expected_node_id}")
    return server_id


async def challenge_dialer(identity: NodeIdentity, context: str, recv: Recv, send: Send, *,
                           timeout: float, protocol: int | None = MESH_PROTOCOL) -> tuple[str, dict, bytes]:
    """Server side: send a fresh challenge, check the signed answer. Returns (node id, claims,
    nonce); AuthError/FrameError on a bad answer (ProtocolMismatch: another mesh protocol),
    asyncio.TimeoutError if none comes in time."""
    nonce, challenge = make_challenge(identity)
    await send(with_protocol(challenge, protocol))
    answer = await asyncio.wait_for(recv(), timeout)
    node_id, claims = check_answer(answer, nonce, identity.node_id, context)
    if mismatch := refused_for_protocol(node_id, answer, protocol):  # named by the id it just proved
        raise mismatch
    return node_id, claims, nonce


async def authorize_dialer(authorize: Authorize, node_id: str, claims: dict, nonce: bytes) -> str | None:
    """The application's verdict on an authenticated dialer: None admits, a string refuses."""
    verdict = authorize(node_id, claims, nonce)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return None if verdict is None else str(verdict)


def verdict_frame(ok: bool, reason: str = "") -> dict:
    return {"type": "verdict", "ok": ok, "reason": reason}


async def answer_server(identity: NodeIdentity, context: str, server_id: str, recv: Recv, send: Send, *,
                        claims_for: ClaimsFor = lambda nonce, server_id: {}, then: tuple[dict, ...] = (),
                        protocol: int | None = MESH_PROTOCOL) -> dict:
    """Dialer side, after pinning `server_id`: read the challenge, answer it (followed by `then`
    frames in the same write), and return the server's verdict frame (see `check_verdict`).
    ProtocolMismatch when the server runs another mesh protocol."""
    challenge = await recv()
    nonce, claimed_id = parse_challenge(challenge)
    if claimed_id != server_id:
        raise AuthError(f"server claims node id {claimed_id} but its certificate is {server_id}")
    mismatch = refused_for_protocol(server_id, challenge, protocol)
    answer = with_protocol(answer_challenge(identity, nonce, server_id, context, claims_for(nonce, server_id)),
                           protocol)
    await send(answer, *(() if mismatch else then))
    if mismatch:
        # The answer tells the server our protocol, so that it says so on its side too; its refusal
        # (or, from an older build, its verdict) ends the exchange.
        try:
            await asyncio.wait_for(recv(), REFUSAL_WAIT_S)
        except Exception:  # noqa: BLE001 - closed, timed out, refused: all the same here
            pass
        raise mismatch
    return await recv()


def check_verdict(verdict: object) -> None:
    """AuthError with the server's reason unless the verdict admits us."""
    if not isinstance(verdict, dict) or verdict.get("type") != "verdict" or verdict.get("ok") is not True:
        reason = verdict.get("reason") if isinstance(verdict, dict) else None
        raise AuthError(str(reason or "refused by the peer"))
