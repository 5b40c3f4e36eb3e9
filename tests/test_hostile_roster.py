"""A hostile member sends crafted roster frames over real QUIC; the honest nodes' rosters hold.

Cast (all real Nodes on loopback): A founded the mesh and invited B, V (the victim) and H (the
hostile member); H invited W. H is a real Node that also writes raw ROSTER frames on its control
stream. In
the post-removal attacks A has removed H, and H2 (another hostile member, invited by A) relays
what H made. After each attack: every honest node's roster is unchanged, no stranger connects,
and the mesh still serves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshchat.errors import MeshchatError
from meshchat.mesh import wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.invites import InviteError
from meshchat.mesh.membership import CLOCK_SKEW, join_payload, sign_record
from meshchat.mesh.node import Node, PeerState
from meshchat.mesh.transport import CONTROL_STREAM, ConnectionLost
from meshchat.mesh.wire import RosterAction
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(60)

ADD, REMOVE = RosterAction.ADD, RosterAction.REMOVE
_probe = itertools.count(1)


@dataclass
class Cast:
    mesh: MeshNodes
    a: Node  # founder
    b: Node
    v: Node  # victim
    h: Node  # hostile member
    w: Node  # invited by H
    h2: Node | None = None  # hostile accomplice (post-removal attacks)

    @property
    def honest(self) -> list[Node]:
        return [self.a, self.b, self.v]

    def rosters(self) -> list[list[wire.RosterRecord]]:
        return [n.membership.records() for n in self.honest]


async def build(mesh: MeshNodes) -> Cast:
    a = await mesh.new("a")
    code = a.create_invite(uses=4)
    b, v, h = await mesh.new("b"), await mesh.new("v"), await mesh.new("h")
    for n in (b, v, h):
        await n.join(code)
    w = await mesh.new("w")
    await w.join(h.create_invite())
    cast = Cast(mesh, a, b, v, h, w)
    await all_connected([a, b, v, h, w])
    return cast


async def all_connected(nodes: list[Node]) -> None:
    for n in nodes:
        for other in nodes:
            if other is not n:
                await n.wait_for_peer(other.node_id, timeout=15)
    want = nodes[0].membership.records()
    await eventually(lambda: all(n.membership.records() == want for n in nodes), 10)


def raw_record(record: wire.RosterRecord, **override: Any) -> dict[str, Any]:
    return record.to_json() | override


def signed(
    author: Identity,
    node: Node,
    subject: NodeId,
    action: RosterAction,
    ts: float | None = None,
    join: tuple[bytes, bytes] | None = None,
) -> dict[str, Any]:
    ts = time.time() if ts is None else ts
    return sign_record(author, node.mesh_id, subject, action, ts, join).to_json()


def proof(joiner: Identity, inviter: NodeId) -> tuple[bytes, bytes]:
    nonce = os.urandom(32)
    return nonce, joiner.sign(join_payload(inviter, joiner.node_id, nonce))


async def deliver(sender: Node, target: Node, records: list[dict[str, Any]]) -> None:
    """Write a crafted ROSTER frame, then a STATUS probe, on sender's control stream to target;
    return once target handled both (the probe shows) or cut the sender off."""
    body = json.dumps({"mesh_id": sender.mesh_id, "records": records}).encode()
    frame = wire.encode_header(wire.MsgType.ROSTER, len(body)) + body
    k = next(_probe)
    probe = wire.encode(wire.Status([k, k + 1], None))
    peer = sender.peer(target.node_id)
    assert peer is not None and peer.conn is not None
    conn = peer.conn
    async with conn._control_lock:
        await conn._write(CONTROL_STREAM, [frame + probe], end=False)

    def handled() -> bool:
        seen = target.peer(sender.node_id)
        return conn.is_closed or (seen is not None and seen.layers == (k, k + 1))

    await eventually(handled, 10)


async def attack(cast: Cast, sender: Node, records: list[dict[str, Any]]) -> None:
    """Send the records to every honest node `sender` is connected to."""
    targets = [n for n in cast.honest if n.node_id in sender.connected()]
    assert targets
    for target in targets:
        await deliver(sender, target, records)


async def unchanged(cast: Cast, before: list[list[wire.RosterRecord]], *strangers: Node) -> None:
    assert cast.rosters() == before
    for stranger in strangers:
        for n in cast.honest:
            assert n.peer(stranger.node_id) is None or stranger.node_id not in n.connected()
            with pytest.raises(ConnectionLost, match="not a member"):
                await stranger.connect(n.node_id, n.addresses)
    # Still serving: B asks A, and the honest nodes still count V as a member.
    cast.a.on(wire.Ping, lambda _n, m: wire.Pong(m.seq))
    assert await cast.b.request(cast.a.node_id, wire.Ping(7), timeout=5) == wire.Pong(7)
    assert all(n.membership.is_member(cast.v.node_id) for n in cast.honest)
    assert all(n.membership.is_member(cast.w.node_id) for n in cast.honest)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


# --- attacks by a member ----------------------------------------------------------------------

Attack = Callable[[Cast], Awaitable[list[Node]]]  # returns the strangers that must stay out


async def add_stranger(c: Cast) -> list[Node]:
    """H adds a node that never redeemed its invite (the join proof is made up)."""
    stranger = await c.mesh.new("s")
    s_id = stranger.node_id
    fake = (os.urandom(32), os.urandom(64))
    await attack(c, c.h, [signed(c.h.identity, c.h, s_id, ADD, join=fake)])
    return [stranger]


def _removal_of_victim(c: Cast, **ts: Any) -> list[dict[str, Any]]:
    return [raw_record(sign_record(c.h.identity, c.h.mesh_id, c.v.node_id, REMOVE, 1.8e9), **ts)]


async def remove_victim_ts_1e300(c: Cast) -> list[Node]:
    await attack(c, c.h, _removal_of_victim(c, ts=1e300))
    return []


async def add_stranger_ts_nan(c: Cast) -> list[Node]:
    """An add that no removal could ever replace (every NaN comparison is false)."""
    stranger = await c.mesh.new("s")
    si = stranger.identity
    rec = signed(c.h.identity, c.h, si.node_id, ADD, join=proof(si, c.h.node_id))
    await attack(c, c.h, [rec | {"ts": float("nan")}])  # JSON NaN
    return [stranger]


async def remove_victim_ts_inf(c: Cast) -> list[Node]:
    await attack(c, c.h, _removal_of_victim(c, ts=float("inf")))  # JSON Infinity
    return []


async def remove_victim_ts_400_digits(c: Cast) -> list[Node]:
    await attack(c, c.h, _removal_of_victim(c, ts=int("9" * 400)))
    return []


async def forged_founder_signature(c: Cast) -> list[Node]:
    """H claims the founder removed V, signing with its own key."""
    rec = signed(c.h.identity, c.h, c.v.node_id, REMOVE) | {"author": str(c.a.node_id)}
    await attack(c, c.h, [rec])
    return []


async def signed_by_non_member(c: Cast) -> list[Node]:
    """Well-signed records by a stranger: it removes V, and adds a node that joined through it."""
    stranger = await c.mesh.new("s")
    other = Identity.generate()
    si = stranger.identity
    records = [
        signed(si, c.h, c.v.node_id, REMOVE),
        signed(si, c.h, other.node_id, ADD, join=proof(other, si.node_id)),
        signed(si, c.h, si.node_id, ADD),  # and adds itself as if it were the founder
    ]
    await attack(c, c.h, records)
    return [stranger]


async def removal_not_allowed(c: Cast) -> list[Node]:
    """H removes V, which the founder invited: only A (or V itself) may."""
    await attack(c, c.h, [signed(c.h.identity, c.h, c.v.node_id, REMOVE)])
    return []


async def removal_dated_beyond_skew(c: Cast) -> list[Node]:
    """H removes W, which it did invite, dated an hour ahead (to outlive a re-add): dropped."""
    ahead = time.time() + max(3600.0, 2 * CLOCK_SKEW)
    await attack(c, c.h, [signed(c.h.identity, c.h, c.w.node_id, REMOVE, ts=ahead)])
    return []


MEMBER_ATTACKS: list[Attack] = [
    add_stranger,
    remove_victim_ts_1e300,
    add_stranger_ts_nan,
    remove_victim_ts_inf,
    remove_victim_ts_400_digits,
    forged_founder_signature,
    signed_by_non_member,
    removal_not_allowed,
    removal_dated_beyond_skew,
]


@pytest.mark.parametrize("attack_fn", MEMBER_ATTACKS, ids=lambda f: f.__name__)
async def test_member_attack_leaves_rosters_unchanged(mesh: MeshNodes, attack_fn: Attack) -> None:
    cast = await build(mesh)
    before = cast.rosters()
    strangers = await attack_fn(cast)
    await unchanged(cast, before, *strangers)


# --- attacks by a removed member (and an accomplice still in the mesh) -----------------------


async def build_with_removed(mesh: MeshNodes) -> tuple[Cast, str]:
    """H is removed by the founder; it holds B's still-valid invite; H2 is still a member."""
    cast = await build(mesh)
    h2 = await mesh.new("h2")
    await h2.join(cast.a.create_invite())
    cast.h2 = h2
    await all_connected([cast.a, cast.b, cast.v, cast.h, cast.w, h2])
    b_invite = cast.b.create_invite(uses=3)
    await cast.a.remove_member(cast.h.node_id)
    h = cast.h.node_id
    await eventually(lambda: all(not n.membership.is_member(h) for n in [*cast.honest, h2]))
    await eventually(lambda: all(h not in n.connected() for n in [*cast.honest, h2]), 10)
    await eventually(lambda: not cast.h.connected(), 10)  # H saw every connection close
    return cast, b_invite


async def test_a_removed_node_drops_every_link_and_stops_dialing(mesh: MeshNodes) -> None:
    """The founder tells H before closing: H (honest code) then leaves the mesh for good."""
    cast, _ = await build_with_removed(mesh)
    assert not cast.h.membership.is_member(cast.h.node_id)
    assert cast.h.peers(False) == []  # no peer left to redial
    await asyncio.sleep(2.0)  # several maintenance rounds: nothing dials back in or out
    assert not cast.h.connected()
    assert all(cast.h.node_id not in n.connected() for n in cast.honest)


async def test_removed_member_readds_itself_through_an_accomplice(mesh: MeshNodes) -> None:
    cast, _ = await build_with_removed(mesh)
    assert cast.h2 is not None
    before = cast.rosters()
    hi = cast.h.identity
    records = [
        # H2 "redeems an invite" for H: a genuine-looking add with H's own join proof.
        signed(cast.h2.identity, cast.h2, hi.node_id, ADD, join=proof(hi, cast.h2.node_id)),
        signed(hi, cast.h2, hi.node_id, ADD),  # H adds itself
    ]
    await attack(cast, cast.h2, records)
    await unchanged(cast, before, cast.h)


async def test_removed_member_redeems_a_still_valid_invite(mesh: MeshNodes) -> None:
    cast, b_invite = await build_with_removed(mesh)
    before = cast.rosters()
    with pytest.raises(InviteError, match="removed from this mesh"):
        await cast.h.join(b_invite)
    await unchanged(cast, before, cast.h)
    # The invite's use was not spent on the refusal: a new node still joins with it.
    newcomer = await mesh.new("n")
    await newcomer.join(b_invite)
    assert cast.b.membership.is_member(newcomer.node_id)


async def test_removed_members_invites_die_with_it(mesh: MeshNodes) -> None:
    """H (hostile) still signs an add for a node that redeemed H's invite after the removal."""
    cast, _ = await build_with_removed(mesh)
    assert cast.h2 is not None
    before = cast.rosters()
    newcomer = await mesh.new("n")
    ni = newcomer.identity
    late = signed(cast.h.identity, cast.h2, ni.node_id, ADD, join=proof(ni, cast.h.node_id))
    await attack(cast, cast.h2, [late])
    await unchanged(cast, before, newcomer, cast.h)
    # The founder told H when it removed it: H's own (honest) code refuses its invites.
    await eventually(lambda: not cast.h.membership.is_member(cast.h.node_id))
    with pytest.raises(InviteError, match="no longer a member"):
        await newcomer.join(cast.h.create_invite())
    assert (
        cast.h.peer(newcomer.node_id) is None
        or cast.h.peer(newcomer.node_id).state is not PeerState.CONNECTED
    )  # type: ignore[union-attr]


async def test_a_removal_not_allowed_is_one_clear_error(mesh: MeshNodes) -> None:
    """`remove_member` (the TUI's F7 shows "remove failed: <message>") says why, in one line."""
    cast = await build(mesh)
    before = cast.rosters()
    with pytest.raises(MeshchatError) as refused:
        await cast.b.remove_member(cast.v.node_id)
    message = str(refused.value)
    assert "\n" not in message and "only the mesh's founder or the member that invited" in message
    await unchanged(cast, before)
    await cast.a.remove_member(cast.v.node_id)  # the founder may
    await eventually(lambda: not cast.b.membership.is_member(cast.v.node_id))
