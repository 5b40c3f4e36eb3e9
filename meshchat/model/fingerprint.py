"""Content fingerprints of a model: one digest per layer, one for the rest, one for the whole.

Peers compare fingerprints before running each other's layers: two files with the same layer
digest for layer i hold the same weights for that layer, whatever their names or paths. Hashing a
multi-GB file takes a while, so the result is cached by (path, size, mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshchat.fsutil import atomic_write_text
from meshchat.model.gguf_file import GGUFHeader, TensorEntry, read_header

_CHUNK = 4 << 20
_FORMAT = 1  # bump when the digest recipe changes, so old cache entries are ignored


@dataclass(frozen=True)
class Fingerprint:
    model: str  # hex digest of the whole model
    config: str  # metadata that shapes compute (everything but general.* descriptions)
    globals: str  # weights outside the blocks: embeddings, output norm, output
    layers: tuple[str, ...]  # one hex digest per block

    @property
    def short(self) -> str:
        return self.model[:16]

    def layers_match(self, other: Fingerprint, first: int, end: int) -> bool:
        """Whether `other` holds the same weights and config for layers [first, end)."""
        return (
            self.config == other.config
            and self.globals == other.globals
            and self.layers[first:end] == other.layers[first:end]
        )


def fingerprint_to_json(fp: Fingerprint) -> dict[str, Any]:
    return {
        "model": fp.model,
        "config": fp.config,
        "globals": fp.globals,
        "layers": list(fp.layers),
    }


def fingerprint_from_json(data: Any) -> Fingerprint | None:
    """A fingerprint read back from JSON (a peer's, or a record on disk), or None if it is
    malformed (neither is trusted)."""
    if not isinstance(data, dict):
        return None
    parts = [data.get(k) for k in ("model", "config", "globals")]
    layers = data.get("layers")
    if not all(isinstance(p, str) and len(p) <= 128 for p in parts):
        return None
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        return None
    return Fingerprint(parts[0], parts[1], parts[2], tuple(layers))  # type: ignore[arg-type]


def _hash_tensor(digest: hashlib._Hash, handle: object, tensor: TensorEntry, name: str) -> None:
    digest.update(f"{name}|{tensor.type_id}|{tensor.shape}|".encode())
    fd = handle.fileno()  # type: ignore[attr-defined]
    remaining, offset = tensor.n_bytes, tensor.offset
    while remaining:
        chunk = os.pread(fd, min(_CHUNK, remaining), offset)
        if not chunk:
            raise OSError(f"unexpected end of file at {offset}")
        digest.update(chunk)
        remaining -= len(chunk)
        offset += len(chunk)


def compute_fingerprint(header: GGUFHeader) -> Fingerprint:
    config = hashlib.sha256()
    for key in sorted(header.metadata):
        if not key.startswith("general.") or key in ("general.architecture", "general.alignment"):
            config.update(key.encode() + b"=" + header.metadata[key].raw)
    n_layers = int(header.get(f"{header.arch}.block_count", 0))
    layer_digests = [hashlib.sha256() for _ in range(n_layers)]
    globals_digest = hashlib.sha256()
    with header.path.open("rb") as handle:
        for tensor in sorted(header.tensors, key=lambda t: t.name):
            layer = tensor.layer
            if layer is None:
                _hash_tensor(globals_digest, handle, tensor, tensor.name)
            else:
                # Hash the name without its block number, so a layer's digest does not depend on
                # where it sits: slices renumber layers, and the digest must survive that.
                local_name = tensor.name.split(".", 2)[2]
                _hash_tensor(layer_digests[layer], handle, tensor, local_name)
    layers = tuple(d.hexdigest() for d in layer_digests)
    whole = hashlib.sha256()
    for part in (config.hexdigest(), globals_digest.hexdigest(), *layers):
        whole.update(part.encode())
    return Fingerprint(whole.hexdigest(), config.hexdigest(), globals_digest.hexdigest(), layers)


class FingerprintCache:
    """Fingerprints on disk, keyed by (absolute path, size, mtime_ns)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _entry_path(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
        return self.directory / f"{key}.json"

    def get(self, header: GGUFHeader) -> Fingerprint:
        path = header.path
        stat = path.stat()
        stamp = {
            "format": _FORMAT,
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        entry = self._entry_path(path)
        try:
            cached = json.loads(entry.read_text())
            if cached.get("stamp") == stamp:
                data = cached["fingerprint"]
                return Fingerprint(
                    data["model"], data["config"], data["globals"], tuple(data["layers"])
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a missing or damaged cache entry only costs a re-hash
        fingerprint = compute_fingerprint(header)
        # A read-only or full disk must not stop the model from running: skip the cache.
        with contextlib.suppress(OSError):
            record = {"stamp": stamp, "fingerprint": asdict(fingerprint)}
            atomic_write_text(entry, json.dumps(record))
        return fingerprint


def fingerprint_of(path: Path, cache_dir: Path | None = None) -> Fingerprint:
    header = read_header(path)
    if cache_dir is None:
        return compute_fingerprint(header)
    return FingerprintCache(cache_dir).get(header)


def config_digest(header: GGUFHeader) -> str:
    """The `config` part of a fingerprint, from the header alone (no tensor data is read)."""
    config = hashlib.sha256()
    for key in sorted(header.metadata):
        if not key.startswith("general.") or key in ("general.architecture", "general.alignment"):
            config.update(key.encode() + b"=" + header.metadata[key].raw)
    return config.hexdigest()


def part_digest(header: GGUFHeader, layer: int | None) -> str:
    """The digest of one layer's tensors (`layer`), or of the global tensors (None), from the
    file `header` describes: what `compute_fingerprint` puts in `layers[layer]` or `globals`.
    A seeded file is checked part by part with it before anything uses it."""
    digest = hashlib.sha256()
    with header.path.open("rb") as handle:
        for tensor in sorted(header.tensors, key=lambda t: t.name):
            if tensor.layer != layer:
                continue
            name = tensor.name if layer is None else tensor.name.split(".", 2)[2]
            _hash_tensor(digest, handle, tensor, name)
    return digest.hexdigest()
