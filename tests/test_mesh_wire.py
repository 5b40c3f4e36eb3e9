"""Wire format, identity, invite codes: round trips and hostile input (hypothesis)."""

from __future__ import annotations

import contextlib
import os
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.errors import MeshchatError
from meshchat.mesh import wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.invites import InviteBook, InviteCode, InviteError

FAST = settings(max_examples=150, deadline=None)

texts = st.text(max_size=20)
blobs = st.binary(max_size=40)
wire_ints = st.integers(1 - wire.MAX_JSON_INT, wire.MAX_JSON_INT - 1)  # the JSON bound
jsonish = st.dictionaries(st.text(max_size=5), wire_ints | st.text(max_size=5), max_size=3)
_ids = [Identity.generate().node_id for _ in range(2)]
node_ids = st.binary(min_size=32, max_size=32).map(NodeId)
records = st.lists(
    st.builds(
        wire.RosterRecord,
        st.text("abcdefgh234567", min_size=1, max_size=32),
        st.sampled_from(_ids),
        st.just(wire.RosterAction.REMOVE),
        st.floats(wire.MIN_ROSTER_TS, wire.MAX_ROSTER_TS),
        st.sampled_from(_ids),
        st.binary(min_size=64, max_size=64),
    ),
    max_size=3,
)

control = st.one_of(
    st.builds(wire.Hello, node_ids, st.none() | texts, st.lists(texts, max_size=3)),
    st.builds(wire.Challenge, blobs),
    st.builds(wire.Auth, blobs, st.none() | blobs),
    st.builds(
        wire.Welcome, node_ids, texts, st.none() | blobs, records, st.lists(texts, max_size=2)
    ),
    st.builds(wire.Error, st.sampled_from(list(wire.FaultCode)), texts),
    st.builds(wire.Ping, st.integers(0, 2**62)),
    st.builds(wire.Pong, st.integers(0, 2**62)),
    st.builds(wire.Status, st.none() | st.lists(st.integers(0, 99), max_size=2)),
    st.builds(wire.Peers, st.dictionaries(node_ids, st.lists(texts, max_size=2), max_size=3)),
    st.builds(wire.Roster, texts, records),
    st.builds(wire.Ack, st.booleans(), jsonish),
    st.builds(wire.Load, texts, jsonish),
    st.builds(wire.Token, st.integers(0, 2**63), st.integers(0, 2**31), st.integers(0, 2**31)),
    st.builds(wire.Cancel, st.integers(0, 2**63), texts),
)


@st.composite
def tensors(draw: st.DrawFn) -> wire.Tensor:
    dtype = draw(st.sampled_from(list(wire.DType)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    n = dtype.itemsize
    for d in shape:
        n *= d
    return wire.Tensor(
        dtype,
        shape,
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.binary(min_size=n, max_size=n)),
    )


@FAST
@given(st.lists(control | tensors(), min_size=1, max_size=4), st.integers(1, 50))
def test_frames_round_trip_in_any_chunking(msgs: list[wire.Message], chunk: int) -> None:
    data = b"".join(wire.encode(m) for m in msgs)
    reader = wire.FrameReader()
    out: list[wire.Message] = []
    for i in range(0, len(data), chunk):
        out += reader.feed(data[i : i + chunk])
    assert reader.at_boundary
    for a, b in zip(msgs, out, strict=True):
        if isinstance(a, wire.Tensor):
            assert isinstance(b, wire.Tensor)
            assert (a.dtype, a.shape, a.session, a.position) == (
                b.dtype,
                b.shape,
                b.session,
                b.position,
            )
            assert bytes(a.data) == bytes(b.data)
        else:
            assert a == b


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    reader = wire.FrameReader()
    with contextlib.suppress(wire.ProtocolError):
        reader.feed(data)


@FAST
@given(st.sampled_from(list(wire.MsgType)), st.binary(max_size=200))
def test_random_bodies_only_raise_protocol_error(mtype: wire.MsgType, body: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_body(mtype, body)


@FAST
@given(st.sampled_from(list(wire.MsgType)), st.from_type(object).map(repr) | jsonish.map(str))
def test_wrong_json_shapes_only_raise_protocol_error(mtype: wire.MsgType, text: str) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_body(mtype, text.encode())


@FAST
@given(st.binary(max_size=60))
def test_random_tensor_headers_only_raise_protocol_error(body: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_tensor(body)


def test_header_checked_before_body() -> None:
    reader = wire.FrameReader()
    huge = wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.PING, 0, wire.MAX_CONTROL_BODY + 1)
    with pytest.raises(wire.ProtocolError, match="exceeds limit"):
        reader.feed(huge)
    with pytest.raises(wire.ProtocolError, match="version"):
        wire.FrameReader().feed(struct.pack("!BBHI", 9, 6, 0, 2))
    with pytest.raises(wire.ProtocolError, match="unknown message type"):
        wire.FrameReader().feed(struct.pack("!BBHI", 1, 200, 0, 2))
    with pytest.raises(wire.ProtocolError, match="exceeds limit"):
        wire.FrameReader(limit=10).feed(struct.pack("!BBHI", 1, wire.MsgType.TENSOR, 0, 11))


def test_tensor_shape_must_match_bytes() -> None:
    good = wire.Tensor(wire.DType.F16, (2, 3), 1, 2, b"\0" * 12)
    frame = bytearray(wire.encode(good))
    frame[wire.HEADER_SIZE + wire.TENSOR_HEAD.size + 3] = 4  # shape (2, 4)
    with pytest.raises(wire.ProtocolError, match="does not match"):
        wire.FrameReader().feed(bytes(frame))


# --- identity ---------------------------------------------------------------------------------


def test_identity_created_0600_and_stable(tmp_path) -> None:
    path = tmp_path / "d" / "identity.key"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).node_id == a.node_id
    assert NodeId.parse(str(a.node_id)) == a.node_id


def test_corrupt_identity_is_an_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(MeshchatError, match=str(path)):
        Identity.load_or_create(path)
    path.write_bytes(os.urandom(50))
    with pytest.raises(MeshchatError, match=str(path)):
        Identity.load_or_create(path)
    assert path.exists()  # never replaced by a fresh identity


@FAST
@given(st.text(max_size=70))
def test_node_id_parse_rejects_junk_cleanly(text: str) -> None:
    with contextlib.suppress(MeshchatError):
        NodeId.parse(text)


def test_node_id_typo_caught() -> None:
    text = str(Identity.generate().node_id)
    typo = text[:5] + ("a" if text[5] != "a" else "b") + text[6:]
    with pytest.raises(MeshchatError, match="checksum"):
        NodeId.parse(typo)


# --- invite codes -----------------------------------------------------------------------------


def test_invite_code_short_and_round_trips(tmp_path) -> None:
    ident = Identity.generate()
    book = InviteBook(tmp_path / "invites.json")
    code = book.issue(ident.node_id, [("192.168.1.20", 47000)])
    text = code.encode()
    assert len(text) <= 100, text
    parsed = InviteCode.parse(text)
    assert parsed == code
    assert parsed.matches(ident.node_id)
    assert not parsed.matches(Identity.generate().node_id)
    assert InviteCode.parse(" " + text.upper() + "\n") == code
    two = book.issue(ident.node_id, [("10.0.0.1", 1), ("fd00::2", 2)])
    assert InviteCode.parse(two.encode()).addresses == (("10.0.0.1", 1), ("fd00::2", 2))


def test_invite_typo_caught_before_network(tmp_path) -> None:
    code = InviteBook(tmp_path / "i.json").issue(Identity.generate().node_id, [("127.0.0.1", 9)])
    text = code.encode()
    for i in range(3, len(text)):
        typo = text[:i] + ("b" if text[i] != "b" else "c") + text[i + 1 :]
        with pytest.raises(InviteError):
            InviteCode.parse(typo)
    with pytest.raises(InviteError, match="truncated"):
        InviteCode.parse(text[:-5])


@FAST
@given(st.text(max_size=120))
def test_invite_parse_only_raises_invite_error(text: str) -> None:
    with contextlib.suppress(InviteError):
        InviteCode.parse("mc1" + text)


def test_invite_book_uses_expiry_and_persistence(tmp_path) -> None:
    node = Identity.generate().node_id
    path = tmp_path / "invites.json"
    book = InviteBook(path)
    once = book.issue(node, [("127.0.0.1", 1)])
    twice = book.issue(node, [("127.0.0.1", 1)], uses=2)
    short = book.issue(node, [("127.0.0.1", 1)], ttl=-1)
    book.redeem(once.secret)
    with pytest.raises(InviteError, match="already used"):
        InviteBook(path).redeem(once.secret)  # a restart keeps it used
    again = InviteBook(path)
    again.redeem(twice.secret)
    again.redeem(twice.secret)
    with pytest.raises(InviteError, match="already used"):
        again.redeem(twice.secret)
    with pytest.raises(InviteError, match="expired"):
        again.redeem(short.secret)
    with pytest.raises(InviteError, match="expired"):
        short.check_fresh()
    with pytest.raises(InviteError, match="not recognised"):
        again.redeem(os.urandom(16))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
