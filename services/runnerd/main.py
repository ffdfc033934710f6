"""runnerd: owns the llama.cpp processes of this node.

It measures memory, inspects the GGUF, keeps `ggml-rpc-server` running whenever a model is set
(on --bind-host with mutual TLS that admits only the plan's host, where the build has TLS; else on
loopback), and runs `llama-server` when the plan makes this node host — restarting it when the
plan's serving set changes, and only then. As host it dials a worker's TLS rpc-server directly
where a quick connect check reaches it, else through gatewayd's tunnel. Children that die are
restarted; bad input (a missing model, missing binaries) is reported in its state and log, and
runnerd stays up to say so.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Callable

import httpx

from common import addresses, progress
from common.addresses import advertised_addresses
from common.binaries import Binaries, BinariesError, find_binaries
from common.bus import ServiceBus
from common.default_model import ModelInstallError, ensure_default_model
from common.gguf_info import ModelError, inspect_gguf
from common.identity import CERT_FILE, KEY_FILE, NodeIdentity
from common.local_keys import new_llama_key, read_llama_key
from common.logs import setup_logging
from common.messages import (Announcement, ChildState, GatewayState, MeshState, Plan, Reply, RunnerState,
                             SpeculationState, StatusRequest)
from common.settings import Settings, service_settings
from common.tasks import Supervisor
from services.runnerd.children import Child, free_loopback_port
from common.rpc_policy import rpc_allowed
from services.runnerd.commands import NotReady, RpcTls, llama_server_args, rpc_server_args
from services.runnerd.memory import Offer, detect_memory
from services.runnerd.llama_log import device_placement, load_progress_text, weight_loads
from services.runnerd.rpc_allow import write_allow_file
from services.runnerd.rpc_paths import DirectPaths
from services.runnerd.speculation import SpeculationChoice, choose_speculation, draft_counts, speculation_args
from services.runnerd.throughput import DecodeWatch

log = logging.getLogger("runnerd")
RESTART_BACKOFF_S = (1, 2, 5, 10)
LLAMA_STOP_GRACE_S = 0.3  # llama-server keeps nothing worth a slow shutdown (one waiting on a lost worker may
# not exit on SIGTERM at all), and a replacement is waiting
LOAD_STALL_S = 120  # llama-server logs its load progress (patch 0003); this long without a line: stuck
METRICS_EVERY_S = 5.0  # how often the decode rate and draft acceptance are read from llama-server's /metrics
SERVED_FOR_S = 30.0  # a child that died after serving this long is restarted at once: its death is news, not a crash loop


class Runnerd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bus = ServiceBus(settings.home, "runnerd", listens_to=("electd", "gatewayd", "meshd"))
        self.state = RunnerState(status="starting")
        self.binaries: Binaries | None = None
        self.plan = Plan()
        self.gateway = GatewayState()
        self.node_id = ""
        self.rpc: Child | None = None
        self.llama: Child | None = None
        self.llama_spec: list[str] | None = None  # the command it runs, with port 0
        self.llama_ready_at = 0.0
        self.rtt_ms: dict[str, float | None] = {}  # peer node id -> round trip meshd measured
        self.rpc_ready: set[str] = set()  # connected peers whose rpc-server is ready
        # Chosen once per plan: round trips wobble, and a new choice would restart llama-server.
        self.speculation: tuple[str, SpeculationChoice] | None = None
        self.offer: Offer | None = None  # memory per device, known once the binaries are (they list the devices)
        self._plan_changed = asyncio.Event()
        self.peers: dict[str, Announcement] = {}  # connected peers' announcements
        self._rpc_tls: RpcTls | None = None
        self.rpc_port: int | None = None  # the TLS rpc-server's port, kept across its restarts
        self.rpc_recycled = False  # the rpc-server was stopped on purpose (recycle_rpc_server)
        self.paths = DirectPaths()  # as host: direct TLS or tunnel to each worker (rpc_paths)
        self.wanted_paths: dict[str, str] = {}  # worker -> "direct HOST:PORT" | "tunnel", of the last desired spec

    def current_state(self) -> RunnerState:
        return self.state

    def update(self, **changes) -> None:
        self.state = self.state.model_copy(update=changes)
        self.bus.state_changed()

    def fail(self, reason: str) -> None:
        log.error("%s", reason)
        self.update(error=reason, status="error")

    # --- set-up --------------------------------------------------------------------------------

    def report_progress(self, step: str, fraction: float) -> None:
        """common.progress's reporter: called from the thread doing the work, published from the loop."""
        text = f"{step} {fraction:.0%}" if fraction < 1 else ""
        if text != self.state.progress:
            self.loop.call_soon_threadsafe(lambda: self.update(progress=text))

    async def prepare(self) -> bool:
        self.loop = asyncio.get_running_loop()
        progress.set_reporter(self.report_progress)
        self.update(status="preparing")
        try:
            model_path = self.settings.model
            if model_path is None:
                self.update(status="fetching the default model")
                model_path = await asyncio.to_thread(ensure_default_model)
            model = await asyncio.to_thread(inspect_gguf, model_path, self.settings.home / "cache")
            self.update(status="preparing llama.cpp binaries")
            self.binaries = await asyncio.to_thread(find_binaries, self.settings.bin_dir, build_if_missing=True,
                                                    build_env=self.settings.build_env())
        except (ModelError, ModelInstallError, BinariesError) as exc:
            self.fail(str(exc))
            return False
        except SystemExit as exc:  # the build/model helpers speak in one-line SystemExit messages
            self.fail(str(exc))
            return False
        finally:
            progress.set_reporter(None)
        backend = self.binaries.backend
        # After the binaries: llama.cpp's own device list is what its servers will use. electd plans only
        # once the model is in our state (below), so nothing waits on this longer than it did.
        self.offer = detect_memory(self.settings.max_vram, self.settings.device, self.binaries.devices)
        log.info("memory offered: %.1f GB (%s)", self.offer.total / (1 << 30), self.offer.source)
        if not self.binaries.loads_local_weights:
            log.warning("ggml-rpc-server in %s lacks --gguf: remote hosts will push every weight over the network",
                        self.binaries.rpc_server.parent)
        self.update(model=model, backend=backend, rpc_loads_local_weights=self.binaries.loads_local_weights,
                    memory_bytes=self.offer.total, memory_source=self.offer.source, device_memory=self.offer.devices,
                    status="ready", error=None)
        log.info("model %s: %s, %d layers, %.0f MB, fingerprint %s", model.name, model.arch, model.n_layers,
                 model.size_bytes / 1e6, model.fingerprint)
        return True

    # --- ggml-rpc-server ---------------------------------------------------------------------------

    def rpc_tls(self) -> RpcTls | None:
        """The TLS files of both llama.cpp servers, where the build has TLS (None before the binaries are known)."""
        if self._rpc_tls is None and self.binaries and self.binaries.rpc_tls:
            home = self.settings.home
            NodeIdentity.load_or_create(home)  # the same key and certificate meshd and gatewayd use
            self._rpc_tls = RpcTls(cert=home / CERT_FILE, key=home / KEY_FILE, allow=addresses.run_dir(home) / "rpc-allow")
        return self._rpc_tls

    def write_rpc_allow(self) -> None:
        """The TLS rpc-server's allow file: the plan's host over a live link, as the tunnels allow (re-read by the
        rpc-server at each connection)."""
        tls = self.rpc_tls()
        if tls is None or not self.node_id:
            return
        if write_allow_file(tls.allow, rpc_allowed(self.plan, self.node_id, set(self.peers))):
            self.recycle_rpc_server()

    def recycle_rpc_server(self) -> None:
        """Start the TLS rpc-server afresh once a host is no longer allowed (rpc_allow says why)."""
        if self.rpc and self.rpc.running():
            log.info("ggml-rpc-server: restarting it, so a connection from a host that is no longer ours ends")
            self.rpc_recycled = True
            self.rpc.kill_now()

    def rpc_listen_port(self, host: str) -> int:
        if self.rpc_port is None:
            if self.settings.rpc_port:
                self.rpc_port = self.settings.rpc_port
            else:
                with socket.socket() as s:
                    s.bind((host, 0))
                    self.rpc_port = s.getsockname()[1]
        return self.rpc_port

    async def keep_rpc_server(self) -> None:
        restarts = crashes = 0
        tls = self.rpc_tls()
        if tls:
            tls.allow.touch(mode=0o600)
            self.write_rpc_allow()
        host = self.settings.bind_host if tls else "127.0.0.1"
        while True:
            port = self.rpc_listen_port(host) if tls else free_loopback_port()
            args = rpc_server_args(self.binaries, port, self.state.model, device=self.settings.device,
                                   threads=self.settings.threads, host=host, tls=tls)
            self.rpc = Child("ggml-rpc-server", args, addresses.log_path(self.settings.home, "rpc-server"))
            self.update(rpc=ChildState(state="starting", port=port, restarts=restarts))
            self.rpc.start()
            started = time.monotonic()
            if await _wait_port(port, self.rpc, timeout=30, host=_connectable(host)):
                announced = advertised_addresses(host, port, self.settings.advertise_rpc) if tls else []
                self.update(rpc=ChildState(state="ready", port=port, pid=self.rpc.pid, restarts=restarts),
                            rpc_tls=announced, rpc_host=_connectable(host))
            await self.rpc.wait()
            if self.rpc_recycled:  # on purpose (recycle_rpc_server): at once, and not a failure
                self.rpc_recycled = False
                restarts += 1
                continue
            detail = f"ggml-rpc-server {self.rpc.exit_description()}: {self.rpc.log_tail(2)}"
            log.warning("%s", detail)
            self.update(rpc=ChildState(state="failed", port=port, restarts=restarts, detail=detail), rpc_tls=[])
            crashes = 0 if time.monotonic() - started > SERVED_FOR_S else crashes + 1
            if crashes:  # the host's llama-server waits for this one: no pause after a death out of the blue
                await asyncio.sleep(RESTART_BACKOFF_S[min(crashes - 1, len(RESTART_BACKOFF_S) - 1)])
            restarts += 1

    # --- llama-server --------------------------------------------------------------------------

    def on_plan(self, plan: Plan) -> None:
        if plan.state == "starting":
            return  # a restarted electd that has not decided yet: keep serving the plan we have
        if plan != self.plan:
            self.plan = plan
            self.write_rpc_allow()
            self.paths.wanted.set()
            self._plan_changed.set()

    def on_gateway(self, state: GatewayState) -> None:
        if state.rpc_forwards != self.gateway.rpc_forwards or state.forwards_moved != self.gateway.forwards_moved:
            self._plan_changed.set()  # a worker is reachable again (or elsewhere): retry without waiting
        self.gateway = state

    def on_mesh(self, state: MeshState) -> None:
        self.rtt_ms = {p.announcement.node_id: p.rtt_ms for p in state.peers}
        peers = {p.announcement.node_id: p.announcement for p in state.peers if p.connected}
        tls_moved = {n: a.rpc_tls for n, a in peers.items()} != {n: a.rpc_tls for n, a in self.peers.items()}
        links_changed = set(peers) != set(self.peers)
        self.peers = peers
        rpc_ready = {p.announcement.node_id for p in state.peers if p.connected and p.announcement.rpc_ready}
        if any(m.node_id in rpc_ready - self.rpc_ready for m in self.plan.members):
            self._plan_changed.set()  # a worker's rpc-server is back: a start that backs off may go now
        self.rpc_ready = rpc_ready
        if state.node_id and state.node_id != self.node_id:
            self.node_id = state.node_id
            self.update(node_id=state.node_id)
            links_changed = tls_moved = True
            self._plan_changed.set()
        if links_changed:
            self.write_rpc_allow()
        if tls_moved:
            self.paths.wanted.set()

    # --- the path to each worker (rpc_paths) --------------------------------------------------------

    async def check_direct_paths(self) -> None:
        """As host: once per plan, which workers' TLS rpc-servers accept a connection from here."""
        while True:
            await self.paths.wanted.wait()
            self.paths.wanted.clear()
            if self.plan.host != self.node_id:
                continue
            if await self.paths.check(self.plan, self.node_id, self.peers):
                self._plan_changed.set()

    def recheck_direct_paths(self) -> None:
        self.paths.llama_failed(self.plan.key, self.state.rpc_paths, self.llama.log_tail(5))

    def rpc_endpoints(self, plan: Plan) -> dict[str, str]:
        """Each remote member's --rpc endpoint; NotReady while a direct check is under way."""
        endpoints, self.wanted_paths = self.paths.endpoints(plan, self.node_id, self.peers, self.gateway.rpc_forwards,
                                                            build_has_tls=bool(self.binaries.rpc_tls))
        return endpoints

    def desired_llama_spec(self) -> tuple[list[str] | None, str]:
        """(command with port 0, why): None when this node should not run llama-server now."""
        plan = self.plan
        if plan.state not in ("solo", "split"):
            return None, plan.reason or plan.state
        if plan.host != self.node_id:
            return None, f"worker; host is {plan.host[:8] if plan.host else '?'}"
        choice = self.speculation_for(plan)
        draft = str(self.settings.draft_model) if self.settings.draft_model else None
        first_device = (self.settings.device or "").split(",")[0] or None  # the draft stays on one
        spec_args = speculation_args(choice.mode, draft_model=draft, backend=self.state.backend, device=first_device)
        try:
            return llama_server_args(self.binaries, 0, self.state.model, plan, self.node_id, self.rpc_endpoints(plan),
                                     backend=self.state.backend, ctx_size=self.settings.ctx_size,
                                     threads=self.settings.threads, speculation=spec_args,
                                     local_weights=self.offer.local_weights), plan.reason
        except NotReady as exc:
            return None, str(exc)

    def speculation_for(self, plan: Plan) -> SpeculationChoice:
        if self.speculation is None or self.speculation[0] != plan.key:
            remote = [self.rtt_ms.get(m.node_id) for m in plan.members if m.node_id != self.node_id]
            draft = str(self.settings.draft_model) if self.settings.draft_model else None
            choice = choose_speculation(self.settings.speculative, draft_model=draft, remote_rtts_ms=remote)
            self.speculation = (plan.key, choice)
            log.info("speculative decoding: %s", choice.reason)
            self.update(speculation=SpeculationState(setting=self.settings.speculative, mode=choice.mode,
                                                     reason=choice.reason))
        return self.speculation[1]

    async def watch_metrics(self) -> None:
        """Keep the serving llama-server's decode rate of recent requests and its draft acceptance in
        our state (from its /metrics)."""
        watch = DecodeWatch()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                await asyncio.sleep(METRICS_EVERY_S)
                llama, spec = self.llama, self.state.speculation
                serving = llama.pid if llama is not None and llama.running() and self.state.llama.state == "ready" \
                    else None
                text = None
                if serving is not None:
                    key = read_llama_key(self.settings.home)  # llama-server's /metrics needs its key too
                    try:
                        text = (await client.get(f"http://127.0.0.1:{self.state.llama.port}/metrics",
                                                 headers={"Authorization": f"Bearer {key}"} if key else {})).text
                    except httpx.HTTPError:
                        pass
                decode = watch.read(serving, text, time.time())  # reset when another llama-server (or none) serves
                if decode != self.state.decode:
                    self.update(decode=decode)
                if text is None:
                    continue
                counts = draft_counts(text) if spec.mode != "off" else None
                if counts and counts != (spec.drafted_tokens, spec.accepted_tokens):
                    drafted, accepted = counts
                    self.update(speculation=spec.model_copy(update={
                        "drafted_tokens": drafted, "accepted_tokens": accepted,
                        "acceptance_rate": accepted / drafted if drafted else None}))

    async def keep_llama_server(self) -> None:
        restarts = 0
        while True:
            self._plan_changed.clear()
            wanted, why = self.desired_llama_spec()
            running = self.llama is not None and self.llama.running()
            if running and wanted != self.llama_spec:
                log.info("stopping llama-server: %s", why)
                await self.llama.stop(grace=LLAMA_STOP_GRACE_S)
                running = False
            if wanted is None:
                self.llama, self.llama_spec = None, None
                self.update(llama=ChildState(state="stopped", detail=why), llama_plan_key="", weights=[], placement=[])
                await self._plan_changed.wait()
                continue
            if not running:
                outcome = await self.start_llama(wanted, restarts)
                if outcome == "plan changed":
                    restarts = 0
                    continue
                if outcome != "ready":
                    restarts += 1
                    await self.back_off(restarts)
                    continue
            # Serving: wake on a plan change or the child's death.
            died = asyncio.ensure_future(self.llama.wait())
            changed = asyncio.ensure_future(self._plan_changed.wait())
            await asyncio.wait({died, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if died.done():
                detail = f"llama-server {self.llama.exit_description()}: {self.llama.log_tail(2)}"
                log.warning("%s; restarting", detail)
                restarts = 1  # it was serving: its death is news (a peer went away), not a crash loop
                self.update(llama=ChildState(state="failed", restarts=restarts, detail=detail), llama_plan_key="")
                self.llama_spec = None
                self.recheck_direct_paths()
                if time.monotonic() - self.llama_ready_at < SERVED_FOR_S:
                    await self.back_off(restarts)  # else start again at once (a worker still coming back wakes us)
            else:
                died.cancel()

    async def back_off(self, restarts: int) -> None:
        """Wait before the next start, but no longer than until the plan changes: that is news."""
        delay = RESTART_BACKOFF_S[min(restarts - 1, len(RESTART_BACKOFF_S) - 1)]
        try:
            await asyncio.wait_for(self._plan_changed.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def start_llama(self, spec: list[str], restarts: int) -> str:
        """Start llama-server and wait for /health: "ready", "plan changed" (stopped, start the new one),
        or a failure ("died", "stalled")."""
        port = free_loopback_port()
        args = list(spec)
        args[args.index("--port") + 1] = str(port)
        # Other local users can reach 127.0.0.1 too: a fresh key that only gatewayd reads guards it.
        args += ["--api-key-file", str(new_llama_key(self.settings.home))]
        self.llama_spec = spec
        tls = self.rpc_tls()
        env = {"GGML_RPC_TLS_CERT": str(tls.cert), "GGML_RPC_TLS_KEY": str(tls.key)} if tls else None
        paths = dict(self.wanted_paths)
        self.llama = Child("llama-server", args, addresses.log_path(self.settings.home, "llama-server"), env=env)
        started = time.monotonic()
        self.update(llama=ChildState(state="starting", port=port, restarts=restarts, detail=self.plan.reason),
                    rpc_paths=paths)
        log_start = self.llama.log_size()
        self.llama.start()
        outcome = await _wait_health(port, self.llama, lambda: self.desired_llama_spec()[0] == spec,
                                     on_wait=lambda s: self.update(progress=load_progress_text(
                                         self.llama.log_text(log_start), s)))
        self.update(progress="")
        if outcome == "plan changed":
            log.info("plan changed while llama-server was loading; starting over")
            await self.llama.stop(grace=LLAMA_STOP_GRACE_S)
            return outcome
        if outcome != "ready":
            detail = f"llama-server {outcome} before it was ready ({self.llama.exit_description()}): " \
                     f"{self.llama.log_tail(3)}"
            log.error("%s", detail)
            self.recheck_direct_paths()
            await self.llama.stop(grace=LLAMA_STOP_GRACE_S)
            self.update(llama=ChildState(state="failed", port=port, restarts=restarts + 1, detail=detail),
                        llama_plan_key="")
            return outcome
        log.info("llama-server ready on 127.0.0.1:%d in %.1f s (%s)", port, time.monotonic() - started, self.plan.reason)
        self.llama_ready_at = time.monotonic()
        self.paths.llama_ready(self.plan.key)
        rpc = spec[spec.index("--rpc") + 1].split(",") if "--rpc" in spec else []
        endpoints = dict(zip([m.node_id for m in self.plan.members if m.node_id != self.node_id], rpc))
        loaded = self.llama.log_text(log_start)
        weights = weight_loads(loaded, endpoints)
        placement = device_placement(loaded, endpoints, self.node_id)
        log.info("llama-server placed the model: %s", ", ".join(
            f"{p.device} ({p.node_id[:8]}) {p.model_bytes / 1e6:.1f} MB" for p in placement))
        for w in weights:
            if w.misses:
                log.warning("%s: %d weight tensors (%d bytes) were not in its GGUF and were sent over the network",
                            w.node_id[:8], w.misses, w.sent_bytes)
        self.update(llama=ChildState(state="ready", port=port, pid=self.llama.pid, restarts=restarts,
                                     detail=self.plan.reason), llama_plan_key=self.plan.key, weights=weights,
                    placement=placement)
        return outcome

    # --- control and lifecycle -------------------------------------------------------------------

    def on_status(self, _: StatusRequest) -> Reply:
        return Reply(ok=True, data=self.state.model_dump())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        tasks = Supervisor("runnerd", self.settings.home, test_faults=self.settings.test_faults)
        tasks.spawn("publish", self.bus.publish_forever(self.current_state))
        tasks.spawn("receive", self.bus.receive_forever(
            {Plan: self.on_plan, GatewayState: self.on_gateway, MeshState: self.on_mesh}))
        tasks.spawn("control", self.bus.serve_control_forever({StatusRequest: self.on_status}))
        if await self.prepare():
            tasks.spawn("rpc-server", self.keep_rpc_server())
            tasks.spawn("llama-server", self.keep_llama_server())
            tasks.spawn("metrics", self.watch_metrics())
            tasks.spawn("direct-paths", self.check_direct_paths())
        failure = await tasks.run_until(stopping)
        for child in (self.llama, self.rpc):
            if child:
                await child.stop()
        self.bus.close()
        if failure:
            raise SystemExit(1)


def _connectable(bind_host: str) -> str:
    """Where this machine reaches a server bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host


async def _wait_port(port: int, child: Child, timeout: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running():
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True
        except OSError:
            await asyncio.sleep(0.1)
    return False


async def _wait_health(port: int, child: Child, still_wanted: Callable[[], bool],
                       on_wait: Callable[[int], None] | None = None) -> str:
    """Poll /health until "ready"; give up on "died", "plan changed", or "stalled": no new log output
    for LOAD_STALL_S (a load blocked on a peer that stopped answering would otherwise wait forever).
    `on_wait(seconds)` hears how long the load has taken, once a second."""
    started = last_progress = time.monotonic()
    last_size, shown = -1, 0
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if not child.running():
                return "died"
            if not still_wanted():
                return "plan changed"
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return "ready"
            except httpx.HTTPError:
                pass
            size = child.log_size()
            if size != last_size:
                last_size, last_progress = size, time.monotonic()
            elif time.monotonic() - last_progress > LOAD_STALL_S:
                return "stalled"
            waited = int(time.monotonic() - started)
            if on_wait and waited > shown:
                shown = waited
                on_wait(waited)
            await asyncio.sleep(0.2)


def main() -> None:
    settings = service_settings()
    log = setup_logging(settings.home, "runnerd", settings.log_level)
    if settings.client:
        log.info("lite client: runnerd has nothing to do")
        return  # exit 0: supervisord leaves it stopped
    asyncio.run(Runnerd(settings).serve())


if __name__ == "__main__":
    main()
