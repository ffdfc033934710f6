"""The key that guards this node's own llama-server from other local users.

llama-server listens on 127.0.0.1, which every user of the machine can reach. runnerd starts it
with a fresh random key (`--api-key-file`, so the key is in no command line or log) kept in an
owner-only file under MESH_HOME/run; gatewayd reads it from there and sends it. It is never
published on the bus or in gossip.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from common import addresses


def new_llama_key(home: Path) -> Path:
    """Write a fresh key (replacing the last one) and return the file llama-server reads it from."""
    addresses.ensure_dirs(home)
    path = addresses.llama_key_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    os.replace(tmp, path)
    return path


def read_llama_key(home: Path) -> str | None:
    try:
        return addresses.llama_key_path(home).read_text().strip() or None
    except OSError:
        return None
