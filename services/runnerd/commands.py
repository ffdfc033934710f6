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
                      threads: int | None, speculation: list[str] = ()) -> list[str]:
    """llama-server for this node as host of `plan`. Remote members are reached at `rpc_endpoints`
    (rpc_endpoint: direct TLS, or the gateway's loopback forwards); the host uses its own device
    directly, not its own rpc-server. `speculation`: its flags (services/runnerd/speculation.py)."""
    # --metrics: runnerd reads the draft acceptance from it (loopback only, like the server itself).
    args = [str(binaries.llama_server), "--model", model.path, "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(ctx_size), "--no-webui", "--alias", model.name, "--metrics", *speculation]
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
    my_ratio = next((m.ratio for m in plan.members if m.node_id == me), 0.0)
    remote_total = sum(m.ratio for m in remote) or 1.0
    if backend == "cpu":
        # A CPU host has no device of its own to offload to: its share is the layers it keeps. The
        # output matrix (or the embedding tied to it), which llama.cpp would offload with the last
        # layers, stays here: otherwise each token's logits (1 MB for a 262k vocabulary) cross the
        # network, and the last worker loads a matrix that is 2/3 of the default model.
        kept = round(my_ratio * model.n_layers)
        args += ["--n-gpu-layers", str(max(model.n_layers - kept, 1)),
                 "--tensor-split", ",".join(f"{m.ratio / remote_total:.3f}" for m in remote),
                 "--override-tensor", OUTPUT_ON_HOST]
    else:
        # Local GPU first, then the RPC devices in --rpc order.
        args += ["--n-gpu-layers", "999",
                 "--tensor-split", ",".join(f"{r:.3f}" for r in [my_ratio] + [m.ratio for m in remote])]
    return args
