"""A worker's TLS rpc-server allow file ($MESH_HOME/run/rpc-allow) and when the rpc-server must start afresh.

Our patched ggml-rpc-server admits only the certificates whose node id is in its allow file, re-read at
each connection; runnerd keeps the file equal to `common.rpc_policy.rpc_allowed` (the plan's host over a
live link, as the tunnels allow). A host that loses its place is refused at its next connection, but a
connection already open stays: the rpc-server serves one client at a time, and a host that vanished (a
partition, a crash) can leave that connection open for minutes, so the next host would queue behind it.
Hence: once a node id leaves the file, runnerd restarts the rpc-server (the tunnels' worker end closes
such connections itself).
"""
from __future__ import annotations

from pathlib import Path


def allow_text(allowed: list[str]) -> str:
    """The allow file's text: one node id a line."""
    return "".join(f"{n}\n" for n in allowed)


def must_recycle(old_text: str, allowed: list[str]) -> bool:
    """Whether the rpc-server must start afresh when the allow file goes from `old_text` to `allowed`:
    a node id it admitted is no longer allowed (its open connection, if any, must end)."""
    return bool(set(old_text.split()) - set(allowed))


def write_allow_file(path: Path, allowed: list[str]) -> bool:
    """Make `path` admit exactly `allowed` (atomically: the rpc-server may read it at any moment);
    True when the rpc-server must start afresh (must_recycle)."""
    text = allow_text(allowed)
    old = path.read_text() if path.exists() else ""
    if old == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return must_recycle(old, allowed)
