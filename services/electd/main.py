"""electd: turns what meshd and runnerd know into the plan (host, members, split).

The decision itself is `election.make_plan`; this loop feeds it and holds a changed plan back
until membership has been stable for `settle_delay`, so a burst of joins restarts llama-server once;
when a node the serving plan needs is gone there is nothing left to keep serving, and the new plan
goes out at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

from common.bus import ServiceBus
from common.logs import setup_logging
from common.messages import MeshState, Plan, Reply, RunnerState, StatusRequest
from common.settings import Settings, service_settings
from common.tasks import Supervisor
from services.electd.election import Candidate, make_plan, member_gone, rpc_counts_ready

log = logging.getLogger("electd")


class Electd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bus = ServiceBus(settings.home, "electd", listens_to=("meshd", "runnerd"))
        self.mesh: MeshState | None = None
        self.runner: RunnerState | None = None
        self.plan = Plan(state="starting", reason="waiting for runnerd and meshd")
        self._pending: Plan | None = None
        self.rpc_ready_at: dict[str, float] = {}  # peer -> when its rpc-server was last announced ready
        self._pending_since = 0.0

    def current_state(self) -> Plan:
        return self.plan

    def on_mesh(self, state: MeshState) -> None:
        if not state.settled:
            return  # a restarted meshd that has not found the mesh again yet: keep the plan we have
        self.mesh = state
        self.reconsider()

    def on_runner(self, state: RunnerState) -> None:
        self.runner = state
        self.reconsider()

    def candidate_plan(self) -> Plan | None:
        if self.runner is None or self.mesh is None or not self.mesh.node_id:
            return None
        model = self.runner.model
        if model is None:
            return Plan(state="no-model", reason=self.runner.error or self.runner.status or "no model loaded yet")
        me = Candidate(self.mesh.node_id, self.runner.memory_bytes, model.fingerprint,
                       devices=tuple(self.runner.device_memory))
        serving = frozenset(m.node_id for m in self.plan.members) if self.plan.state == "split" else frozenset()
        now = time.monotonic()
        peers = []
        for p in (p for p in self.mesh.peers if p.connected):
            a = p.announcement
            if a.rpc_ready:
                self.rpc_ready_at[a.node_id] = now
            rpc_ready = rpc_counts_ready(a.rpc_ready, a.node_id in serving, now - self.rpc_ready_at.get(a.node_id, -1e9))
            peers.append(Candidate(a.node_id, a.memory_bytes, a.model_fingerprint, a.role, rpc_ready, p.rtt_ms,
                                   tuple(a.device_memory)))
        return make_plan(me, peers, model.size_bytes, margin=self.settings.memory_margin,
                         force_split=self.settings.split, tensor_split=self.settings.tensor_split,
                         max_rtt_ms=self.settings.max_rtt_ms or None, current=serving)

    def reconsider(self) -> None:
        candidate = self.candidate_plan()
        if candidate is None:
            return
        if (candidate.state, candidate.key) == (self.plan.state, self.plan.key):
            self._pending = None
            if candidate != self.plan:  # same serving set; details such as exclusions changed
                self.plan = candidate
                self.bus.state_changed()
            return
        if self._pending is None or (self._pending.state, self._pending.key) != (candidate.state, candidate.key):
            self._pending, self._pending_since = candidate, time.monotonic()
        else:
            self._pending = candidate

    async def settle_forever(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.reconsider()
            if self._pending and (time.monotonic() - self._pending_since >= self.settings.settle_delay
                                  or self.member_gone()):
                if (self._pending.state, self._pending.key) != (self.plan.state, self.plan.key):
                    log.info("plan: %s — %s", self._pending.state, self._pending.reason)
                self.plan, self._pending = self._pending, None
                self.bus.state_changed()

    def member_gone(self) -> bool:
        connected = {p.announcement.node_id for p in self.mesh.peers if p.connected} if self.mesh else set()
        return member_gone(self.plan, self.mesh.node_id if self.mesh else "", connected)

    def on_status(self, _: StatusRequest) -> Reply:
        return Reply(ok=True, data=self.plan.model_dump())

    async def serve(self) -> None:
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
        tasks = Supervisor("electd", self.settings.home, test_faults=self.settings.test_faults)
        tasks.spawn("publish", self.bus.publish_forever(self.current_state))
        tasks.spawn("receive", self.bus.receive_forever({MeshState: self.on_mesh, RunnerState: self.on_runner}))
        tasks.spawn("control", self.bus.serve_control_forever({StatusRequest: self.on_status}))
        tasks.spawn("settle", self.settle_forever())
        failure = await tasks.run_until(stopping)
        self.bus.close()
        if failure:
            raise SystemExit(1)


def main() -> None:
    settings = service_settings()
    log = setup_logging(settings.home, "electd", settings.log_level)
    if settings.client:
        log.info("lite client: electd has nothing to do")
        return  # exit 0: supervisord leaves it stopped
    asyncio.run(Electd(settings).serve())


if __name__ == "__main__":
    main()
