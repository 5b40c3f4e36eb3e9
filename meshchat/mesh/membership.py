"""Mesh membership: the mesh's identity, its shared secret and the roster of member NodeIDs.

Every node starts as the only member of its own mesh; redeeming an invite adopts the inviter's
mesh. Roster entries carry a timestamp and merge last-writer-wins (ties: removal wins), so a
removal spreads between members and a removed node needs a fresh invite (a newer entry) to
return. Persisted atomically in the data dir with mode 0600: the mesh secret is in it.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh.identity import NodeId


@dataclass
class Entry:
    ts: float
    removed: bool = False

    def newer_than(self, other: Entry) -> bool:
        return (self.ts, self.removed) > (other.ts, other.removed)


class Membership:
    """This node's view of its mesh. Call `save()` after changes (the node does)."""

    def __init__(
        self,
        path: Path,
        self_id: NodeId,
        mesh_id: str,
        mesh_secret: bytes,
        roster: dict[NodeId, Entry],
        addresses: dict[NodeId, list[str]],
    ) -> None:
        self.path = path
        self.self_id = self_id
        self.mesh_id = mesh_id
        self.mesh_secret = mesh_secret
        self.roster = roster
        self.addresses = addresses  # last known listen addresses of members, for reconnects
        self.roster.setdefault(self_id, Entry(time.time()))

    @classmethod
    def load_or_create(cls, path: Path, self_id: NodeId) -> Membership:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            m = cls.new(path, self_id)
            m.save()
            return m
        except (OSError, ValueError) as exc:
            raise MeshchatError(f"mesh file {path} is unreadable ({exc})") from exc
        try:
            roster = {
                NodeId.parse(k): Entry(float(v["ts"]), bool(v["removed"]))
                for k, v in data["roster"].items()
            }
            addresses = {
                NodeId.parse(k): [str(a) for a in v] for k, v in data.get("addresses", {}).items()
            }
            return cls(
                path,
                self_id,
                str(data["mesh_id"]),
                base64.b64decode(data["mesh_secret"]),
                roster,
                addresses,
            )
        except (KeyError, TypeError, ValueError, AttributeError, MeshchatError) as exc:
            raise MeshchatError(f"mesh file {path} is corrupt ({exc})") from exc

    @classmethod
    def new(cls, path: Path, self_id: NodeId) -> Membership:
        mesh_id = base64.b32encode(os.urandom(10)).decode().lower()
        return cls(path, self_id, mesh_id, os.urandom(32), {}, {})

    def save(self) -> None:
        data = {
            "mesh_id": self.mesh_id,
            "mesh_secret": base64.b64encode(self.mesh_secret).decode(),
            "roster": self.roster_json(),
            "addresses": {str(k): v for k, v in self.addresses.items()},
        }
        atomic_write_text(self.path, json.dumps(data, indent=1), mode=0o600)

    # --- queries

    def is_member(self, node: NodeId) -> bool:
        entry = self.roster.get(node)
        return entry is not None and not entry.removed

    def members(self) -> list[NodeId]:
        return sorted(n for n, e in self.roster.items() if not e.removed)

    # --- changes

    def add(self, node: NodeId) -> None:
        self.roster[node] = Entry(max(time.time(), self._ts(node) + 1e-3))

    def remove(self, node: NodeId) -> None:
        if node == self.self_id:
            raise MeshchatError("a node cannot remove itself from its mesh; leave instead")
        self.roster[node] = Entry(max(time.time(), self._ts(node) + 1e-3), removed=True)
        self.addresses.pop(node, None)

    def _ts(self, node: NodeId) -> float:
        entry = self.roster.get(node)
        return entry.ts if entry else 0.0

    def adopt(self, mesh_id: str, mesh_secret: bytes, roster: dict[str, Any]) -> None:
        """Join another mesh (after redeeming an invite): its roster replaces ours."""
        self.mesh_id = mesh_id
        self.mesh_secret = mesh_secret
        self.roster = {}
        self.addresses = {}
        self.merge(roster)
        self.roster.setdefault(self.self_id, Entry(time.time()))

    def roster_json(self) -> dict[str, Any]:
        return {str(k): {"ts": v.ts, "removed": v.removed} for k, v in self.roster.items()}

    def merge(self, entries: dict[str, Any]) -> list[NodeId]:
        """Merge a peer's roster; return the nodes whose entry changed. Bad entries are skipped."""
        changed = []
        for key, raw in entries.items():
            try:
                node = NodeId.parse(key)
                entry = Entry(float(raw["ts"]), bool(raw["removed"]))
            except (MeshchatError, KeyError, TypeError, ValueError):
                continue
            if node == self.self_id and entry.removed:
                # We were removed: keep the record so we stop treating the mesh as ours.
                pass
            old = self.roster.get(node)
            if old is None or entry.newer_than(old):
                self.roster[node] = entry
                changed.append(node)
        return changed
