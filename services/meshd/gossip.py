"""Gossip merge and liveness — pure functions.

Each node sends its whole view (every announcement it knows) to every peer it is connected to,
on change and every second. Merging keeps the newest announcement per node (by `seq`, which is
time-based so a restarted node supersedes its old self). A peer counts as alive only while we
hold a live, authenticated connection to it; hearsay alone never makes a node a member of a plan.
"""
from __future__ import annotations

from common.messages import Announcement

DEAD_AFTER_S = 10.0
FORGET_AFTER_S = 60.0


def merge_view(view: dict[str, Announcement], incoming: list[Announcement], me: str) -> tuple[dict[str, Announcement], bool]:
    """(new view, whether anything changed). Our own entry is never taken from others."""
    merged = dict(view)
    changed = False
    for ann in incoming:
        if ann.node_id == me:
            continue
        known = merged.get(ann.node_id)
        if known is None or ann.seq > known.seq:
            merged[ann.node_id] = ann
            changed = changed or known is None or known.model_dump(exclude={"seq"}) != ann.model_dump(exclude={"seq"})
    return merged, changed


def forget_stale(view: dict[str, Announcement], last_heard: dict[str, float], connected: set[str],
                 now: float) -> dict[str, Announcement]:
    """Drop nodes nobody has connected to for FORGET_AFTER_S (they left or never came up)."""
    return {nid: ann for nid, ann in view.items()
            if nid in connected or now - last_heard.get(nid, now) < FORGET_AFTER_S}
