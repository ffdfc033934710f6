"""Gossip: signed announcements, merge rules, hearsay expiry, secret rotations — pure functions.

Each node sends its whole view (every announcement it knows) to every peer it is connected to,
on change and every second. An announcement about node X counts only with X's signature: it
carries X's public key (whose hash is X's node id) and a signature over its fields and the mesh
id, so no member can speak for another, and relaying changes nothing. Merging keeps the newest
announcement per node by `seq`, which only grows (time-based, so a restarted node supersedes its
old self); forged (key not X's, or unsigned), altered (signature does not match the fields) and
replayed (validly signed, but older than what we hold and not one we held lately) announcements
are dropped and counted.

A peer counts as alive only while we hold a live, authenticated connection to it; hearsay alone
never makes a node a member of a plan. Entries for nodes we never reached expire after
FORGET_AFTER_S, and the same entry is not taken back from gossip afterwards (else two nodes that
both heard of a ghost would hand it to each other forever); a newer one, or one from the node
itself, is.

A rotation of the mesh secret is signed by the member that made it and is taken only from a
member, only with a well-formed secret and a higher (generation, secret) than ours.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass, field

from common.identity import NodeIdentity, is_node_id, node_id_of_public_key
from common.messages import Announcement

FORGET_AFTER_S = 60.0
RECENT_SEQS = 8  # older seqs still in flight from slower relays: normal lag, not a replay
_ANNOUNCEMENT_DOMAIN = b"mesh-inference announcement v1\x00"
_ROTATION_DOMAIN = b"mesh-inference rotation v1\x00"
_UNSIGNED = {"sig", "public_key", "kind"}


@dataclass
class GossipMemory:
    """What the merge rules remember besides the view itself (all in memory: a restart forgets it)."""
    recent_seqs: dict[str, list[int]] = field(default_factory=dict)
    first_heard: dict[str, float] = field(default_factory=dict)  # nodes known only from others' gossip
    expired: dict[str, int] = field(default_factory=dict)  # node id -> seq of the entry that expired
    dropped: Counter = field(default_factory=Counter)  # forged / altered / replayed / bad_rotation


# --- announcements ---------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def announcement_message(ann: Announcement, mesh_id: str) -> bytes:
    """The bytes a node signs: every field but the signature itself, and the mesh it speaks to."""
    fields = ann.model_dump(mode="json", exclude=_UNSIGNED)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return b"".join([_ANNOUNCEMENT_DOMAIN, mesh_id.encode("ascii", "replace"), b"\x00", ann.public_key.encode("ascii", "replace"),
                     b"\x00", canonical.encode("ascii")])


def sign_announcement(ann: Announcement, mesh_id: str, identity: NodeIdentity) -> Announcement:
    signed = ann.model_copy(update={"public_key": _b64(identity.public_key_der)})
    return signed.model_copy(update={"sig": _b64(identity.sign(announcement_message(signed, mesh_id)))})


def announcement_fault(ann: Announcement, mesh_id: str) -> str | None:
    """None if `ann` is signed by the node it is about; else "forged" or "altered"."""
    public_key = _unb64(ann.public_key) if ann.public_key else None
    signature = _unb64(ann.sig) if ann.sig else None
    if public_key is None or signature is None or not is_node_id(ann.node_id):
        return "forged"
    try:
        if node_id_of_public_key(public_key) != ann.node_id:
            return "forged"  # somebody else's key speaking for this node
    except ValueError:
        return "forged"
    if not NodeIdentity.verify(public_key, announcement_message(ann, mesh_id), signature):
        return "altered"
    return None


def merge_view(view: dict[str, Announcement], incoming: list[Announcement], me: str, mesh_id: str,
               memory: GossipMemory, now: float, *, sender: str | None = None) -> tuple[dict[str, Announcement], bool]:
    """(new view, whether anything but a seq changed). Our own entry is never taken from others;
    `sender` (the authenticated peer) may bring back its own expired entry."""
    merged = dict(view)
    changed = False
    for ann in incoming:
        if ann.node_id == me:
            continue
        known = merged.get(ann.node_id)
        if known is not None and ann == known:
            continue  # what we hold already (the common case: everyone resends its whole view)
        if known is not None and ann.seq <= known.seq:
            if ann.seq in memory.recent_seqs.get(ann.node_id, ()):
                continue  # a slower relay still passing on one we held a moment ago
            memory.dropped[announcement_fault(ann, mesh_id) or "replayed"] += 1
            continue
        fault = announcement_fault(ann, mesh_id)
        if fault:
            memory.dropped[fault] += 1
            continue
        if known is None and ann.node_id != sender and ann.seq <= memory.expired.get(ann.node_id, -1):
            continue  # hearsay we let expire; only something newer brings it back
        memory.expired.pop(ann.node_id, None)
        seqs = memory.recent_seqs.setdefault(ann.node_id, [])
        seqs.append(ann.seq)
        del seqs[:-RECENT_SEQS]
        if known is None and ann.node_id != sender:
            memory.first_heard.setdefault(ann.node_id, now)
        merged[ann.node_id] = ann
        changed = changed or known is None or \
            known.model_dump(exclude={"seq", "sig"}) != ann.model_dump(exclude={"seq", "sig"})
    return merged, changed


def forget_stale(view: dict[str, Announcement], last_heard: dict[str, float], connected: set[str], now: float,
                 memory: GossipMemory | None = None) -> dict[str, Announcement]:
    """Drop nodes nobody has connected to for FORGET_AFTER_S: since we last heard them directly, or,
    for nodes never reached, since they first appeared in gossip (they left or never came up)."""
    memory = memory if memory is not None else GossipMemory()
    kept = {}
    for nid, ann in view.items():
        since = last_heard[nid] if nid in last_heard else memory.first_heard.get(nid, now)
        if nid in connected or now - since < FORGET_AFTER_S:
            kept[nid] = ann
        else:
            memory.expired[nid] = ann.seq
            memory.first_heard.pop(nid, None)
    return kept


# --- liveness ------------------------------------------------------------------------------

def heartbeat_interval(liveness_timeout: float) -> float:
    """About six heartbeats per timeout (0.5 s at the default 3 s), between 0.1 and 1 s apart."""
    return min(max(liveness_timeout / 6.0, 0.1), 1.0)


DIAL_BACKOFF_S = (1, 2, 5, 10, 20)
RECENT_MEMBER_S = 60.0  # a member heard this recently is probably just behind a blip (a partition, a restart)...
RECENT_REDIAL_S = 2.0   # ...so it is redialled this often instead of backing off to DIAL_BACKOFF_S's 20 s


def redial_delay(failures: int, heard_ago: float | None) -> float:
    """Seconds before the next dial after `failures` failed ones, for a member last heard `heard_ago`
    seconds ago (None: never). A heal is noticed within about RECENT_REDIAL_S; long-dead members
    keep the long back-off."""
    delay = DIAL_BACKOFF_S[min(failures, len(DIAL_BACKOFF_S) - 1)]
    if heard_ago is not None and heard_ago < RECENT_MEMBER_S:
        return min(delay, RECENT_REDIAL_S)
    return delay


def redials_in_flight(heard_ago: float | None) -> int:
    """How many dials to a lost member may be under way at once. A dial sent while the path is down
    waits out its whole timeout (5 s) even if the path heals meanwhile, so for a recent member a new
    one starts every RECENT_REDIAL_S regardless."""
    return 3 if heard_ago is not None and heard_ago < RECENT_MEMBER_S else 1


FORGET_AFTER_FAILED_DIALS = 15  # about 4 minutes of the full back-off...
FORGET_KNOWN_AFTER_S = 300.0    # ...and not heard for 5 minutes: gone for good (or moved), stop dialing it


def give_up_redialing(failures: int, heard_ago: float | None) -> bool:
    """Whether a known member that keeps failing dials should be forgotten. Time counts as well as
    failures: redials of recent members come fast, and a long partition must not forget the other side."""
    return failures >= FORGET_AFTER_FAILED_DIALS and (heard_ago is None or heard_ago > FORGET_KNOWN_AFTER_S)


def grown_silence(silent_for: float, elapsed: float, interval: float) -> float:
    """A link's silence after a heartbeat tick `elapsed` seconds after the last one. A tick that comes
    late because this process was starved counts as at most two intervals: the peer's frames may be
    waiting, unread, in our own socket — a loaded machine must not make us drop live peers."""
    return silent_for + min(max(elapsed, 0.0), 2.0 * interval)


# --- rotations of the mesh secret ------------------------------------------------------------

def is_secret(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _rotation_message(mesh_id: str, generation: int, secret: str) -> bytes:
    return _ROTATION_DOMAIN + f"{mesh_id}\x00{generation}\x00{secret}".encode("ascii")


def sign_rotation(mesh_id: str, generation: int, secret: str, identity: NodeIdentity) -> dict:
    """The rotation as gossiped: who made it, with their key, signed."""
    return {"mesh": mesh_id, "gen": generation, "secret": secret, "by": identity.node_id,
            "public_key": _b64(identity.public_key_der),
            "sig": _b64(identity.sign(_rotation_message(mesh_id, generation, secret)))}


def rotation_verdict(frame: object, mesh_id: str, generation: int, secret: str,
                     members: set[str]) -> tuple[dict | None, str | None]:
    """(rotation to adopt, None) or (None, why it was refused); (None, None) for nothing new."""
    if frame is None:
        return None, None  # a mesh that never rotated gossips none
    if not isinstance(frame, dict):
        return None, "not a rotation"
    gen, new = frame.get("gen"), frame.get("secret")
    if frame.get("mesh") != mesh_id:
        return None, "another mesh"
    if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen < 1 << 62:
        return None, "bad generation"
    if gen < generation or (gen == generation and new == secret):
        return None, None  # what we have, or older: nothing to do
    if not is_secret(new):
        return None, "malformed secret"
    if gen == generation and new < secret:
        return None, None  # two rotations at once: every member settles on the larger secret
    by, public_key, signature = frame.get("by"), frame.get("public_key"), frame.get("sig")
    if not is_node_id(by) or by not in members:
        return None, "not signed by a member"
    key = _unb64(public_key) if isinstance(public_key, str) else None
    sig = _unb64(signature) if isinstance(signature, str) else None
    if key is None or sig is None:
        return None, "unsigned"
    try:
        if node_id_of_public_key(key) != by:
            return None, "signed with another node's key"
    except ValueError:
        return None, "bad key"
    if not NodeIdentity.verify(key, _rotation_message(mesh_id, gen, new), sig):
        return None, "bad signature"
    return {k: frame[k] for k in ("mesh", "gen", "secret", "by", "public_key", "sig")}, None
