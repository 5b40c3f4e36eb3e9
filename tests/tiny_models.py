"""Tiny random GGUF models for tests, written with meshchat's own GGUF header writer.

Each borrows a real tokenizer (the default model's `tokenizer.*` metadata), so prompts tokenize
as usual, and has small random weights in the tensor layout llama.cpp expects for its
architecture. Random weights make nonsense text, which is all a parity test needs: the split
model must produce exactly the nonsense the whole model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from meshchat.model.gguf_file import (
    TensorLayout,
    ValueType,
    encode_header,
    encode_value,
    padding,
    read_header,
)

F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16
Q8_0 = GGMLQuantizationType.Q8_0


@dataclass(frozen=True)
class TinyConfig:
    arch: str
    n_layers: int = 8
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    weight_type: GGMLQuantizationType = F16
    tied_output: bool = True
    seed: int = 0
    sliding_window: int = 6  # gemma3 only: small, so prompts cross the window

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _layer_tensors(cfg: TinyConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
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
    cfg: TinyConfig, tokenizer: dict[str, bytes], n_vocab: int
) -> list[tuple[str, bytes]]:
    a = cfg.arch
    u32, f32, s = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING
    entries = [
        ("general.architecture", encode_value(s, a)),
        ("general.name", encode_value(s, f"tiny-{a}-{cfg.seed}")),
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


def _encode_tensor(data: np.ndarray, type_id: GGMLQuantizationType) -> bytes:
    if type_id == F32:
        return data.astype(np.float32).tobytes()
    if type_id == F16:
        return data.astype(np.float16).tobytes()
    return quantize(data.astype(np.float32), type_id).tobytes()


def write_tiny_model(path: Path, cfg: TinyConfig, tokenizer_source: Path) -> Path:
    """Write a tiny random model of `cfg.arch` to `path`; returns `path`."""
    source = read_header(tokenizer_source)
    tokenizer = {k: e.raw for k, e in source.metadata.items() if k.startswith("tokenizer.")}
    n_vocab = source.metadata["tokenizer.ggml.tokens"].array_length or 0
    rng = np.random.default_rng(cfg.seed)
    tensors: list[tuple[str, GGMLQuantizationType, tuple[int, ...], bytes]] = []

    def add(name: str, shape: tuple[int, ...], matrix: bool, type_id: GGMLQuantizationType) -> None:
        numpy_shape = tuple(reversed(shape))
        if matrix:
            data = rng.standard_normal(numpy_shape) * (1.0 / np.sqrt(shape[0]))
        else:
            data = 1.0 + 0.1 * rng.standard_normal(numpy_shape)  # norms near 1, biases small
            if name.endswith(".bias"):
                data -= 1.0
        tensors.append((name, type_id, shape, _encode_tensor(data, type_id)))

    add("token_embd.weight", (cfg.n_embd, n_vocab), True, F16)
    add("output_norm.weight", (cfg.n_embd,), False, F32)
    if not cfg.tied_output:
        add("output.weight", (cfg.n_embd, n_vocab), True, cfg.weight_type)
    for layer in range(cfg.n_layers):
        for name, (shape, matrix) in _layer_tensors(cfg).items():
            add(f"blk.{layer}.{name}", shape, matrix, cfg.weight_type if matrix else F32)
    layouts = [TensorLayout(n, int(t), s, len(b)) for n, t, s, b in tensors]
    alignment = 32
    with path.open("wb") as out:
        out.write(encode_header(_metadata(cfg, tokenizer, n_vocab), layouts, alignment))
        for _, _, _, data in tensors:
            out.write(data + padding(len(data), alignment))
    return path
