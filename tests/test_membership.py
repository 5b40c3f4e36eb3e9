"""The signed roster: record format, who may do what, replay order, bounds and persistence."""

from __future__ import annotations

import json
import os
import random
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.errors import MeshchatError
from meshchat.mesh import membership, wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.membership import (
    CLOCK_SKEW,
    Membership,
    RosterError,
    founded_by,
    join_payload,
    sign_record,
)
from meshchat.mesh.wire import ProtocolError, RosterAction, RosterRecord

ADD, REMOVE = RosterAction.ADD, RosterAction.REMOVE


def join_proof(joiner: Identity, inviter: NodeId) -> tuple[bytes, bytes]:
    """What the joiner's handshake gives the inviter when it redeems an invite."""
    nonce = os.urandom(32)
    return nonce, joiner.sign(join_payload(inviter, joiner.node_id, nonce))


class Mesh:
    """A founder's Membership and helpers to invite, all in memory (files under tmp_path)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.founder = Identity.generate()
        self.views: dict[NodeId, Membership] = {}
        self.ids: dict[NodeId, Identity] = {self.founder.node_id: self.founder}
        self.views[self.founder.node_id] = Membership.load_or_create(
            root / "founder.json", self.founder
        )

    def view(self, ident: Identity) -> Membership:
        return self.views[ident.node_id]

    def invite(self, inviter: Identity, name: str) -> Identity:
        """`inviter` adds a new node (as its _decide does) and the newcomer adopts the roster."""
        new = Identity.generate()
        self.ids[new.node_id] = new
        host = self.view(inviter)
        host.add(new.node_id, *join_proof(new, inviter.node_id))
        joined = Membership.load_or_create(self.root / f"{name}.json", new)
        joined.adopt(host.mesh_id, host.mesh_secret, host.records())
        self.views[new.node_id] = joined
        return new


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path)


def test_founder_is_bound_into_the_mesh_id(mesh: Mesh) -> None:
    m = mesh.view(mesh.founder)
    assert founded_by(m.mesh_id, mesh.founder.node_id)
    assert not founded_by(m.mesh_id, Identity.generate().node_id)
    assert m.founder == mesh.founder.node_id and m.members() == [mesh.founder.node_id]
    assert len(m.mesh_secret) == 32


def test_invitee_adopts_and_members_agree(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    c = mesh.invite(b, "c")  # a member invites too
    fm, bm = mesh.view(mesh.founder), mesh.view(b)
    assert fm.merge(bm.records()) == [c.node_id]
    expected = sorted([mesh.founder.node_id, b.node_id, c.node_id])
    assert fm.members() == bm.members() == mesh.view(c).members() == expected


def test_who_may_remove_whom(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    c = mesh.invite(mesh.founder, "c")
    d = mesh.invite(b, "d")
    bm = mesh.view(b)
    bm.merge(mesh.view(mesh.founder).records())
    # b did not add c: refused, with a reason fit for the TUI's one-line error.
    with pytest.raises(RosterError, match="only the mesh's founder or the member that invited"):
        bm.remove(c.node_id)
    with pytest.raises(RosterError, match="leave instead"):
        bm.remove(b.node_id)
    assert bm.is_member(c.node_id)
    bm.remove(d.node_id)  # b added d: allowed
    assert not bm.is_member(d.node_id)
    fm = mesh.view(mesh.founder)
    fm.merge(bm.records())
    assert not fm.is_member(d.node_id)
    fm.remove(b.node_id)  # the founder: anyone
    cm = mesh.view(c)
    cm.merge(fm.records())
    assert cm.members() == sorted([mesh.founder.node_id, c.node_id])


def test_a_member_may_leave(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    bm = mesh.view(b)
    leave = sign_record(b, bm.mesh_id, b.node_id, REMOVE, time.time() + 1)
    fm = mesh.view(mesh.founder)
    assert fm.merge([leave]) == [b.node_id] and not fm.is_member(b.node_id)


def _wait_past(ts: float) -> None:
    """Let the clock pass `ts`: records made in quick succession are stamped 1 ms apart, ahead
    of the clock, and a node that has not seen a record may otherwise stamp one at its time or
    before (a concurrent change, which replay rightly orders first)."""
    while time.time() <= ts:
        time.sleep(0.001)


def test_removal_is_final_and_kills_the_removed_members_invites(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm, bm = mesh.view(mesh.founder), mesh.view(b)
    removal = fm.remove(b.node_id)
    with pytest.raises(RosterError, match="removed from this mesh"):
        fm.check_add(b.node_id)
    # b, not told yet, redeems its own invite for e, after its removal.
    _wait_past(removal.ts)
    e = Identity.generate()
    late = bm.add(e.node_id, *join_proof(e, b.node_id))
    assert late.ts > fm.records()[-1].ts
    assert fm.merge(bm.records()) == [] and not fm.is_member(e.node_id)
    # Once told, b refuses invites itself.
    bm.merge(fm.records())
    with pytest.raises(RosterError, match="no longer a member"):
        bm.check_add(Identity.generate().node_id)


def test_removal_beats_an_add_of_the_same_timestamp(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm = mesh.view(mesh.founder)
    ts = max(r.ts for r in fm.records()) + 1
    e = Identity.generate()
    add = sign_record(b, fm.mesh_id, e.node_id, ADD, ts, join_proof(e, b.node_id))
    remove = sign_record(mesh.founder, fm.mesh_id, b.node_id, REMOVE, ts)
    fm.merge([add, remove])
    assert fm.members() == [mesh.founder.node_id]


def test_adds_need_the_joiners_proof(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm = mesh.view(mesh.founder)
    stranger = Identity.generate()
    ts = time.time() + 1
    # A proof made for another inviter, or by another key, does not verify.
    for proof in (join_proof(stranger, mesh.founder.node_id), join_proof(b, b.node_id)):
        forged = sign_record(b, fm.mesh_id, stranger.node_id, ADD, ts, proof)
        with pytest.raises(RosterError, match="bad signature"):
            fm.merge([forged])
    # Only the founder adds itself.
    self_add = sign_record(b, fm.mesh_id, b.node_id, ADD, ts)
    assert fm.merge([self_add]) == []
    assert fm.members() == sorted([mesh.founder.node_id, b.node_id])


def test_bad_signatures_and_strangers(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm = mesh.view(mesh.founder)
    good = sign_record(mesh.founder, fm.mesh_id, b.node_id, REMOVE, time.time() + 1)
    tampered = RosterRecord(
        good.mesh_id, good.subject, good.action, good.ts + 1, good.author, good.signature
    )
    with pytest.raises(RosterError, match="bad signature"):
        fm.merge([tampered])
    stranger = Identity.generate()
    by_stranger = sign_record(stranger, fm.mesh_id, b.node_id, REMOVE, time.time())
    other_mesh = sign_record(mesh.founder, "othermesh", b.node_id, REMOVE, time.time())
    assert fm.merge([by_stranger, other_mesh]) == [] and fm.is_member(b.node_id)


def test_future_records_beyond_the_skew_are_dropped(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm = mesh.view(mesh.founder)
    ahead = sign_record(mesh.founder, fm.mesh_id, b.node_id, REMOVE, time.time() + 2 * CLOCK_SKEW)
    assert fm.merge([ahead]) == [] and fm.is_member(b.node_id)


@pytest.mark.parametrize(
    "ts",
    [float("nan"), float("inf"), float("-inf"), 1e300, -1.0, 0, int("9" * 400), True, "1", None],
    ids=["nan", "inf", "-inf", "1e300", "negative", "zero", "400-digits", "bool", "text", "null"],
)
def test_bad_timestamps_are_protocol_errors(mesh: Mesh, ts: object) -> None:
    fm = mesh.view(mesh.founder)
    obj = fm.records()[0].to_json() | {"ts": ts}
    with pytest.raises(ProtocolError):
        RosterRecord.from_json(obj)
    body = json.dumps({"mesh_id": fm.mesh_id, "records": [obj]}).encode()
    with pytest.raises(ProtocolError):
        wire.decode_body(wire.MsgType.ROSTER, body)


def test_malformed_records_are_protocol_errors(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    add = next(r for r in mesh.view(b).records() if r.subject == b.node_id).to_json()
    assert RosterRecord.from_json(add).subject == b.node_id
    for bad in (
        add | {"action": "promote"},
        add | {"subject": "nope"},
        add | {"sig": "AAAA"},
        add | {"extra": 1},
        {k: v for k, v in add.items() if k != "join_sig"},  # an add of another node needs proof
        add | {"action": "remove"},  # and a removal carries none
        add | {"mesh_id": ""},
        add | {"mesh_id": "\u00e9" * 64},  # would not fit the signed layout's length byte
        [add],
    ):
        with pytest.raises(ProtocolError):
            RosterRecord.from_json(bad)
    too_many = {"mesh_id": "m", "records": [add] * (wire.MAX_ROSTER_RECORDS + 1)}
    with pytest.raises(ProtocolError, match="more than"):
        wire.decode_body(wire.MsgType.ROSTER, json.dumps(too_many).encode())


def test_roster_is_bounded(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "MAX_SUBJECTS", 3)
    b = mesh.invite(mesh.founder, "b")
    mesh.invite(mesh.founder, "c")
    with pytest.raises(RosterError, match="full"):
        mesh.view(mesh.founder).check_add(Identity.generate().node_id)
    # A member that adds past the bound is not followed.
    e = Identity.generate()
    bm = mesh.view(b)
    bm.state.adds.pop(mesh.founder.node_id)  # b's view: pretend it has room
    extra = sign_record(b, bm.mesh_id, e.node_id, ADD, time.time() + 1, join_proof(e, b.node_id))
    fm = mesh.view(mesh.founder)
    assert fm.merge([extra]) == [] and len(fm.members()) == 3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_replay_does_not_depend_on_arrival_order(tmp_path_factory, seed: int) -> None:
    """Whole rosters (what nodes send) merged in any order give the same members."""
    mesh = Mesh(tmp_path_factory.mktemp("order"))
    b = mesh.invite(mesh.founder, "b")
    c = mesh.invite(b, "c")
    d = mesh.invite(c, "d")
    fm = mesh.view(mesh.founder)
    for view in mesh.views.values():
        fm.merge(view.records())
    removal = fm.remove(b.node_id)  # b's later adds die; c and d stay (added before)
    _wait_past(removal.ts)
    late = Identity.generate()
    mesh.view(b).add(late.node_id, *join_proof(late, b.node_id))
    rosters = [view.records() for view in mesh.views.values()]
    random.Random(seed).shuffle(rosters)
    fresh = Membership.load_or_create(mesh.root / f"x{seed}.json", Identity.generate())
    fresh.mesh_id = fm.mesh_id
    fresh.state = membership.RosterState(fm.mesh_id)
    for roster in rosters:
        fresh.merge(roster)
    assert fresh.members() == sorted([mesh.founder.node_id, c.node_id, d.node_id])
    assert fresh.records() == fm.records()


def test_persisted_0600_and_reloaded(mesh: Mesh) -> None:
    b = mesh.invite(mesh.founder, "b")
    fm = mesh.view(mesh.founder)
    fm.addresses[b.node_id] = ["127.0.0.1:1"]
    fm.addresses[Identity.generate().node_id] = ["127.0.0.1:2"]  # not a member: not kept
    fm.save()
    assert stat.S_IMODE(fm.path.stat().st_mode) == 0o600
    again = Membership.load_or_create(fm.path, mesh.founder)
    assert again.mesh_id == fm.mesh_id and again.records() == fm.records()
    assert again.addresses == {b.node_id: ["127.0.0.1:1"]}
    # A record whose signature was edited in the file is dropped at load.
    data = json.loads(fm.path.read_text())
    data["records"][1]["ts"] += 1
    fm.path.write_text(json.dumps(data))
    assert Membership.load_or_create(fm.path, mesh.founder).members() == [mesh.founder.node_id]


def test_previous_version_file_is_migrated(tmp_path: Path) -> None:
    me = Identity.generate()
    member, gone = Identity.generate().node_id, Identity.generate().node_id
    old = {
        "mesh_id": "oldmeshid",
        "mesh_secret": "c2VjcmV0",
        "roster": {
            str(me.node_id): {"ts": 1.7e9, "removed": False},
            str(member): {"ts": 1.7e9, "removed": False},
            str(gone): {"ts": 1.7e9, "removed": True},
        },
        "addresses": {str(member): ["10.0.0.2:4000"]},
    }
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(old))
    m = Membership.load_or_create(path, me)
    assert founded_by(m.mesh_id, me.node_id) and m.members() == [me.node_id]
    assert m.is_removed(gone) and not m.is_member(member)
    with pytest.raises(RosterError, match="removed"):
        m.check_add(gone)
    assert json.loads(path.read_text())["version"] == membership.FILE_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("{not json")
    with pytest.raises(MeshchatError, match="unreadable"):
        Membership.load_or_create(path, me)
    for corrupt in ({"roster": {"not-a-node-id": {"removed": True}}}, [], {"records": [{}]}):
        path.write_text(json.dumps(corrupt))
        with pytest.raises(MeshchatError, match="corrupt"):
            Membership.load_or_create(path, me)
