"""Named data paths between llama-server and the ggml-rpc-servers, for `bench.bench_rpc`.

A path is a function `(rpc_endpoints, rtt_ms) -> context manager` whose value is the list of
(host, port) that llama-server's `--rpc` should dial, one per rpc-server, in the same order. While
the context is open the path carries the traffic; leaving it tears the path down. `rtt_ms` is the
round-trip delay to inject on the path's network leg (0: none). TCP legs get it from a
`DelayRelay` on the wire (see `_wire`); a UDP leg (QUIC) gets it from a `UdpDelayRelay`.

To report traffic (bytes, round trips), a path yields `Endpoints(addresses, meters=[...])`, a
list with meters attached; each meter has `snapshot() -> TrafficStats` (as `DelayRelay` does).
A plain list works too; the bench then leaves the traffic columns empty.

Register a path with `@register(name, description)`; `mesh` is the slot for the mesh's tunnel.
"""
from __future__ import annotations

import datetime
import ssl
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

from tests.support.delay_relay import Address, DelayRelay, EventLoopThread, TrafficStats, UdpDelayRelay


class TrafficMeter(Protocol):
    def snapshot(self) -> TrafficStats: ...


class Endpoints(list):
    """The addresses a path yields, plus the meters that see its traffic (may be none)."""

    def __init__(self, addresses: Iterable[Address], meters: Iterable[TrafficMeter] = ()):
        super().__init__(addresses)
        self.meters = list(meters)


PathFn = Callable[[list[Address], float], ContextManager[list[Address]]]


@dataclass(frozen=True)
class PathSpec:
    name: str
    open: PathFn
    description: str


PATHS: dict[str, PathSpec] = {}


def register(name: str, description: str) -> Callable[[PathFn], PathFn]:
    def add(fn: PathFn) -> PathFn:
        PATHS[name] = PathSpec(name, fn, description)
        return fn
    return add


StartRelay = Callable[[DelayRelay], DelayRelay]


@contextmanager
def _relay_loop() -> Iterator[StartRelay]:
    """One event-loop thread for all of a path's relays; yields `start(relay) -> relay`."""
    loop_thread = EventLoopThread(name="bench-relays").start()
    started: list[DelayRelay] = []

    def start(relay: DelayRelay) -> DelayRelay:
        loop_thread.run(relay.start(), timeout=10)
        started.append(relay)
        return relay

    try:
        yield start
    finally:
        for relay in reversed(started):
            try:
                loop_thread.run(relay.stop(), timeout=5)
            except Exception:  # teardown goes on: the other relays and the loop still need stopping
                pass
        loop_thread.stop()


def _wire(start: StartRelay, target: Address, rtt_ms: float) -> Address:
    """The network leg towards `target`: `target` itself, or a delay relay in front of it."""
    return start(DelayRelay(target, rtt_ms=rtt_ms)).address if rtt_ms > 0 else target


@register("stock-direct", "llama-server --rpc straight to the rpc-servers (with RTT: via a delay relay)")
@contextmanager
def stock_direct(rpc_endpoints: list[Address], rtt_ms: float) -> Iterator[list[Address]]:
    if rtt_ms <= 0:
        yield Endpoints(rpc_endpoints)
        return
    with _relay_loop() as start:
        relays = [start(DelayRelay(endpoint, rtt_ms=rtt_ms)) for endpoint in rpc_endpoints]
        yield Endpoints([r.address for r in relays], meters=relays)


@register("relay", "one plain asyncio TCP relay hop per rpc-server (the Python relay reference)")
@contextmanager
def python_relay(rpc_endpoints: list[Address], rtt_ms: float) -> Iterator[list[Address]]:
    with _relay_loop() as start:
        hops = [start(DelayRelay(_wire(start, endpoint, rtt_ms))) for endpoint in rpc_endpoints]
        yield Endpoints([h.address for h in hops], meters=hops)


TLS_SERVER_NAME = "mesh-bench"


@contextmanager
def _self_signed_tls() -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """(server, client) TLS 1.3 contexts pinned to one fresh self-signed EC certificate.

    Both ends present and require that certificate (mutual TLS), as a mesh lane between two
    admitted nodes would; the handshake cost is paid once per connection, not per message.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        contexts = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            context = ssl.SSLContext(purpose)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cert_file, key_file)
            context.load_verify_locations(cert_file)
            context.verify_mode = ssl.CERT_REQUIRED
            contexts.append(context)
        yield contexts[0], contexts[1]


@register("tls-relay", "two-hop TLS-over-TCP lane: plain TCP -> TLS entry hop -> (wire) -> TLS exit hop -> rpc-server")
@contextmanager
def tls_relay(rpc_endpoints: list[Address], rtt_ms: float) -> Iterator[list[Address]]:
    with _self_signed_tls() as (server_tls, client_tls), _relay_loop() as start:
        entries = []
        for endpoint in rpc_endpoints:
            exit_hop = start(DelayRelay(endpoint, listen_ssl=server_tls))
            entries.append(start(DelayRelay(_wire(start, exit_hop.address, rtt_ms), target_ssl=client_tls,
                                            target_server_hostname=TLS_SERVER_NAME)))
        # Metered at the entry hop: payload bytes and round trips as llama-server sees them.
        yield Endpoints([e.address for e in entries], meters=entries)


@contextmanager
def _mesh_tunnels(rpc_endpoints: list[Address], rtt_ms: float, prefer: str) -> Iterator[list[Address]]:
    """The real gatewayd tunnel ends, one process per node: a worker end in front of each rpc-server,
    one host end with a forward per worker; the delay relay sits on the lane's leg between them
    (TCP, or UDP for the QUIC lane)."""
    import json
    import subprocess
    import sys

    from common.identity import NodeIdentity

    def spawn(*args: str) -> tuple[subprocess.Popen, dict]:
        proc = subprocess.Popen([sys.executable, "-m", "bench.tunnel_end", *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tunnel end {args[0]} did not start")
        return proc, json.loads(line)

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp, _relay_loop() as start:
        try:
            host_home = Path(tmp) / "host"
            host_id = NodeIdentity.load_or_create(host_home).node_id
            peers, relays = [], []
            for i, endpoint in enumerate(rpc_endpoints):
                _, hello = spawn("worker", str(Path(tmp) / f"w{i}"), host_id, f"{endpoint[0]}:{endpoint[1]}")
                if rtt_ms > 0:
                    lane = "quic" if prefer == "quic" else "tcp"
                    relay_type = UdpDelayRelay if lane == "quic" else DelayRelay
                    relay = start(relay_type(tuple(hello[lane][0]), rtt_ms=rtt_ms))
                    relays.append(relay)
                    hello[lane] = [relay.address]
                peers.append(json.dumps(hello))
            _, opened = spawn("host", str(host_home), prefer, *peers)
            yield Endpoints([("127.0.0.1", port) for port in opened["ports"]], meters=relays)
        finally:
            for proc in procs:
                proc.stdin.close()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@register("mesh", "the mesh's data tunnel between gatewayd ends: TLS over TCP lane (the default between reachable nodes)")
@contextmanager
def mesh_path(rpc_endpoints: list[Address], rtt_ms: float) -> Iterator[list[Address]]:
    with _mesh_tunnels(rpc_endpoints, rtt_ms, prefer="tcp") as endpoints:
        yield endpoints


@register("mesh-quic", "the mesh's QUIC lane, the path that always connects (delay from a UDP relay)")
@contextmanager
def mesh_quic_path(rpc_endpoints: list[Address], rtt_ms: float) -> Iterator[list[Address]]:
    with _mesh_tunnels(rpc_endpoints, rtt_ms, prefer="quic") as endpoints:
        yield endpoints
