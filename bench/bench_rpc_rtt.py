"""What one RPC round trip costs on loopback: a real ggml-rpc-server answering a small command
(GET_ALIGNMENT, 13 bytes out, 16 back), over plain TCP (stock) and over our patch's mutual TLS 1.3
(llama.cpp/patches/0002-rpc-mutual-tls.patch), the path the host now takes to a worker whose
address connects. The client is Python (a plain socket, or `ssl` with a node certificate), so the
TLS row also pays Python's side of TLS: an upper bound for llama-server's C++ client.

    python -m bench.bench_rpc_rtt [--count 5000] [--repeat 3] [--json out.json]

Rows are measured in interleaved rounds; the best round's median and p90 are shown (µs).
"""
from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import struct
import tempfile
import time
from pathlib import Path

from common.binaries import find_binaries
from common.identity import NodeIdentity
from tests.support.llama_procs import start_rpc_server

HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)
GET_ALIGNMENT = bytes([1]) + struct.pack("<Q", 4) + struct.pack("<I", 0)


def _recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("rpc-server closed the connection")
        data += chunk
    return data


def round_trips(sock, count: int) -> list[float]:
    sock.sendall(HELLO)
    size = struct.unpack("<Q", _recv_exactly(sock, 8))[0]
    _recv_exactly(sock, size)
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.sendall(GET_ALIGNMENT)
        _recv_exactly(sock, 16)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bins = find_binaries(None)
    if not bins.rpc_tls:
        raise SystemExit(f"error: {bins.rpc_server} has no --tls-allow; build llama.cpp with OpenSSL (`just build`)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        host, worker = NodeIdentity.load_or_create(tmp / "host"), NodeIdentity.load_or_create(tmp / "worker")
        (tmp / "allow").write_text(host.node_id + "\n")
        servers = {
            "tcp (stock)": start_rpc_server(bins, tmp, name="rpc-tcp", threads=1),
            "mutual TLS 1.3": start_rpc_server(bins, tmp, name="rpc-tls", threads=1, tls=[
                "--tls-cert", str(worker.cert_path), "--tls-key", str(worker.key_path), "--tls-allow", str(tmp / "allow")]),
        }
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the bench trusts its own server
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(host.cert_path, host.key_path)
        best: dict[str, list[float]] = {}
        try:
            for _ in range(args.repeat):
                for name, server in servers.items():
                    raw = socket.create_connection(server.address, timeout=10)
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock = ctx.wrap_socket(raw) if "TLS" in name else raw
                    with sock:
                        times = round_trips(sock, args.count)
                    if name not in best or statistics.median(times) < statistics.median(best[name]):
                        best[name] = times
                    time.sleep(0.2)  # the server serves one client at a time: let it see this one go
        finally:
            for server in servers.values():
                server.stop()
    rows = [{"path": name, "median_us": statistics.median(t), "p90_us": statistics.quantiles(t, n=10)[-1],
             "count": len(t)} for name, t in best.items()]
    print(f"{'path':<16} {'median µs':>10} {'p90 µs':>8}")
    for r in rows:
        print(f"{r['path']:<16} {r['median_us']:>10.1f} {r['p90_us']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
