"""The challenge exchange that authenticates a dialer to a server, once for every lane.

The server's key is pinned by the dialer (the TLS certificate it presented must hash to the node id
it meant to reach); the dialer proves its own key by signing the server's fresh nonce, bound to the
server's node id and the lane's context string, together with its claims (e.g. a mesh admission
proof). Written over two callables (`recv` a frame, `send` frames) so that the QUIC connection
driver and the TLS-TCP lane run the very same exchange.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Awaitable, Callable

from common.identity import (AuthError, NodeIdentity, answer_challenge, check_answer, make_challenge,
                             node_id_of_public_key, parse_challenge)

Recv = Callable[[], Awaitable[dict]]
Send = Callable[..., Awaitable[None]]
Authorize = Callable[[str, dict, bytes], "str | None | Awaitable[str | None]"]
ClaimsFor = Callable[[bytes, str], dict]


class PeerIdentityMismatch(AuthError):
    """The server's certificate key is not the node we meant to reach (wrong address, or worse)."""


def pinned_server_id(public_key: object, expected_node_id: str | None) -> str:
    """The node id of the server's certificate key; PeerIdentityMismatch unless it is the expected one."""
    if public_key is None:
        raise AuthError("server presented no certificate")
    server_id = node_id_of_public_key(public_key)
    if expected_node_id is not None and server_id != expected_node_id:
        raise PeerIdentityMismatch(f"peer presented node id {server_id}, expected {expected_node_id}")
    return server_id


async def challenge_dialer(identity: NodeIdentity, context: str, recv: Recv, send: Send, *,
                           timeout: float) -> tuple[str, dict, bytes]:
    """Server side: send a fresh challenge, check the signed answer. Returns (node id, claims,
    nonce); AuthError/FrameError on a bad answer, asyncio.TimeoutError if none comes in time."""
    nonce, challenge = make_challenge(identity)
    await send(challenge)
    answer = await asyncio.wait_for(recv(), timeout)
    node_id, claims = check_answer(answer, nonce, identity.node_id, context)
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
                        claims_for: ClaimsFor = lambda nonce, server_id: {}, then: tuple[dict, ...] = ()) -> dict:
    """Dialer side, after pinning `server_id`: read the challenge, answer it (followed by `then`
    frames in the same write), and return the server's verdict frame (see `check_verdict`)."""
    nonce, claimed_id = parse_challenge(await recv())
    if claimed_id != server_id:
        raise AuthError(f"server claims node id {claimed_id} but its certificate is {server_id}")
    await send(answer_challenge(identity, nonce, server_id, context, claims_for(nonce, server_id)), *then)
    return await recv()


def check_verdict(verdict: object) -> None:
    """AuthError with the server's reason unless the verdict admits us."""
    if not isinstance(verdict, dict) or verdict.get("type") != "verdict" or verdict.get("ok") is not True:
        reason = verdict.get("reason") if isinstance(verdict, dict) else None
        raise AuthError(str(reason or "refused by the peer"))
