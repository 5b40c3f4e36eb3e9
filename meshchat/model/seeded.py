"""Seeded slices: layer ranges this node got from a peer, kept in its model store.

A seeded slice is an ordinary slice file (meshchat.model.slices) beside a small JSON record:
the whole model's fingerprint (so the node can check a plan against it without the model
file), the peers it came from and its size. A transfer in progress lives in `partial/` as a
sparse mirror of the sender's file plus a resume record; only a verified, complete slice is
renamed into place, so nothing half-written is ever loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh.identity import NodeId
from meshchat.model.fingerprint import Fingerprint, fingerprint_from_json, fingerprint_to_json
from meshchat.model.slices import LayerRange

_RECORD = ".json"
MAX_RECORD_BYTES = 1 << 20  # a record holds a fingerprint: a few KiB per thousand layers


def _origin(texts: list[str]) -> tuple[NodeId, ...]:
    """A record's origin: who sent the slice, for `model list` only. A name that is not a
    NodeID (an edited record) is left out; the slice itself is checked by its fingerprint."""
    found = []
    for text in texts:
        with contextlib.suppress(MeshchatError, TypeError):
            found.append(NodeId.parse(text))
    return tuple(found)


class SeedStoreError(MeshchatError):
    pass


@dataclass(frozen=True)
class SeededSlice:
    path: Path
    fingerprint: Fingerprint
    layers: LayerRange
    origin: tuple[NodeId, ...]  # the peers that sent it
    size: int

    @property
    def name(self) -> str:
        return self.path.name


class SeedStore:
    """The seeded slices of one data dir (`<models>/seeded`), with an optional disk budget."""

    def __init__(self, directory: Path, budget: int | None = None) -> None:
        self.directory = directory
        self.budget = budget  # bytes seeded slices (and transfers) may take; None: no limit

    @classmethod
    def in_store(cls, models: Path, budget: int | None = None) -> SeedStore:
        """The seeded slices kept in the model store at `models`."""
        return cls(models / "seeded", budget)

    @property
    def partial_dir(self) -> Path:
        return self.directory / "partial"

    def path_for(self, model: str, layers: LayerRange) -> Path:
        return self.directory / f"{model[:32]}-{layers.first}-{layers.end}.gguf"

    def partial_for(self, model: str, layers: LayerRange) -> Path:
        return self.partial_dir / f"{model[:32]}-{layers.first}-{layers.end}.part"

    def slices(self) -> list[SeededSlice]:
        """Every complete seeded slice (records that do not parse are skipped)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.gguf")):
            entry = self._read(path)
            if entry is not None:
                found.append(entry)
        return found

    def find(self, model: str, layers: LayerRange) -> SeededSlice | None:
        path = self.path_for(model, layers)
        entry = self._read(path) if path.is_file() else None
        return entry if entry is not None and entry.fingerprint.model == model else None

    def _read(self, path: Path) -> SeededSlice | None:
        record = path.with_suffix(_RECORD)
        try:
            if record.stat().st_size > MAX_RECORD_BYTES:
                return None
            data = json.loads(record.read_text())
            fingerprint = fingerprint_from_json(data["fingerprint"])
            if fingerprint is None:
                return None
            return SeededSlice(
                path,
                fingerprint,
                LayerRange(int(data["first"]), int(data["end"])),
                _origin(data["origin"]),
                path.stat().st_size,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record(self, path: Path, fp: Fingerprint, layers: LayerRange, origin: list[NodeId]) -> None:
        """Write the record of a slice just renamed into place (it becomes visible now)."""
        body = {
            "fingerprint": fingerprint_to_json(fp),
            "first": layers.first,
            "end": layers.end,
            "origin": sorted(str(node) for node in origin),
        }
        atomic_write_text(path.with_suffix(_RECORD), json.dumps(body))

    def used(self) -> int:
        """Bytes on disk under the store (slices, records, partial transfers)."""
        total = 0
        if self.directory.is_dir():
            for path in self.directory.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file():
                        total += path.stat().st_blocks * 512  # sparse mirrors count as used
        return total

    def check_room(self, need: int) -> None:
        """SeedStoreError if `need` more bytes would pass the budget or the free disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise SeedStoreError(
                f"seeding needs {_mib(need)} MiB, the disk at {self.directory} has {_mib(free)} MiB"
            )
        if self.budget is not None and self.used() + need > self.budget:
            raise SeedStoreError(
                f"seeding needs {_mib(need)} MiB; the disk budget for seeded layers is "
                f"{_mib(self.budget)} MiB with {_mib(self.used())} MiB used"
            )

    def remove(self, name: str) -> list[Path]:
        """Delete seeded slices whose file name or model digest starts with `name`
        ("all": every one, and any partial transfer). Returns the files removed."""
        removed: list[Path] = []
        for entry in self.slices():
            if name in ("all", entry.name) or entry.fingerprint.model.startswith(name):
                for path in (entry.path, entry.path.with_suffix(_RECORD)):
                    path.unlink(missing_ok=True)
                    removed.append(path)
        if name == "all" and self.partial_dir.is_dir():
            for path in self.partial_dir.iterdir():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
