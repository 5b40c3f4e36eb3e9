"""Wire messages of distributed generation: activations, session ops, faults, capabilities."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.mesh import wire

GREEDY = wire.Sampling(0.0, 40, 0.95, 0.05, 1.0, 64, None)


@given(
    session=st.integers(0, 2**63),
    position=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 2**32 - 1),
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
    width=st.integers(1, 16),
    dtype=st.sampled_from([None, wire.DType.F32, wire.DType.F16]),
    want=st.booleans(),
    trace=st.lists(st.integers(0, 2**32 - 1), max_size=5),
)
def test_activations_round_trip(
    session: int,
    position: int,
    epoch: int,
    tokens: list[int],
    width: int,
    dtype: wire.DType | None,
    want: bool,
    trace: list[int],
) -> None:
    data = b"" if dtype is None else bytes(range(256))[:1] * (len(tokens) * width * dtype.itemsize)
    msg = wire.Activations(
        session, position, epoch, tuple(tokens), dtype, 0 if dtype is None else width, data,
        want, tuple(trace),
    )  # fmt: skip
    frame = wire.encode(msg)
    (back,) = wire.FrameReader().feed(frame)
    assert isinstance(back, wire.Activations)
    assert back.tokens == msg.tokens and back.trace == msg.trace
    assert (back.session, back.position, back.epoch, back.want_token) == (
        session, position, epoch, want,
    )  # fmt: skip
    assert back.dtype == dtype and bytes(back.data) == data


def test_malformed_activations_raise_protocol_error_only() -> None:
    good = wire.encode_body(wire.Activations(1, 0, 0, (5, 6), wire.DType.F32, 2, bytes(16)))
    head = bytearray(good[: wire.ACT_HEAD.size])
    cases = [
        good[:10],  # truncated header
        good[:-4],  # data shorter than tokens x width
        good + b"x",  # data longer
        bytes(head[:-3]) + b"\x07" + bytes(head[-2:]) + good[wire.ACT_HEAD.size :],  # flags
    ]
    bad_dtype = bytearray(good)
    bad_dtype[wire.ACT_HEAD.size - 4] = 9
    cases.append(bytes(bad_dtype))
    no_tokens = wire.ACT_HEAD.pack(1, 0, 0, 0, 0, 0, 0, 0)
    cases.append(no_tokens)
    many_trace = wire.ACT_HEAD.pack(1, 0, 0, 1, 0, 0, 0, 65) + struct.pack("!66I", *range(66))
    cases.append(many_trace)
    for body in cases:
        with pytest.raises(wire.ProtocolError):
            wire.decode_body(wire.MsgType.ACTIVATIONS, body)


def test_activations_frames_are_bulk_sized_and_control_messages_round_trip() -> None:
    big = 1 << 24
    assert wire.check_header(wire.encode_header(wire.MsgType.ACTIVATIONS, big))[1] == big
    with pytest.raises(ValueError):
        wire.encode_header(wire.MsgType.SESSION_OP, big)
    for msg in (
        wire.SessionOp(3, 4, wire.SessionOpKind.ROLLBACK, 17),
        wire.SessionOp(3, 5, wire.SessionOpKind.SAMPLE, 0, sampling=GREEDY),
        wire.SessionOp(3, 6, wire.SessionOpKind.OPEN, 0, plan_id="p1"),
        wire.SessionDone(3, 5),
        wire.StageFault(3, wire.FaultCode.BAD_INPUT, "wrong shape", "abc"),
        wire.CapsQuery("fp"),
        wire.Token(3, 9, 42, [10, 20]),
        wire.Cancel(3, "stop", 7),
    ):
        (back,) = wire.FrameReader().feed(wire.encode(msg))
        assert back == msg
    with pytest.raises(wire.ProtocolError):
        wire.decode_body(wire.MsgType.SESSION_OP, b'{"session": 1, "seq": "x", "op": "open"}')
