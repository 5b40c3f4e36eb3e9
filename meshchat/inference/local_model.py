"""The model file a node has on its own disk: header, spec, fingerprint, and its stage slices.

Every node of a mesh runs layers only from its own copy of the model; this is the one place
that turns "layers [a, b) of my model" into a file llama.cpp can load (the whole file, or a
cached slice written from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshchat.model.fingerprint import Fingerprint, FingerprintCache
from meshchat.model.gguf_file import GGUFHeader, read_header
from meshchat.model.slices import LayerRange, SliceCache
from meshchat.model.spec import ModelSpec, spec_from_header
from meshchat.paths import DataDir


@dataclass(frozen=True)
class LocalModel:
    path: Path
    header: GGUFHeader
    spec: ModelSpec
    fingerprint: Fingerprint

    @classmethod
    def open(cls, path: Path, data: DataDir) -> LocalModel:
        """Read the header and the (cached) fingerprint; hashing a new file takes a while."""
        return cls.from_header(read_header(path), data)

    @classmethod
    def from_header(cls, header: GGUFHeader, data: DataDir) -> LocalModel:
        """The model whose header is already read; only the fingerprint is looked up."""
        fingerprint = FingerprintCache(data.fingerprints).get(header)
        return cls(header.path, header, spec_from_header(header), fingerprint)

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    @property
    def output_bytes(self) -> int:
        """Bytes of the output matrix (the token embeddings when the model ties them)."""
        return self.spec.output_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV cache bytes one token takes in one layer (f16 keys and values)."""
        arch = self.spec.arch
        head_dim = self.header.get(f"{arch}.attention.key_length")
        if not isinstance(head_dim, int):
            head_dim = self.spec.n_embd // max(self.spec.n_head, 1)
        return 2 * 2 * self.spec.n_head_kv * head_dim

    def stage_file(self, data: DataDir, first: int, end: int) -> Path:
        """The file holding layers [first, end): the model itself or a slice cut from it."""
        return SliceCache(data.slices).get(
            self.header, self.fingerprint.model, LayerRange(first, end)
        )

    def status(self) -> dict[str, Any]:
        """The `model` entry of the status file."""
        return {"path": str(self.path), "fingerprint": self.fingerprint.model}
