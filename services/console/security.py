"""Who may talk to the console: pure checks on a request's Host, Origin and API key.

The console can join this node to any mesh and shows its invite token, so a web page the user
happens to visit must not be able to drive it. Two attacks matter:
- DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends the page's requests to
  us with `Host: evil.example:3131`. Refusing any Host that is not our own address stops it.
- Cross-site requests: a form or fetch from another origin can POST to 127.0.0.1 (the browser
  sends it; it only hides the answer). Refusing state-changing requests, and token reads, whose
  Origin (or Sec-Fetch-Site) says they came from elsewhere stops that.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class SecurityError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, port: int, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host header values that name this console: host:port for loopback names and the bind address."""
    names = set(LOOPBACK_NAMES) if is_loopback(bind_host) or bind_host in ("0.0.0.0", "::") else set()
    if bind_host not in ("0.0.0.0", "::"):
        names.add(f"[{bind_host}]" if ":" in bind_host else bind_host)
    names.update(extra)
    return frozenset(f"{name}:{port}".lower() for name in names)


@dataclass(frozen=True)
class AccessPolicy:
    hosts: frozenset[str]
    api_key: str | None = None

    def check_host(self, host_header: str | None) -> None:
        if not host_header or host_header.lower() not in self.hosts:
            raise SecurityError(421, f"this console answers only to {', '.join(sorted(self.hosts))}, "
                                     f"not Host {host_header!r}; open it by that address")

    def check_origin(self, method: str, origin: str | None, fetch_site: str | None, *, sensitive: bool = False) -> None:
        """State-changing requests (and `sensitive` reads) must come from the console's own page."""
        if method.upper() in SAFE_METHODS and not sensitive:
            return
        if fetch_site and fetch_site not in ("same-origin", "none"):
            raise SecurityError(403, f"refused a {fetch_site} request; use the console page itself")
        if origin is None:
            # Browsers send Origin on every cross-origin POST (and on same-origin fetch POSTs); a request
            # without one comes from a non-browser client that already passed the Host check.
            return
        host = origin.split("://", 1)[-1].rstrip("/").lower()
        if origin.lower() == "null" or host not in self.hosts:
            raise SecurityError(403, f"refused a request from another origin ({origin}); use the console page itself")

    def check_key(self, authorization: str | None) -> None:
        if not self.api_key:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise SecurityError(401, "this console needs its API key; enter it on the page")


def bind_check(host: str, api_key: str | None) -> str | None:
    """Why the console must not start with these settings, or None."""
    if not is_loopback(host) and not api_key:
        return (f"--host {host} exposes the console (which can join this node to any mesh) to your network; "
                f"also pass --api-key KEY (or set MESH_CONSOLE_API_KEY)")
    return None
