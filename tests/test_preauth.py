"""Before authentication: frame limits, connection caps, QUIC Retry, TLS-bound proofs, and the
wire decoders' one exception boundary (issue 12, items 4, 5, 7). Real QUIC on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.errors import MeshchatError
from meshchat.mesh import auth, wire
from meshchat.mesh.identity import Identity
from meshchat.mesh.invites import InviteError
from meshchat.mesh.membership import Membership
from meshchat.mesh.node import Node, PeerState
from meshchat.mesh.transport import (
    ALPN,
    CONTROL_STREAM,
    Connection,
    ConnectionLost,
    Tuning,
    parse_addr,
    session_binding,
)
from meshchat.paths import DataDir
from meshchat.timeouts import TIMEOUTS
from tests.mesh_helpers import FAST_PING, MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


async def node_at(mesh: MeshNodes, host: str, name: str, **kw: Any) -> Node:
    """A started node listening on another loopback address (127.0.0.2...)."""
    kw.setdefault("ping_interval", FAST_PING)
    node = Node(DataDir(mesh.root / name), f"{host}:0", **kw)
    await node.start()
    mesh.nodes.append(node)
    return node


async def stranger_conn(mesh: MeshNodes, target: Node) -> Connection:
    """A QUIC connection to `target` from a node that never authenticates."""
    stranger = await mesh.new()
    return await stranger.endpoint.dial(target.endpoint.address, lambda n: n == target.node_id)


async def still_admits(a: Node, newcomer: Node) -> None:
    """The service still works: `newcomer` redeems an invite and is connected on both ends."""
    await newcomer.join(a.create_invite(), timeout=5)
    await a.wait_for_peer(newcomer.node_id)
    assert newcomer.peer(a.node_id).state is PeerState.CONNECTED  # type: ignore[union-attr]


# --- pre-auth frame limits ----------------------------------------------------------------------

FIRST_FRAMES = {
    # a 64 MiB tensor header and 60 KB of its body: the reader must not wait for the rest
    "tensor": (
        wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.TENSOR, 0, wire.MAX_TENSOR_BODY)
        + bytes(60_000),
        "TENSOR frame before authentication",
    ),
    "big-hello": (
        wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.HELLO, 0, 5000) + bytes(5000),
        f"HELLO frame of 5000 bytes exceeds limit {wire.HANDSHAKE_FRAME}",
    ),
    "plan": (wire.encode_header(wire.MsgType.PLAN, 2) + b"{}", "PLAN frame before authentication"),
    "welcome-to-listener": (
        wire.encode(wire.Welcome(Identity.generate().node_id, "y")),
        "WELCOME frame before authentication",
    ),
}


@pytest.mark.parametrize("kind", list(FIRST_FRAMES))
async def test_oversized_or_wrong_first_frame_is_refused_at_once(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # No timeout can close it for us: only the frame check can.
    monkeypatch.setattr(TIMEOUTS, "auth_s", 600.0)
    a = await mesh.new()
    conn = await stranger_conn(mesh, a)
    frame, reason = FIRST_FRAMES[kind]
    conn._quic.send_stream_data(CONTROL_STREAM, frame)
    conn.transmit()
    await asyncio.wait_for(conn.closed, 30)
    assert reason in conn.close_reason, conn.close_reason
    await eventually(lambda: not a.endpoint.connections)
    await still_admits(a, await mesh.new())


def test_handshake_limits_leave_room_for_real_frames(tmp_path: Path) -> None:
    """A HELLO with 100 addresses and a WELCOME with a 300-member roster fit the limits."""
    node = Identity.load_or_create(tmp_path / "id").node_id
    node_id = str(node)
    many = [f"[fd00::{i:x}]:44330" for i in range(100)]
    hello = wire.Hello(node, "m" * 16, many)
    assert len(wire.encode(hello)) - wire.HEADER_SIZE <= wire.HANDSHAKE_FRAME
    roster = {f"{node_id[:-3]}{i:03d}": {"ts": time.time(), "removed": False} for i in range(300)}
    welcome = wire.Welcome(node, "m" * 16, b"s" * 32, roster, many[:8])
    assert len(wire.encode(welcome)) - wire.HEADER_SIZE <= wire.WELCOME_FRAME


# --- connection caps and QUIC Retry -------------------------------------------------------------


async def test_handshake_flood_from_one_address_does_not_lock_out_a_join(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TIMEOUTS, "auth_s", 600.0)  # the flood holds its connections
    tuning = Tuning(max_connections=12)  # fewer slots than the flood, so it could fill them
    a = await mesh.new(tuning=tuning)
    flooder = await mesh.new()  # on 127.0.0.1, completes QUIC, never authenticates

    async def one() -> bool:
        try:
            await flooder.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id, 3.0)
            return True
        except ConnectionLost:
            return False

    held = sum(await asyncio.gather(*(one() for _ in range(30))))
    assert held == tuning.max_unauthenticated_per_host  # the rest were dropped
    assert len(a.endpoint.connections) == held
    member = await node_at(mesh, "127.0.0.2", "member")
    await still_admits(a, member)
    assert a.peer(member.node_id).state is PeerState.CONNECTED  # type: ignore[union-attr]


async def test_handshake_flood_from_several_addresses_does_not_lock_out_a_join(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the per-address cap: all slots held by strangers, a newcomer evicts the oldest."""
    monkeypatch.setattr(TIMEOUTS, "auth_s", 600.0)
    tuning = Tuning(max_connections=12)
    a = await mesh.new(tuning=tuning)
    flooders = [await node_at(mesh, f"127.0.3.{i}", f"flood{i}") for i in (1, 2)]
    dials = await asyncio.gather(
        *(
            f.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id, 3.0)
            for f in flooders
            for _ in range(tuning.max_unauthenticated_per_host)
        ),
        return_exceptions=True,
    )
    held = [c for c in dials if isinstance(c, Connection)]
    assert len(a.endpoint.connections) == tuning.max_connections  # full of strangers
    member = await node_at(mesh, "127.0.0.2", "member")
    await still_admits(a, member)
    # The member took a stranger's slot: at most max_connections - 1 strangers remain.
    await eventually(lambda: sum(not c.is_closed for c in held) < tuning.max_connections)
    assert len(a.endpoint.connections) <= tuning.max_connections


def client_initials(target: tuple[str, int], n: int) -> list[bytes]:
    """Real first Initial datagrams of `n` meshchat clients (each a fresh TLS ClientHello)."""
    out = []
    for _ in range(n):
        quic = QuicConnection(
            configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        )
        quic.connect(target, now=time.monotonic())
        out.append(quic.datagrams_to_send(now=time.monotonic())[0][0])
    return out


async def send_from_many_addresses(target: tuple[str, int], hosts: int, each: int) -> None:
    """Initials from 127.0.1.1.. that never answer: what spoofed source addresses look like."""
    datagrams = client_initials(target, hosts * each)
    for h in range(hosts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((f"127.0.1.{h + 1}", 0))
            for i in range(each):
                sock.sendto(datagrams[h * each + i], target)
        await asyncio.sleep(0)


async def test_spoofed_initial_flood_holds_no_connection_with_retry(mesh: MeshNodes) -> None:
    tuning = Tuning(max_connections=32)
    a = await mesh.new(tuning=tuning)
    unprotected = await mesh.new(tuning=Tuning(max_connections=32, retry=False))
    for node in (a, unprotected):
        await send_from_many_addresses(node.endpoint.address, hosts=20, each=10)
    # Without Retry every Initial from a new address takes a slot until its handshake times
    # out: the node is full (the attack is real)...
    await eventually(lambda: len(unprotected.endpoint.connections) == 32, timeout=10)
    # ... with Retry the same flood got only Retry packets and holds nothing.
    await asyncio.sleep(0.2)
    assert not a.endpoint.connections
    await still_admits(a, await node_at(mesh, "127.0.0.2", "member"))


# --- the auth proof is bound to the TLS session -------------------------------------------------


async def test_session_binding_matches_on_both_ends_and_differs_per_session(
    mesh: MeshNodes,
) -> None:
    """We read aioquic's TLS key schedule (private); fail loudly if it moves."""
    a, b = await mesh.new(), await mesh.new()
    dialed = [await b.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id) for _ in range(2)]
    await eventually(lambda: len(a.endpoint.connections) == 2)
    for conn in dialed:
        schedule = conn._quic.tls.key_schedule
        assert schedule is not None, "aioquic changed: fix session_binding"
        assert schedule.generation == 3 and hasattr(schedule, "hash"), "aioquic changed"
        assert session_binding(conn._quic) == conn.tls_binding
        assert len(conn.tls_binding) == auth.BINDING_SIZE
    listener_side = {c.tls_binding for c in a.endpoint.connections}
    assert listener_side == {c.tls_binding for c in dialed}
    assert dialed[0].tls_binding != dialed[1].tls_binding


async def _challenge(conn: Connection, claimed: Node) -> bytes:
    await conn.send(wire.Hello(claimed.node_id, claimed.mesh_id, []))
    challenge = await conn.recv_handshake(5)
    assert isinstance(challenge, wire.Challenge)
    return challenge.nonce


async def test_proof_from_another_tls_session_is_refused(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with the very same nonce, a member's signature from one TLS session does not
    authenticate another session (a stranger's, claiming to be that member)."""
    a = await mesh.new()
    victim = await mesh.new()
    await still_admits(a, victim)
    monkeypatch.setattr(auth, "new_nonce", lambda: b"n" * 32)  # worst case: a repeated nonce
    own = await victim.endpoint.dial(a.endpoint.address, lambda n: n == a.node_id)
    nonce = await _challenge(own, victim)
    payload = auth.auth_payload(a.node_id, victim.node_id, nonce, own.tls_binding)
    proof = victim.identity.sign(payload)

    stolen = await stranger_conn(mesh, a)
    assert await _challenge(stolen, victim) == nonce
    await stolen.send(wire.Auth(proof))
    refusal = await stolen.recv_handshake(5)
    assert isinstance(refusal, wire.Error) and refusal.code is wire.FaultCode.BAD_SIGNATURE, refusal
    await asyncio.wait_for(stolen.closed, 5)
    # The proof itself is good: on its own session it is accepted.
    await own.send(wire.Auth(proof))
    assert isinstance(await own.recv_handshake(5), wire.Welcome)


# --- a peer's malformed input: one boundary, clear errors, the redial task survives --------------

HUGE = 10**400  # a float() of it overflows; 5000 digits would break int() itself


async def test_join_with_a_malformed_welcome_is_a_clear_error(
    mesh: MeshNodes, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = await mesh.new()

    async def bad_welcome(*args: Any) -> wire.Welcome:
        entry = {"ts": HUGE, "removed": False}
        return wire.Welcome(hostile.node_id, hostile.mesh_id, b"s" * 32, {str(args[1]): entry})

    hostile._decide = bad_welcome  # type: ignore[method-assign]
    b = await mesh.new()
    with pytest.raises(InviteError, match="integer"):
        await b.join(hostile.create_invite())
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_redial_survives_a_member_sending_a_malformed_welcome(
    mesh: MeshNodes, caplog: pytest.LogCaptureFixture
) -> None:
    a = await mesh.new()
    b = await mesh.new()
    await still_admits(a, b)

    async def bad_welcome(conn: Connection, dialer: Any, *rest: Any) -> wire.Welcome:
        entry = {"ts": HUGE, "removed": False}
        return wire.Welcome(a.node_id, a.mesh_id, None, {str(dialer): entry})

    a._decide = bad_welcome  # type: ignore[method-assign]
    a._should_dial = lambda peer: False  # type: ignore[method-assign]  # only b redials
    a_side = a.peer(b.node_id)
    assert a_side is not None and a_side.conn is not None
    a_side.conn.abort("test: drop the link")
    peer = b.peer(a.node_id)
    assert peer is not None
    # Each failed redial backs off (only the task's MeshchatError path does that).
    await eventually(lambda: peer.dial_backoff >= 2.0, timeout=15)
    assert peer.state is PeerState.LOST
    assert not any("background task failed" in r.message for r in caplog.records)


async def test_a_roster_refused_after_decoding_is_a_clear_error(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's boundary past the decoder: a protocol error raised while membership takes
    in a roster (here after it changed part of its state) ends the join with InviteError and
    the saved membership, and closes a member's connection."""
    a = await mesh.new()
    b = await mesh.new()

    def half_adopt(self: Membership, mesh_id: str, *_args: Any) -> None:
        self.mesh_id = mesh_id
        raise wire.ProtocolError("roster entry not signed")

    def refuse(self: Membership, records: list[Any]) -> list[Any]:
        raise wire.ProtocolError("roster entry not signed")

    monkeypatch.setattr(Membership, "adopt", half_adopt)
    own_mesh = b.mesh_id
    with pytest.raises(InviteError, match="malformed welcome: roster entry not signed"):
        await b.join(a.create_invite())
    assert b.mesh_id == own_mesh and b.membership.is_member(b.node_id)  # nothing half-adopted
    monkeypatch.undo()
    await still_admits(a, b)
    monkeypatch.setattr(Membership, "merge", refuse)
    conn = a.peer(b.node_id).conn  # type: ignore[union-attr]
    assert conn is not None
    await b.send(a.node_id, wire.Roster(a.mesh_id, []))
    await asyncio.wait_for(conn.closed, 5)
    assert "roster entry not signed" in conn.close_reason
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_addresses_with_non_ascii_digits_are_dropped_not_fatal(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """'²'.isdigit() is true but int('²') raises ValueError: it used to escape parse_addr and
    end the listener's handshake task (in HELLO) or a redial (in WELCOME / PEERS)."""
    a = await mesh.new()
    b = await mesh.new()
    with pytest.raises(MeshchatError, match="not an address"):
        parse_addr("127.0.0.1:²")
    real = Node.addresses.fget
    assert real is not None
    monkeypatch.setattr(Node, "addresses", property(lambda n: ["127.0.0.1:²", *real(n)]))
    await still_admits(a, b)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_huge_numbers_from_a_member_close_only_that_stream(mesh: MeshNodes) -> None:
    a = await mesh.new()
    b = await mesh.new()
    await still_admits(a, b)
    a.on(wire.Ping, lambda n, m: wire.Pong(m.seq))
    conn = b.peer(a.node_id).conn  # type: ignore[union-attr]
    assert conn is not None
    for body in (b'{"seq":' + b"9" * 5000 + b"}", b'{"seq":NaN}', b'{"seq":1e400}'):
        sid = conn._quic.get_next_available_stream_id()
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        conn._pending[sid] = fut
        frame = wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.PING, 0, len(body)) + body
        conn._quic.send_stream_data(sid, frame, end_stream=True)
        conn.transmit()
        reply = await asyncio.wait_for(fut, 5)
        assert isinstance(reply, wire.Error) and reply.code is wire.FaultCode.PROTOCOL, reply
    assert await b.request(a.node_id, wire.Ping(7), timeout=5) == wire.Pong(7)


# --- fuzzing the decoders: only ProtocolError escapes --------------------------------------------

FUZZ = settings(max_examples=150, deadline=None)

numbers = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's 4300-digit int() limit
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 400 + ".5"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
depths = st.integers(1, 3000).map(lambda d: "[" * d + "1" + "]" * d)
long_texts = st.integers(0, 70_000).map(lambda n: json.dumps("x" * n))
values = numbers | depths | long_texts | st.sampled_from(['"a"', "true", "null", "{}", "[]"])
field_names = st.sampled_from(
    ["seq", "node_id", "mesh_id", "addresses", "roster", "entries", "layers", "nonce", "x"]
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    fields = draw(st.dictionaries(field_names, values, max_size=3))
    inner = ",".join(f'"{k}":{v}' for k, v in fields.items())
    return ("{" + inner + "}").encode()


def only_protocol_errors(mtype: int, body: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_body(mtype, body)


@FUZZ
@given(st.sampled_from(list(wire.MsgType)), hostile_bodies())
def test_fuzz_hostile_json_only_raises_protocol_error(mtype: wire.MsgType, body: bytes) -> None:
    only_protocol_errors(mtype, body)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=2000))
def test_fuzz_random_bodies_only_raise_protocol_error(mtype: int, body: bytes) -> None:
    only_protocol_errors(mtype, body)


@FUZZ
@given(
    st.sampled_from([wire.LISTENER_PRE_AUTH, wire.DIALER_PRE_AUTH, None]),
    st.lists(st.binary(max_size=300) | hostile_bodies(), max_size=4),
    st.lists(st.sampled_from(list(wire.MsgType)), min_size=4, max_size=4),
)
def test_fuzz_frame_reader_only_raises_protocol_error(
    allowed: dict[wire.MsgType, int] | None, bodies: list[bytes], types: list[wire.MsgType]
) -> None:
    stream = b"".join(
        wire.HEADER.pack(wire.WIRE_VERSION, t, 0, len(b)) + b
        for t, b in zip(types, bodies, strict=False)
    )
    reader = wire.FrameReader(allowed=allowed)
    step = max(7, len(stream) // 40)
    with contextlib.suppress(wire.ProtocolError):
        for i in range(0, len(stream), step):
            for msg in reader.feed(stream[i : i + step]):
                assert allowed is None or msg.TYPE in allowed


def test_json_bounds_are_protocol_errors() -> None:
    """The ones that escaped before as ValueError (or were accepted)."""
    cases = {
        b'{"seq":' + b"9" * 5000 + b"}": "integer literal too long",
        b'{"seq":18446744073709551616}': "integer out of range",
        b'{"seq":NaN}': "NaN is not allowed",
        b'{"seq":1e400}': "number out of range",
        b'{"layers":' + b"[" * 40 + b"]" * 40 + b"}": "nested deeper",
        b'{"x":"' + b"a" * (wire.MAX_JSON_TEXT + 1) + b'"}': "text longer",
    }
    for body, reason in cases.items():
        with pytest.raises(wire.ProtocolError, match=reason):
            wire.decode_body(wire.MsgType.STATUS, body)
    assert wire.decode_body(wire.MsgType.PING, b'{"seq":18446744073709551615}') == wire.Ping(
        2**64 - 1
    )
