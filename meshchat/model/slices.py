"""Slice files: a GGUF holding only layers [first, end) of a model, renumbered from 0.

llama.cpp has no layer-range loader, but it loads any consistent GGUF. A slice keeps every
metadata entry (block_count and per-layer arrays cut to the range), the layers' tensors renamed
`blk.{i - first}.*`, and the global tensors the loader needs: token embeddings and the output
norm always, the output matrix only in the last slice. Slices are cached by
(fingerprint, first, end) and written atomically, so a crash never leaves a half slice that loads.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_writer
from meshchat.model.gguf_file import (
    GGUFHeader,
    MetadataEntry,
    TensorEntry,
    TensorLayout,
    ValueType,
    encode_header,
    encode_value,
    padding,
    read_header,
)

_COPY_CHUNK = 8 << 20
_LAST_SLICE_ONLY = ("output.weight", "output.bias")


@dataclass(frozen=True)
class LayerRange:
    first: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.first < self.end:
            raise ValueError(f"empty or negative layer range [{self.first}, {self.end})")

    def __str__(self) -> str:
        return f"[{self.first}, {self.end})"

    @property
    def count(self) -> int:
        return self.end - self.first


def _slice_metadata(
    header: GGUFHeader, layers: LayerRange, fingerprint: str
) -> list[tuple[str, bytes]]:
    arch = header.arch
    n_layers = int(header.get(f"{arch}.block_count"))
    entries: list[tuple[str, bytes]] = []
    for key, entry in header.metadata.items():
        entries.append((key, _slice_entry(entry, arch, n_layers, layers)))
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    from meshchat.model.spec import spec_from_header

    pattern = spec_from_header(header).sliding_window_pattern
    if pattern is not None:
        # Carry the per-layer pattern explicitly: a renumbered layer would otherwise get the
        # pattern of its new index and attend differently.
        raw = encode_value(
            ValueType.ARRAY, list(pattern[layers.first : layers.end]), ValueType.BOOL
        )
        entries = [(k, v) for k, v in entries if k != pattern_key] + [(pattern_key, raw)]
    entries += [
        ("meshchat.slice.first_layer", encode_value(ValueType.UINT32, layers.first)),
        ("meshchat.slice.end_layer", encode_value(ValueType.UINT32, layers.end)),
        ("meshchat.slice.source_layers", encode_value(ValueType.UINT32, n_layers)),
        ("meshchat.slice.source_fingerprint", encode_value(ValueType.STRING, fingerprint)),
    ]
    return entries


def _slice_entry(entry: MetadataEntry, arch: str, n_layers: int, layers: LayerRange) -> bytes:
    if entry.key == f"{arch}.block_count":
        return encode_value(entry.value_type, layers.count)
    if entry.key.startswith(f"{arch}.") and entry.value_type == ValueType.ARRAY:
        value = entry.value
        if isinstance(value, list) and len(value) == n_layers:
            # A per-layer array (head counts, ffn sizes, patterns): keep the range's part.
            return encode_value(ValueType.ARRAY, value[layers.first : layers.end], entry.item_type)
    return entry.raw


def _slice_tensors(header: GGUFHeader, layers: LayerRange, n_layers: int) -> list[TensorEntry]:
    kept = []
    for tensor in header.tensors:
        layer = tensor.layer
        if layer is None:
            if tensor.name in _LAST_SLICE_ONLY and layers.end != n_layers:
                continue
            kept.append(tensor)
        elif layers.first <= layer < layers.end:
            rest = tensor.name.split(".", 2)[2]
            kept.append(tensor.renamed(f"blk.{layer - layers.first}.{rest}"))
    return kept


def write_slice(header: GGUFHeader, layers: LayerRange, fingerprint: str, dest: Path) -> None:
    """Write the slice of `header`'s model for `layers` to `dest` (atomically)."""
    n_layers = int(header.get(f"{header.arch}.block_count"))
    if layers.end > n_layers:
        raise MeshchatError(f"layer range {layers} is beyond the model's {n_layers} layers")
    metadata = _slice_metadata(header, layers, fingerprint)
    tensors = _slice_tensors(header, layers, n_layers)
    layouts = [TensorLayout(t.name, t.type_id, t.shape, t.n_bytes) for t in tensors]
    try:
        with atomic_writer(dest) as out, header.path.open("rb") as src:
            out.write(encode_header(metadata, layouts, header.alignment))
            for tensor in tensors:
                _copy_range(src.fileno(), out.fileno(), tensor.offset, tensor.n_bytes)
                out.write(padding(tensor.n_bytes, header.alignment))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MeshchatError(f"no space left on device writing slice {dest}") from exc
        raise MeshchatError(f"cannot write slice {dest}: {exc.strerror or exc}") from exc


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, count), offset)
        if not chunk:
            raise OSError(errno.EIO, "model file shrank while slicing")
        os.write(dst_fd, chunk)
        offset += len(chunk)
        count -= len(chunk)


class SliceCache:
    """Slice files on disk, one per (model fingerprint, first layer, end layer)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, fingerprint: str, layers: LayerRange) -> Path:
        return self.directory / f"{fingerprint[:32]}-{layers.first}-{layers.end}.gguf"

    def get(self, header: GGUFHeader, fingerprint: str, layers: LayerRange) -> Path:
        """The slice file for `layers`, written on first use. The whole range is the model."""
        n_layers = int(header.get(f"{header.arch}.block_count"))
        if layers.first == 0 and layers.end == n_layers:
            return header.path
        path = self.path_for(fingerprint, layers)
        if path.exists():
            try:
                read_header(path)
                return path
            except MeshchatError:
                path.unlink(missing_ok=True)  # damaged by hand or by disk: write it again
        write_slice(header, layers, fingerprint, path)
        return path
