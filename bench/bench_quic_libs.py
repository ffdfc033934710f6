"""qh3 against aioquic: the same QUIC micro-benchmark over loopback, one library at a time.

Client and server are separate processes (as two nodes' gatewayd would be), both on the library
under test, with the same TLS 1.3 certificate and the libraries' default settings:

    handshake   connect + handshake + close, median of N, in ms
    bulk        32 MB on one stream client -> server, until the server has it all, in MB/s
    ping-pong   64 bytes each way on one stream, median round trip in us (llama.cpp RPC's pattern:
                small request, wait, small answer)
    rpc-4k      4 KB request, 4 KB answer, median round trip in us

    .venv/bin/pip install aioquic        # the product uses qh3; aioquic is only compared here
    python -m bench.bench_quic_libs      # both libraries; --libs qh3 ; --quick

Writes bench/results/quic-libs.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALPN = ["mesh-bench"]
LIBS = ("aioquic", "qh3")


def _lib(name: str):
    """(connect, serve, QuicConfiguration) of `name`."""
    asyncio_mod = importlib.import_module(f"{name}.asyncio")
    config_mod = importlib.import_module(f"{name}.quic.configuration")
    return asyncio_mod.connect, asyncio_mod.serve, config_mod.QuicConfiguration


def _write_cert(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mesh-bench")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


# --- server (a child process) ---------------------------------------------------------------

async def _serve(lib: str, cert: str, key: str) -> None:
    _, serve, QuicConfiguration = _lib(lib)
    config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    config.load_cert_chain(cert, key)

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.ensure_future(_handle(reader, writer))

    server = await serve("127.0.0.1", 0, configuration=config, stream_handler=on_stream)
    port = server._transport.get_extra_info("sockname")[1]
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    server.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    op = await reader.readexactly(1)
    if op == b"S":  # sink: count until EOF, answer the count
        total = 0
        while data := await reader.read(1 << 16):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
        writer.write_eof()
    elif op == b"E":  # echo each message of the given size
        size = int.from_bytes(await reader.readexactly(4), "big")
        try:
            while True:
                writer.write(await reader.readexactly(size))
        except asyncio.IncompleteReadError:
            writer.write_eof()


# --- client ---------------------------------------------------------------------------------

async def _measure(lib: str, port: int, quick: bool) -> dict:
    connect, _, QuicConfiguration = _lib(lib)

    def config():
        c = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name="mesh-bench")
        c.verify_mode = ssl.CERT_NONE
        return c

    handshakes = []
    for _ in range(5 if quick else 20):
        started = time.perf_counter()
        async with connect("127.0.0.1", port, configuration=config()) as conn:
            handshakes.append((time.perf_counter() - started) * 1000)
            conn.close()
    result = {"handshake_ms": statistics.median(handshakes)}
    async with connect("127.0.0.1", port, configuration=config()) as conn:
        size = (8 if quick else 32) << 20
        reader, writer = await conn.create_stream()
        chunk = os.urandom(1 << 16)
        started = time.perf_counter()
        writer.write(b"S")
        for _ in range(size // len(chunk)):
            writer.write(chunk)  # neither library's stream writer has drain(): no write backpressure
            await asyncio.sleep(0)
        writer.write_eof()
        received = int.from_bytes(await reader.readexactly(8), "big")
        seconds = time.perf_counter() - started
        assert received == size, (received, size)
        result["bulk_MBps"] = size / seconds / 1e6
        for label, msg_size, n in (("pingpong_us", 64, 200 if quick else 1000), ("rpc4k_us", 4096, 100 if quick else 500)):
            reader, writer = await conn.create_stream()
            writer.write(b"E" + msg_size.to_bytes(4, "big"))
            message, times = os.urandom(msg_size), []
            for _ in range(n):
                started = time.perf_counter()
                writer.write(message)
                assert await reader.readexactly(msg_size) == message
                times.append((time.perf_counter() - started) * 1e6)
            writer.write_eof()
            result[label] = statistics.median(times)
        conn.close()
    return result


def run_lib(lib: str, quick: bool, folder: Path) -> dict:
    cert, key = _write_cert(folder)
    server = subprocess.Popen([sys.executable, "-m", "bench.bench_quic_libs", "--serve", lib, str(cert), str(key)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(server.stdout.readline())["port"]
        module = importlib.import_module(lib)
        return {"version": getattr(module, "__version__", "?"), **asyncio.run(_measure(lib, port, quick))}
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--rounds", type=int, default=3, help="runs per library, interleaved (median reported)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", nargs=3, metavar=("LIB", "CERT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quic-libs.json")
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(*args.serve))
        return 0
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    for lib in libs:
        try:
            importlib.import_module(lib)
        except ImportError:
            print(f"bench_quic_libs: {lib} is not installed; `.venv/bin/pip install {lib}` or pass --libs", file=sys.stderr)
            return 2
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    with tempfile.TemporaryDirectory(prefix="quic-libs-") as tmp:
        for round_ in range(1 if args.quick else args.rounds):
            for lib in libs:  # interleaved: a neighbour's load hits both alike
                runs[lib].append(run_lib(lib, args.quick, Path(tmp)))
                print(f"round {round_} {lib}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in runs[lib][-1].items()), flush=True)
    summary = {lib: {k: (statistics.median(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k])
                     for k in rs[0]} for lib, rs in runs.items()}
    print("\n| library | handshake ms | bulk MB/s | ping-pong 64 B us | 4 KB round trip us |\n| --- | --- | --- | --- | --- |")
    for lib, s in summary.items():
        print(f"| {lib} {s['version']} | {s['handshake_ms']:.1f} | {s['bulk_MBps']:.1f} | {s['pingpong_us']:.0f} | "
              f"{s['rpc4k_us']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                    "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
