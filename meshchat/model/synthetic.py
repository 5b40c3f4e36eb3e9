"""Random-weight GGUF models: tiny ones for tests, realistic sizes for benchmarks.

No registry package ships a GGUF of 1B parameters or more, and random weights cost exactly what
trained ones do per token, so `meshchat bench --synthetic 1B` writes one. Each model borrows a
real tokenizer (another model's `tokenizer.*` metadata), so prompts tokenize as usual, and has
seeded random weights in the tensor layout llama.cpp expects for its architecture: the same
seed and shape give the same bytes, hence the same fingerprint, on every machine.

Quantized matrices (Q8_0, Q4_0) are written as random blocks directly (a scale and random
integers), not quantized from floats: a 1B model is written in seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from meshchat.errors import UsageError
from meshchat.fsutil import atomic_writer
from meshchat.model.gguf_file import (
    TensorLayout,
    ValueType,
    encode_header,
    encode_value,
    padding,
    read_header,
    tensor_n_bytes,
)

F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16
Q8_0 = GGMLQuantizationType.Q8_0
Q4_0 = GGMLQuantizationType.Q4_0
_ALIGNMENT = 32
# Standard deviation of a uniform integer quant: Q8_0 draws from [-127, 127], Q4_0 from [-8, 7].
_QUANT_STD = {Q8_0: 127 / np.sqrt(3), Q4_0: 16 / np.sqrt(12)}
_ROWS_PER_CHUNK = 4096  # a 2048 x 49152 embedding is written in 12 pieces, not held whole


@dataclass(frozen=True)
class SyntheticConfig:
    arch: str
    n_layers: int = 8
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    weight_type: GGMLQuantizationType = F16
    embed_type: GGMLQuantizationType = F16
    tied_output: bool = True
    seed: int = 0
    sliding_window: int = 6  # gemma3 only: small, so prompts cross the window

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_params(self) -> int:
        return sum(int(np.prod(shape)) for shape, _ in _layer_tensors(self).values())


def _layer_tensors(cfg: SyntheticConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Per-layer tensors: name -> (ggml shape, is a matrix). Mirrors llama.cpp's loaders."""
    e, ff, hd = cfg.n_embd, cfg.n_ff, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_head_kv * hd
    tensors: dict[str, tuple[tuple[int, ...], bool]] = {
        "attn_norm.weight": ((e,), False),
        "attn_q.weight": ((e, q), True),
        "attn_k.weight": ((e, kv), True),
        "attn_v.weight": ((e, kv), True),
        "attn_output.weight": ((q, e), True),
        "ffn_norm.weight": ((e,), False),
        "ffn_gate.weight": ((e, ff), True),
        "ffn_up.weight": ((e, ff), True),
        "ffn_down.weight": ((ff, e), True),
    }
    if cfg.arch == "qwen2":
        tensors |= {
            "attn_q.bias": ((q,), False),
            "attn_k.bias": ((kv,), False),
            "attn_v.bias": ((kv,), False),
        }
    if cfg.arch in ("qwen3", "gemma3"):
        tensors |= {"attn_q_norm.weight": ((hd,), False), "attn_k_norm.weight": ((hd,), False)}
    if cfg.arch == "gemma3":
        tensors |= {
            "post_attention_norm.weight": ((e,), False),
            "post_ffw_norm.weight": ((e,), False),
        }
    return tensors


def _metadata(
    cfg: SyntheticConfig, tokenizer: dict[str, bytes], n_vocab: int
) -> list[tuple[str, bytes]]:
    a = cfg.arch
    u32, f32, s = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING
    entries = [
        ("general.architecture", encode_value(s, a)),
        ("general.name", encode_value(s, f"synthetic-{a}-{cfg.seed}")),
        (f"{a}.block_count", encode_value(u32, cfg.n_layers)),
        (f"{a}.context_length", encode_value(u32, 2048)),
        (f"{a}.embedding_length", encode_value(u32, cfg.n_embd)),
        (f"{a}.feed_forward_length", encode_value(u32, cfg.n_ff)),
        (f"{a}.attention.head_count", encode_value(u32, cfg.n_head)),
        (f"{a}.attention.head_count_kv", encode_value(u32, cfg.n_head_kv)),
        (f"{a}.attention.layer_norm_rms_epsilon", encode_value(f32, 1e-5)),
        (f"{a}.rope.freq_base", encode_value(f32, 10000.0)),
        (f"{a}.vocab_size", encode_value(u32, n_vocab)),
    ]
    if a == "gemma3":
        entries += [
            (f"{a}.attention.key_length", encode_value(u32, cfg.head_dim)),
            (f"{a}.attention.value_length", encode_value(u32, cfg.head_dim)),
            (f"{a}.attention.sliding_window", encode_value(u32, cfg.sliding_window)),
            (f"{a}.rope.freq_base_swa", encode_value(f32, 100.0)),
        ]
    return entries + list(tokenizer.items())


@dataclass(frozen=True)
class _Tensor:
    name: str
    type_id: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    matrix: bool


def _tensors(cfg: SyntheticConfig, n_vocab: int) -> list[_Tensor]:
    tensors = [
        _Tensor("token_embd.weight", cfg.embed_type, (cfg.n_embd, n_vocab), True),
        _Tensor("output_norm.weight", F32, (cfg.n_embd,), False),
    ]
    if not cfg.tied_output:
        tensors.append(_Tensor("output.weight", cfg.weight_type, (cfg.n_embd, n_vocab), True))
    for layer in range(cfg.n_layers):
        for name, (shape, matrix) in _layer_tensors(cfg).items():
            type_id = cfg.weight_type if matrix else F32
            tensors.append(_Tensor(f"blk.{layer}.{name}", type_id, shape, matrix))
    return tensors


def _random_blocks(
    rng: np.random.Generator, type_id: GGMLQuantizationType, n_values: int, std: float
) -> bytes:
    """`n_values` random weights of standard deviation `std`, as Q8_0 or Q4_0 blocks."""
    block, _ = GGML_QUANT_SIZES[type_id]
    n_blocks = n_values // block
    scale = np.full((n_blocks, 1), std / _QUANT_STD[type_id], dtype=np.float16)
    if type_id == Q8_0:
        quants = rng.integers(-127, 128, size=(n_blocks, block), dtype=np.int8)
    else:  # Q4_0: two 4-bit values a byte
        quants = rng.integers(0, 256, size=(n_blocks, block // 2), dtype=np.uint8)
    return np.concatenate([scale.view(np.uint8), quants.view(np.uint8)], axis=1).tobytes()


def _tensor_chunks(rng: np.random.Generator, tensor: _Tensor) -> Iterator[bytes]:
    """The tensor's bytes, a few thousand rows at a time."""
    row, rows = tensor.shape[0], int(np.prod(tensor.shape[1:]))
    if not tensor.matrix:
        data = 1.0 + 0.1 * rng.standard_normal(tuple(reversed(tensor.shape)))  # norms near 1
        if tensor.name.endswith(".bias"):
            data -= 1.0  # biases near 0
        yield data.astype(np.float32).tobytes()
        return
    std = 1.0 / np.sqrt(row)  # keeps activations of the right size through the layers
    for start in range(0, rows, _ROWS_PER_CHUNK):
        count = min(_ROWS_PER_CHUNK, rows - start)
        if tensor.type_id in _QUANT_STD:
            yield _random_blocks(rng, tensor.type_id, count * row, std)
            continue
        data = rng.standard_normal((count, row)) * std
        if tensor.type_id == F32:
            yield data.astype(np.float32).tobytes()
        elif tensor.type_id == F16:
            yield data.astype(np.float16).tobytes()
        else:
            yield quantize(data.astype(np.float32), tensor.type_id).tobytes()


def write_model(path: Path, cfg: SyntheticConfig, tokenizer_source: Path) -> Path:
    """Write a random model of `cfg` to `path` (atomically); returns `path`."""
    source = read_header(tokenizer_source)
    tokenizer = {k: e.raw for k, e in source.metadata.items() if k.startswith("tokenizer.")}
    n_vocab = source.metadata["tokenizer.ggml.tokens"].array_length or 0
    tensors = _tensors(cfg, n_vocab)
    layouts = [
        TensorLayout(t.name, int(t.type_id), t.shape, tensor_n_bytes(int(t.type_id), t.shape))
        for t in tensors
    ]
    rng = np.random.default_rng(cfg.seed)
    with atomic_writer(path) as out:
        out.write(encode_header(_metadata(cfg, tokenizer, n_vocab), layouts, _ALIGNMENT))
        for tensor, layout in zip(tensors, layouts, strict=True):
            _write_tensor(out, rng, tensor, layout.n_bytes)
    return path


def _write_tensor(out: IO[bytes], rng: np.random.Generator, tensor: _Tensor, n_bytes: int) -> None:
    written = 0
    for chunk in _tensor_chunks(rng, tensor):
        out.write(chunk)
        written += len(chunk)
    if written != n_bytes:  # a shape the block size does not divide: a bug here, not input
        raise AssertionError(f"{tensor.name}: wrote {written} bytes, the header says {n_bytes}")
    out.write(padding(n_bytes, _ALIGNMENT))


# --- realistic sizes for benchmarks -----------------------------------------------------------

# Llama-family widths (n_embd, heads, kv heads, n_ff), smallest first; the 2048 row is
# Llama 3.2 1B's. A size takes the widest whose embeddings and MIN_LAYERS layers fit in it, so
# a model is deep enough to split three ways, as real ones are.
_WIDTHS = (
    (64, 4, 2, 128),
    (256, 4, 2, 768),
    (512, 8, 4, 1536),
    (1024, 16, 4, 4096),
    (2048, 32, 8, 8192),
    (4096, 32, 8, 14336),
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMB]?)")
_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
WEIGHT_TYPES = {"q8_0": Q8_0, "q4_0": Q4_0}
SYNTHETIC_SEED = 1234
MIN_LAYERS = 8


def parse_params(text: str) -> int:
    """'1B', '350M', '4M' → parameter count (decimal units, as model names use them)."""
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise UsageError(f"--synthetic wants a parameter count like 1B or 350M, got {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def config_for_params(
    params: int, n_vocab: int, weight_type: GGMLQuantizationType = Q8_0, seed: int = SYNTHETIC_SEED
) -> SyntheticConfig:
    """A llama-architecture shape of about `params` parameters (embeddings tied to the output)."""
    chosen = None
    for width in _WIDTHS:
        cfg = _shaped(width, MIN_LAYERS, weight_type, seed)
        if n_vocab * cfg.n_embd + MIN_LAYERS * cfg.layer_params() <= params:
            chosen = cfg
    if chosen is None:
        smallest = (
            n_vocab * _WIDTHS[0][0]
            + MIN_LAYERS * _shaped(_WIDTHS[0], 1, weight_type, seed).layer_params()
        )
        raise UsageError(
            f"--synthetic: the smallest model with this tokenizer has {smallest} parameters"
        )
    layers = round((params - n_vocab * chosen.n_embd) / chosen.layer_params())
    return _shaped(
        (chosen.n_embd, chosen.n_head, chosen.n_head_kv, chosen.n_ff), layers, weight_type, seed
    )


def _shaped(
    width: tuple[int, int, int, int], layers: int, weight_type: GGMLQuantizationType, seed: int
) -> SyntheticConfig:
    n_embd, n_head, n_head_kv, n_ff = width
    return SyntheticConfig(
        "llama", layers, n_embd, n_head, n_head_kv, n_ff, weight_type, weight_type, True, seed
    )


def synthetic_model(
    size: str, tokenizer_source: Path, cache_dir: Path, weight_type: str = "q8_0"
) -> Path:
    """The cached synthetic model of `size` parameters, written on first use.

    Its name holds everything its bytes depend on, so a cached file is reused as is.
    """
    if weight_type not in WEIGHT_TYPES:
        raise UsageError(f"synthetic weight type must be one of {', '.join(WEIGHT_TYPES)}")
    source = read_header(tokenizer_source)
    n_vocab = source.metadata["tokenizer.ggml.tokens"].array_length or 0
    cfg = config_for_params(parse_params(size), n_vocab, WEIGHT_TYPES[weight_type])
    tokenizer = hashlib.sha256(
        b"".join(e.raw for k, e in sorted(source.metadata.items()) if k.startswith("tokenizer."))
    ).hexdigest()[:8]
    name = (
        f"synthetic-llama-{size.strip().upper()}-{weight_type}-{cfg.n_layers}x{cfg.n_embd}"
        f"-tok{tokenizer}-s{cfg.seed}.gguf"
    )
    path = cache_dir / "synthetic" / name
    if not path.exists():
        write_model(path, cfg, tokenizer_source)
    return path
