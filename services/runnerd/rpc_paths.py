"""The host's path to each worker's rpc-server: the worker's TLS rpc-server directly, or gatewayd's tunnel.

Once per plan the host checks whether each worker's announced TLS addresses accept a connection within
DIRECT_CHECK_S; a worker that does gets `--rpc NODEID@host:port`, else the tunnel's loopback forward.
llama-server failing DIRECT_FAILURES_MAX times in a row over a worker's direct path in one plan sends
that worker to the tunnel (it connects, yet something is wrong: e.g. another server at that address).

The policy is pure functions; `DirectPaths` keeps what was found and the failure counts, and
`first_connecting` is the check's one piece of I/O.
"""
from __future__ import annotations

import asyncio
import logging

from common.messages import Announcement, Plan
from services.runnerd.commands import NotReady, rpc_endpoint

log = logging.getLogger("runnerd")
DIRECT_CHECK_S = 1.0  # a worker's TLS rpc-server that does not accept a connection in this long: the tunnel
DIRECT_FAILURES_MAX = 2  # llama-server failures in a row over a worker's direct path before its tunnel is used

DirectKey = tuple[str, str, tuple]  # (plan key, worker, its announced TLS addresses)
Found = tuple[str, int] | None  # the address that connected, or None: the tunnel


def direct_key(plan_key: str, worker: str, ann: Announcement | None) -> DirectKey | None:
    """What a direct check is valid for; None when the worker announces no TLS rpc-server."""
    return (plan_key, worker, tuple(map(tuple, ann.rpc_tls))) if ann and ann.rpc_tls else None


def direct_outcome(key: DirectKey, found: Found, failures: int) -> tuple[Found, str]:
    """(the path to use, why the tunnel) after a check of `key` that found `found`, with `failures`
    llama-server failures in a row over this worker's direct path in this plan."""
    why = f"no answer from {', '.join(f'{h}:{p}' for h, p in key[2])} in {DIRECT_CHECK_S:g} s"
    if found and failures >= DIRECT_FAILURES_MAX:
        # it connects, yet llama-server failed through it: e.g. another server at that address
        return None, f"llama-server failed {DIRECT_FAILURES_MAX} times in a row over the direct path"
    return found, why


# What llama-server logs when a worker's rpc-server refused its certificate: that worker's allow file does
# not name this host yet (it learns the plan a moment after us). The tunnel carries TLS to the same server,
# so it would be refused alike: such a failure is no reason to leave the direct path.
REFUSED_BY_WORKER = "alert handshake failure"


def count_failures(failures: dict[tuple[str, str], int], plan_key: str,
                   rpc_paths: dict[str, str], llama_log_tail: str = "") -> dict[tuple[str, str], int]:
    """The failure counts after llama-server failed with `rpc_paths` (worker -> "direct …" | "tunnel…"):
    each worker it reached directly gets one more, unless a worker refused it (REFUSED_BY_WORKER)."""
    out = dict(failures)
    if REFUSED_BY_WORKER in llama_log_tail:
        return out
    for worker, path in rpc_paths.items():
        if path.startswith("direct"):
            out[(plan_key, worker)] = out.get((plan_key, worker), 0) + 1
    return out


def member_path(worker: str, key: DirectKey | None, direct: dict[DirectKey, Found], forward: int | None, *,
                build_has_tls: bool) -> tuple[str | None, str]:
    """(--rpc endpoint or None while unreachable, the path in words) of one remote member; NotReady while its
    direct check is under way or the build cannot speak its TLS."""
    if key and not build_has_tls:
        raise NotReady(f"{worker[:8]}'s rpc-server wants TLS and this node's llama.cpp build has none; "
                       f"rebuild it (`just build`) with OpenSSL")
    if key and key not in direct:
        raise NotReady(f"checking the direct path to {worker[:8]}")
    found = direct.get(key) if key else None
    endpoint = rpc_endpoint(worker, tls=key is not None, direct=found, forward=forward)
    words = f"direct TLS {found[0]}:{found[1]}" if found else ("tunnel, TLS inside" if key else "tunnel")
    return endpoint, words


class DirectPaths:
    """As host: each worker's checked path in the current plan, and llama-server's failures over direct paths."""

    def __init__(self) -> None:
        self.direct: dict[DirectKey, Found] = {}  # checked once per plan: see direct_key
        self.failures: dict[tuple[str, str], int] = {}  # (plan key, worker) -> llama-server failures in a row
        self.wanted = asyncio.Event()  # set: (re)check the paths not known yet

    def key(self, plan: Plan, worker: str, peers: dict[str, Announcement]) -> DirectKey | None:
        return direct_key(plan.key, worker, peers.get(worker))

    async def check(self, plan: Plan, me: str, peers: dict[str, Announcement]) -> bool:
        """Check the workers of `plan` not checked yet; True if any was (the caller retries llama-server)."""
        keys = [k for m in plan.members if m.node_id != me
                and (k := self.key(plan, m.node_id, peers)) and k not in self.direct]
        results = await asyncio.gather(*(first_connecting(k[2]) for k in keys))
        self.direct = {k: v for k, v in self.direct.items() if k[0] == plan.key}
        for key, found in zip(keys, results):
            found, why = direct_outcome(key, found, self.failures.get(key[:2], 0))
            self.direct[key] = found
            log.info("rpc path to %s: %s", key[1][:8], f"direct TLS {found[0]}:{found[1]}" if found else f"tunnel ({why})")
        return bool(keys)

    def llama_failed(self, plan_key: str, rpc_paths: dict[str, str], llama_log_tail: str = "") -> None:
        """llama-server failed: a direct path that connected at the check may not now (the next start re-checks);
        a worker whose direct path failed DIRECT_FAILURES_MAX times in a row in this plan gets the tunnel."""
        self.failures = count_failures(self.failures, plan_key, rpc_paths, llama_log_tail)
        self.direct.clear()
        self.wanted.set()

    def llama_ready(self, plan_key: str) -> None:
        """llama-server serves this plan: its direct paths' failures are no longer "in a row"."""
        self.failures = {k: v for k, v in self.failures.items() if k[0] != plan_key}

    def endpoints(self, plan: Plan, me: str, peers: dict[str, Announcement], forwards: dict[str, int], *,
                  build_has_tls: bool) -> tuple[dict[str, str], dict[str, str]]:
        """(each remote member's --rpc endpoint, the path to each in words); NotReady while a check is under way."""
        endpoints: dict[str, str] = {}
        words: dict[str, str] = {}
        for m in plan.members:
            if m.node_id == me:
                continue
            endpoint, path = member_path(m.node_id, self.key(plan, m.node_id, peers), self.direct,
                                         forwards.get(m.node_id), build_has_tls=build_has_tls)
            if endpoint:
                endpoints[m.node_id] = endpoint
                words[m.node_id] = path
        return endpoints, words


async def first_connecting(addrs: tuple, timeout: float = DIRECT_CHECK_S) -> tuple[str, int] | None:
    """The first of `addrs` that accepts a TCP connection within `timeout` (all tried at once), or None."""
    async def one(host: str, port: int):
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.close()
        return host, port
    results = await asyncio.gather(*(one(h, p) for h, p in addrs), return_exceptions=True)
    return next((r for r in results if isinstance(r, tuple)), None)
