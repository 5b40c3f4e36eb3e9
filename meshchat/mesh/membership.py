"""Mesh membership: the mesh's identity, its shared secret and the signed roster.

The roster is a set of `wire.RosterRecord`s, each signed (Ed25519, the node key) by the member
that made it. Every node checks every record before keeping it, by replaying all records in
timestamp order (a removal before an add of the same timestamp) and keeping those that are
allowed at that point. Replay makes the result depend only on the set of records, so members
that saw the same records agree, whatever order they arrived in.

Who may do what (checked at replay, on every node):
- The founder is the node that created the mesh: the mesh id starts with a hash of its key, so
  every member can tell who it is. Its own add (author = subject) starts the roster.
- Add: any member, for a node that redeemed that member's invite. The add carries the newcomer's
  join proof (its handshake signature over `join_payload`, made only when redeeming an invite),
  so a member cannot add a node that never asked to join through it.
- Remove: the founder may remove anyone; a member may remove the members it added; any member
  may remove itself (leave). A member that was added by two members may be removed by either.
- A removal is final: a removed NodeID never becomes a member of this mesh again (honest nodes
  refuse its invites; a new identity is needed). Records by an author dated after its removal
  are dropped, so invites it issued die with it.
- The author must be a member at the record's timestamp; timestamps are finite, within
  [wire.MIN_ROSTER_TS, wire.MAX_ROSTER_TS], and not later than now + CLOCK_SKEW on arrival.

Why not "any member may remove anyone": one guest could empty the mesh. Why not trust the
inviter without a join proof: a member could add any NodeID, or claim to have added a victim
(backdating its add) and so gain the right to remove it.

Persisted atomically in the data dir with mode 0600: the mesh secret is in it. A file from the
previous version (unsigned `roster` entries, random mesh id) is migrated at load into a new mesh
founded by this node: its removals are re-signed by this node as bans, its other members must
pair again with an invite (the old mesh had no founder to anchor their signed adds).
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.wire import (
    MAX_ROSTER_RECORDS,
    MAX_ROSTER_TS,
    ProtocolError,
    RosterAction,
    RosterRecord,
)

log = logging.getLogger(__name__)

FILE_VERSION = 2
#: A record dated more than this ahead of our clock is refused. It must exceed the clock
#: difference between honest machines (a LAN without NTP drifts by minutes; else a joiner would
#: refuse its own add), and stay small so no record sits far ahead of every clock.
CLOCK_SKEW = 300.0
#: Distinct NodeIDs on the roster (each has one add and maybe one removal): 2 records each, so a
#: whole roster fits one control frame (~490 bytes a record: 0.5 MB of the 1 MiB limit).
MAX_SUBJECTS = MAX_ROSTER_RECORDS // 2
MAX_ADDRESSES_PER_MEMBER = 8
_FOUNDER_HASH = 12  # bytes of the founder's key hash at the start of the mesh id
_MESH_NONCE = 8
_JOIN_DOMAIN = b"meshchat/1 join\x00"


class RosterError(MeshchatError):
    """A roster record that is not allowed; the message says why."""


def join_payload(inviter: NodeId, joiner: NodeId, nonce: bytes) -> bytes:
    """What a node signs in the handshake when it redeems an invite of `inviter`."""
    return _JOIN_DOMAIN + inviter.raw + joiner.raw + nonce


def new_mesh_id(founder: NodeId) -> str:
    raw = founder.fingerprint(_FOUNDER_HASH) + os.urandom(_MESH_NONCE)
    return base64.b32encode(raw).decode().lower()


def founded_by(mesh_id: str, node: NodeId) -> bool:
    """True if `mesh_id` was made by `node` (its key hash starts the id)."""
    try:
        raw = base64.b32decode(mesh_id.upper())
    except ValueError:
        return False
    return len(raw) == _FOUNDER_HASH + _MESH_NONCE and hmac.compare_digest(
        raw[:_FOUNDER_HASH], node.fingerprint(_FOUNDER_HASH)
    )


def sign_record(
    identity: Identity,
    mesh_id: str,
    subject: NodeId,
    action: RosterAction,
    ts: float,
    join: tuple[bytes, bytes] | None = None,
) -> RosterRecord:
    nonce, proof = join if join is not None else (None, None)
    unsigned = RosterRecord(mesh_id, subject, action, ts, identity.node_id, b"", nonce, proof)
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_payload()))


def check_signatures(record: RosterRecord) -> bool:
    """The author's signature, and for an add of another node the subject's join proof."""
    if not record.author.verify(record.signature, record.signed_payload()):
        return False
    if record.join_nonce is None or record.join_signature is None:
        return True
    proof = join_payload(record.author, record.subject, record.join_nonce)
    return record.subject.verify(record.join_signature, proof)


def _replay_order(r: RosterRecord) -> tuple[float, bool, bytes, bytes, bytes]:
    # Removals first at equal timestamps ("a removal beats an add of the same timestamp").
    return (r.ts, r.action is RosterAction.ADD, r.subject.raw, r.author.raw, r.signature)


@dataclass
class RosterState:
    """The outcome of a replay: the first valid add and the valid removal of each NodeID."""

    mesh_id: str
    adds: dict[NodeId, RosterRecord] = field(default_factory=dict)
    removals: dict[NodeId, RosterRecord] = field(default_factory=dict)

    def is_member(self, node: NodeId) -> bool:
        return node in self.adds and node not in self.removals

    def refusal(self, r: RosterRecord) -> str | None:
        """Why `r` is not allowed after the records replayed so far, or None if it is."""
        if r.mesh_id != self.mesh_id:
            return "the record is for another mesh"
        new_subject = r.subject not in self.adds and r.subject not in self.removals
        if new_subject and len(self.adds.keys() | self.removals.keys()) >= MAX_SUBJECTS:
            return f"the roster is full ({MAX_SUBJECTS} nodes)"
        if r.subject in self.removals:
            return f"node {r.subject.short} was removed from this mesh"
        if r.action is RosterAction.ADD:
            if r.subject == r.author:
                ok = founded_by(self.mesh_id, r.author) and not self.adds
                return None if ok else "only the founder adds itself, first"
            if not self.is_member(r.author):
                return f"node {r.author.short} is not a member"
            return None  # its join proof (checked with the signatures) shows it asked to join
        if not self.is_member(r.author):
            return f"node {r.author.short} is not a member"
        added = self.adds.get(r.subject)
        if (
            r.author == r.subject
            or founded_by(self.mesh_id, r.author)
            or (added is not None and added.author == r.author)
        ):
            return None
        return (
            f"node {r.author.short} may not remove {r.subject.short}: only the mesh's founder "
            "or the member that invited it can"
        )

    def apply(self, r: RosterRecord) -> None:
        if r.action is RosterAction.REMOVE:
            self.removals[r.subject] = r
        else:
            self.adds.setdefault(r.subject, r)

    def records(self) -> list[RosterRecord]:
        return sorted([*self.adds.values(), *self.removals.values()], key=_replay_order)


def replay(mesh_id: str, records: Iterable[RosterRecord]) -> RosterState:
    """Keep the records that are allowed, in timestamp order (signatures checked before)."""
    state = RosterState(mesh_id)
    for r in sorted(set(records), key=_replay_order):
        if state.refusal(r) is None:
            state.apply(r)
    return state


class Membership:
    """This node's view of its mesh. Call `save()` after changes (the node does)."""

    def __init__(
        self,
        path: Path,
        identity: Identity,
        mesh_id: str,
        mesh_secret: bytes,
        state: RosterState,
        addresses: dict[NodeId, list[str]],
    ) -> None:
        self.path = path
        self.identity = identity
        self.self_id = identity.node_id
        self.mesh_id = mesh_id
        self.mesh_secret = mesh_secret
        self.state = state
        self.addresses = addresses  # last known listen addresses of members, for reconnects

    @classmethod
    def load_or_create(cls, path: Path, identity: Identity) -> Membership:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            m = cls.new(path, identity)
            m.save()
            return m
        except (OSError, ValueError) as exc:
            raise MeshchatError(f"mesh file {path} is unreadable ({exc})") from exc
        try:
            if "records" not in data:
                return cls._migrate(path, identity, data)
            mesh_id = str(data["mesh_id"])
            records = [RosterRecord.from_json(r) for r in data["records"]]
            # Our own file: signatures are checked, the clock-skew bound is not (the clock
            # may have been set back since these records were written).
            state = replay(mesh_id, (r for r in records if check_signatures(r)))
            addresses = {
                NodeId.parse(k): [str(a) for a in v][:MAX_ADDRESSES_PER_MEMBER]
                for k, v in data.get("addresses", {}).items()
            }
            m = cls(path, identity, mesh_id, base64.b64decode(data["mesh_secret"]), state, {})
            m.addresses = {n: a for n, a in addresses.items() if m.is_member(n)}
            return m
        except (
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            ProtocolError,
            MeshchatError,
        ) as exc:
            raise MeshchatError(f"mesh file {path} is corrupt ({exc})") from exc

    @classmethod
    def new(cls, path: Path, identity: Identity) -> Membership:
        mesh_id = new_mesh_id(identity.node_id)
        m = cls(path, identity, mesh_id, os.urandom(32), RosterState(mesh_id), {})
        m._commit(m._sign(identity.node_id, RosterAction.ADD))
        return m

    @classmethod
    def _migrate(cls, path: Path, identity: Identity, data: dict[str, Any]) -> Membership:
        """A previous-version file: a new mesh founded by us, keeping its removals as bans."""
        removed = [
            NodeId.parse(k)
            for k, v in data["roster"].items()
            if v["removed"] is True and k != str(identity.node_id)
        ]
        m = cls.new(path, identity)
        for node in removed[: MAX_SUBJECTS - 1]:
            m._commit(m._sign(node, RosterAction.REMOVE))
        m.save()
        log.warning(
            "mesh file %s is from an older meshchat: started a new mesh (%d removed nodes kept "
            "out); other members must join again with an invite",
            path,
            len(removed),
        )
        return m

    def save(self) -> None:
        self.addresses = {n: a for n, a in self.addresses.items() if self.is_member(n)}
        data = {
            "version": FILE_VERSION,
            "mesh_id": self.mesh_id,
            "mesh_secret": base64.b64encode(self.mesh_secret).decode(),
            "records": [r.to_json() for r in self.records()],
            "addresses": {str(k): v[:MAX_ADDRESSES_PER_MEMBER] for k, v in self.addresses.items()},
        }
        atomic_write_text(self.path, json.dumps(data, indent=1), mode=0o600)

    # --- queries

    def is_member(self, node: NodeId) -> bool:
        return self.state.is_member(node)

    def is_removed(self, node: NodeId) -> bool:
        return node in self.state.removals

    def members(self) -> list[NodeId]:
        return sorted(n for n in self.state.adds if n not in self.state.removals)

    def records(self) -> list[RosterRecord]:
        return self.state.records()

    @property
    def founder(self) -> NodeId | None:
        return next((n for n in self.state.adds if founded_by(self.mesh_id, n)), None)

    # --- changes made by this node (signed by it)

    def check_add(self, node: NodeId) -> None:
        """Raise RosterError if this node could not add `node` now (before using an invite)."""
        if not self.is_member(self.self_id):
            raise RosterError("this node is no longer a member of its mesh")
        if self.is_removed(node):
            raise RosterError(f"node {node.short} was removed from this mesh and cannot rejoin")
        full = len(self.state.adds.keys() | self.state.removals.keys()) >= MAX_SUBJECTS
        if node not in self.state.adds and full:
            raise RosterError(f"the roster is full ({MAX_SUBJECTS} nodes)")

    def add(self, node: NodeId, join_nonce: bytes, join_signature: bytes) -> RosterRecord:
        """Record that `node` redeemed our invite; the join proof is its handshake signature."""
        self.check_add(node)
        record = self._sign(node, RosterAction.ADD, (join_nonce, join_signature))
        if not check_signatures(record):
            raise RosterError(f"node {node.short}'s join proof does not verify")
        self._commit(record)
        return record

    def remove(self, node: NodeId) -> RosterRecord:
        """Remove `node` (founder: anyone; member: those it added). Raises RosterError if not."""
        if node == self.self_id:
            raise RosterError("a node cannot remove itself from its mesh; leave instead")
        if not self.is_member(node):
            raise RosterError(f"node {node.short} is not a member of this mesh")
        record = self._sign(node, RosterAction.REMOVE)
        self._commit(record)
        self.addresses.pop(node, None)
        return record

    def _sign(
        self, subject: NodeId, action: RosterAction, join: tuple[bytes, bytes] | None = None
    ) -> RosterRecord:
        # After every record we know: the author was a member then, and replay order is kept
        # even if our clock is behind the one that stamped our own add.
        latest = max((r.ts for r in self.records()), default=0.0)
        ts = min(max(time.time(), latest + 1e-3), MAX_ROSTER_TS)
        return sign_record(self.identity, self.mesh_id, subject, action, ts, join)

    def _commit(self, record: RosterRecord) -> None:
        reason = self.state.refusal(record)
        if reason is not None:
            raise RosterError(reason)
        self.state.apply(record)

    # --- records from other nodes

    def adopt(self, mesh_id: str, mesh_secret: bytes, records: list[RosterRecord]) -> None:
        """Join another mesh (after redeeming an invite): its checked roster replaces ours."""
        state = replay(mesh_id, self._acceptable(records, mesh_id))
        if not state.is_member(self.self_id):
            raise RosterError(
                "the inviter's roster does not list this node as a member (is this machine's "
                f"clock more than {CLOCK_SKEW:g} s behind the inviter's?)"
            )
        self.mesh_id, self.mesh_secret, self.state = mesh_id, mesh_secret, state
        self.addresses = {}

    def merge(self, records: list[RosterRecord]) -> list[NodeId]:
        """Merge a peer's roster; return the nodes whose membership changed.

        Records not allowed (yet) are dropped: a peer may know less than we do. A record whose
        signature does not verify raises RosterError: no honest member sends one.
        """
        known = set(self.records())
        new = [r for r in records if r not in known]
        if not new:
            return []
        before = set(self.members())
        removed_before = set(self.state.removals)
        self.state = replay(self.mesh_id, [*known, *self._acceptable(new, self.mesh_id)])
        after = set(self.members())
        changed = (before ^ after) | (set(self.state.removals) - removed_before)
        return sorted(changed)

    def _acceptable(self, records: list[RosterRecord], mesh_id: str) -> list[RosterRecord]:
        limit = time.time() + CLOCK_SKEW
        good = []
        for r in records:
            if r.mesh_id != mesh_id or not math.isfinite(r.ts) or r.ts > limit:
                continue
            if not check_signatures(r):
                raise RosterError(f"roster record by {r.author.short} has a bad signature")
            good.append(r)
        return good
