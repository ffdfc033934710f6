"""One end of the mesh's data tunnel, as a gatewayd process would run it, for the benchmarks.

    python -m bench.tunnel_end worker HOME HOST_ID RPC_HOST:RPC_PORT
        serves RPC to that rpc-server for HOST_ID; prints {"node_id", "tcp", "quic"}
    python -m bench.tunnel_end host HOME PREFER PEER_JSON...
        opens one forward per peer ({"node_id", "tcp", "quic"}); prints {"ports": [...]}
Both print their stats as JSON when a line "stats" arrives on stdin, and exit when stdin closes.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from common.identity import NodeIdentity
from services.gatewayd.tunnels import PeerDataAddrs, TunnelService


async def serve_until_stdin_closes(service: TunnelService) -> None:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "stats":
            print(json.dumps(service.stats()), flush=True)
    await service.close()


async def worker(home: str, host_id: str, rpc: str) -> None:
    rpc_host, rpc_port = rpc.rsplit(":", 1)
    identity = NodeIdentity.load_or_create(Path(home))
    service = TunnelService(identity, is_member=lambda node_id: node_id == host_id,
                            local_target=lambda kind: (rpc_host, int(rpc_port)) if kind == "rpc" else None,
                            bind_host="127.0.0.1")
    tcp, quic = await service.start()
    print(json.dumps({"node_id": identity.node_id, "tcp": tcp, "quic": quic}), flush=True)
    await serve_until_stdin_closes(service)


async def host(home: str, prefer: str, peers: list[str]) -> None:
    identity = NodeIdentity.load_or_create(Path(home))
    members = {json.loads(p)["node_id"] for p in peers}
    service = TunnelService(identity, is_member=members.__contains__, local_target=lambda kind: None,
                            bind_host="127.0.0.1", prefer=prefer)
    await service.start()
    ports = []
    for text in peers:
        peer = json.loads(text)
        ports.append(await service.open_forward(PeerDataAddrs(peer["node_id"], [tuple(a) for a in peer["tcp"]],
                                                              [tuple(a) for a in peer["quic"]]), "rpc"))
    print(json.dumps({"node_id": identity.node_id, "ports": ports}), flush=True)
    await serve_until_stdin_closes(service)


def main() -> None:
    role, *rest = sys.argv[1:]
    asyncio.run(worker(*rest) if role == "worker" else host(rest[0], rest[1], rest[2:]))


if __name__ == "__main__":
    # MESH_TUNNEL_PROFILE=DIR: each end writes a cProfile of its whole run to DIR/<role>.prof (to
    # count the Python calls a decode token costs on the lane: bench_product's QUIC analysis).
    if profile_dir := os.environ.get("MESH_TUNNEL_PROFILE"):
        import cProfile
        cProfile.run("main()", str(Path(profile_dir) / f"{sys.argv[1]}.prof"))
    else:
        main()
