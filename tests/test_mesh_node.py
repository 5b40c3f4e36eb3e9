"""Mesh nodes on loopback: pairing by invite, refusals, RTT, messages, liveness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshchat.errors import MeshchatError
from meshchat.mesh import wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.invites import InviteCode, InviteError
from meshchat.mesh.node import Node, PeerState
from meshchat.mesh.transport import (
    CONTROL_STREAM,
    END_STATES,
    Connection,
    ConnectionLost,
    frame_parts,
    peer_certificate_node_id,
)
from meshchat.model.fingerprint import Fingerprint
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


async def test_two_nodes_pair_by_invite_and_measure_rtt(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    assert await b.join(a.create_invite()) == a.node_id
    pa = await a.wait_for_peer(b.node_id, rtt=True)
    pb = await b.wait_for_peer(a.node_id, rtt=True)
    assert pa.via == pb.via == "invite"
    assert pa.rtt_ms is not None and 0 < pa.rtt_ms < 200
    assert b.mesh_id == a.mesh_id and b.membership.mesh_secret == a.membership.mesh_secret
    assert a.membership.is_member(b.node_id) and b.membership.is_member(a.node_id)
    status = a.status()
    assert status["peers"][0]["node_id"] == str(b.node_id)
    assert status["peers"][0]["state"] == "connected"


async def test_three_nodes_find_each_other_through_peers(mesh: MeshNodes) -> None:
    a, b, c = await mesh.new(), await mesh.new(), await mesh.new()
    code = a.create_invite(uses=2)
    await b.join(code)
    await c.join(code)
    # b and c never exchanged an invite: a tells each about the other.
    pc = await b.wait_for_peer(c.node_id, rtt=True, timeout=10)
    assert pc.via == "peer"
    await c.wait_for_peer(b.node_id, rtt=True, timeout=10)
    assert sorted(map(str, a.connected())) == sorted(map(str, [b.node_id, c.node_id]))


async def test_restart_reconnects_without_new_invite(mesh: MeshNodes, tmp_path: Path) -> None:
    a, b = await mesh.new("a"), await mesh.new("b")
    code = a.create_invite()
    await b.join(code)
    await a.wait_for_peer(b.node_id)
    await b.stop()
    b2 = await mesh.new("b")  # same data dir: same identity and mesh, new port
    assert b2.node_id == b.node_id
    await b2.wait_for_peer(a.node_id, timeout=10)
    await a.wait_for_peer(b.node_id, timeout=10)
    # Restarting with the same (used) --join code is fine for a member: no redeem needed.
    await b2.stop()
    b3 = await mesh.new("b")
    assert await b3.join(code) == a.node_id
    await a.wait_for_peer(b.node_id, timeout=10)


async def test_messages_requests_and_tensors(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    await b.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    got: asyncio.Queue[wire.Message] = asyncio.Queue()
    a.on(wire.Tensor, lambda peer, msg: got.put_nowait(msg))
    a.on(wire.Token, lambda peer, msg: got.put_nowait(msg))

    async def plan(peer: object, msg: wire.Plan) -> wire.Message:
        return wire.Ack(True, {"echo": msg.plan_id})

    a.on(wire.Plan, plan)
    data = bytes(range(256)) * (3 * 576 * 4 // 256)
    for pos in range(3):
        await b.send(a.node_id, wire.Tensor(wire.DType.F32, (3, 576), 7, pos, data))
    await b.send(a.node_id, wire.Token(7, 3, 42))
    for pos in range(3):
        t = await asyncio.wait_for(got.get(), 5)
        assert isinstance(t, wire.Tensor) and t.position == pos and bytes(t.data) == data
    assert await asyncio.wait_for(got.get(), 5) == wire.Token(7, 3, 42)
    fp = Fingerprint("m", "c", "g", ("l0", "l1"))
    one_stage = (wire.PlanStage(a.node_id, 0, 2),)
    reply = await b.request(
        a.node_id, wire.Plan("p1", one_stage, fp, 64, 1, wire.DType.F32, flash_attn=True)
    )
    assert reply == wire.Ack(True, {"echo": "p1"})
    with pytest.raises(MeshchatError, match="no handler"):
        await b.request(a.node_id, wire.Load("p1"))


async def test_status_layers_shared(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    await b.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    b.set_status((0, 15), {"path": "m.gguf", "fingerprint": "abc"})
    await eventually(lambda: (p := a.peer(b.node_id)) is not None and p.layers == (0, 15))
    assert a.status()["peers"][0]["layers"] == [0, 15]


# --- invites refused ----------------------------------------------------------------------------


async def test_reused_invite_refused(mesh: MeshNodes) -> None:
    a, b, c = await mesh.new(), await mesh.new(), await mesh.new()
    code = a.create_invite()
    await b.join(code)
    with pytest.raises(InviteError, match="already used"):
        await c.join(code)
    assert not a.membership.is_member(c.node_id)


async def test_expired_invite_refused_locally_and_remotely(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    code = a.invites.issue(a.node_id, a.invite_addresses(), ttl=-1).encode()
    with pytest.raises(InviteError, match="expired"):
        await b.join(code)
    # A code whose expiry was edited (checksum recomputed) is still refused by the issuer.
    real = a.invites.issue(a.node_id, a.invite_addresses(), ttl=1)
    await asyncio.sleep(1.1)
    stretched = InviteCode(real.inviter, real.secret, real.expires + 3600, real.addresses)
    with pytest.raises(InviteError, match="expired"):
        await b.join(stretched.encode())


async def test_mistyped_invite_refused_before_traffic(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    code = a.create_invite()
    typo = code[:20] + ("a" if code[20] != "a" else "b") + code[21:]
    with pytest.raises(InviteError, match="typo"):
        await b.join(typo)
    assert not a.endpoint.connections  # nothing was sent


async def test_forged_invite_refused(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    real = InviteCode.parse(a.create_invite())
    forged = InviteCode(real.inviter, b"\x01" * 16, real.expires, real.addresses)
    with pytest.raises(InviteError, match="not recognised"):
        await b.join(forged.encode())
    # An invite naming another node at a's address: a's key does not match, nothing is sent.
    other = InviteCode(Identity.generate().node_id.fingerprint(), real.secret, real.expires,
                       real.addresses)  # fmt: skip
    with pytest.raises(InviteError, match="not the node that issued"):
        await b.join(other.encode())
    await b.join(real.encode())  # the real one still works: nothing was used up


# --- authentication refused ---------------------------------------------------------------------


async def test_non_member_refused(mesh: MeshNodes) -> None:
    a, stranger = await mesh.new(), await mesh.new()
    with pytest.raises(ConnectionLost, match="not a member"):
        await stranger.connect(a.node_id, a.addresses)
    assert a.connected() == []


async def test_wrong_key_refused(mesh: MeshNodes) -> None:
    from meshchat.mesh.auth import AuthRefused, dial_handshake

    a, b = await mesh.new(), await mesh.new()
    await b.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    # An impostor claims b's NodeID but signs with its own key.
    impostor = await mesh.new()
    conn = await impostor.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id)
    hello = wire.Hello(b.node_id, a.mesh_id, [])
    with pytest.raises(AuthRefused, match="wrong key"):
        await dial_handshake(conn, impostor.identity, hello, None)
    # The dialer side: a node at a's address that is not the NodeID we expect.
    with pytest.raises(ConnectionLost, match="does not match"):
        await b.endpoint.dial(a.endpoint.address, lambda n: n == impostor.node_id)
    assert a.peer(b.node_id) is not None and a.peer(b.node_id).state is PeerState.CONNECTED


async def test_removed_member_refused(mesh: MeshNodes) -> None:
    a, b, c = await mesh.new(), await mesh.new(), await mesh.new()
    code = a.create_invite(uses=2)
    await b.join(code)
    await c.join(code)
    await c.wait_for_peer(b.node_id, timeout=10)
    await a.remove_member(b.node_id)
    # The removal spreads: c drops b as well.
    await eventually(lambda: not c.membership.is_member(b.node_id))
    await eventually(lambda: b.node_id not in c.connected())
    with pytest.raises(ConnectionLost, match="not a member"):
        await b.connect(a.node_id, a.addresses)
    with pytest.raises(ConnectionLost, match="not a member"):
        await b.connect(c.node_id, c.addresses)
    # A removal is final: even a fresh invite is refused, and the use is not spent.
    code = a.create_invite()
    with pytest.raises(InviteError, match="removed from this mesh"):
        await b.join(code)
    assert not a.membership.is_member(b.node_id)
    d = await mesh.new()
    await d.join(code)
    assert a.membership.is_member(d.node_id)


# --- liveness -----------------------------------------------------------------------------------


async def test_dead_peer_noticed_within_bound(mesh: MeshNodes) -> None:
    a = await mesh.new(dead_after=1.0)
    b = await mesh.new()
    await b.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    assert b.endpoint._transport is not None
    b.endpoint._transport.sendto = lambda *args: None  # type: ignore[method-assign]
    start = time.monotonic()
    await eventually(lambda: a.peer(b.node_id).state is PeerState.LOST, timeout=5)
    assert time.monotonic() - start < 1.0 + 0.6


async def test_aioquic_private_attributes_still_exist(mesh: MeshNodes) -> None:
    """We read aioquic internals (peer cert, stream send buffer); fail loudly if they move."""
    a, b = await mesh.new(), await mesh.new()
    conn = await b.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id)
    assert hasattr(conn._quic.tls, "_peer_certificate"), "aioquic changed: fix key pinning"
    assert peer_certificate_node_id(conn._quic) == a.node_id
    await conn.send(wire.Ping(1))
    stream = conn._quic._streams[0]
    assert isinstance(stream.sender._buffer, bytearray), "aioquic changed: fix send backpressure"
    assert conn._backlog(0) >= 0
    assert conn._quic._state not in END_STATES and conn._quic._close_event is None
    await a.stop()
    await eventually(lambda: conn.is_closed, timeout=2)  # seen at once, not after draining


async def test_messages_in_the_same_packet_as_welcome_are_delivered(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener's first messages often ride in WELCOME's packet, before the dialer's node
    has taken the connection: they are held for it, not dropped."""
    a = await mesh.new()
    b = await mesh.new()
    behind = wire.Status([3, 9], {"path": "behind", "fingerprint": "welcome"})
    real_send = Connection.send

    async def welcome_and_status(self: Connection, msg: wire.Message) -> None:
        if not isinstance(msg, wire.Welcome):
            return await real_send(self, msg)
        async with self._control_lock:  # one write: both frames in one packet
            await self._write(CONTROL_STREAM, [*frame_parts(msg), *frame_parts(behind)], False)

    seen: list[wire.Status] = []
    real_on_status = Node._on_status

    def spy(self: Node, node: NodeId, msg: wire.Status) -> None:
        if self is b:
            seen.append(msg)
        real_on_status(self, node, msg)

    monkeypatch.setattr(Connection, "send", welcome_and_status)
    monkeypatch.setattr(Node, "_on_status", spy)
    await b.join(a.create_invite())
    await eventually(lambda: behind in seen)
