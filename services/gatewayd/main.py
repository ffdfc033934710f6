"""gatewayd: the :9337 API and the data-plane tunnels of this node.

On the host it opens one loopback port per remote worker that carries llama.cpp RPC to that
worker's ggml-rpc-server; on every other node it opens one loopback port that carries HTTP to the
host's gatewayd, and points the API there. Tunnels only serve mesh members, and each only what its
role needs: a worker's ggml-rpc-server only to the host of its plan; HTTP tunnels end at gatewayd's
members' API (a Unix socket under MESH_HOME/run), never at llama-server, which only gatewayd can
use (its key: common.local_keys).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from typing import Callable

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common import addresses
from common.addresses import advertised_addresses
from common.bus import ServiceBus
from common.identity import NodeIdentity
from common.local_keys import read_llama_key
from common.logs import setup_logging
from common.messages import GatewayState, MeshState, PeerView, Plan, Reply, RunnerState, StatusRequest, TunnelStats
from common.nat.reach import nat_report
from common.nat.turn import relay_states
from common.settings import Settings, service_settings
from common.tasks import Supervisor
from services.gatewayd.api import Upstream, build_app
from common.rpc_policy import RPC_PLAN_WAIT_S, rpc_refusal
from services.gatewayd.tunnels import PeerDataAddrs, TunnelService

log = logging.getLogger("gatewayd")
MEMBERS_WAIT_FOR_LLAMA_S = 10.0  # then a RETRY_HEADER 503: the asking gateway retries (and may find a new host)


class StateCollector:
    """A prometheus-client collector over values we already keep (tunnel byte counts, request counters)."""

    def __init__(self, families: Callable[[], list]) -> None:
        self.families = families

    def collect(self):
        yield from self.families()


def metric_families(tunnels: list[TunnelStats], counters: dict[str, int], peers_connected: int) -> list:
    tunnel_bytes = CounterMetricFamily("mesh_tunnel_bytes", "bytes through the data tunnels, per peer, direction and lane",
                                       labels=["peer", "direction", "lane"])
    for t in tunnels:
        tunnel_bytes.add_metric([t.node_id, "in", t.lane], t.bytes_in)
        tunnel_bytes.add_metric([t.node_id, "out", t.lane], t.bytes_out)
    requests = CounterMetricFamily("mesh_requests", "API requests answered by a host (served) or with an error (failed)",
                                   labels=["result"])
    requests.add_metric(["served"], counters.get("served", 0))
    requests.add_metric(["failed"], counters.get("failed", 0))
    peers = GaugeMetricFamily("mesh_peers", "peers connected now", value=peers_connected)
    return [tunnel_bytes, requests, peers]


class Gatewayd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bus = ServiceBus(settings.home, "gatewayd", listens_to=("meshd", "electd", "runnerd"))
        self.identity = NodeIdentity.load_or_create(settings.home)
        self.mesh = MeshState()
        self.plan = Plan()
        self.runner = RunnerState()
        self.state = GatewayState(api_url=f"http://{settings.api_bind_host}:{settings.port}/v1")
        self.upstream = Upstream()
        self.local_llama = Upstream()  # what the members' API serves: this node's own llama-server only
        self.members_api: str | None = None  # its Unix socket, once it listens
        self.counters = {"served": 0, "failed": 0}
        self.tunnels = TunnelService(self.identity, is_member=self.is_member, local_target=self.local_target,
                                     allow=self.allow_tunnel,
                                     bind_host=settings.bind_host, tcp_port=settings.data_port,
                                     quic_port=settings.data_port, stun=settings.stun, relays=settings.relay)
        self.forwards: dict[tuple[str, str], int] = {}  # (peer node id, kind) -> loopback port
        self.forward_addrs: dict[tuple[str, str], PeerDataAddrs] = {}  # where each forward dials the peer
        self._changed = asyncio.Event()

    # --- facts from the bus ------------------------------------------------------------------------

    def on_mesh(self, state: MeshState) -> None:
        if not state.settled:
            return  # a restarted meshd still reconnecting: keep the tunnels and upstream we have
        self.mesh = state
        self._changed.set()

    def on_plan(self, plan: Plan) -> None:
        if plan.state == "starting":
            return  # a restarted electd that has not decided yet: keep the tunnels of the plan we have
        self.plan = plan
        self._changed.set()

    def on_runner(self, state: RunnerState) -> None:
        self.runner = state
        self._changed.set()

    def is_member(self, node_id: str) -> bool:
        return any(p.announcement.node_id == node_id for p in self.mesh.peers)

    def local_target(self, kind: str) -> tuple[str, int] | str | None:
        child = {"rpc": self.runner.rpc, "http": self.runner.llama}.get(kind)
        if child is None or child.state != "ready" or not child.port:
            return None
        if kind == "http":
            return self.members_api  # our own API for members, which holds llama-server's key
        # a TLS rpc-server (runnerd's rpc_tls) listens on the bind host; the host's TLS runs through the tunnel
        return (self.runner.rpc_host if self.runner.rpc_tls else "127.0.0.1", child.port)

    async def allow_tunnel(self, dialer: str, kind: str) -> str | None:
        """RPC only from the host of our plan over a live link; HTTP from any member (it reaches the API only).
        The host may have settled on the plan a moment before us: wait a little for ours to agree (and for
        our rpc-server to be known)."""
        if kind == "http":
            return None
        if kind != "rpc":
            return rpc_refusal(kind, self.plan, self.mesh.node_id, dialer, connected=False)
        deadline = asyncio.get_running_loop().time() + RPC_PLAN_WAIT_S
        while True:
            reason = rpc_refusal(kind, self.plan, self.mesh.node_id, dialer, connected=self.peer(dialer) is not None)
            # A gatewayd that just restarted hears where runnerd's rpc-server is within a second: wait for that too.
            if (reason is None and self.local_target("rpc")) or asyncio.get_running_loop().time() >= deadline:
                return reason
            await asyncio.sleep(0.1)

    def current_state(self) -> GatewayState:
        stats = self.tunnels.stats()
        tunnels = [TunnelStats(node_id=node_id, lane=s.get("lane", ""), bytes_in=s.get("bytes_in", 0),
                               bytes_out=s.get("bytes_out", 0), streams=s.get("open_streams", 0),
                               last_error=s.get("last_error") or "", path=self.quic_path(node_id, s),
                               rtt_ms=s.get("rtt_ms")) for node_id, s in stats.items()]
        return self.state.model_copy(update={
            "tunnels": tunnels, "requests_served": self.counters["served"], "requests_failed": self.counters["failed"],
            "relays": relay_states(self.tunnels.relays, self.tunnels.relay_failures),
            "data_quic": self.data_quic()})

    def data_quic(self) -> list:
        """The QUIC lane's announced addresses, with the relayed ones as they are now (a relay restarts)."""
        if self.tunnels.reach is None:
            return self.state.data_quic
        return [a for h, p in self.tunnels.quic_candidates() for a in advertised_addresses(h, p, None)]

    def quic_path(self, node_id: str, stats: dict) -> str:
        """direct/relayed of the QUIC lane's connection; relayed too when it goes to the peer's relay address."""
        path, remote = stats.get("path", ""), stats.get("remote")
        peer = next((p.announcement for p in self.mesh.peers if p.announcement.node_id == node_id), None)
        if path and remote and peer is not None and tuple(remote) in {tuple(a) for a in peer.relay_addrs}:
            return "relayed"
        return path

    # --- tunnels and upstream --------------------------------------------------------------------

    def peer(self, node_id: str) -> PeerView | None:
        return next((p for p in self.mesh.peers if p.announcement.node_id == node_id and p.connected), None)

    def choose_host(self) -> PeerView | None:
        """The peer whose llama-server we should use: prefer one serving our own model, then the largest."""
        mine = self.runner.model.fingerprint if self.runner.model else None
        hosts = [p for p in self.mesh.peers if p.connected and p.announcement.host_ready]
        if not hosts:
            return None
        return max(hosts, key=lambda p: (p.announcement.model_fingerprint == mine, p.announcement.memory_bytes,
                                         p.announcement.node_id))

    async def punch_forever(self) -> None:
        """Keep the QUIC lane's NAT mappings toward members open (see TunnelService.punch)."""
        while True:
            await asyncio.sleep(1.0)
            peers = [p for p in self.mesh.peers if p.connected and p.announcement.data_quic]
            self.tunnels.punch([PeerDataAddrs(node_id=p.announcement.node_id, quic=list(p.announcement.data_quic))
                                for p in peers], [h for p in peers for h, _ in p.announcement.public_addrs],
                               {tuple(a) for p in peers for a in p.announcement.relay_addrs})

    async def ensure_forward(self, peer: PeerView, kind: str) -> int | None:
        ann = peer.announcement
        if not ann.data_tcp and not ann.data_quic:
            return None  # its gatewayd has not said where it listens yet; the next announcement will
        key = (ann.node_id, kind)
        if key in self.forwards:
            # The forward reads these on every new connection: a peer whose gatewayd restarted (new data
            # ports) is reached through the same local port, so llama-server's --rpc stays valid.
            addrs = self.forward_addrs[key]
            if (addrs.tcp, addrs.quic) != (list(ann.data_tcp), list(ann.data_quic)):
                addrs.tcp, addrs.quic = list(ann.data_tcp), list(ann.data_quic)
                self.state = self.state.model_copy(update={"forwards_moved": self.state.forwards_moved + 1})
                self.bus.state_changed()
            return self.forwards[key]
        addrs = PeerDataAddrs(node_id=ann.node_id, tcp=list(ann.data_tcp), quic=list(ann.data_quic))
        try:
            self.forwards[key] = await self.tunnels.open_forward(addrs, kind)
        except Exception as exc:
            log.warning("cannot open %s tunnel to %s: %s", kind, key[0][:8], exc)
            return None
        self.forward_addrs[key] = addrs
        log.info("tunnel %s → %s on 127.0.0.1:%d", kind, key[0][:8], self.forwards[key])
        return self.forwards[key]

    async def close_unwanted(self, wanted: set[tuple[str, str]]) -> None:
        for key in [k for k in self.forwards if k not in wanted]:
            port = self.forwards.pop(key)
            self.forward_addrs.pop(key, None)
            await self.tunnels.close_forward(port)
            log.info("closed %s tunnel to %s", key[1], key[0][:8])

    async def reconcile(self) -> None:
        wanted: set[tuple[str, str]] = set()
        rpc_forwards: dict[str, int] = {}
        me = self.mesh.node_id
        if self.plan.state == "split" and self.plan.host == me:
            for member in self.plan.members:
                peer = self.peer(member.node_id) if member.node_id != me else None
                if peer and (port := await self.ensure_forward(peer, "rpc")):
                    wanted.add((member.node_id, "rpc"))
                    rpc_forwards[member.node_id] = port
        llama = self.runner.llama
        local = ("127.0.0.1", llama.port) if llama.state == "ready" and llama.port else None
        key = read_llama_key(self.settings.home) if local else None  # written before this llama-server started
        self.local_llama.set(local[1] if local else None, "local", key)
        if local:
            self.upstream.set(local[1], "local", key)
        elif (host := self.choose_host()) and (port := await self.ensure_forward(host, "http")):
            wanted.add((host.announcement.node_id, "http"))
            self.upstream.set(port, host.announcement.node_id)
        else:
            self.upstream.set(None, "")
        await self.close_unwanted(wanted)
        # Only the plan's host over a live link may use our rpc-server (common.rpc_policy), then as when it opened.
        if dropped := self.tunnels.drop_served("rpc", lambda node_id: node_id == self.plan.host and self.peer(node_id)):
            log.info("closed %d rpc tunnel(s) from a node that is no longer our live host", dropped)
        upstream = "local" if local else self.upstream.label
        if rpc_forwards != self.state.rpc_forwards or upstream != self.state.upstream:
            self.state = self.state.model_copy(update={"rpc_forwards": rpc_forwards, "upstream": upstream})
            self.bus.state_changed()

    async def reconcile_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed")
            await asyncio.sleep(0.05)

    # --- status ------------------------------------------------------------------------------------

    def status(self) -> dict:
        return {"mesh": self.mesh.model_dump(), "plan": self.plan.model_dump(), "runner": self.runner.model_dump(),
                "gateway": self.current_state().model_dump()}

    def metrics(self) -> str:
        """Prometheus text exposition of this node's counters, read from the current state at scrape time."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StateCollector(lambda: metric_families(
            self.current_state().tunnels, self.counters, sum(p.connected for p in self.mesh.peers))
            + path_metric_families(self.mesh)))
        return generate_latest(registry).decode()

    def on_status(self, _: StatusRequest) -> Reply:
        return Reply(ok=True, data=self.current_state().model_dump())

    # --- lifecycle ---------------------------------------------------------------------------------

    def members_api_socket(self) -> socket.socket:
        """An owner-only Unix socket: other local users cannot reach llama-server through it."""
        path = addresses.mesh_api_socket(self.settings.home)
        path.unlink(missing_ok=True)  # a stale one from a killed gatewayd; the service lock makes us the only one
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def api_socket(self) -> socket.socket | None:
        """Bind the API port ourselves so a clash is one clear line in state and log, not a crash loop."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.api_bind_host, self.settings.port))
        except OSError as exc:
            sock.close()
            reason = (f"API port {self.settings.port} on {self.settings.api_bind_host} is unavailable ({exc.strerror}); "
                      f"stop whatever uses it or pass --port")
            log.error("%s", reason)
            self.state = self.state.model_copy(update={"error": reason})
            return None
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def serve(self) -> None:
        if reason := self.settings.api_exposure_problem():  # Settings refuses this too; never serve it anyway
            log.error("%s", reason)
            self.state = self.state.model_copy(update={"error": reason})
        tcp, quic = await self.tunnels.start()
        for allocation in self.tunnels.relays:
            allocation.on_change = self.bus.state_changed  # a new relayed address: announce it
        self.state = self.state.model_copy(update={
            "data_tcp": [a for h, p in tcp for a in advertised_addresses(h, p, self.settings.advertise_data)],
            "data_quic": [a for h, p in quic for a in advertised_addresses(h, p, None)]})
        log.info("data tunnels: tcp %s, quic %s", self.state.data_tcp, self.state.data_quic)
        if self.tunnels.reach is not None and self.settings.stun:
            self.state = self.state.model_copy(update={"nat": nat_report(self.tunnels.reach.nat)})
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        tasks = Supervisor("gatewayd", self.settings.home, test_faults=self.settings.test_faults)
        tasks.spawn("publish", self.bus.publish_forever(self.current_state))
        tasks.spawn("receive", self.bus.receive_forever(
            {MeshState: self.on_mesh, Plan: self.on_plan, RunnerState: self.on_runner}))
        tasks.spawn("control", self.bus.serve_control_forever({StatusRequest: self.on_status}))
        tasks.spawn("reconcile", self.reconcile_forever())
        tasks.spawn("punch", self.punch_forever())
        members = uvicorn.Server(uvicorn.Config(
            build_app(self.local_llama, wait_for_host=MEMBERS_WAIT_FOR_LLAMA_S, api_key=None, status=None,
                      metrics=None, counters=self.counters),
            log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        members.install_signal_handlers = lambda: None
        members_sock = self.members_api_socket()
        tasks.spawn("members-api", members.serve(sockets=[members_sock]))
        self.members_api = members_sock.getsockname()
        server = None
        sock = None if self.state.error else self.api_socket()
        if sock:
            app = build_app(self.upstream, wait_for_host=self.settings.wait_for_host, api_key=self.settings.api_key,
                            status=self.status, metrics=self.metrics, counters=self.counters)
            config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)
            server.install_signal_handlers = lambda: None  # we own SIGTERM
            tasks.spawn("api", server.serve(sockets=[sock]))
            log.info("API on http://%s:%d/v1", self.settings.api_bind_host, self.settings.port)
        failure = await tasks.run_until(stopping)
        await self.tunnels.close()
        self.bus.close()
        if failure:
            raise SystemExit(1)


def path_metric_families(mesh: MeshState) -> list:
    """Per peer: the path of the mesh connection (direct/punched/relayed), its RTT and bytes."""
    path = GaugeMetricFamily("mesh_peer_path", "the path of the mesh connection to a peer (1 = in use)",
                             labels=["peer", "path"])
    rtt = GaugeMetricFamily("mesh_peer_rtt_seconds", "round trip of the mesh connection to a peer", labels=["peer"])
    sent = CounterMetricFamily("mesh_peer_bytes", "bytes of the mesh connection to a peer, per direction",
                               labels=["peer", "direction"])
    for p in mesh.peers:
        if p.path is None:
            continue
        peer = p.announcement.node_id
        path.add_metric([peer, p.path.path], 1)
        if p.path.rtt_ms is not None:
            rtt.add_metric([peer], p.path.rtt_ms / 1000)
        sent.add_metric([peer, "out"], p.path.bytes_sent)
        sent.add_metric([peer, "in"], p.path.bytes_received)
    return [path, rtt, sent]


def main() -> None:
    settings = service_settings()
    setup_logging(settings.home, "gatewayd", settings.log_level)
    asyncio.run(Gatewayd(settings).serve())


if __name__ == "__main__":
    main()
