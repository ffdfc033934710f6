"""The live picture of the node: the latest state each service publishes on the bus, as one view.

The console subscribes to the services' PUB sockets like any other listener (they republish on a
heartbeat, so it converges within a second of joining or of a service restart) and turns the four
states into the one dict the page renders: `mesh_view` is pure, so it is unit-tested.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import zmq
import zmq.asyncio
from pydantic import ValidationError

from common import addresses
from common.bus import make_socket
from common.messages import GatewayState, MeshState, Plan, RunnerState, decode
from common.plan_text import plan_line

log = logging.getLogger("console")
STALE_AFTER_S = 3.5  # services publish every second; older than this and the service is down


def mesh_view(mesh: MeshState | None, plan: Plan | None, runner: RunnerState | None, gateway: GatewayState | None,
              ages: dict[str, float]) -> dict:
    """Everything the page shows about the mesh, from the services' latest states (None: not heard)."""
    up = {name: age is not None and age < STALE_AFTER_S for name, age in ages.items()}
    me = mesh.node_id if mesh else (runner.node_id if runner else "")
    host = plan.host if plan else None
    members = {m.node_id: m for m in (plan.members if plan else [])}
    excluded = {e.node_id: e.reason for e in (plan.excluded if plan else [])}
    tunnels = {t.node_id: t for t in (gateway.tunnels if gateway else [])}
    my_fp = runner.model.fingerprint if runner and runner.model else None

    def role(node_id: str, announced_role: str) -> str:
        if announced_role == "client":
            return "lite client"
        return "host" if node_id == host else "worker"

    def placement(node_id: str) -> str:
        if node_id in excluded:
            return f"excluded: {excluded[node_id]}"
        if node_id in members and plan and plan.state in ("solo", "split"):
            return f"serves {members[node_id].ratio:.0%} of the model"
        return ""

    nodes = []
    if mesh and mesh.me:
        a = mesh.me
        nodes.append({"node_id": a.node_id, "me": True, "role": role(a.node_id, a.role),
                      "memory_bytes": runner.memory_bytes if runner else a.memory_bytes,
                      "memory_source": runner.memory_source if runner else "",
                      "model": a.model_name, "fingerprint": a.model_fingerprint, "model_match": None,
                      "connected": True, "rtt_ms": None, "lane": "", "bytes_in": 0, "bytes_out": 0,
                      "status": "this node", "placement": placement(a.node_id)})
    for peer in (mesh.peers if mesh else []):
        a = peer.announcement
        t, via = tunnels.get(a.node_id), peer.path
        match = None if a.role == "client" or not a.model_fingerprint else a.model_fingerprint == my_fp
        nodes.append({"node_id": a.node_id, "me": False, "role": role(a.node_id, a.role),
                      "memory_bytes": a.memory_bytes, "memory_source": "announced by the node",
                      "model": a.model_name, "fingerprint": a.model_fingerprint, "model_match": match,
                      "connected": peer.connected, "rtt_ms": peer.rtt_ms, "lane": t.lane if t else "",
                      "path": via.path if via else "", "relay": via.via if via and via.path == "relayed" else "",
                      "rpc_path": runner.rpc_paths.get(a.node_id, "") if runner else "",
                      # the mesh connection and the tunnels, as `meshctl status` counts them (a direct TLS
                      # RPC path to a worker is llama.cpp's own connection: nobody counts its bytes)
                      "bytes_in": (t.bytes_in if t else 0) + (via.bytes_received if via else 0),
                      "bytes_out": (t.bytes_out if t else 0) + (via.bytes_sent if via else 0),
                      "status": peer.status, "placement": placement(a.node_id)})
    errors = []
    for name, err in (("meshd", mesh and mesh.errors), ("runnerd", runner and runner.error),
                      ("gatewayd", gateway and gateway.error)):
        for line in (err if isinstance(err, list) else [err] if err else []):
            errors.append(f"{name}: {line}")
    for name, ok in up.items():
        if ages.get(name) is not None and not ok:
            errors.append(f"{name}: not heard from for {ages[name]:.0f} s")
    split = [{"node_id": m.node_id, "ratio": m.ratio, "memory_bytes": m.memory_bytes, "host": m.node_id == host}
             for m in (plan.members if plan else [])]
    return {
        "node_id": me, "mesh_id": mesh.mesh_id if mesh else "", "services": up,
        "plan": {"state": plan.state if plan else "unknown", "reason": plan.reason if plan else "",
                 "line": plan_line(plan.state, plan.reason) if plan else "",  # as `meshctl status` says it
                 "host": host, "split": split, "needed_bytes": plan.needed_bytes if plan else 0,
                 "available_bytes": plan.available_bytes if plan else 0,
                 "excluded": [{"node_id": k, "reason": v} for k, v in excluded.items()]},
        "nodes": nodes,
        "runner": None if runner is None else {
            "status": runner.status, "backend": runner.backend,
            "model": runner.model.model_dump() if runner.model else None,
            "llama": runner.llama.model_dump(), "rpc": runner.rpc.model_dump(),
            "weights": [w.model_dump() for w in runner.weights], "progress": runner.progress,
            "decode": runner.decode.model_dump()},
        "gateway": None if gateway is None else {
            "api_url": gateway.api_url, "upstream": gateway.upstream, "served": gateway.requests_served,
            "failed": gateway.requests_failed},
        "errors": errors,
    }


class LiveState:
    """Subscribes to every service's PUB socket; `changed` wakes the event streams."""

    def __init__(self, home: Path):
        self.home = home
        self.latest: dict[str, object] = {}
        self.heard_at: dict[str, float] = {}
        self.version = 0
        self.changed = asyncio.Condition()

    def forget(self) -> None:
        """The node stopped: show nothing rather than its last states."""
        self.latest.clear()
        self.heard_at.clear()

    def view(self) -> dict:
        now = time.monotonic()
        ages = {s: (now - self.heard_at[s]) if s in self.heard_at else None for s in addresses.SERVICES}
        return mesh_view(self.latest.get("meshd"), self.latest.get("electd"), self.latest.get("runnerd"),
                         self.latest.get("gatewayd"), ages)

    async def bump(self) -> None:
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    async def wait_change(self, version: int, timeout: float) -> int:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version != version), timeout)
            except asyncio.TimeoutError:
                pass
            return self.version

    async def receive_forever(self) -> None:
        ctx = zmq.asyncio.Context()
        addresses.ensure_dirs(self.home)
        sub = make_socket(ctx, zmq.SUB, connect=[addresses.pub_address(self.home, s) for s in addresses.SERVICES])
        owners = {MeshState: "meshd", Plan: "electd", RunnerState: "runnerd", GatewayState: "gatewayd"}
        try:
            while True:
                try:
                    data = await asyncio.wait_for(sub.recv(), 1.0)
                except asyncio.TimeoutError:
                    await self.bump()  # ages move on even when nothing is published (a node that stopped)
                    continue
                try:
                    message = decode(data)
                except ValidationError:
                    continue
                owner = owners.get(type(message))
                if owner is None:
                    continue
                if isinstance(message, MeshState):
                    message = message.model_copy(update={"token": ""})  # the token is shown only on request
                changed = self.latest.get(owner) != message
                self.latest[owner] = message
                self.heard_at[owner] = time.monotonic()
                if changed:
                    await self.bump()
        finally:
            ctx.destroy(linger=0)
