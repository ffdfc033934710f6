"""GGUF inspection: size, layers, architecture and a cheap content fingerprint.

The fingerprint identifies *which file* a node holds: the header (metadata + tensor table), the
file size and the first 4 KiB of every tensor's data. Two fine-tunes of one architecture share a
header but not their weights, so sampling each tensor tells them apart while reading ~1 MB of a
multi-GB file. Results are cached by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from common.messages import ModelInfo

GGUF_MAGIC = b"GGUF"
SAMPLE_BYTES = 4096


class ModelError(Exception):
    """A model file we cannot use; the message says what and what to do."""


def check_readable_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; pass --model with the path of a .gguf file")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file; pass --model with the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"model file {path} is not readable ({exc.strerror}); fix its permissions") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (no GGUF magic); convert it with llama.cpp's convert_hf_to_gguf.py")


def inspect_gguf(path: Path, cache_dir: Path | None = None) -> ModelInfo:
    path = Path(path).expanduser().resolve()
    check_readable_gguf(path)
    stat = path.stat()
    cache_key = f"v3|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / "gguf-info.json" if cache_dir else None
    cache = _read_cache(cache_file)
    if cache_key in cache:
        return ModelInfo(**cache[cache_key])
    info = _inspect_uncached(path, stat.st_size)
    if cache_file:
        cache[cache_key] = info.model_dump()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return info


def _inspect_uncached(path: Path, size: int) -> ModelInfo:
    try:
        with open(path, "rb") as f:
            header = read_gguf_header(f)
            digest = hashlib.sha256(f"gguf-fingerprint-v1|{size}".encode())
            f.seek(0)
            digest.update(f.read(header.data_start))  # magic, metadata and the tensor table
            for offset, n_bytes in sorted(header.tensors.values()):
                f.seek(header.data_start + offset)
                digest.update(f.read(min(SAMPLE_BYTES, n_bytes)))
    except (struct.error, UnicodeDecodeError, KeyError, ValueError, MemoryError) as exc:
        raise ModelError(f"{path} is not a valid GGUF ({exc}); the file may be cut off — download it again") from None
    data_end = header.data_start + max((o + n for o, n in header.tensors.values()), default=0)
    if data_end > size:
        raise ModelError(f"{path} is cut off: its tensors need {data_end} bytes but the file has {size}; download it again")
    arch = str(header.metadata.get("general.architecture", "unknown"))
    return ModelInfo(path=str(path), name=str(header.metadata.get("general.name") or path.stem), size_bytes=size,
                     n_layers=int(header.metadata.get(f"{arch}.block_count", 0)), arch=arch,
                     fingerprint=digest.hexdigest()[:32],
                     has_chat_template=bool(header.metadata.get("tokenizer.chat_template")),
                     embeddings=f"{arch}.pooling_type" in header.metadata)


@dataclass
class GGUFHeader:
    metadata: dict  # scalar values only; arrays are skipped (the vocabulary alone is ~250k strings)
    tensors: dict[str, tuple[int, int]]  # name -> (offset in the data section, byte size)
    data_start: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_STRING = 1 << 24


def read_gguf_header(f) -> GGUFHeader:
    """Parse a GGUF (v2/v3) header with plain reads: the `gguf` package's reader materialises every
    vocabulary string as a numpy view, which takes tens of seconds on a big vocabulary."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def unpack(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file in the header")
        return struct.unpack(fmt, data)[0]

    def string() -> str:
        length = unpack("<Q")
        if length > MAX_STRING:
            raise ValueError(f"string of {length} bytes in the header")
        return f.read(length).decode("utf-8")

    def value(kind: int):
        if kind in _SCALARS:
            return unpack(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = unpack("<I"), unpack("<Q")
            if item_kind == 8:
                for _ in range(count):
                    length = unpack("<Q")
                    if length > MAX_STRING:
                        raise ValueError("oversized string in an array")
                    f.seek(length, 1)
            elif item_kind in _SCALARS:
                f.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
            else:
                for _ in range(count):
                    value(item_kind)
            return None
        raise ValueError(f"unknown metadata type {kind}")

    if f.read(4) != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    version = unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= unpack("<Q")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(unpack("<I"))]
        tensors[name] = (unpack("<Q"), n_elements // block * type_size)
    alignment = int(metadata.get("general.alignment") or 32)
    data_start = -(-f.tell() // alignment) * alignment
    return GGUFHeader(metadata, tensors, data_start)


def _read_cache(cache_file: Path | None) -> dict:
    if not cache_file or not cache_file.exists():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
