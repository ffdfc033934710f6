"""Every local address of a node: bus sockets, lock files, logs — derived from MESH_HOME alone."""
from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
from pathlib import Path

SERVICES = ("meshd", "electd", "runnerd", "gatewayd")
IPC_PATH_LIMIT = 100  # sun_path holds 107 bytes; keep a margin for the suffix


def run_dir(home: Path) -> Path:
    """Sockets and locks. Falls back to a short owner-only /tmp path when MESH_HOME is too deep for ipc://."""
    preferred = home / "run"
    if len(str(preferred / "gatewayd.pub")) <= IPC_PATH_LIMIT:
        return preferred
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mesh-{os.getuid()}-{digest}"


def ensure_dirs(home: Path) -> None:
    """Create MESH_HOME, its run and logs dirs, owner-only (keys and sockets live there)."""
    for path in (home, run_dir(home), logs_dir(home)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)


def pub_address(home: Path, service: str) -> str:
    return f"ipc://{run_dir(home) / f'{service}.pub'}"


def ctl_address(home: Path, service: str) -> str:
    return f"ipc://{run_dir(home) / f'{service}.ctl'}"


def lock_path(home: Path, service: str) -> Path:
    return run_dir(home) / f"{service}.lock"


def logs_dir(home: Path) -> Path:
    return home / "logs"


def log_path(home: Path, name: str) -> Path:
    return logs_dir(home) / f"{name}.log"


def supervisord_pidfile(home: Path) -> Path:
    return run_dir(home) / "supervisord.pid"


def advertised_addresses(bind_host: str, port: int, advertise: list[str] | None = None) -> list[tuple[str, int]]:
    """The addresses other nodes can try for an endpoint bound to (bind_host, port).

    `advertise` entries ("host" or "host:port") win; a wildcard bind offers every IPv4 interface
    address, non-loopback first, so a peer on the same machine can still use 127.0.0.1.
    """
    if advertise:
        out = []
        for entry in advertise:
            host, _, fixed = entry.rpartition(":") if ":" in entry else (entry, "", "")
            out.append((host, int(fixed)) if fixed.isdigit() else (entry, port))
        return out
    if bind_host not in ("0.0.0.0", ""):
        return [(bind_host, port)]
    import psutil
    found = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET]
    return [(h, port) for h in sorted(set(found), key=lambda h: (h.startswith("127."), h))]


def is_loopback_host(host: str) -> bool:
    """True when a server bound to `host` is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve to anything: treat it as exposed


def llama_key_path(home: Path) -> Path:
    """The API key of this node's llama-server (owner-only; runnerd writes it, gatewayd sends it)."""
    return run_dir(home) / "llama-server.key"


def mesh_api_socket(home: Path) -> Path:
    """gatewayd's API for mesh members (HTTP tunnels end here, never at llama-server itself)."""
    return run_dir(home) / "mesh-api.sock"


def parse_host_port(text: str, default_port: int = 3478) -> tuple[str, int]:
    """'host:port', 'host' or '[v6]:port' -> (host, port); ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty address; expected HOST:PORT")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host; expected HOST:PORT")
    if port_text and not port_text.isdigit():
        raise ValueError(f"{text!r} has a port that is not a number; expected HOST:PORT")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} has port {port}, outside 1-65535")
    return host, port
