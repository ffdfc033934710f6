"""Every message on the local bus and in mesh gossip: pydantic models with a `kind` discriminator.

JSON on the wire, decoded through the one `decode` adapter below; dispatch on `kind` with a table.
Services publish *state* (the whole current picture), never events.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Address = tuple[str, int]

# The mesh protocol: what two nodes must agree on to talk at all (QUIC framing, stream credit, lanes,
# these messages). Said by both sides of the authenticated challenge exchange (common/quic/auth.py);
# a peer on another one is refused with one line. Raise it with any change an older node cannot follow.
#   1: the aioquic builds (said nothing: a peer that omits it runs 1)
#   2: qh3, with the per-stream credit stream
MESH_PROTOCOL = 2


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- facts about the local model -------------------------------------------------------------

class ModelInfo(Message):
    path: str
    name: str
    size_bytes: int
    n_layers: int
    arch: str
    fingerprint: str
    has_chat_template: bool = True
    embeddings: bool = False  # an embedding model (its GGUF sets a pooling type): llama-server runs with --embeddings


# --- runnerd ---------------------------------------------------------------------------------

class ChildState(Message):
    state: Literal["stopped", "starting", "ready", "failed", "waiting"] = "stopped"
    port: int | None = None
    pid: int | None = None
    restarts: int = 0
    detail: str = ""


class WeightLoad(Message):
    """How one worker got its weights in the last load: from its own GGUF, or sent over the tunnel."""
    node_id: str
    local_bytes: int = 0
    sent_bytes: int = 0
    misses: int = 0


class SpeculationState(Message):
    """Speculative decoding in the running llama-server: the mode chosen, why, and how it fares."""
    setting: str = ""  # auto | off | ngram | draft
    mode: str = ""  # off | ngram | draft
    reason: str = ""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None


class DecodeRate(Message):
    """tok/s of the requests llama-server finished between two reads of its /metrics (the latest such)."""
    tok_s: float | None = None
    tokens: int = 0
    at: float = 0.0  # unix time of the read


class DevicePlacement(Message):
    """A device llama-server put model weights on, as its log names it (CUDA0, RPC0[127.0.0.1:port], CPU_Mapped)."""
    device: str
    node_id: str = ""  # whose device: this node, or the worker behind the RPC forward
    model_bytes: int = 0


class RunnerState(Message):
    kind: Literal["runner_state"] = "runner_state"
    node_id: str = ""
    memory_bytes: int = 0
    memory_source: str = ""
    device_memory: list[int] = Field(default_factory=list)  # per device its rpc-server serves; sums to memory_bytes
    backend: str = ""
    model: ModelInfo | None = None
    rpc: ChildState = Field(default_factory=ChildState)
    rpc_loads_local_weights: bool = False
    # The rpc-server speaks mutual TLS (pinned to node ids) on rpc_host: the plan's host dials one of
    # rpc_tls directly, or reaches rpc_host through the tunnel. Empty: loopback only, without TLS.
    rpc_tls: list[Address] = Field(default_factory=list)
    rpc_host: str = "127.0.0.1"
    rpc_paths: dict[str, str] = Field(default_factory=dict)  # as host: worker node id -> "direct HOST:PORT" or "tunnel"
    llama: ChildState = Field(default_factory=ChildState)
    llama_plan_key: str = ""
    weights: list[WeightLoad] = Field(default_factory=list)  # per worker, from llama-server's rpc-gguf log
    placement: list[DevicePlacement] = Field(default_factory=list)  # llama-server's own report, device by device
    speculation: SpeculationState = Field(default_factory=SpeculationState)
    decode: DecodeRate = Field(default_factory=DecodeRate)  # recent requests, all senders
    error: str | None = None
    status: str = ""
    progress: str = ""  # the long step under way and how far it is, e.g. "building llama.cpp 40%"


# --- electd ----------------------------------------------------------------------------------

class PlanMember(Message):
    node_id: str
    memory_bytes: int
    ratio: float
    devices: list[int] = Field(default_factory=list)  # memory per device it offers; the host splits `ratio` by it


class Exclusion(Message):
    node_id: str
    reason: str


class Plan(Message):
    kind: Literal["plan"] = "plan"
    state: Literal["starting", "client", "no-model", "waiting", "solo", "split"] = "starting"
    host: str | None = None
    members: list[PlanMember] = Field(default_factory=list)
    excluded: list[Exclusion] = Field(default_factory=list)
    needed_bytes: int = 0
    available_bytes: int = 0
    reason: str = ""
    key: str = ""  # identity of the serving set + split: llama-server restarts only when it changes


# --- meshd -----------------------------------------------------------------------------------

class StunServerState(Message):
    server: str
    mapped: Address | None = None
    error: str = ""


class NatReport(Message):
    """What STUN said about one of this node's UDP endpoints (see common/nat/stun.py)."""
    behaviour: str = "unknown"  # "no NAT", "endpoint-independent", "symmetric", "unknown"
    public: Address | None = None
    detail: str = ""
    servers: list[StunServerState] = Field(default_factory=list)


class RelayState(Message):
    """One TURN allocation of this node (the URL without its password)."""
    relay: str
    relayed: Address | None = None
    error: str = ""
    bytes_out: int = 0  # QUIC bytes this node sent through the relay
    bytes_in: int = 0


class PeerPath(Message):
    """How this node reaches a peer now (control connection, and the data lane's QUIC connection)."""
    path: str = ""       # "direct", "punched", "relayed" or "" (none)
    via: str = ""        # the address in use; for a relayed path, the relay
    lane: str = ""       # data lane last used: "tls-tcp" or "quic"
    rtt_ms: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


class Announcement(Message):
    """What a node tells the mesh about itself; gossiped until every node has every other's."""
    kind: Literal["announcement"] = "announcement"
    node_id: str
    seq: int  # time-based, so a restarted node's announcements supersede its old ones
    role: Literal["worker", "client"]
    version: str
    memory_bytes: int = 0
    # memory per device of its rpc-server, in that server's order (several GPUs behind one server)
    device_memory: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=64)
    model_name: str | None = None
    model_fingerprint: str | None = None
    model_size: int = 0
    rpc_ready: bool = False
    rpc_tls: list[Address] = Field(default_factory=list)  # its rpc-server, mutual TLS: only its plan's host may connect
    mesh_addrs: list[Address] = Field(default_factory=list)
    data_tcp: list[Address] = Field(default_factory=list)
    data_quic: list[Address] = Field(default_factory=list)
    host_ready: bool = False  # this node runs a llama-server that answers
    plan_key: str = ""
    public_key: str = Field("", max_length=512)  # base64 DER; its hash is node_id (services/meshd/gossip.py)
    sig: str = Field("", max_length=512)  # the node's signature over everything else and the mesh id
    nat: str = ""  # NatReport.behaviour of mesh_addrs' port; "" = no STUN server asked
    public_addrs: list[Address] = Field(default_factory=list)  # of mesh_addrs, the server-reflexive ones (STUN)
    relay_addrs: list[Address] = Field(default_factory=list)  # relayed candidates (TURN), of mesh_addrs and data_quic


class PeerView(Message):
    announcement: Announcement
    connected: bool
    rtt_ms: float | None = None
    last_heard: float = 0.0
    status: str = ""
    path: PeerPath | None = None


class JoinRetry(Message):
    """A --join whose inviter could not be reached yet: meshd keeps dialing its addresses."""
    node_id: str
    addrs: list[Address] = Field(default_factory=list)
    attempts: int = 0               # failed so far
    retry_in_s: float | None = None  # None: a dial is under way
    error: str = ""                 # the last attempt's


class MeshState(Message):
    kind: Literal["mesh_state"] = "mesh_state"
    node_id: str = ""
    mesh_id: str = ""
    listen: list[Address] = Field(default_factory=list)
    me: Announcement | None = None
    peers: list[PeerView] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    gossip_dropped: dict[str, int] = Field(default_factory=dict)  # forged / altered / replayed / bad_rotation
    # False while a (re)started meshd is still reconnecting to the members it knew: until then its
    # peer list is short by those, and re-planning on it would restart llama-server for nothing.
    settled: bool = False
    nat: NatReport | None = None
    relays: list[RelayState] = Field(default_factory=list)
    joining: list[JoinRetry] = Field(default_factory=list)


# --- gatewayd --------------------------------------------------------------------------------

class TunnelStats(Message):
    node_id: str
    lane: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    streams: int = 0
    last_error: str = ""
    path: str = ""  # of the QUIC lane's connection: "direct" or "relayed" ("" = none open)
    rtt_ms: float | None = None


class GatewayState(Message):
    kind: Literal["gateway_state"] = "gateway_state"
    api_url: str = ""
    data_tcp: list[Address] = Field(default_factory=list)
    data_quic: list[Address] = Field(default_factory=list)
    rpc_forwards: dict[str, int] = Field(default_factory=dict)  # worker node id -> loopback port on this host
    forwards_moved: int = 0  # bumped when a forward's peer moved to new data ports: worth retrying now
    upstream: str = ""  # "local", a host node id, or "" while there is none
    tunnels: list[TunnelStats] = Field(default_factory=list)
    requests_served: int = 0
    requests_failed: int = 0
    error: str | None = None
    nat: NatReport | None = None  # of the QUIC data lane's port
    relays: list[RelayState] = Field(default_factory=list)  # the QUIC data lane's allocations


# --- control requests (DEALER → ROUTER) --------------------------------------------------------

class StatusRequest(Message):
    kind: Literal["status"] = "status"


class JoinRequest(Message):
    kind: Literal["join"] = "join"
    token: str


class TokenRequest(Message):
    kind: Literal["token"] = "token"
    rotate: bool = False


class LeaveRequest(Message):
    """Leave the mesh: tell every peer, forget them, and start a mesh of our own (new id and secret)."""
    kind: Literal["leave"] = "leave"


class Reply(Message):
    kind: Literal["reply"] = "reply"
    ok: bool
    error: str | None = None
    data: dict = Field(default_factory=dict)


AnyMessage = Annotated[
    Union[RunnerState, Plan, MeshState, GatewayState, Announcement, StatusRequest, JoinRequest, TokenRequest,
          LeaveRequest, Reply],
    Field(discriminator="kind"),
]
_adapter: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


def decode(data: bytes | str) -> Message:
    """Parse any bus/gossip message; raises pydantic.ValidationError on anything else."""
    return _adapter.validate_json(data)


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()
