"""Micro-benchmark of the data-plane tunnels: request/response latency and bulk throughput through
direct TCP, the tls-tcp lane and the quic lane (services/gatewayd/tunnels.py), on loopback; and, to
tell where a lane's time goes, one and two plain asyncio TCP relays (tests/support/delay_relay.py,
each its own process, no TLS, no framing): the cost of a Python hop alone.

    python -m bench.bench_tunnel                    # all three paths
    python -m bench.bench_tunnel --paths quic --pings 5000 --bulk-mb 64 --json out.json

Every party is its own process, as in a deployment: the bench client, gateway A (the forward
port), gateway B (the serving side) and the target (a threaded echo/sink server). Paths are
measured in interleaved rounds and the best round is shown (the machine's other load adds noise,
never speed). Rows:
  ping 1 KiB   — median / p90 round trip of a 1 KiB message echoed back (µs)
  upload       — one-way bulk to a sink that counts bytes (MB/s, 1 MB = 10^6 bytes)
  echo         — bulk sent and echoed back at once (MB/s each way)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATHS = ("direct", "relay1", "relay2", "tls-tcp", "quic")
RELAY_HOPS = {"relay1": 1, "relay2": 2}


# --- the target: echo ("rpc") and sink ("http"), blocking threads so it costs the paths little --

def _echo_client(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            conn.sendall(view[:n])
        conn.shutdown(socket.SHUT_WR)


def _sink_client(conn: socket.socket) -> None:
    with conn:
        buf = bytearray(1 << 20)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(total.to_bytes(8, "big"))
        conn.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def run_target() -> None:
    ports = {}
    for kind, handler in (("rpc", _echo_client), ("http", _sink_client)):
        listener = socket.create_server(("127.0.0.1", 0))
        ports[kind] = listener.getsockname()[1]
        threading.Thread(target=_serve, args=(listener, handler), daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the parent closes our stdin


# --- the gateways -----------------------------------------------------------------------------

async def _gateway_b(home: str, target_ports: dict) -> None:
    from common.identity import NodeIdentity
    from services.gatewayd.tunnels import TunnelService
    identity = NodeIdentity.load_or_create(Path(home))
    service = TunnelService(identity, is_member=lambda node_id: True,
                            local_target=lambda kind: ("127.0.0.1", target_ports[kind]) if kind in target_ports else None,
                            bind_host="127.0.0.1")
    tcp, quic = await service.start()
    print(json.dumps({"node_id": identity.node_id, "tcp": tcp, "quic": quic, "kinds": sorted(target_ports)}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await service.close()


async def _gateway_a(home: str, peer: dict, prefer: str) -> None:
    from common.identity import NodeIdentity
    from services.gatewayd.tunnels import PeerDataAddrs, TunnelService
    identity = NodeIdentity.load_or_create(Path(home))
    service = TunnelService(identity, is_member=lambda node_id: True, local_target=lambda kind: None,
                            bind_host="127.0.0.1", prefer=prefer)
    await service.start()
    addrs = PeerDataAddrs(peer["node_id"], [tuple(a) for a in peer["tcp"]], [tuple(a) for a in peer["quic"]])
    ports = {kind: await service.open_forward(addrs, kind) for kind in peer["kinds"]}
    print(json.dumps(ports), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(service.stats()), file=sys.stderr, flush=True)
    await service.close()


# --- measurements (blocking sockets in the bench client: no event loop in the measured path) ----

def measure_ping(port: int, count: int, size: int = 1024) -> tuple[float, float]:
    message = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(size)
        samples = []
        for i in range(count + count // 10):
            started = time.perf_counter()
            sock.sendall(message)
            view, got = memoryview(buf), 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError("path closed during ping")
                got += n
            if i >= count // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - started)
        if bytes(buf) != message:
            raise AssertionError("ping payload corrupted")
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.9)] * 1e6


def measure_upload(port: int, total: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            part = sock.recv(8 - len(reply))
            if not part:
                raise ConnectionError("path closed before the sink's count")
            reply += part
        elapsed = time.perf_counter() - started
    if int.from_bytes(reply, "big") != sent:
        raise AssertionError(f"sink counted {int.from_bytes(reply, 'big')} of {sent} bytes")
    return sent / elapsed / 1e6


def measure_echo(port: int, total: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        received = 0

        def drain() -> None:
            nonlocal received
            buf = bytearray(1 << 20)
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                received += n
        reader = threading.Thread(target=drain)
        started = time.perf_counter()
        reader.start()
        sent = 0
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reader.join()
        elapsed = time.perf_counter() - started
    if received != sent:
        raise AssertionError(f"echo returned {received} of {sent} bytes")
    return sent / elapsed / 1e6


# --- orchestration ------------------------------------------------------------------------------

def _spawn(*args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {proc.stderr.read()}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(input="", timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _spawn_relay(target_port: int) -> tuple[subprocess.Popen, int]:
    """A plain asyncio TCP relay (the delay relay at 0 ms) in its own process."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.delay_relay", "--target", f"127.0.0.1:{target_port}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "relaying TCP 127.0.0.1:PORT -> ..."
    if not line.startswith("relaying"):
        proc.kill()
        raise RuntimeError(f"relay did not start: {proc.stderr.read()}")
    return proc, int(line.split()[2].rsplit(":", 1)[1])


def run_bench(paths: list[str], pings: int, bulk_mb: int, repeat: int) -> list[dict]:
    """All paths stay up while the measurements run `repeat` rounds, interleaved, so that
    interference from the rest of the machine hits every path alike; each row keeps the best
    round (lowest ping median, highest throughputs)."""
    work = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    procs: list[subprocess.Popen] = []
    try:
        target, target_ports = _spawn("--role", "target")
        procs.append(target)
        forward_ports = {"direct": target_ports}
        relays: list[subprocess.Popen] = []
        for path in (p for p in paths if p in RELAY_HOPS):
            ports = dict(target_ports)
            for _ in range(RELAY_HOPS[path]):
                for kind in ports:
                    relay, ports[kind] = _spawn_relay(ports[kind])
                    relays.append(relay)
            forward_ports[path] = ports
        if set(paths) - {"direct", *RELAY_HOPS}:
            gateway_b, peer = _spawn("--role", "gateway-b", str(work / "b"), json.dumps(target_ports))
            procs.append(gateway_b)
            for path in paths:
                if path in ("tls-tcp", "quic"):
                    prefer = "tcp" if path == "tls-tcp" else "quic"
                    gateway_a, forward_ports[path] = _spawn("--role", "gateway-a", str(work / f"a-{prefer}"),
                                                            json.dumps(peer), prefer)
                    procs.insert(0, gateway_a)
        for path in paths:
            measure_ping(forward_ports[path]["rpc"], 50)  # opens the lane (QUIC connection, TLS code paths)
        rounds: dict[str, list[dict]] = {path: [] for path in paths}
        for round_number in range(repeat):
            for path in paths:
                ports = forward_ports[path]
                median, p90 = measure_ping(ports["rpc"], pings)
                rounds[path].append({"ping_median_us": median, "ping_p90_us": p90,
                                     "upload_MBps": measure_upload(ports["http"], bulk_mb << 20),
                                     "echo_MBps_each_way": measure_echo(ports["rpc"], bulk_mb << 20)})
            print(f"  round {round_number + 1}/{repeat} done", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            _stop(proc)
        for relay in locals().get("relays", []):
            relay.terminate()
            relay.wait(timeout=10)
    rows = []
    for path in paths:
        best_ping = min(rounds[path], key=lambda r: r["ping_median_us"])
        rows.append({"path": path,
                     "ping_median_us": round(best_ping["ping_median_us"], 1),
                     "ping_p90_us": round(best_ping["ping_p90_us"], 1),
                     "upload_MBps": round(max(r["upload_MBps"] for r in rounds[path]), 1),
                     "echo_MBps_each_way": round(max(r["echo_MBps_each_way"] for r in rounds[path]), 1),
                     "rounds": rounds[path]})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'path':<9} {'ping 1KiB median µs':>20} {'p90 µs':>8} {'upload MB/s':>12} {'echo MB/s each way':>19}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['path']:<9} {r['ping_median_us']:>20.0f} {r['ping_p90_us']:>8.0f} "
              f"{r['upload_MBps']:>12.1f} {r['echo_MBps_each_way']:>19.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["target", "gateway-a", "gateway-b"], help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--pings", type=int, default=3000, help="1 KiB round trips per path")
    parser.add_argument("--bulk-mb", type=int, default=64, help="MiB per bulk measurement")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.role == "target":
        run_target()
        return
    if args.role == "gateway-b":
        asyncio.run(_gateway_b(args.role_args[0], json.loads(args.role_args[1])))
        return
    if args.role == "gateway-a":
        asyncio.run(_gateway_a(args.role_args[0], json.loads(args.role_args[1]), args.role_args[2]))
        return
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    rows = run_bench(paths, args.pings, args.bulk_mb, args.repeat)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
