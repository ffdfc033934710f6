"""The one settings model: `MESH_*` variables, `$MESH_HOME/config.toml`, and `meshctl up` flags.

Precedence: explicit values (CLI flags) > environment > config file > defaults.
`meshctl up` turns its flags into `MESH_*` variables for supervisord's children, so every
service reads the same settings the same way.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

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
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="state, keys, logs and sockets of this node")
    model: Path | None = Field(None, description="GGUF model file; unset = the default Gemma 3 270M")
    client: bool = Field(False, description="lite client: no model, no llama.cpp; API proxy only")
    join: Annotated[list[str], NoDecode] = Field(default_factory=list, description="invite tokens to join at start")
    port: int = Field(9337, ge=1, le=65535, description="OpenAI API port")
    api_host: str = Field("127.0.0.1", description="address the API listens on")
    listen_all: bool = Field(False, description="serve the API on every interface (requires api_key)")
    api_key: str | None = Field(None, description="bearer key the API requires (required with listen_all)")
    bind_host: str = Field("0.0.0.0", description="address the mesh endpoints (QUIC, data lanes) bind to")
    bind_port: int = Field(0, ge=0, le=65535, description="fixed UDP port for the mesh QUIC endpoint; 0 = any")
    advertise: Annotated[list[str], NoDecode] = Field(default_factory=list, description="addresses to put in invite tokens")
    advertise_data: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                           description="HOST:PORT other nodes use for the TCP data lane")
    data_port: int = Field(0, ge=0, le=65535, description="fixed port for the data tunnels (TCP lane and QUIC lane); 0 = any")
    tensor_split: Annotated[list[float], NoDecode] | None = Field(None, description="manual split ratios, e.g. 0.85,0.15")
    split: bool = Field(False, description="split over every node with the model even when it fits one")
    bin_dir: Path | None = Field(None, description="directory with ggml-rpc-server (or rpc-server) and llama-server")
    device: str | None = Field(None, description="device for ggml-rpc-server, e.g. CUDA0 or MTL0")
    max_vram: Annotated[int | None, NoDecode] = Field(None, description="memory this node offers, e.g. 8G (overrides detection)")
    ctx_size: int = Field(4096, ge=256, description="llama-server context size")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp")
    wait_for_host: float = Field(60.0, ge=0, description="seconds an API request waits for a serving host before 503")
    settle_delay: float = Field(2.0, ge=0, description="seconds membership must be stable before a new plan")
    memory_margin: float = Field(1.1, ge=1.0, description="pooled memory needed = model size x this")
    stun: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                 description="STUN server HOST:PORT (repeatable): learn this node's "
                                                             "public address; two tell cone from symmetric NAT")
    relay: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                  description="TURN relay turn:USER:PASS@HOST:PORT (repeatable): the "
                                                              "path of last resort when no direct or punched one works")
    log_level: str = Field("INFO")

    @field_validator("join", "advertise", "advertise_data", "stun", "relay", mode="before")
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

    @field_validator("home", "model", "bin_dir", mode="after")
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
