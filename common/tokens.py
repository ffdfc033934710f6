"""Invite tokens and admission proofs — pure functions, no I/O.

A token carries the mesh id, the mesh secret, the inviting node's id (its certificate is pinned
to it) and the addresses it listens on. Knowing an address gets nobody in: a dialer must prove it
holds the secret with an HMAC over the server's fresh nonce and both node ids, so a proof can
be neither replayed nor relayed to another node.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field

TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 4096


class TokenError(ValueError):
    """A token we cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class InviteToken:
    mesh_id: str
    secret: str  # hex
    node_id: str
    addrs: tuple[tuple[str, int], ...] = field(default_factory=tuple)


def new_secret() -> str:
    return secrets.token_hex(32)


def new_mesh_id() -> str:
    return secrets.token_hex(8)


def encode_token(token: InviteToken) -> str:
    body = {"v": TOKEN_VERSION, "mesh": token.mesh_id, "secret": token.secret, "node": token.node_id,
            "addrs": [[host, port] for host, port in token.addrs]}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(text: str) -> InviteToken:
    hint = "copy the whole token printed by `meshctl token` on a node of the mesh"
    text = (text or "").strip()
    if not text:
        raise TokenError(f"the invite token is empty; {hint}")
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError(f"the invite token is {len(text)} characters, too long to be one; {hint}")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        body = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TokenError(f"the invite token is not valid (it does not decode); {hint}") from None
    if not isinstance(body, dict) or body.get("v") != TOKEN_VERSION:
        raise TokenError(f"the invite token has an unknown format or version; {hint} (same mesh-inference version)")
    try:
        mesh_id, secret, node_id = (str(body[k]) for k in ("mesh", "secret", "node"))
        addrs = tuple((str(h), int(p)) for h, p in body["addrs"])
    except (KeyError, TypeError, ValueError):
        raise TokenError(f"the invite token is missing fields; {hint}") from None
    if not _is_hex(secret, 64) or not _is_hex(node_id, 32) or not _is_hex(mesh_id, 16):
        raise TokenError(f"the invite token has malformed ids; {hint}")
    if not addrs or any(not (0 < p < 65536) or not h for h, p in addrs):
        raise TokenError(f"the invite token has no usable address; {hint}")
    return InviteToken(mesh_id, secret, node_id, addrs)


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


def admission_proof(secret: str, nonce: bytes, dialer_id: str, server_id: str) -> str:
    message = b"mesh-admit|" + nonce + f"|{dialer_id}|{server_id}".encode()
    return hmac.new(bytes.fromhex(secret), message, hashlib.sha256).hexdigest()


def check_admission(secret: str, nonce: bytes, dialer_id: str, server_id: str, proof: object) -> bool:
    if not isinstance(proof, str):
        return False
    try:
        expected = admission_proof(secret, nonce, dialer_id, server_id)
    except ValueError:  # a malformed secret admits nobody (and must not crash admission)
        return False
    return hmac.compare_digest(expected.encode(), proof.encode("utf-8", "replace"))
