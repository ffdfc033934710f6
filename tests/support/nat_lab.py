"""A small Internet in network namespaces: a "public" segment (203.0.113.0/24, a documentation
range) on a bridge, STUN/TURN servers (real coturn) on it, and home sites behind nftables
masquerade routers that drop unsolicited inbound traffic, as home routers do (DESIGN.md, facts of
2026-12-01). Every namespace name carries a random tag; `close()` removes them all."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import Node
from tests.support.procs import kill_process_tree, wait_until

PUBLIC_PREFIX = "203.0.113"
STUN_IP = f"{PUBLIC_PREFIX}.3"
STUN2_IP = f"{PUBLIC_PREFIX}.4"
STUN_SERVERS = (f"{STUN_IP}:3478", f"{STUN2_IP}:3478")  # two, to tell cone from symmetric
TURN_USER = "meshuser"
TURN_PASS = "s3cret-relay-pass"
RELAY_URL = f"turn:{TURN_USER}:{TURN_PASS}@{STUN_IP}:3478"
STUN_ENV = {"MESH_STUN": ",".join(STUN_SERVERS)}  # = --stun A --stun B


def sh(*args: str, input: str | None = None) -> None:
    done = subprocess.run(args, capture_output=True, text=True, input=input)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def available() -> str | None:
    """Why the lab cannot run here, or None."""
    for tool in ("ip", "nft", "turnserver", "conntrack"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install -y iproute2 nftables coturn conntrack)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "needs root for network namespaces"
    return None


@dataclass
class Site:
    ns: str                 # where the node runs
    address: str            # its own address (private behind a NAT)
    router: str | None = None
    public_ip: str | None = None


@dataclass
class NatLab:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    relay: subprocess.Popen | None = None  # the TURN server, when start_servers(relay=True)
    _hosts: int = 10
    _servers_ns: str = ""
    _log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.wan = self._netns("wan")
        sh("ip", "-n", self.wan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.wan, "link", "set", "br0", "up")

    def _netns(self, name: str) -> str:
        ns = f"nat-{name}-{self.tag}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _plug(self, ns: str, address: str) -> str:
        """A veth from `ns` into the public bridge, with `address`/24 on it."""
        self._hosts += 1
        inside, outside = f"w{self._hosts}{self.tag}", f"b{self._hosts}{self.tag}"
        sh("ip", "link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.wan)
        sh("ip", "-n", self.wan, "link", "set", outside, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        sh("ip", "-n", ns, "link", "set", inside, "up")
        return inside

    def public_site(self, name: str, last_octet: int, *, drop_inbound: bool = False) -> Site:
        """A host with a public address; with `drop_inbound`, a host firewall drops unsolicited inbound."""
        ns = self._netns(name)
        address = f"{PUBLIC_PREFIX}.{last_octet}"
        self._plug(ns, address)
        if drop_inbound:
            sh("ip", "netns", "exec", ns, "nft", "-f", "-", input="""
table inet fw {
  chain input {
    type filter hook input priority 0; policy drop;
    iifname "lo" accept
    ct state established,related accept
  }
}""")
        return Site(ns, address)

    def home_site(self, name: str, index: int, *, symmetric: bool = False, udp_timeout: int | None = None) -> Site:
        """A host at 10.0.<index>.2 behind a router at 203.0.113.<100+index> that masquerades
        (keeping ports: a cone; `symmetric`: a random port per destination) and drops unsolicited
        inbound traffic. `udp_timeout`: how long it keeps an idle UDP mapping that saw one answer
        (Linux: 30 s; RFC 4787 REQ-5 asks a NAT for at least 120)."""
        router, host = self._netns(f"r{name}"), self._netns(name)
        public_ip = f"{PUBLIC_PREFIX}.{100 + index}"
        wan_dev = self._plug(router, public_ip)
        lan_r, lan_h = f"lr{index}{self.tag}", f"lh{index}{self.tag}"
        sh("ip", "link", "add", lan_r, "netns", router, "type", "veth", "peer", "name", lan_h, "netns", host)
        sh("ip", "-n", router, "addr", "add", f"10.0.{index}.1/24", "dev", lan_r)
        sh("ip", "-n", host, "addr", "add", f"10.0.{index}.2/24", "dev", lan_h)
        sh("ip", "-n", router, "link", "set", lan_r, "up")
        sh("ip", "-n", host, "link", "set", lan_h, "up")
        sh("ip", "-n", host, "route", "add", "default", "via", f"10.0.{index}.1")
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if udp_timeout is not None:
            sh("ip", "netns", "exec", router, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={udp_timeout}")
        mode = " random" if symmetric else ""
        sh("ip", "netns", "exec", router, "nft", "-f", "-", input=f"""
table ip nat {{
  chain post {{
    type nat hook postrouting priority 100;
    oifname "{wan_dev}" masquerade{mode}
  }}
}}
table inet fw {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ct state established,related accept
    iifname "{wan_dev}" drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    iifname "{wan_dev}" drop
  }}
}}""")
        return Site(host, f"10.0.{index}.2", router, public_ip)

    def start_coturn(self, ns: str, port: int, log_dir: Path, *, user: str | None = None,
                     listen_ip: str = STUN_IP) -> subprocess.Popen:
        """Real coturn on `listen_ip:port`; STUN always, TURN with long-term credentials when `user`."""
        args = ["ip", "netns", "exec", ns, "turnserver", "-n", "--listening-ip", listen_ip, "--relay-ip", listen_ip,
                "-p", str(port), "--no-tls", "--no-dtls", "--no-cli", "--simple-log",
                "--log-file", str(log_dir / f"coturn-{listen_ip}-{port}.log"),
                "--pidfile", str(log_dir / f"coturn-{listen_ip}-{port}.pid"),
                "--min-port", "49152", "--max-port", "49999", "--realm", "mesh.test", "-v"]
        args += ["--lt-cred-mech", "--user", user] if user else ["--stun-only"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_until(lambda: _udp_listening(ns, listen_ip, port), timeout=20, interval=0.1, what=f"coturn on {port}")
        return proc

    def start_servers(self, log_dir: Path, *, relay: bool) -> None:
        """STUN at STUN_IP and STUN2_IP (two, to tell cone from symmetric); with `relay`, the first is
        a TURN relay too (RELAY_URL)."""
        self._log_dir = log_dir
        self._servers_ns = self.public_site("turn" if relay else "stun", 3).ns
        if relay:
            self.start_relay()
        else:
            self.start_coturn(self._servers_ns, 3478, log_dir, listen_ip=STUN_IP)
        self.start_coturn(self.public_site("stun2", 4).ns, 3478, log_dir, listen_ip=STUN2_IP)

    def start_relay(self) -> None:
        assert self._log_dir is not None and self.relay is None
        self.relay = self.start_coturn(self._servers_ns, 3478, self._log_dir, user=f"{TURN_USER}:{TURN_PASS}")

    def kill_relay(self) -> None:
        """The relay dies, and every allocation on it."""
        assert self.relay is not None
        kill_process_tree(self.relay, grace=0, first=signal.SIGKILL)
        wait_until(lambda: not _udp_listening(self._servers_ns, STUN_IP, 3478), timeout=10, interval=0.1,
                   what="the relay gone")
        self.relay = None

    @property
    def relay_ns(self) -> str:
        """The namespace of the STUN/TURN server at STUN_IP (for a capture on its segment)."""
        return self._servers_ns

    def keep_ports(self, site: Site) -> None:
        """The site's router stops randomizing ports for new flows, as a user's router does once they
        switch it to a port-preserving ("cone") NAT mode, and applies that as a router reloads its
        ruleset: in one step, its flows starting afresh (as after they idle out), all but those to the
        relay's TURN port (3478), so that the relayed path carries on meanwhile. Linux then maps every
        new flow of a socket as that socket's remaining flow is mapped (nf_nat's find_appropriate_src:
        one mapping per socket, so hole punching works; peers learned it from the relay's
        XOR-MAPPED-ADDRESS). One nft transaction, then the flows deleted in one shell in the router:
        the cut flows are held for as short a time as the machine allows (a Python loop of
        `ip netns exec` per flow held them longer under load).
        A router that kept its old flows instead would keep a punch from ever meeting: the checks we
        send every second keep refreshing the old random mapping toward the peer, which is not the
        one the peer checks (#10: the pair stays relayed until it idles out, which it never does)."""
        assert site.router is not None
        out = subprocess.run(["ip", "netns", "exec", site.router, "nft", "-a", "list", "chain", "ip", "nat", "post"],
                             capture_output=True, text=True, check=True).stdout
        handle = next(line.rsplit("# handle ", 1)[1].strip() for line in out.splitlines() if "masquerade" in line)
        wan_dev = out.split('oifname "', 1)[1].split('"', 1)[0]
        # No new flow may leave while the old ones go (it would take over an old flow's random mapping):
        # the hold comes in the same transaction as the new rule, and goes once every flow but the
        # relay's is deleted (this kernel has no conntrack marks to delete them in one call).
        rules = (f'replace rule ip nat post handle {handle} oifname "{wan_dev}" masquerade\n'
                 "add table inet keepports\n"
                 "add chain inet keepports hold { type filter hook forward priority -10; }\n"
                 f'add rule inet keepports hold oifname "{wan_dev}" udp dport != 3478 drop\n')
        first_of_each = ('{ split("", f); for (i = 1; i <= NF; i++) { n = index($i, "="); '
                         'if (n && !(substr($i, 1, n - 1) in f)) f[substr($i, 1, n - 1)] = substr($i, n + 1) } '
                         'if (f["dport"] != "" && f["dport"] != "3478") print f["src"], f["dst"], f["sport"], f["dport"] }')
        script = ("nft -f - && conntrack -L -p udp 2>/dev/null | awk '" + first_of_each + "' | "
                  "while read s d sp dp; do conntrack -D -p udp -s $s -d $d --sport $sp --dport $dp >/dev/null 2>&1; "
                  "done; nft delete table inet keepports")
        sh("ip", "netns", "exec", site.router, "sh", "-c", script, input=rules)

    def close(self) -> None:
        for proc in self.procs:
            kill_process_tree(proc, grace=2)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _udp_listening(ns: str, ip: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hlun"], capture_output=True, text=True).stdout
    return f"{ip}:{port}" in out


# --- meshes in the lab (tests/integration/test_nat.py and bench/bench_nat_paths.py) ---------------

@contextlib.contextmanager
def mesh(tmp_path: Path, public: Site, *members: tuple[str, Site, list[str], dict]):
    """The rendezvous node P on `public`, then every member (name, site, flags, env) joining its token.
    Yields (seconds-clock time the joins started, [P, *members]); every node stops at the end."""
    p = Node(tmp_path / "p", netns=public.ns, extra=["--client"], env=STUN_ENV)
    nodes = [Node(tmp_path / name, netns=site.ns, extra=extra, env=env) for name, site, extra, env in members]
    try:
        p.start()
        token = wait_until(lambda: try_token(p), timeout=120, interval=0.5, what="P's token") if nodes else ""
        started = time.monotonic()
        for n in nodes:
            n.start("--join", token)
        yield started, [p, *nodes]
    finally:
        for n in [*reversed(nodes), p]:
            n.stop()


def try_token(node: Node) -> str | None:
    """The node's token, or None while meshctl is slow to answer (a loaded machine)."""
    try:
        return node.token()
    except subprocess.TimeoutExpired:
        return None


def in_netns(node: Node, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def ask(node: Node, max_tokens: int = 8, timeout: float = 180) -> dict:
    """One streamed chat at `node`'s :9337 (tests/support/ask.py): status, seconds, decode rates."""
    out = in_netns(node, "-m", "tests.support.ask", node.api, str(max_tokens), str(timeout), timeout=timeout + 30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_split_serving(host: Node, members: set[str]) -> None:
    wait_until(lambda: {m["node_id"] for m in host.status().get("electd", {}).get("members", [])} == members
               and host.runner().get("llama", {}).get("state") == "ready", timeout=300, interval=1.0,
               what="the split serving")


def relay_bytes(nodes: list[Node], service: str = "meshd") -> int:
    return sum(r["bytes_out"] + r["bytes_in"] for n in nodes for r in n.status()[service].get("relays", []))
