"""Which member may reach this node's rpc-server, and open which tunnel to this node — pure functions.

A worker's ggml-rpc-server can read and write the worker's memory through its commands, so only the
host of this node's current plan may reach it, over a link meshd reports live: through a tunnel
(gatewayd asks `rpc_refusal`) or directly, where the rpc-server's mutual TLS admits the node ids in
its allow file (runnerd writes `rpc_allowed`). HTTP tunnels end at gatewayd's members' API, which
any member may use.
"""
from __future__ import annotations

from common.messages import Plan

RPC_PLAN_WAIT_S = 3.0  # below the dialer's setup timeout (tunnels.SETUP_TIMEOUT)


def rpc_refusal(kind: str, plan: Plan, me: str, dialer: str, *, connected: bool) -> str | None:
    """Why `dialer` may not open a `kind` tunnel here, or None."""
    if kind != "rpc":
        return f"no tunnel kind {kind[:40]!r} here"
    # Only the host matters, not the plan's state: split flags (--split, --tensor-split) may be set on the
    # host alone, so a worker may plan "solo" on the same host that splits over it.
    if not plan.host or plan.host == me:
        return f"this node has no host to serve now ({plan.state}); only its plan's host may use its rpc-server"
    if dialer != plan.host:
        return f"node {dialer[:8]} is not the host of this node's plan (the host is {plan.host[:8]})"
    if not connected:
        return f"no live mesh link to the host {dialer[:8]}"
    return None


def rpc_allowed(plan: Plan, me: str, connected: set[str]) -> list[str]:
    """The node ids this node's rpc-server admits now (its TLS allow file): the same rule as the tunnels'."""
    host = plan.host
    if host and rpc_refusal("rpc", plan, me, host, connected=host in connected) is None:
        return [host]
    return []
