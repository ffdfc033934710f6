"""meshd: this node's identity, admission and gossip over QUIC.

One QUIC endpoint (qh3) accepts and dials. A dialer gets in only by proving it holds the mesh secret
(from an invite token) over the server's fresh nonce; the server's certificate is pinned to its
node id. Once in, nodes gossip their announcements on a control stream and keep a direct
connection to every other node (the host needs one to each worker anyway), so liveness is simply
"we hold a live connection": every link carries a heartbeat frame twice a second or so, and a link
silent for `liveness_timeout` (3 s by default) is dropped.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from common.addresses import advertised_addresses
from common.bus import ServiceBus
from common.frames import FrameError, encode_frame, read_frame, send_frame
from common.identity import AuthError, NodeIdentity
from common.logs import setup_logging
from common.messages import (Announcement, GatewayState, JoinRequest, JoinRetry, LeaveRequest, MeshState, PeerView,
                             Plan, Reply, RunnerState, StatusRequest, TokenRequest)
from common.nat.reach import EndpointReach, nat_report, race_dial
from common.quic import QuicEndpoint, QuicPeerConnection
from common.quic.auth import MISMATCHES, ProtocolMismatch
from common.settings import Settings, service_settings
from common.tasks import Supervisor
from common.tokens import (InviteToken, TokenError, admission_proof, check_admission, decode_token, encode_token,
                           new_mesh_id, new_secret)
from services.meshd.gossip import (GossipMemory, forget_stale, give_up_redialing, grown_silence, heartbeat_interval,
                                   merge_view, redial_delay, redials_in_flight, rotation_verdict, sign_announcement,
                                   sign_rotation)
from common.nat.turn import open_relays, relay_states
from services.meshd.joining import join_retry_delay, keep_retrying_join
from services.meshd.reach import (announcement_fields, migrate_relayed, my_candidates, peer_path, permitted_ips,
                                  mapped_candidates, punch_forever, relay_candidates, relayed, stun_errors)

log = logging.getLogger("meshd")
ALPN = "mesh-inference/1"
GOSSIP_INTERVAL_S = 1.0
MAX_GOSSIP_FRAME = 1 << 20
SETTLE_AFTER_START_S = 5.0  # longest a restarted meshd reports "not settled" while it redials known members

try:
    VERSION = version("mesh-inference")
except PackageNotFoundError:
    VERSION = "dev"


@dataclass
class MeshSecret:
    """Persisted in MESH_HOME/mesh.json: which mesh we belong to and the secret that admits to it."""
    mesh_id: str
    secret: str
    generation: int = 0  # bumped by `meshctl token --rotate`; the highest generation wins in gossip
    known: dict[str, list[list]] = field(default_factory=dict)  # node id -> mesh addrs, to rejoin after a restart
    rotation: dict | None = None  # the signed rotation that made `secret` (gossip.sign_rotation); None for gen 0
    previous: str | None = None  # the secret before the last rotation: still admits known members until...
    previous_until: float = 0.0  # ...this time (members that were offline during the rotation)


@dataclass
class Link:
    conn: QuicPeerConnection
    writer: object
    last_heard: float
    silent_for: float = 0.0  # seconds of our own running time without a frame from the peer (gossip.grown_silence)


class Meshd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bus = ServiceBus(settings.home, "meshd", listens_to=("runnerd", "gatewayd", "electd"))
        self.identity = NodeIdentity.load_or_create(settings.home)
        self.me_id = self.identity.node_id
        self.secret = self.load_secret()
        self.endpoint = QuicEndpoint(self.identity, alpn=ALPN, host=settings.bind_host, port=settings.bind_port,
                                     authorize=self.authorize, on_connection=self.on_inbound)
        self.reach = EndpointReach(self.endpoint)  # STUN and hole punching on the same socket
        self.relays: list = []          # TURN allocations on that socket
        self.relay_failures: list[tuple[str, str]] = []
        self.links: dict[str, list[Link]] = {}
        self.view: dict[str, Announcement] = {}
        self.gossip_memory = GossipMemory()
        self.last_heard: dict[str, float] = {}
        self.dial_failures: dict[str, tuple[int, float]] = {}  # node id -> (failures, next attempt time)
        self.redials: set[asyncio.Task] = set()  # dials to known members under way: leaving cancels them
        self.errors: list[str] = []
        self.joining: dict[str, JoinRetry] = {}  # inviter node id -> a --join being retried
        self._join_retry_at: dict[str, float] = {}
        self.direct_listen: list[tuple[str, int]] = []  # host and public candidates (relayed ones: self.listen)
        self.runner = RunnerState()
        self.gateway = GatewayState()
        self.plan = Plan()
        self.seq = time.time_ns()
        self._my_announcement: Announcement | None = None
        self._signed_for = ""  # the mesh id _my_announcement is signed for
        self.started = time.monotonic()
        self._settled = False
        self._announce_now = asyncio.Event()

    # --- persistent mesh secret --------------------------------------------------------------------

    def load_secret(self) -> MeshSecret:
        path = self.settings.home / "mesh.json"
        if path.exists():
            try:
                return MeshSecret(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable %s (%s); starting a new mesh", path, exc)
        secret = MeshSecret(mesh_id=new_mesh_id(), secret=new_secret())
        self.save_secret(secret)
        return secret

    def save_secret(self, secret: MeshSecret | None = None) -> None:
        secret = secret or self.secret
        path = self.settings.home / "mesh.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secret.__dict__, f)
        os.replace(tmp, path)

    @property
    def listen(self) -> list[tuple[str, int]]:
        """Our candidates: direct ones, then our relays' current relayed addresses (they change when a
        relay restarts)."""
        return self.direct_listen + mapped_candidates(self.reach.nat, self.relays, self.direct_listen) + \
            relay_candidates(self.relays)

    def token(self) -> str:
        return encode_token(InviteToken(self.secret.mesh_id, self.secret.secret, self.me_id, tuple(self.listen)))

    # --- admission -------------------------------------------------------------------------------

    def authorize(self, node_id: str, claims: dict, nonce: bytes) -> str | None:
        if claims.get("mesh") != self.secret.mesh_id:
            return "not a member of this mesh (different mesh id); ask a member for a token with `meshctl token`"
        proof = claims.get("proof")
        if check_admission(self.secret.secret, nonce, node_id, self.me_id, proof):
            return None
        if self.secret.previous and time.time() < self.secret.previous_until \
                and (node_id in self.secret.known or node_id in self.view) \
                and check_admission(self.secret.previous, nonce, node_id, self.me_id, proof):
            log.info("%s was offline during the last rotation: admitted with the previous secret", node_id[:8])
            return None  # it gets the new secret from our gossip
        return "wrong or rotated mesh secret; ask a member for a new token with `meshctl token`"

    def claims_for(self, secret: MeshSecret):
        return lambda nonce, server_id: {"mesh": secret.mesh_id,
                                         "proof": admission_proof(secret.secret, nonce, self.me_id, server_id)}

    # --- connections -------------------------------------------------------------------------------

    async def on_inbound(self, conn: QuicPeerConnection) -> None:
        conn.on_stream = lambda reader, writer: self.run_link(conn, reader, writer)

    async def dial(self, node_id: str | None, addrs: list, secret: MeshSecret,
                   still_wanted: Callable[[], bool] = lambda: True) -> QuicPeerConnection:
        """Dial every candidate address (staggered, checked ones first); the first that authenticates wins."""
        conn = await race_dial(self.endpoint, self.reach, node_id, addrs, self.claims_for(secret), relays=self.relays)
        if not still_wanted():
            await conn.close()
            raise ConnectionError("this node left that mesh while the dial was under way")
        reader, writer = await conn.open_stream()
        asyncio.ensure_future(self.run_link(conn, reader, writer))
        return conn

    async def run_link(self, conn: QuicPeerConnection, reader, writer) -> None:
        """One control stream: gossip both ways until it goes quiet or the peer leaves."""
        peer_id = conn.peer_node_id
        link = Link(conn, writer, time.monotonic())
        self.links.setdefault(peer_id, []).append(link)
        self.dial_failures.pop(peer_id, None)
        log.info("connected to %s (%s, %s)", peer_id[:8], "dialed" if conn.dialed else "accepted", conn.remote_address)
        self.bus.state_changed()
        try:
            await self.send_gossip(link)
            while True:
                frame = await read_frame(reader, MAX_GOSSIP_FRAME)  # heartbeat_forever drops a silent link
                link.last_heard, link.silent_for = time.monotonic(), 0.0
                self.last_heard[peer_id] = time.time()
                if frame.get("t") == "leave":
                    log.info("%s left the mesh", peer_id[:8])
                    self.view.pop(peer_id, None)
                    break
                if frame.get("t") == "gossip":
                    self.on_gossip(peer_id, frame)
        except (FrameError, ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.info("link to %s closed: %s", peer_id[:8], exc or type(exc).__name__)
        except Exception:
            log.exception("link to %s failed", peer_id[:8])
        finally:
            links = self.links.get(peer_id, [])
            if link in links:
                links.remove(link)
            if not links:
                self.links.pop(peer_id, None)
            await conn.close()
            self.bus.state_changed()

    def on_gossip(self, peer_id: str, frame: dict) -> None:
        try:
            incoming = [Announcement.model_validate(a) for a in frame.get("anns", [])[:1024]]
        except Exception as exc:
            log.warning("malformed gossip from %s ignored: %s", peer_id[:8], str(exc).splitlines()[0])
            return
        incoming = [a for a in incoming if a.node_id != peer_id] + [a for a in incoming if a.node_id == peer_id]
        if not any(a.node_id == peer_id for a in incoming):
            return
        self.view, changed = merge_view(self.view, incoming, self.me_id, self.secret.mesh_id, self.gossip_memory,
                                        time.time(), sender=peer_id)
        addrs = [list(a) for a in self.view[peer_id].mesh_addrs] if peer_id in self.view else []
        if addrs and self.secret.known.get(peer_id) != addrs:
            self.secret.known[peer_id] = addrs  # so a restart can rejoin through any member, not just the inviter
            self.save_secret()
        members = set(self.secret.known) | set(self.view) | {peer_id, self.me_id}
        rotation, refused = rotation_verdict(frame.get("secret"), self.secret.mesh_id, self.secret.generation,
                                             self.secret.secret, members)
        if refused:
            self.gossip_memory.dropped["bad_rotation"] += 1
            log.info("ignored a rotation of the mesh secret from %s: %s", peer_id[:8], refused)
        elif rotation:
            log.info("mesh secret rotated by %s (generation %d)", rotation["by"][:8], rotation["gen"])
            self.adopt_secret(rotation)
            changed = True
        if changed:
            self.bus.state_changed()

    def announcement(self) -> Announcement:
        model = self.runner.model
        fields = dict(
            node_id=self.me_id, role="client" if self.settings.client else "worker", version=VERSION,
            memory_bytes=self.runner.memory_bytes, device_memory=self.runner.device_memory,
            model_name=model.name if model else None,
            model_fingerprint=model.fingerprint if model else None, model_size=model.size_bytes if model else 0,
            rpc_ready=self.runner.rpc.state == "ready", rpc_tls=self.runner.rpc_tls, mesh_addrs=self.listen, data_tcp=self.gateway.data_tcp,
            data_quic=self.gateway.data_quic, host_ready=self.runner.llama.state == "ready",
            plan_key=self.runner.llama_plan_key)
        fields.update(announcement_fields(self.reach.nat, self.relays, self.gateway.relays))
        mesh_id = self.secret.mesh_id
        if self._my_announcement is None or self._signed_for != mesh_id or \
                self._my_announcement.model_dump(exclude={"seq", "kind", "sig", "public_key"}) != fields:
            self.seq = max(self.seq + 1, time.time_ns())
            self._my_announcement = sign_announcement(Announcement(seq=self.seq, **fields), mesh_id, self.identity)
            self._signed_for = mesh_id
        return self._my_announcement

    async def send_gossip(self, link: Link) -> None:
        frame = {"t": "gossip", "anns": [self.announcement().model_dump(mode="json")] +
                 [a.model_dump(mode="json") for a in self.view.values()]}
        if self.secret.rotation:
            frame["secret"] = self.secret.rotation
        await asyncio.wait_for(send_frame(link.writer, frame), 5.0)

    async def gossip_forever(self) -> None:
        while True:
            try:  # a change of our own announcement (llama-server ready, say) goes out at once: peers re-route on it
                await asyncio.wait_for(self._announce_now.wait(), GOSSIP_INTERVAL_S)
                await asyncio.sleep(0.05)  # coalesce a burst of changes
            except asyncio.TimeoutError:
                pass
            self._announce_now.clear()
            for links in list(self.links.values()):
                for link in list(links):
                    try:
                        await self.send_gossip(link)
                    except Exception as exc:
                        log.info("gossip to %s failed: %s", link.conn.peer_node_id[:8], type(exc).__name__)
                        await link.conn.close()

    async def heartbeat_forever(self) -> None:
        """A small frame on every link several times per liveness timeout, and drop links that stay silent.
        Writes do not wait for a slow peer, so one stuck link cannot silence the others."""
        timeout = self.settings.liveness_timeout
        interval = heartbeat_interval(timeout)
        frame = encode_frame({"t": "hb"})
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            elapsed, last = now - last, now
            for links in list(self.links.values()):
                for link in list(links):
                    link.silent_for = grown_silence(link.silent_for, elapsed, interval)
                    if link.silent_for >= timeout:
                        log.warning("%s went quiet for %.1f s; dropping it", link.conn.peer_node_id[:8], link.silent_for)
                        link.silent_for = float("-inf")  # closing once is enough
                        asyncio.ensure_future(link.conn.close())
                    elif not link.conn.is_closed:
                        link.writer.write(frame)

    async def connect_forever(self) -> None:
        """Keep a direct connection to every node we know of (from gossip or from before a restart)."""
        dialing: dict[str, list[asyncio.Task]] = {}
        while True:
            await asyncio.sleep(0.5)  # redials of recent members are due every RECENT_REDIAL_S
            self.view = forget_stale(self.view, self.last_heard, set(self.links), time.time(), self.gossip_memory)
            targets = {nid: a.mesh_addrs for nid, a in self.view.items()}
            for nid, addrs in self.secret.known.items():
                targets.setdefault(nid, addrs)
            now = time.monotonic()
            for node_id, addrs in targets.items():
                if node_id == self.me_id or node_id in self.links or not addrs:
                    continue
                in_flight = [t for t in dialing.get(node_id, []) if not t.done()]
                heard = self.last_heard.get(node_id)
                overlap = redials_in_flight(time.time() - heard if heard is not None else None)
                if len(in_flight) >= overlap:
                    continue
                failures, next_try = self.dial_failures.get(node_id, (0, 0.0))
                if now < next_try:
                    continue
                # Both ends would dial each other at once; the lower id dials first, the other a little later.
                if failures == 0 and node_id < self.me_id and node_id in self.view:
                    self.dial_failures[node_id] = (1, now + 3.0)
                    continue
                if overlap > 1:  # a dial sent while the path was down waits out its timeout: start another meanwhile
                    self.dial_failures[node_id] = (failures, now + redial_delay(failures, 0.0))
                dialing[node_id] = in_flight + [asyncio.ensure_future(self.redial(node_id, list(addrs), failures))]

    def unconnected_addrs(self) -> list[list]:
        """Candidates of the members we know of and hold no direct connection to (for hole punching)."""
        return [a.mesh_addrs for nid, a in self.view.items() if nid != self.me_id and
                all(relayed(link.conn, a) for link in self.links.get(nid, []))]

    async def relay_upkeep_forever(self) -> None:
        """Permissions for every member on our relays; relayed connections move to direct paths."""
        while True:  # a supervised loop: returning would count as a failure
            for allocation in self.relays:
                allocation.permit(permitted_ips(list(self.view.values()), self.relays))
            migrate_relayed([link.conn for links in self.links.values() for link in links], self.reach, self.view)
            await asyncio.sleep(1.0)

    async def redial(self, node_id: str, addrs: list, failures: int) -> None:
        task, secret = asyncio.current_task(), self.secret
        self.redials.add(task)
        try:
            # A member of the mesh we were in when it started: not once we have left (or joined another).
            await self.dial(node_id, addrs, secret, still_wanted=lambda: self.secret.mesh_id == secret.mesh_id)
        except (AuthError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
            heard = self.last_heard.get(node_id)
            heard_ago = time.time() - heard if heard is not None else None
            if give_up_redialing(failures, heard_ago) and node_id not in self.view and node_id in self.secret.known:
                del self.secret.known[node_id]  # gone for good (or moved): stop dialing it
                self.save_secret()
            delay = redial_delay(failures, heard_ago)
            self.dial_failures[node_id] = (failures + 1, time.monotonic() + delay)
            log.info("cannot reach %s: %s (retry in %g s)", node_id[:8], getattr(exc, "reason", exc), delay)
        finally:
            self.redials.discard(task)

    async def join(self, text: str) -> Reply:
        return (await self._join_once(text))[0]

    async def _join_once(self, text: str) -> tuple[Reply, bool]:
        """One join attempt: the reply, and whether it failed only because the inviter did not answer."""
        try:
            token = decode_token(text)
        except TokenError as exc:
            return self.join_failed(str(exc)), False
        if token.node_id == self.me_id:
            return self.join_failed("that token was printed by this node itself; use it on another machine"), False
        candidate = MeshSecret(mesh_id=token.mesh_id, secret=token.secret, generation=0, known=dict(self.secret.known))
        try:
            await self.dial(token.node_id, list(token.addrs), candidate)
        except ProtocolMismatch as exc:  # not the mesh's refusal: the two builds cannot talk
            return self.join_failed(exc.reason), False
        except AuthError as exc:
            return self.join_failed(f"the mesh refused this node: {exc.reason}"), False
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            return self.join_failed(f"cannot reach the inviting node: {exc}; check the address and that UDP is "
                                    f"allowed"), True
        if candidate.mesh_id != self.secret.mesh_id or candidate.secret != self.secret.secret:
            candidate.generation = self.secret.generation if candidate.mesh_id == self.secret.mesh_id else 0
            self.secret = candidate
        self.secret.known[token.node_id] = [list(a) for a in token.addrs]
        self.save_secret()
        log.info("joined mesh %s through %s", token.mesh_id, token.node_id[:8])
        self.errors = [e for e in self.errors if not e.startswith("join:")]
        self.bus.state_changed()
        return Reply(ok=True, data={"mesh_id": token.mesh_id, "via": token.node_id}), False

    async def join_until_joined(self, text: str) -> None:
        """A --join at start: tried, and while its inviter cannot be reached tried again with a
        bounded back-off (services/meshd/joining.py) for as long as the node runs alone."""
        mesh_at_start = self.secret.mesh_id
        try:
            token = decode_token(text)
        except TokenError:
            token = None
        failures = 0
        try:
            while True:
                if token is not None:
                    self.joining[token.node_id] = JoinRetry(node_id=token.node_id, addrs=list(token.addrs),
                                                            attempts=failures, error=self._join_error())
                reply, unreachable = await self._join_once(text)
                if reply.ok or token is None or not unreachable:
                    return
                failures += 1
                delay = join_retry_delay(failures)
                retry_at = time.monotonic() + delay
                self.joining[token.node_id] = JoinRetry(node_id=token.node_id, addrs=list(token.addrs),
                                                        attempts=failures, retry_in_s=delay, error=reply.error or "")
                self._join_retry_at[token.node_id] = retry_at
                self.bus.state_changed()
                while time.monotonic() < retry_at:
                    await asyncio.sleep(min(1.0, max(retry_at - time.monotonic(), 0.0)))
                    if not self._keep_joining(token, unreachable, mesh_at_start):
                        break
                if not self._keep_joining(token, unreachable, mesh_at_start):
                    log.info("join through %s: no longer retried (%s)", token.node_id[:8],
                             "joined" if self.secret.mesh_id == token.mesh_id else "the node moved on")
                    return
                log.info("join through %s: trying again (%d failed)", token.node_id[:8], failures)
        finally:
            if token is not None:
                self.joining.pop(token.node_id, None)
                self._join_retry_at.pop(token.node_id, None)
                self.bus.state_changed()

    def _keep_joining(self, token: InviteToken, unreachable: bool, mesh_at_start: str) -> bool:
        connected = self.secret.mesh_id == token.mesh_id and any(self.links.values())
        return keep_retrying_join(unreachable, token.mesh_id, mesh_at_start, self.secret.mesh_id, connected)

    def _join_error(self) -> str:
        return next((e.removeprefix("join: ") for e in reversed(self.errors) if e.startswith("join: ")), "")

    def join_failed(self, reason: str) -> Reply:
        log.error("join failed: %s", reason)
        self.errors = [e for e in self.errors if not e.startswith("join:")][-4:] + [f"join: {reason}"]
        self.bus.state_changed()
        return Reply(ok=False, error=reason)

    def on_token(self, request: TokenRequest) -> Reply:
        if request.rotate:
            self.adopt_secret(sign_rotation(self.secret.mesh_id, self.secret.generation + 1, new_secret(), self.identity))
            log.info("mesh secret rotated (generation %d): old tokens no longer admit new nodes", self.secret.generation)
            self.bus.state_changed()
        return Reply(ok=True, data={"token": self.token()})

    def adopt_secret(self, rotation: dict) -> None:
        """Take a signed rotation; the secret it replaces still admits known members for a while."""
        s = self.secret
        s.previous, s.previous_until = s.secret, time.time() + self.settings.rotation_grace
        s.secret, s.generation, s.rotation = rotation["secret"], rotation["gen"], rotation
        self.save_secret()

    async def on_leave(self, _: LeaveRequest) -> Reply:
        """Belong to a fresh mesh of one, forget the old members, then say goodbye to every peer.
        The new mesh id comes first: from then on old members' dials in are refused, and our own
        dials to them that are under way are cancelled (and would be dropped if they got through)."""
        old_mesh = self.secret.mesh_id
        self.secret = MeshSecret(mesh_id=new_mesh_id(), secret=new_secret())  # known members: none
        self.save_secret()
        self.view, self.last_heard, self.dial_failures = {}, {}, {}
        for task in list(self.redials):
            task.cancel()
        for links in list(self.links.values()):
            for link in list(links):
                try:
                    await asyncio.wait_for(send_frame(link.writer, {"t": "leave"}), 1.0)
                except Exception:
                    pass
                await link.conn.close()
        log.info("left mesh %s; now alone in mesh %s", old_mesh, self.secret.mesh_id)
        self.bus.state_changed()
        return Reply(ok=True, data={"left": old_mesh, "mesh_id": self.secret.mesh_id})

    # --- bus ---------------------------------------------------------------------------------------

    def current_state(self) -> MeshState:
        peers = []
        relays = relay_states(self.relays, self.relay_failures)
        for node_id, ann in sorted(self.view.items()):
            links = self.links.get(node_id, [])
            rtt = next((l.conn.rtt() for l in links if l.conn.rtt() is not None), None)
            failures, _ = self.dial_failures.get(node_id, (0, 0.0))
            status = "connected" if links else (f"unreachable ({failures} failed dials)" if failures else "connecting")
            path = peer_path(links[0].conn, ann, self.reach.nat) if links else None
            peers.append(PeerView(announcement=ann, connected=bool(links), rtt_ms=rtt * 1000 if rtt is not None else None,
                                  last_heard=self.last_heard.get(node_id, 0.0), status=status, path=path))
        errors = self.errors + stun_errors(self.reach.nat) + [f"relay {r.relay}: {r.error}" for r in relays if r.error]
        # peers on another mesh protocol (either end of the exchange), unless a join error says it already
        errors += [line for line in MISMATCHES.lines() if not any(line in e for e in errors)]
        return MeshState(node_id=self.me_id, mesh_id=self.secret.mesh_id, listen=self.listen,
                         me=self.announcement(), peers=peers, errors=errors, settled=self.settled(),
                         gossip_dropped=dict(self.gossip_memory.dropped), nat=nat_report(self.reach.nat), relays=relays,
                         joining=[self._joining_now(j) for j in self.joining.values()])

    def _joining_now(self, retry: JoinRetry) -> JoinRetry:
        at = self._join_retry_at.get(retry.node_id)
        if retry.retry_in_s is None or at is None:
            return retry
        return retry.model_copy(update={"retry_in_s": round(max(at - time.monotonic(), 0.0), 1)})

    def settled(self) -> bool:
        """Every member known from before this start is connected again or was tried once (or time ran out)."""
        if not self._settled:
            known = set(self.secret.known) - {self.me_id}
            self._settled = time.monotonic() - self.started > SETTLE_AFTER_START_S or \
                all(nid in self.links or nid in self.dial_failures for nid in known)
        return self._settled

    def on_runner(self, state: RunnerState) -> None:
        self.runner = state
        self.announce_if_changed()

    def on_gateway(self, state: GatewayState) -> None:
        self.gateway = state
        self.announce_if_changed()

    def announce_if_changed(self) -> None:
        before = self._my_announcement
        if self.announcement() is not before:
            self._announce_now.set()
        self.bus.state_changed()

    def on_plan(self, plan: Plan) -> None:
        self.plan = plan

    def on_status(self, _: StatusRequest) -> Reply:
        return Reply(ok=True, data=self.current_state().model_dump())

    async def serve(self) -> None:
        host, port = await self.endpoint.start()
        await self.reach.discover(self.settings.stun)  # a few seconds at most, even if no server answers
        self.direct_listen = my_candidates(advertised_addresses(host, port, self.settings.advertise), self.reach.nat)
        self.relays, self.relay_failures = await open_relays(self.endpoint, self.settings.relay)
        for allocation in self.relays:
            allocation.on_change = self.bus.state_changed  # a new relayed address: announce it
        log.info("node %s listening on UDP %s:%d", self.me_id, host, port)
        log.info("invite token: `meshctl token` prints it (it holds the mesh secret, so it is never logged)")
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        tasks = Supervisor("meshd", self.settings.home, test_faults=self.settings.test_faults)
        tasks.spawn("publish", self.bus.publish_forever(self.current_state))
        tasks.spawn("receive", self.bus.receive_forever(
            {RunnerState: self.on_runner, GatewayState: self.on_gateway, Plan: self.on_plan}))
        tasks.spawn("control", self.bus.serve_control_forever(
            {StatusRequest: self.on_status, JoinRequest: lambda r: self.join(r.token), TokenRequest: self.on_token,
             LeaveRequest: self.on_leave}))
        tasks.spawn("gossip", self.gossip_forever())
        tasks.spawn("heartbeat", self.heartbeat_forever())
        tasks.spawn("connect", self.connect_forever())
        tasks.spawn("punch", punch_forever(self.reach, self.unconnected_addrs))
        tasks.spawn("relay-upkeep", self.relay_upkeep_forever())
        joins = [asyncio.ensure_future(self.join_until_joined(token)) for token in self.settings.join]  # noqa: F841 (held)
        failure = await tasks.run_until(stopping)
        await self.leave()
        if failure:
            raise SystemExit(1)

    async def leave(self) -> None:
        """Tell every peer we are going, so they re-plan now instead of after a timeout."""
        for links in list(self.links.values()):
            for link in links:
                try:
                    await asyncio.wait_for(send_frame(link.writer, {"t": "leave"}), 1.0)
                except Exception:
                    pass
        await asyncio.sleep(0.1)
        await self.endpoint.close()
        self.bus.close()


def main() -> None:
    settings = service_settings()
    setup_logging(settings.home, "meshd", settings.log_level)
    asyncio.run(Meshd(settings).serve())


if __name__ == "__main__":
    main()
