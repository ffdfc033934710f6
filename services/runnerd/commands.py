"""Command lines for llama.cpp's processes — pure functions of the plan, so they are testable alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.binaries import Binaries
from common.messages import ModelInfo, Plan


TEMPLATES = Path(__file__).parent / "templates"


# llama.cpp's --override-tensor patterns are searched, not matched: unanchored, `output\.weight` would
# also pull every layer's `attn_output.weight` onto the host (a round trip per layer per token).
OUTPUT_ON_HOST = r"^output\.weight$=CPU,^token_embd\.weight$=CPU"


class NotReady(Exception):
    """The plan needs something that is not there yet (e.g. a tunnel); the message says what."""


@dataclass(frozen=True)
class RpcTls:
    """This node's certificate and key (common.identity), and the file of node ids its rpc-server admits."""
    cert: Path
    key: Path
    allow: Path


def rpc_server_args(binaries: Binaries, port: int, model: ModelInfo, *, device: str | None,
                    threads: int | None, host: str = "127.0.0.1", tls: RpcTls | None = None) -> list[str]:
    """ggml-rpc-server: on loopback without TLS, or with `tls` on `host` (mutual TLS, pinned to node ids)."""
    args = [str(binaries.rpc_server), "--host", host if tls else "127.0.0.1", "--port", str(port)]
    if tls:
        args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-allow", str(tls.allow)]
    if device:
        args += ["--device", device]
    if threads:
        args += ["--threads", str(threads)]
    if binaries.loads_local_weights:
        args += ["--gguf", model.path]
    return args


def rpc_endpoint(worker: str, *, tls: bool, direct: tuple[str, int] | None, forward: int | None) -> str | None:
    """The `--rpc` endpoint of one worker: its TLS rpc-server directly, else through the gateway's loopback
    forward (TLS end to end when the worker's rpc-server speaks it), else None (no path yet).
    `NODEID@` pins the server's node id (our patch): a TLS endpoint must be that worker and no other."""
    if tls and direct:
        return f"{worker}@{direct[0]}:{direct[1]}"
    if forward:
        return f"{worker}@127.0.0.1:{forward}" if tls else f"127.0.0.1:{forward}"
    return None


def llama_server_args(binaries: Binaries, port: int, model: ModelInfo, plan: Plan, me: str,
                      rpc_endpoints: dict[str, str], *, backend: str, ctx_size: int,
                      threads: int | None, speculation: list[str] = (),
                      local_weights: list[int] | None = None) -> list[str]:
    """llama-server for this node as host of `plan`. Remote members are reached at `rpc_endpoints`
    (rpc_endpoint: direct TLS, or the gateway's loopback forwards); the host uses its own device
    directly, not its own rpc-server. `speculation`: its flags (services/runnerd/speculation.py), the
    same solo or split. `local_weights`: the host's own GPUs as tensor_split takes them (None: one,
    the backend's default)."""
    # --metrics: runnerd reads the draft acceptance from it (loopback only, like the server itself).
    args = [str(binaries.llama_server), "--model", model.path, "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(ctx_size), "--no-webui", "--alias", model.name, "--metrics", *speculation,
            # -lv 4: libllama's load report (which device holds how much: runnerd's `placement`) is at
            # trace level in this llama.cpp; it adds a few lines per request, none per token.
            "-lv", "4"]
    if threads:
        args += ["--threads", str(threads)]
    if model.embeddings:
        args += ["--embeddings"]  # an embedding model serves /v1/embeddings (and no chat)
    if binaries.has_fit:
        # runnerd sets the context size and the layers itself, so llama.cpp's fit pass would change
        # nothing; it would still read the model's vocabulary a second time (~0.35 s for Gemma's 262k
        # tokens) and, with RPC, make ~20 round trips to every worker before loading.
        args += ["--fit", "off"]
    if not model.has_chat_template and model.arch.startswith("gemma"):
        # Such GGUFs (Gemma 3 270M from the registry among them) would get chatml; `--chat-template gemma` is taken
        # as a literal Jinja template by this llama.cpp, so we ship the template itself.
        args += ["--chat-template-file", str(TEMPLATES / "gemma.jinja")]
    remote = [m for m in plan.members if m.node_id != me]
    if not remote:
        return args + ["--n-gpu-layers", "999"]
    missing = [m.node_id[:8] for m in remote if m.node_id not in rpc_endpoints]
    if missing:
        raise NotReady(f"waiting for tunnels to {', '.join(missing)}")
    args += ["--rpc", ",".join(rpc_endpoints[m.node_id] for m in remote)]
    if backend == "cpu":
        # A CPU host has no device of its own to offload to: its share is the layers it keeps. The
        # output matrix (or the embedding tied to it), which llama.cpp would offload with the last
        # layers, stays here: otherwise each token's logits (1 MB for a 262k vocabulary) cross the
        # network, and the last worker loads a matrix that is 2/3 of the default model.
        # llama.cpp counts the output layer among --n-gpu-layers: n_layers - kept + 1 leaves `kept` here.
        my_ratio = next((m.ratio for m in plan.members if m.node_id == me), 0.0)
        kept = min(round(my_ratio * model.n_layers), model.n_layers - 1)
        args += ["--n-gpu-layers", str(model.n_layers - kept + 1),
                 "--tensor-split", layer_split(tensor_split(plan, me, []), model.n_layers - kept),
                 "--override-tensor", OUTPUT_ON_HOST]
    else:
        args += ["--n-gpu-layers", "999",
                 "--tensor-split", layer_split(tensor_split(plan, me, local_weights or [1]), model.n_layers)]
    return args


def tensor_split(plan: Plan, me: str, local_weights: list[int]) -> list[float]:
    """--tensor-split in this llama.cpp's device order: the RPC devices first (src/llama.cpp puts them
    at the front), server by server in --rpc order and each server's devices in its own order, then
    the host's own GPUs. Each member's ratio is spread over its devices by their memory.
    `local_weights`: the host's GPUs (Offer.local_weights); empty for a CPU host, whose share is the
    layers it keeps, so the workers' shares are normalised among themselves."""
    def spread(ratio: float, weights: list[int]) -> list[float]:
        total = sum(weights)
        return [ratio * w / total for w in weights] if total > 0 else [ratio / len(weights)] * len(weights)

    remote = [m for m in plan.members if m.node_id != me]
    shares = [s for m in remote for s in spread(m.ratio, m.devices or [m.memory_bytes])]
    if local_weights:
        my_ratio = next((m.ratio for m in plan.members if m.node_id == me), 0.0)
        shares += spread(my_ratio, local_weights)
    total = sum(shares) or 1.0
    return [s / total for s in shares]


def layer_split(shares: list[float], layers: int) -> str:
    """--tensor-split that gives each device exactly its share of the `layers` offloaded (largest
    remainder). llama.cpp splits layers + 1 slots (the output layer's too, which goes to the last
    device) at the ratios' cumulative points; putting each point half a slot before the next device's
    first layer gives the counts exactly, whatever float32 does to the division."""
    exact = [s * layers for s in shares]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))[:layers - sum(counts)]:
        counts[i] += 1
    points, running = [], 0
    for c in counts[:-1]:
        running += c
        points.append(running - 0.5 if running else 0.0)
    points.append(layers + 1.0)
    return ",".join(f"{b - a:g}" for a, b in zip([0.0, *points], points))
