"""The plan in one line, as `meshctl status` and the console both show it — a pure function."""
from __future__ import annotations

STATE_WORDS = {"no-model": "no model", "client": "lite client"}


def plan_line(state: str, reason: str) -> str:
    """The plan's state, then electd's reason for it, saying the state once: where the reason already
    names it ("split over 2 nodes by memory", "waiting for more peers — …") the reason alone."""
    words = STATE_WORDS.get(state, state)
    if not reason:
        return words
    if words in reason.lower():
        return reason
    return f"{words} — {reason}"
