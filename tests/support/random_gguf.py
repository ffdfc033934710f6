"""Random-weight GGUF models of llama architecture, for tests and benchmarks of any model size.

The tokenizer comes from the vocab-only `tests/data/ggml-vocab-llama-spm.gguf` (llama.cpp's own
test vocab, 32000 tokens). Matrices are Q4_0 blocks of random nibbles with one small f16 scale per
tensor, norms are F32 ones. The output is noise, but load time, memory, and speed behave like a
real model of the same shape. Deterministic for a seed.

    python -m tests.support.random_gguf OUT.gguf --preset tiny
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, PoolingType

VOCAB_GGUF = Path(__file__).resolve().parents[1] / "data" / "ggml-vocab-llama-spm.gguf"

Q4_0_BLOCK_ELEMENTS = 32
Q4_0_BLOCK_BYTES = 18  # f16 scale + 32 four-bit values
# Std of a Q4_0 value (q - 8, q uniform in 0..15); used to size the scale.
Q4_0_VALUE_STD = math.sqrt((16 ** 2 - 1) / 12)


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int = 4096


PRESETS: dict[str, LlamaShape] = {
    # ~26 MB, mostly the two 32000-row embedding matrices; loads in about a second.
    "tiny": LlamaShape(n_layer=4, n_embd=512, n_ff=1536, n_head=8, n_head_kv=8),
    # Eight layers of the 7B shape: ~1.06 GB.
    "1g": LlamaShape(n_layer=8, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
    # LLaMA-2 7B's shape: ~3.8 GB.
    "7b": LlamaShape(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
}


def _tokenizer_fields(vocab_gguf: Path) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """Every `tokenizer.*` key of the vocab GGUF as (key, value, type, array element type)."""
    reader = GGUFReader(vocab_gguf)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), main_type, sub_type))
    return fields


def _matrix_layout(shape: LlamaShape, n_vocab: int) -> list[tuple[str, int, int]]:
    """(name, rows, row length) of every matrix, in llama.cpp's names; rows multiply the input."""
    head_dim = shape.n_embd // shape.n_head
    q_dim, kv_dim = head_dim * shape.n_head, head_dim * shape.n_head_kv
    matrices = [("token_embd.weight", n_vocab, shape.n_embd)]
    for i in range(shape.n_layer):
        b = f"blk.{i}"
        matrices += [
            (f"{b}.attn_q.weight", q_dim, shape.n_embd),
            (f"{b}.attn_k.weight", kv_dim, shape.n_embd),
            (f"{b}.attn_v.weight", kv_dim, shape.n_embd),
            (f"{b}.attn_output.weight", shape.n_embd, q_dim),
            (f"{b}.ffn_gate.weight", shape.n_ff, shape.n_embd),
            (f"{b}.ffn_up.weight", shape.n_ff, shape.n_embd),
            (f"{b}.ffn_down.weight", shape.n_embd, shape.n_ff),
        ]
    matrices.append(("output.weight", n_vocab, shape.n_embd))
    return matrices


def _norm_names(shape: LlamaShape) -> list[str]:
    names = []
    for i in range(shape.n_layer):
        names += [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"]
    return names + ["output_norm.weight"]


def _random_q4_0(rng: np.random.Generator, rows: int, row_length: int) -> np.ndarray:
    """Q4_0 bytes of shape (rows, row_length/32*18): random nibbles under one fixed f16 scale.

    The scale makes a dot product with a unit-variance input come out near unit variance, so
    activations stay finite through any number of layers.
    """
    blocks_per_row = row_length // Q4_0_BLOCK_ELEMENTS
    data = np.frombuffer(bytearray(rng.bytes(rows * blocks_per_row * Q4_0_BLOCK_BYTES)), dtype=np.uint8)
    blocks = data.reshape(rows * blocks_per_row, Q4_0_BLOCK_BYTES)
    scale = np.float16(1.0 / (Q4_0_VALUE_STD * math.sqrt(row_length)))
    blocks[:, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return data.reshape(rows, blocks_per_row * Q4_0_BLOCK_BYTES)


def write_random_gguf(path: Path | str, *, n_layer: int, n_embd: int, n_ff: int, n_head: int,
                      n_head_kv: int, context_length: int = 4096, seed: int = 0,
                      vocab_gguf: Path = VOCAB_GGUF, pooling_type: int | None = None) -> Path:
    """Write a random-weight llama GGUF to `path`, one tensor in memory at a time; return `path`.
    `pooling_type` (llama.cpp's: 1 mean, 2 cls, 3 last) makes it an embedding model."""
    shape = LlamaShape(n_layer, n_embd, n_ff, n_head, n_head_kv, context_length)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if n_embd % Q4_0_BLOCK_ELEMENTS or n_ff % Q4_0_BLOCK_ELEMENTS:
        raise ValueError(f"n_embd and n_ff must be multiples of {Q4_0_BLOCK_ELEMENTS} (Q4_0 blocks)")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_fields(vocab_gguf)
    n_vocab = len(next(value for key, value, *_ in tokenizer if key == "tokenizer.ggml.tokens"))

    writer = GGUFWriter(path, "llama")
    writer.add_name(f"random-llama-{n_layer}x{n_embd}-seed{seed}")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(2)
    writer.add_context_length(context_length)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    if pooling_type is not None:
        writer.add_pooling_type(PoolingType(pooling_type))
    for key, value, vtype, sub_type in tokenizer:
        writer.add_key_value(key, value, vtype, sub_type)

    matrices = _matrix_layout(shape, n_vocab)
    norms = _norm_names(shape)
    for name, rows, row_length in matrices:
        byte_shape = (rows, row_length // Q4_0_BLOCK_ELEMENTS * Q4_0_BLOCK_BYTES)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                               raw_dtype=GGMLQuantizationType.Q4_0)
    for name in norms:
        writer.add_tensor_info(name, (n_embd,), np.dtype(np.float32), n_embd * 4)

    tmp = path.with_name(path.name + ".partial")  # a crash never leaves a valid-looking model
    writer.open_output_file(tmp)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, rows, row_length in matrices:
        writer.write_tensor_data(_random_q4_0(rng, rows, row_length))
    ones = np.ones(n_embd, dtype=np.float32)
    for _ in norms:
        writer.write_tensor_data(ones)
    writer.close()
    tmp.replace(path)
    return path


def write_preset(path: Path | str, preset: str, *, seed: int = 0) -> Path:
    return write_random_gguf(path, **asdict(PRESETS[preset]), seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    for field in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "context_length"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, dest=field,
                            help="override the preset's value")
    args = parser.parse_args(argv)

    shape = asdict(PRESETS[args.preset])
    shape.update({k: v for k, v in vars(args).items() if k in shape and v is not None})
    started = time.monotonic()
    try:
        out = write_random_gguf(args.out, **shape, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"random_gguf: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB, {shape}) in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
