"""The one settings model: `MESH_*` variables, `$MESH_HOME/config.toml`, and `meshctl up` flags.

Declare a setting once, as a Field with a description, and it is all three: `foo_bar` is
`MESH_FOO_BAR`, `foo_bar = …` in config.toml and `meshctl up --foo-bar` (common/settings_cli.py
generates the flags; `cli(...)` refines one: metavar, the default as users read it, a short alias).
Precedence: explicit values (CLI flags) > environment > config file > defaults.
`meshctl up` turns its flags into `MESH_*` variables for supervisord's children, so every
service reads the same settings the same way.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from common.addresses import is_loopback_host

DEFAULT_HOME = Path("~/.mesh-inference")
GIB = 1 << 30


def home_from_env() -> Path:
    return Path(os.environ.get("MESH_HOME") or DEFAULT_HOME).expanduser()


def parse_memory(value: Any) -> int | None:
    """'24', '24G', '24GB', '512M', '1.5GiB' → bytes; a bare number means GB, '1024B' means bytes."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(value).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"memory size {value!r} must be a positive size like 8G or 512M")
    number, unit, suffix = match.groups()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}.get(unit) or (1 if suffix else GIB)
    return int(float(number) * scale)


def split_list(value: Any) -> list[str]:
    """'a,b' or ['a', 'b,c'] (a repeated flag) → ['a', 'b', 'c']."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list = []
    for item in items:
        if isinstance(item, str):
            out += [part.strip() for part in item.split(",") if part.strip()]
        else:
            out.append(item)
    return out


def cli(*, metavar: str | None = None, default: str | None = None, short: str | None = None) -> dict:
    """json_schema_extra for a Field: how its `meshctl up` flag reads (all optional)."""
    return {k: v for k, v in (("metavar", metavar), ("default", default), ("short", short)) if v is not None}


# Settings that are not `meshctl up` flags (still MESH_* variables and config keys): keep it short.
NOT_FLAGS: frozenset[str] = frozenset({"console_port", "console_host", "console_api_key",  # `meshctl console`'s own
                                      "test_faults"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="node state: keys, secret, sockets, logs",
                       json_schema_extra=cli(metavar="DIR"))
    model: Path | None = Field(None, description="GGUF model file", json_schema_extra=cli(default="SmolLM2 135M Instruct"))
    client: bool = Field(False, description="lite client: no model, no llama.cpp; API proxy only")
    join: Annotated[list[str], NoDecode] = Field(default_factory=list, description="join a mesh with this invite token",
                                                 json_schema_extra=cli(metavar="TOKEN"))
    port: int = Field(9337, ge=1, le=65535, description="OpenAI API port", json_schema_extra=cli(metavar="PORT"))
    api_host: str = Field("127.0.0.1", description="address the API listens on", json_schema_extra=cli(metavar="ADDR"))
    listen_all: bool = Field(False, description="serve the API on every interface (requires --api-key)")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on the API",
                                json_schema_extra=cli(metavar="KEY"))
    bind_host: str = Field("0.0.0.0", description="address the mesh endpoints (QUIC, data lanes) bind to",
                           json_schema_extra=cli(metavar="ADDR"))
    bind_port: int = Field(0, ge=0, le=65535, description="fixed UDP port of the mesh QUIC endpoint (for port forwarding)",
                           json_schema_extra=cli(metavar="PORT", default="any"))
    advertise: Annotated[list[str], NoDecode] = Field(default_factory=list, description="address to put in invite tokens",
                                                      json_schema_extra=cli(metavar="HOST[:PORT]",
                                                                            default="interface addresses"))
    advertise_data: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="address other nodes use for the TCP data lane (e.g. a forwarded port)",
        json_schema_extra=cli(metavar="HOST:PORT", default="interface addresses"))
    data_port: int = Field(0, ge=0, le=65535, description="fixed port of the data tunnels (TCP lane and QUIC lane)",
                           json_schema_extra=cli(metavar="PORT", default="any"))
    rpc_port: int = Field(0, ge=0, le=65535, description="fixed TCP port of this worker's rpc-server on --bind-host "
                                                         "(mutual TLS, only the plan's host; for port forwarding)",
                          json_schema_extra=cli(metavar="PORT", default="any"))
    advertise_rpc: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="address the host dials for this worker's rpc-server (e.g. a forwarded port)",
        json_schema_extra=cli(metavar="HOST:PORT", default="interface addresses"))
    tensor_split: Annotated[list[float], NoDecode] | None = Field(None, description="manual split ratios, host first",
                                                                  json_schema_extra=cli(metavar="R,R", default="by memory"))
    split: bool = Field(False, description="split over every node with the model even when it fits one")
    bin_dir: Path | None = Field(None, description="directory with ggml-rpc-server (or rpc-server) and llama-server",
                                 json_schema_extra=cli(default="project build"))
    device: str | None = Field(None, description="devices this node offers (its ggml-rpc-server serves them all), "
                                                 "as llama.cpp names them, e.g. CUDA0 or CUDA0,CUDA1",
                               json_schema_extra=cli(metavar="DEV[,DEV]", default="every GPU llama.cpp lists"))
    max_vram: Annotated[int | None, NoDecode] = Field(None, description="memory this node offers, e.g. 8G (overrides detection; spread over its GPUs by their size)",
                                                      json_schema_extra=cli(metavar="SIZE", default="detected"))
    ctx_size: int = Field(4096, ge=256, description="llama-server context size")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp",
                                json_schema_extra=cli(default="llama.cpp's"))
    speculative: Literal["auto", "off", "ngram", "draft"] = Field(
        "auto", description="speculative decoding on the host: auto (on where a split crosses the network), "
                            "off, ngram (drafts from the context), draft (a small model, --draft-model)",
        json_schema_extra=cli(metavar="MODE"))
    draft_model: Path | None = Field(None, description="draft GGUF for --speculative draft/auto: a small model with "
                                                       "the same vocabulary, run on the host's own device",
                                     json_schema_extra=cli(default="none"))
    max_rtt_ms: float = Field(80.0, ge=0, description="the host leaves a member whose round trip to it is above this "
                                                       "(ms) out of the split unless its memory is needed; 0 = no bound",
                              json_schema_extra=cli(metavar="MS"))
    wait_for_host: float = Field(60.0, ge=0, description="seconds an API request waits for a serving host before 503",
                                 json_schema_extra=cli(metavar="SECONDS"))
    settle_delay: float = Field(2.0, ge=0, description="seconds membership must be stable before a new plan",
                                json_schema_extra=cli(metavar="SECONDS"))
    memory_margin: float = Field(1.1, ge=1.0, description="pooled memory needed = model size x this",
                                 json_schema_extra=cli(metavar="X"))
    liveness_timeout: float = Field(3.0, ge=0.5, description="seconds of silence on a peer's control link before "
                                    "it counts as gone (it sends a heartbeat about every timeout/6 s)",
                                    json_schema_extra=cli(metavar="SECONDS"))
    rotation_grace: float = Field(86400.0, ge=0, description="seconds the previous mesh secret still admits known "
                                  "members after `meshctl token --rotate` (members offline during it)",
                                  json_schema_extra=cli(metavar="SECONDS"))
    stun: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                 description="STUN server HOST:PORT (repeatable): learn this node's "
                                                             "public address; two tell cone from symmetric NAT",
                                                 json_schema_extra=cli(metavar="HOST:PORT", default="none"))
    relay: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                  description="TURN relay turn:USER:PASS@HOST:PORT (repeatable): the "
                                                              "path of last resort when no direct or punched one works",
                                                  json_schema_extra=cli(metavar="turn:USER:PASS@HOST:PORT", default="none"))
    log_level: str = Field("INFO", description="log level of the services (DEBUG, INFO, WARNING, ERROR)",
                           json_schema_extra=cli(metavar="LEVEL"))
    # Build and model-store settings: read by llama.cpp/build.py and common/default_model.py from the
    # environment (build.py runs before the project is installed), so meshctl passes them to every service.
    models_dir: Path = Field(Path("~/.models"), description="where the default models are installed")
    llama_cache: Path | None = Field(None, description="llama.cpp build cache",
                                     json_schema_extra=cli(default="~/.cache/mesh-inference/llama.cpp"))
    llama_backend: Literal["cpu", "cuda", "metal"] | None = Field(
        None, description="llama.cpp backend to build: cpu, cuda or metal (CUDA needs nvcc and a visible GPU)",
        json_schema_extra=cli(default="detected"))
    cuda_arch: str | None = Field(None, description="CUDA architectures to build for, e.g. 90 or 86;90",
                                  json_schema_extra=cli(metavar="ARCH", default="native"))
    llama_source: Path | None = Field(None, description="build llama.cpp from this local tree or tarball of the pinned "
                                                        "source instead of downloading it",
                                      json_schema_extra=cli(default="the pinned sdist"))
    console_port: int = Field(3131, ge=1, le=65535, description="port of the web console (`meshctl console`)")
    console_host: str = Field("127.0.0.1", description="address the web console listens on (not loopback: needs console_api_key)")
    console_api_key: str | None = Field(None, description="key the web console asks for (required off loopback)")
    test_faults: bool = Field(False, description="for tests only: a file MESH_HOME/run/fault-SERVICE-TASK makes "
                              "that task of that service fail once (common/tasks.py)")

    @field_validator("join", "advertise", "advertise_data", "advertise_rpc", "stun", "relay", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> list[str]:
        return split_list(value)

    @field_validator("stun", mode="after")
    @classmethod
    def _stun_servers(cls, value: list[str]) -> list[str]:
        from common.addresses import parse_host_port
        for entry in value:
            try:
                parse_host_port(entry)
            except ValueError as exc:
                raise ValueError(f"STUN server {exc}") from None
        return value

    @field_validator("relay", mode="after")
    @classmethod
    def _relays(cls, value: list[str]) -> list[str]:
        from common.nat.turn import parse_relay_url
        for entry in value:
            parse_relay_url(entry)  # ValueError says what is wrong, without the password
        return value

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _ratios(cls, value: Any) -> list[float] | None:
        parts = split_list(value)
        if not parts:
            return None
        try:
            ratios = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"tensor split {value!r} must be numbers like 0.85,0.15") from None
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"tensor split {value!r} needs non-negative ratios with a positive sum")
        return ratios

    @field_validator("max_vram", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int | None:
        return parse_memory(value)

    @model_validator(mode="after")
    def _draft_needs_model(self) -> "Settings":
        if self.speculative == "draft" and self.draft_model is None:
            raise ValueError("speculative = draft needs a draft model: pass --draft-model PATH (MESH_DRAFT_MODEL)")
        return self

    @field_validator("home", "model", "bin_dir", "draft_model", "models_dir", "llama_cache", "llama_source", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _exposed_api_needs_a_key(self) -> "Settings":
        if problem := self.api_exposure_problem():
            raise ValueError(problem)
        return self

    def api_exposure_problem(self) -> str | None:
        """Why the API may not start as configured: beyond loopback it needs a key, however it was asked for
        (flag, MESH_* variable or config file)."""
        if self.api_key or is_loopback_host(self.api_bind_host):
            return None
        how = "--listen-all" if self.listen_all else f"api_host {self.api_bind_host}"
        return (f"{how} exposes the API to your network; also pass --api-key KEY (or set MESH_API_KEY / api_key), "
                f"or keep the API on 127.0.0.1")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = home_from_env() / "config.toml"
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file)

    @property
    def api_bind_host(self) -> str:
        return "0.0.0.0" if self.listen_all else self.api_host

    def build_env(self) -> dict[str, str]:
        """The variables llama.cpp/build.py and common/default_model.py read."""
        env = self.to_env()
        return {k: env[k] for k in ("MESH_MODELS_DIR", "MESH_LLAMA_CACHE", "MESH_LLAMA_BACKEND", "MESH_CUDA_ARCH",
                                    "MESH_LLAMA_SOURCE") if k in env}

    def to_env(self) -> dict[str, str]:
        """The MESH_* variables that reproduce these settings in a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None or value == []:
                continue
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[f"MESH_{name.upper()}"] = str(value)
        if self.max_vram is not None:
            env["MESH_MAX_VRAM"] = f"{self.max_vram}B"
        return env


def load_settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def service_settings() -> Settings:
    """Settings for a service's main(): invalid ones are one line and exit 2, not a traceback per restart."""
    try:
        return load_settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "/".join(str(p) for p in err["loc"])
        print(f"error: invalid settings{' (' + where + ')' if where else ''}: "
              f"{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        raise SystemExit(2) from None
