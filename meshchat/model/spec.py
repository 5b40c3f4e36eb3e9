"""A typed summary of a GGUF model: architecture, dimensions, tokenizer facts, quant types."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from meshchat.model.architectures import sliding_window_pattern
from meshchat.model.gguf_file import GGUFHeader, ModelFileError, read_header


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    arch: str
    name: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int
    vocab_size: int
    rope_freq_base: float | None
    file_size: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    layer_bytes: tuple[int, ...] = ()  # bytes of weights in each block
    global_bytes: int = 0  # bytes of weights outside the blocks (embeddings, output)
    output_bytes: int = 0  # the output matrix (the token embeddings when the model ties them)
    has_chat_template: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None
    sliding_window_pattern: tuple[bool, ...] | None = None  # per layer: True = sliding window

    @property
    def main_quant(self) -> str:
        """The type holding most tensors among the quantized ones (what people call 'the quant')."""
        quantized = {t: n for t, n in self.tensor_types.items() if t not in ("F32",)}
        pool = quantized or self.tensor_types
        return max(pool, key=lambda t: pool[t]) if pool else "unknown"


def _int(header: GGUFHeader, key: str, default: int | None = None) -> int:
    value = header.get(key)
    if value is None:
        if default is not None:
            return default
        raise ModelFileError(f"GGUF metadata lacks {key}: {header.path}")
    if isinstance(value, list):
        # Some models give per-layer values; the first stands for the whole in a summary.
        return int(value[0]) if value else (default or 0)
    return int(value)


def read_spec(path: Path) -> ModelSpec:
    """Read the spec of the GGUF at `path` (header only; weights are not touched)."""
    return spec_from_header(read_header(path))


def spec_from_header(header: GGUFHeader) -> ModelSpec:
    arch = header.arch
    n_layers = _int(header, f"{arch}.block_count")
    n_head = _int(header, f"{arch}.attention.head_count")
    layer_bytes = [0] * n_layers
    global_bytes = 0
    for tensor in header.tensors:
        layer = tensor.layer
        if layer is None:
            global_bytes += tensor.n_bytes
        elif 0 <= layer < n_layers:
            layer_bytes[layer] += tensor.n_bytes
        else:
            raise ModelFileError(f"tensor {tensor.name} is outside block_count in {header.path}")
    sizes = {t.name: t.n_bytes for t in header.tensors}
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = header.get(f"{arch}.vocab_size")
    if not isinstance(vocab, int):
        vocab = (tokens.array_length or 0) if tokens is not None else 0
    rope = header.get(f"{arch}.rope.freq_base")
    bos = header.get("tokenizer.ggml.bos_token_id")
    eos = header.get("tokenizer.ggml.eos_token_id")
    add_bos = header.get("tokenizer.ggml.add_bos_token")
    name = header.get("general.name")
    return ModelSpec(
        path=header.path,
        arch=arch,
        name=name if isinstance(name, str) else header.path.stem,
        n_layers=n_layers,
        n_embd=_int(header, f"{arch}.embedding_length"),
        n_head=n_head,
        n_head_kv=_int(header, f"{arch}.attention.head_count_kv", default=n_head),
        n_ff=_int(header, f"{arch}.feed_forward_length", default=0),
        context_length=_int(header, f"{arch}.context_length", default=2048),
        vocab_size=vocab,
        rope_freq_base=float(rope) if isinstance(rope, float | int) else None,
        file_size=header.file_size,
        tensor_types=dict(Counter(t.type_name for t in header.tensors)),
        layer_bytes=tuple(layer_bytes),
        global_bytes=global_bytes,
        output_bytes=sizes.get("output.weight", sizes.get("token_embd.weight", 0)),
        has_chat_template="tokenizer.chat_template" in header.metadata,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        sliding_window_pattern=sliding_window_pattern(header, arch, n_layers),
    )
