"""Host election and tensor split — pure functions over what every node knows from gossip.

Every node computes the same answer from the same facts, so there is no consensus protocol:
the highest memory wins, ties go to the highest node id; the model is split in proportion to
memory; when pooled memory is short of model size × margin, the mesh waits for more peers.

Round trips: every token waits on every worker of the split, so a worker far from the host costs
more than its layers save. The host leaves out a member whose round trip to it is above
`max_rtt_ms` unless the model needs that member's memory (closest first). Only the host measures
its own round trips, so this is the host's decision; other nodes still list such a member.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from common.messages import Exclusion, Plan, PlanMember

GB = 1 << 30


@dataclass(frozen=True)
class Candidate:
    node_id: str
    memory_bytes: int
    fingerprint: str | None
    role: str = "worker"
    rpc_ready: bool = True
    rtt_ms: float | None = None  # round trip from the node computing the plan; None: not measured
    devices: tuple[int, ...] = ()  # memory per device it offers (several GPUs behind one rpc-server)


DEFAULT_MAX_RTT_MS = 80.0  # past this, mesh-llm found that splits stop paying
# A member already serving stays until its round trip is this much above the bound, so a round
# trip that wobbles around it does not restart llama-server at each wobble.
KEEP_FACTOR = 1.25


def far_members(host: Candidate, others: list[Candidate], needed: int, *, max_rtt_ms: float | None,
                current: frozenset[str] = frozenset()) -> tuple[list[Candidate], list[Exclusion]]:
    """Split the host's partners into (kept, left out for their round trip). A far member is kept
    when the rest do not hold enough memory, the closest first."""
    if max_rtt_ms is None:
        return others, []

    def bound(c: Candidate) -> float:
        return max_rtt_ms * (KEEP_FACTOR if c.node_id in current else 1.0)

    near = [c for c in others if c.rtt_ms is None or c.rtt_ms <= bound(c)]
    far = sorted((c for c in others if c not in near), key=lambda c: (c.rtt_ms, c.node_id))
    kept = list(near)
    have = host.memory_bytes + sum(c.memory_bytes for c in near)
    excluded = []
    for c in far:
        if have < needed:
            kept.append(c)
            have += c.memory_bytes
        else:
            excluded.append(Exclusion(node_id=c.node_id, reason=f"round trip {c.rtt_ms:.0f} ms to the host is above "
                                                                f"{max_rtt_ms:g} ms (max_rtt_ms); memory not needed"))
    return [c for c in others if c in kept], excluded


def elect_host(candidates: list[Candidate]) -> Candidate:
    return max(candidates, key=lambda c: (c.memory_bytes, c.node_id))


def split_by_memory(memories: list[int]) -> list[float]:
    """Ratios proportional to memory, rounded to 3 decimals, summing to exactly 1."""
    total = sum(memories)
    if total <= 0:
        return [round(1 / len(memories), 3)] * len(memories)
    ratios = [round(m / total, 3) for m in memories]
    ratios[0] = round(1 - sum(ratios[1:]), 3)
    return ratios


def plan_key(host: str, members: list[PlanMember]) -> str:
    # A member's devices are in the key once it has several: a GPU more or less changes --tensor-split.
    text = host + "|" + ";".join(f"{m.node_id}:{m.ratio:.3f}" + (f"{list(m.devices)}" if len(m.devices) > 1 else "")
                                 for m in members)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fmt_gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def make_plan(me: Candidate | None, peers: list[Candidate], model_size: int, *, margin: float = 1.1,
              force_split: bool = False, tensor_split: list[float] | None = None,
              max_rtt_ms: float | None = DEFAULT_MAX_RTT_MS, current: frozenset[str] = frozenset()) -> Plan:
    """The plan for the mesh as this node sees it. `me` is None on a node without a model.
    `peers[].rtt_ms` is this node's round trip to each; `current` the members of the plan now serving."""
    if me is None:
        return Plan(state="no-model", reason="this node has no model")
    if me.role == "client":
        return Plan(state="client", reason="lite client: serves the API through the host")

    eligible, excluded = [me], []
    for peer in sorted(peers, key=lambda p: p.node_id):
        if peer.node_id == me.node_id:
            continue
        if peer.role == "client":
            excluded.append(Exclusion(node_id=peer.node_id, reason="lite client"))
        elif peer.fingerprint != me.fingerprint:
            excluded.append(Exclusion(node_id=peer.node_id, reason="holds a different model"))
        elif not peer.rpc_ready:
            excluded.append(Exclusion(node_id=peer.node_id, reason="rpc-server not ready"))
        else:
            eligible.append(peer)

    needed = int(model_size * margin)
    host = elect_host(eligible)
    if host.memory_bytes >= needed and (not force_split or len(eligible) == 1):
        members = [PlanMember(node_id=host.node_id, memory_bytes=host.memory_bytes, ratio=1.0, devices=list(host.devices))]
        return Plan(state="solo", host=host.node_id, members=members, excluded=excluded, needed_bytes=needed,
                    available_bytes=host.memory_bytes, key=plan_key(host.node_id, members),
                    reason=f"elected {host.node_id[:8]} ({fmt_gb(host.memory_bytes)} for a {fmt_gb(model_size)} model)")

    if host.node_id == me.node_id:
        partners, too_far = far_members(host, [c for c in eligible if c is not host], needed, max_rtt_ms=max_rtt_ms,
                                    current=current)
        eligible, excluded = [host, *partners], excluded + too_far
        if len(eligible) == 1 and host.memory_bytes >= needed:
            members = [PlanMember(node_id=host.node_id, memory_bytes=host.memory_bytes, ratio=1.0, devices=list(host.devices))]
            return Plan(state="solo", host=host.node_id, members=members, excluded=excluded, needed_bytes=needed,
                        available_bytes=host.memory_bytes, key=plan_key(host.node_id, members),
                        reason=f"elected {host.node_id[:8]} ({fmt_gb(host.memory_bytes)} for a {fmt_gb(model_size)} "
                               f"model); every other member is too far away to split with")
    ordered = sorted(eligible, key=lambda c: (c.memory_bytes, c.node_id), reverse=True)  # host first
    available = sum(c.memory_bytes for c in ordered)
    if available < needed:
        return Plan(state="waiting", host=host.node_id, excluded=excluded, needed_bytes=needed, available_bytes=available,
                    reason=f"waiting for more peers — need {fmt_gb(needed)} for the model, have {fmt_gb(available)}")
    ratios = split_by_memory([c.memory_bytes for c in ordered])
    reason = f"split over {len(ordered)} nodes by memory"
    if tensor_split:
        if len(tensor_split) == len(ordered):
            total = sum(tensor_split)
            ratios = [round(r / total, 3) for r in tensor_split]
            reason = f"split over {len(ordered)} nodes by --tensor-split"
        else:
            reason += f" (--tensor-split has {len(tensor_split)} ratios for {len(ordered)} nodes; ignored)"
    members = [PlanMember(node_id=c.node_id, memory_bytes=c.memory_bytes, ratio=r, devices=list(c.devices))
               for c, r in zip(ordered, ratios)]
    return Plan(state="split", host=host.node_id, members=members, excluded=excluded, needed_bytes=needed,
                available_bytes=available, key=plan_key(host.node_id, members), reason=reason)


def member_gone(plan: Plan, me: str, connected: set[str]) -> bool:
    """A node the serving plan needs (its host, a worker of its split) is no longer linked to us. That
    plan is broken already (gatewayd closes the tunnels of a lost member at once, and without them
    llama-server stops), so a new plan need not wait for membership to settle: it only adds to the outage."""
    if plan.state not in ("solo", "split"):
        return False
    needed = {plan.host} | {m.node_id for m in plan.members}
    return any(n and n != me and n not in connected for n in needed)


RPC_RESTART_GRACE_S = 5.0


def rpc_counts_ready(rpc_ready: bool, serving: bool, ready_ago: float) -> bool:
    """A worker of the serving split whose rpc-server was ready RPC_RESTART_GRACE_S ago keeps its place:
    runnerd restarts a dead rpc-server at once, and re-planning around it meanwhile would restart
    the host's llama-server twice (solo, then the split again) instead of once."""
    return rpc_ready or (serving and ready_ago < RPC_RESTART_GRACE_S)
