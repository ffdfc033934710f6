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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

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
NOT_FLAGS: frozenset[str] = frozenset()


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
    tensor_split: Annotated[list[float], NoDecode] | None = Field(None, description="manual split ratios, host first",
                                                                  json_schema_extra=cli(metavar="R,R", default="by memory"))
    split: bool = Field(False, description="split over every node with the model even when it fits one")
    bin_dir: Path | None = Field(None, description="directory with ggml-rpc-server (or rpc-server) and llama-server",
                                 json_schema_extra=cli(default="project build"))
    device: str | None = Field(None, description="device for ggml-rpc-server, e.g. CUDA0 or MTL0",
                               json_schema_extra=cli(metavar="DEV", default="backend default"))
    max_vram: Annotated[int | None, NoDecode] = Field(None, description="memory this node offers, e.g. 8G (overrides detection)",
                                                      json_schema_extra=cli(metavar="SIZE", default="detected"))
    ctx_size: int = Field(4096, ge=256, description="llama-server context size")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp",
                                json_schema_extra=cli(default="llama.cpp's"))
    wait_for_host: float = Field(60.0, ge=0, description="seconds an API request waits for a serving host before 503",
                                 json_schema_extra=cli(metavar="SECONDS"))
    settle_delay: float = Field(2.0, ge=0, description="seconds membership must be stable before a new plan",
                                json_schema_extra=cli(metavar="SECONDS"))
    memory_margin: float = Field(1.1, ge=1.0, description="pooled memory needed = model size x this",
                                 json_schema_extra=cli(metavar="X"))
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

    @field_validator("join", "advertise", "advertise_data", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> list[str]:
        return split_list(value)

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

    @field_validator("home", "model", "bin_dir", "models_dir", "llama_cache", "llama_source", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

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
