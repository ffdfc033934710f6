"""The host's llama-server reaches a worker's rpc-server over llama.cpp's own mutual TLS, pinned to node
ids (llama.cpp/patches/0002-rpc-mutual-tls.patch), where the worker's address connects, and through the
tunnel where it does not; the rpc-server admits the plan's host only."""
from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import psutil
import pytest

from common import addresses
from common.binaries import find_binaries
from common.identity import NodeIdentity
from tests.integration.harness import Node, meshctl
from tests.support.llama_procs import start_rpc_server
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.slow
RPC_HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)  # the HELLO command a client opens with


def split_host_and_worker(root, b_flags=()) -> tuple[Node, Node]:
    a = Node(root / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1"])
    b = Node(root / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1", *b_flags])
    a.start()
    b.start("--join", a.token())
    b_id = b.node_id()
    wait_until(lambda: (a.runner().get("llama", {}).get("state") == "ready"
                        and b_id in a.runner().get("rpc_paths", {})), timeout=300, interval=0.5,
               what="A serving the split over B")
    return a, b


def answers_hello(address, identity: NodeIdentity | None) -> bool:
    """A TLS 1.3 client (with `identity`'s certificate, or none) says HELLO: does the rpc-server answer?"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the server's pin is llama-server's part
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if identity:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    try:
        with socket.create_connection(address, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(RPC_HELLO)
            return len(tls.recv(64)) > 0
    except (ssl.SSLError, OSError):
        return False


def test_the_host_serves_over_direct_tls_and_only_the_host_is_in_the_workers_allow_file(tmp_path):
    a, b = split_host_and_worker(tmp_path)
    try:
        a_id, b_id = a.node_id(), b.node_id()
        assert a.runner()["rpc_paths"][b_id].startswith("direct TLS 127.0.0.1:")
        assert a.chat("Name three colours.", max_tokens=8)
        status = meshctl("status", home=a.home, timeout=30).stdout
        assert f"rpc path to {b_id[:8]}: direct TLS" in status, status
        assert "mutual TLS, only the plan's host" in meshctl("status", home=b.home, timeout=30).stdout
        assert f"rpc-tls: accepted node={a_id}" in (b.home / "logs" / "rpc-server.log").read_text(errors="replace")
        assert (addresses.run_dir(b.home) / "rpc-allow").read_text().split() == [a_id]
        # The tunnel to B carried none of it: no Python hop on the data path.
        tunnels = {t["node_id"]: t for t in a.status()["gatewayd"]["tunnels"]}
        assert tunnels.get(b_id, {}).get("bytes_out", 0) == 0, tunnels
    finally:
        b.stop()
        a.stop()


def test_a_worker_whose_address_does_not_connect_is_reached_through_the_tunnel(tmp_path):
    closed = free_port()  # nothing listens there: the host's connect check fails
    a, b = split_host_and_worker(tmp_path, b_flags=["--advertise-rpc", f"127.0.0.1:{closed}"])
    try:
        b_id = b.node_id()
        assert a.runner()["rpc_paths"][b_id] == "tunnel, TLS inside"
        assert a.chat("Name three colours.", max_tokens=8)
        tunnels = {t["node_id"]: t for t in a.status()["gatewayd"]["tunnels"]}
        assert tunnels[b_id]["bytes_out"] > 0
        # TLS end to end: B's rpc-server admitted A's node id through the tunnel too.
        assert f"rpc-tls: accepted node={a.node_id()}" in (b.home / "logs" / "rpc-server.log").read_text(errors="replace")
    finally:
        b.stop()
        a.stop()


def test_an_address_that_connects_but_is_not_the_worker_ends_on_the_tunnel(tmp_path):
    """e.g. a wrong port forward: the connect check passes, TLS to the pinned node id does not."""
    impostor = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up() -> None:
        impostor.settimeout(0.5)
        while not stop.is_set():
            try:
                impostor.accept()[0].close()
            except OSError:
                pass
    threading.Thread(target=hang_up, daemon=True).start()
    a, b = split_host_and_worker(tmp_path, b_flags=["--advertise-rpc", f"127.0.0.1:{impostor.getsockname()[1]}"])
    try:
        wait_until(lambda: a.runner().get("llama", {}).get("state") == "ready"
                   and a.runner()["rpc_paths"].get(b.node_id()) == "tunnel, TLS inside", timeout=180, interval=0.5,
                   what="A serving over the tunnel after the direct path failed")
        assert "failed 2 times in a row over the direct path" in (a.home / "logs" / "runnerd.log").read_text()
        assert a.chat("Name three colours.", max_tokens=8)
    finally:
        stop.set()
        impostor.close()
        b.stop()
        a.stop()


def serving_split_over(node: Node, me: str, worker: str) -> bool:
    """`node` hosts a split that includes `worker`, with the llama-server for that plan ready."""
    status = node.status()
    plan, runner = status.get("electd", {}), status.get("runnerd", {})
    return (plan.get("state") == "split" and plan.get("host") == me
            and worker in [m["node_id"] for m in plan.get("members", [])]
            and runner.get("llama", {}).get("state") == "ready" and runner.get("llama_plan_key") == plan.get("key"))


def freeze(node: Node) -> list[psutil.Process]:
    """SIGSTOP every process of `node` (ours: its meshctl up and all below it). Its kernel keeps its TCP
    connections open and answering, as for a host that vanished behind a partition: no FIN, no RST."""
    root = psutil.Process(node.proc.pid)
    family = [root, *root.children(recursive=True)]
    for p in family:
        p.send_signal(signal.SIGSTOP)
    return family


def test_the_next_host_serves_through_a_worker_whose_former_host_vanished_holding_its_connection(tmp_path):
    """B's TLS rpc-server serves one client at a time. A, its host, freezes with its connection open;
    C, elected next, must get through B within bounded time: B restarts its rpc-server once A is no
    longer allowed (runnerd's recycle). Without that, C queues behind A's connection for good."""
    a = Node(tmp_path / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1"])
    b = Node(tmp_path / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1"])
    c = Node(tmp_path / "c", extra=["--split", "--max-vram", "6G", "--bind-host", "127.0.0.1"])
    frozen: list[psutil.Process] = []
    try:
        a.start()
        token = a.token()
        b.start("--join", token)
        c.start("--join", token)
        a_id, b_id, c_id = a.node_id(), b.node_id(), c.node_id()
        wait_until(lambda: serving_split_over(a, a_id, b_id) and serving_split_over(a, a_id, c_id)
                   and a.runner().get("rpc_paths", {}).get(b_id, "").startswith("direct TLS"), timeout=300,
                   interval=0.5, what="A serving a split over B and C, B over direct TLS")
        assert a.chat("Name three colours.", max_tokens=8)
        rpc_pid = b.runner()["rpc"]["pid"]
        peers = {c.laddr.port for c in psutil.Process(rpc_pid).net_connections("tcp")
                 if c.status == psutil.CONN_ESTABLISHED}
        assert peers, "A's llama-server holds a connection to B's rpc-server"
        frozen = freeze(a)
        cut = time.monotonic()
        wait_until(lambda: serving_split_over(c, c_id, b_id), timeout=120, interval=0.5,
                   what="C serving a split over B after A vanished holding B's rpc-server")
        served_after = time.monotonic() - cut
        assert c.chat("Name three colours.", max_tokens=8)
        # Direct or through the tunnel (C's direct check may meet B's rpc-server mid-restart): either way
        # B's one rpc-server, which A's connection would hold.
        print(f"C served through B ({c.runner()['rpc_paths'][b_id]}) {served_after:.1f} s after A froze "
              f"(load {os.getloadavg()[0]:.1f})")
        assert "ggml-rpc-server: restarting it" in (b.home / "logs" / "runnerd.log").read_text()
        assert b.runner()["rpc"]["pid"] != rpc_pid
    finally:
        for p in frozen:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        for n in (c, b, a):
            n.stop()


def test_the_rpc_server_admits_the_allowed_node_only(tmp_path):
    """ggml-rpc-server serves one client at a time, so this one is alone, not a mesh's busy worker."""
    bins = find_binaries(None)
    host, worker, member = (NodeIdentity.load_or_create(tmp_path / n) for n in ("host", "worker", "member"))
    allow = tmp_path / "allow"
    allow.write_text(f"# the plan's host\n{host.node_id}\n")
    tls = ["--tls-cert", str(worker.cert_path), "--tls-key", str(worker.key_path), "--tls-allow", str(allow)]
    server = start_rpc_server(bins, tmp_path, tls=tls)
    try:
        assert not answers_hello(server.address, None)  # no certificate
        assert not answers_hello(server.address, member)  # a valid node certificate, not in the allow file
        with socket.create_connection(server.address, timeout=10) as plain:  # no TLS at all
            plain.sendall(RPC_HELLO)
            assert plain.recv(64) == b""
        assert answers_hello(server.address, host)  # and the host still gets in
        log = server.log_path.read_text(errors="replace")
        assert "rpc-tls: refused 127.0.0.1:" in log and "peer did not return a certificate" in log
        assert f"rpc-tls: refused node={member.node_id} from 127.0.0.1:" in log and "not in the allow file" in log
        assert f"rpc-tls: accepted node={host.node_id}" in log
        # The allow file is read at each connection: the member, once listed, gets in without a restart.
        allow.write_text(f"{host.node_id}\n{member.node_id}\n")
        assert answers_hello(server.address, member)
        # A client pins the server's node id: the right server under another id is refused by the client.
        out = subprocess.run([str(bins.llama_server), "--rpc", f"{member.node_id}@127.0.0.1:{server.port}",
                              "--list-devices"], capture_output=True, text=True, timeout=60,
                             env=os.environ | {"GGML_RPC_TLS_CERT": str(host.cert_path),
                                               "GGML_RPC_TLS_KEY": str(host.key_path)})
        assert f"is node {worker.node_id}, not the pinned {member.node_id}" in out.stdout + out.stderr
    finally:
        server.stop()
    base = [str(bins.rpc_server), "--host", "127.0.0.1", "--port", str(free_port())]
    out = subprocess.run([*base, "--tls-cert", str(worker.cert_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--tls-cert, --tls-key and --tls-allow go together" in out.stderr
    out = subprocess.run([*base, *tls[:4], "--tls-allow", str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "cannot read the allow file" in out.stderr
