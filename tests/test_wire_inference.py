"""Wire messages of distributed generation: activations, plans, session ops, faults."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.mesh import wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.model.fingerprint import Fingerprint

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
        wire.StageFault(3, wire.FaultCode.BAD_INPUT, "wrong shape", NODES[0]),
        wire.CapsQuery("fp"),
        wire.Token(3, 9, 42, [10, 20]),
        wire.Cancel(3, "stop", 7),
    ):
        (back,) = wire.FrameReader().feed(wire.encode(msg))
        assert back == msg
    with pytest.raises(wire.ProtocolError):
        wire.decode_body(wire.MsgType.SESSION_OP, b'{"session": 1, "seq": "x", "op": "open"}')


# --- typed, bounded bodies: plan and session ops ------------------------------------------------

NODES = [Identity.generate().node_id for _ in range(3)]
FP = Fingerprint("m" * 64, "c" * 64, "g" * 64, tuple(f"l{i}" for i in range(8)))
BOUNDED = settings(max_examples=60, deadline=None)
_check = hashlib.sha256(NODES[0].raw).digest()[:2]
BAD_CHECKSUM = base64.b32encode(NODES[0].raw + bytes([_check[0] ^ 1, _check[1]])).decode()


def _plan(**changes: object) -> wire.Plan:
    stages = tuple(
        wire.PlanStage(n, a, b) for n, (a, b) in zip(NODES, [(0, 3), (3, 6), (6, 8)], strict=True)
    )
    values: dict[str, object] = {
        "plan_id": "p1", "stages": stages, "model": FP, "n_ctx": 512, "max_sessions": 2,
        "dtype": wire.DType.F32, "flash_attn": True,
    }  # fmt: skip
    values.update(changes)
    return wire.Plan(**values)  # type: ignore[arg-type]


def _json(msg: wire.Message) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(wire.encode_body(msg))
    return obj


def _decode(mtype: wire.MsgType, obj: Any) -> wire.Message:
    return wire.decode_body(mtype, json.dumps(obj).encode())


@BOUNDED
@given(
    cuts=st.lists(st.integers(1, 7), max_size=2, unique=True),
    n_ctx=st.integers(1, wire.MAX_PLAN_CONTEXT),
    sessions=st.integers(1, wire.MAX_PLAN_SESSIONS),
    dtype=st.sampled_from(list(wire.DType)),
    flash=st.booleans(),
)
def test_plan_round_trips_typed(
    cuts: list[int], n_ctx: int, sessions: int, dtype: wire.DType, flash: bool
) -> None:
    bounds = [0, *sorted(cuts), 8]
    stages = tuple(wire.PlanStage(NODES[i], a, b) for i, (a, b) in enumerate(pairwise(bounds)))
    plan = _plan(stages=stages, n_ctx=n_ctx, max_sessions=sessions, dtype=dtype, flash_attn=flash)
    (back,) = wire.FrameReader().feed(wire.encode(plan))
    assert back == plan and isinstance(back, wire.Plan)
    assert all(isinstance(s.node, NodeId) for s in back.stages) and back.dtype is dtype
    assert back.stage_of(NODES[0]) == 0


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target = obj
    *parents, last = path.split(".")
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return obj


BAD_PLANS = [
    ("n_ctx", 0), ("n_ctx", wire.MAX_PLAN_CONTEXT + 1), ("n_ctx", 1.5), ("n_ctx", True),
    ("max_sessions", 0), ("max_sessions", wire.MAX_PLAN_SESSIONS + 1),
    ("stages", []), ("stages", [{"node": str(NODES[0]), "first": 0, "end": 8}] * 65),
    ("stages.0.first", 1), ("stages.1.first", 4), ("stages.2.end", 9), ("stages.2.end", 6),
    ("stages.0.node", "not-a-node"), ("stages.0.node", BAD_CHECKSUM),
    ("stages.1.node", str(NODES[0])), ("stages.0", "x"), ("stages.1.end", 2),
    ("dtype", 3), ("dtype", "f32"), ("flash_attn", 1), ("plan_id", ""), ("plan_id", "x" * 65),
    ("model.layers", ["l"] * 7), ("model.model", "m" * 129), ("model", None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value"), BAD_PLANS)
def test_a_plan_out_of_bounds_does_not_decode(path: str, value: Any) -> None:
    with pytest.raises(wire.ProtocolError):
        _decode(wire.MsgType.PLAN, _set(_json(_plan()), path, value))


GOOD_SAMPLING = wire.Sampling(0.7, 40, 0.95, 0.05, 1.1, 64, 1234)
BAD_OPS = [
    ("op", "explode"), ("op", "open"), ("op", 1), ("sampling", None), ("plan_id", "p1"),
    ("position", -1), ("position", 1 << 32), ("session", -1), ("seq", 1 << 64),
    ("sampling.temperature", -0.1), ("sampling.temperature", 1e9), ("sampling.top_p", 1.5),
    ("sampling.min_p", -1), ("sampling.top_k", -1), ("sampling.top_k", wire.MAX_TOP_K + 1),
    ("sampling.repeat_penalty", 0), ("sampling.repeat_last_n", 1 << 40),
    ("sampling.repeat_last_n", -1), ("sampling.seed", -1), ("sampling.seed", 1 << 32),
    ("sampling.top_p", "0.5"), ("sampling", {"temperature": 0.5}),
    ("sampling.temperature", 10**400), ("sampling.repeat_penalty", -(10**400)),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value"), BAD_OPS)
def test_a_session_op_out_of_bounds_does_not_decode(path: str, value: Any) -> None:
    op = wire.SessionOp(1, 2, wire.SessionOpKind.SAMPLE, 0, sampling=GOOD_SAMPLING)
    with pytest.raises(wire.ProtocolError):
        _decode(wire.MsgType.SESSION_OP, _set(_json(op), path, value))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_does_not_decode(literal: str) -> None:
    op = wire.SessionOp(1, 2, wire.SessionOpKind.SAMPLE, 0, sampling=GOOD_SAMPLING)
    body = wire.encode_body(op).replace(b'"temperature":0.7', b'"temperature":' + literal.encode())
    with pytest.raises(wire.ProtocolError):
        wire.decode_body(wire.MsgType.SESSION_OP, body)


def test_fault_codes_are_typed() -> None:
    """(A code we do not know, or one that is not text: tests/test_wire_errors.py.)"""
    fault = _json(wire.StageFault(1, wire.FaultCode.MEMORY, "too big"))
    back = _decode(wire.MsgType.STAGE_FAULT, fault)
    assert isinstance(back, wire.StageFault) and back.code is wire.FaultCode.MEMORY
    with pytest.raises(wire.ProtocolError):
        _decode(wire.MsgType.STAGE_FAULT, {**fault, "code": 7})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([10**400, -(10**400)])
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
PLAN_PATHS = ["plan_id", "stages", "stages.0", "stages.1.node", "stages.2.end", "model",
              "model.layers", "n_ctx", "max_sessions", "dtype", "flash_attn"]  # fmt: skip
OP_PATHS = ["op", "position", "plan_id", "sampling", "sampling.top_k", "sampling.seed",
            "sampling.temperature", "sampling.repeat_last_n"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from([("plan", p) for p in PLAN_PATHS] + [("op", p) for p in OP_PATHS]),
    value=json_values,
)
def test_fuzzed_inference_bodies_raise_protocol_error_only(
    which: tuple[str, str], value: Any
) -> None:
    kind, path = which
    if kind == "plan":
        mtype, obj = wire.MsgType.PLAN, _json(_plan())
    else:
        op = wire.SessionOp(1, 2, wire.SessionOpKind.SAMPLE, 0, sampling=GOOD_SAMPLING)
        mtype, obj = wire.MsgType.SESSION_OP, _json(op)
    try:
        msg = _decode(mtype, _set(obj, path, value))
    except wire.ProtocolError:
        return
    assert isinstance(msg, wire.Plan | wire.SessionOp)  # it decoded: then it is well-formed
