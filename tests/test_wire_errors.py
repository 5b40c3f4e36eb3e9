"""Error and fault codes on the wire: one enum (wire.FaultCode), decoded at the wire boundary.

A code this version does not know (a newer peer's) decodes as FaultCode.UNKNOWN, keeping the
refusal and its reason; a code that is not text is a protocol error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from meshchat.mesh import wire
from meshchat.mesh.node import Refused
from tests.mesh_helpers import eventually, mesh_nodes

Code = wire.FaultCode

# The wire text of every code a released node sends: an older peer keeps understanding us,
# and we it, only while these stay as they are.
RELEASED = {
    "PROTOCOL": "protocol", "BAD_HELLO": "bad-hello", "SELF": "self",
    "BAD_SIGNATURE": "bad-signature", "INVITE": "invite", "NOT_MEMBER": "not-member",
    "UNSUPPORTED": "unsupported", "FAILED": "failed", "REFUSED": "refused",
    "BAD_PLAN": "plan", "BUSY": "busy", "NO_MODEL": "no-model", "FINGERPRINT": "fingerprint",
    "MEMORY": "memory", "LOAD": "load", "SEED": "seed", "OVERLOAD": "overload",
    "UNKNOWN_SESSION": "unknown-session", "BAD_INPUT": "bad-input", "STALE_PLAN": "stale-plan",
    "NO_SLOT": "no-slot", "OVERFLOW": "overflow", "STAGE": "stage", "LOST": "lost",
    "INTERNAL": "internal",
}  # fmt: skip


def _body(msg: wire.Message) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(wire.encode_body(msg)))


def _decode(mtype: wire.MsgType, body: dict[str, Any]) -> wire.Message:
    return wire.decode_body(mtype, json.dumps(body).encode())


@pytest.mark.parametrize("code", list(Code))
def test_every_code_round_trips_in_an_error_and_a_fault(code: wire.FaultCode) -> None:
    error = wire.Error(code, "why")
    (back,) = wire.FrameReader().feed(wire.encode(error))
    assert back == error and isinstance(back, wire.Error) and back.code is code
    fault = wire.StageFault(3, code, "why", None)
    (back,) = wire.FrameReader().feed(wire.encode(fault))
    assert back == fault and isinstance(back, wire.StageFault) and back.code is code


def test_the_wire_text_of_released_codes_is_kept() -> None:
    assert {name: Code[name].value for name in RELEASED} == RELEASED
    assert len({c.value for c in Code}) == len(Code)  # no two members share a wire text


@pytest.mark.parametrize("text", ["reboot", "", "PROTOCOL", "x" * 1000])
def test_a_peers_unknown_code_is_unknown_with_its_reason_kept(text: str) -> None:
    error = _decode(wire.MsgType.ERROR, {**_body(wire.Error(Code.BUSY, "later")), "code": text})
    assert error == wire.Error(Code.UNKNOWN, "later")
    fault = _body(wire.StageFault(9, Code.MEMORY, "too big", None))
    back = _decode(wire.MsgType.STAGE_FAULT, {**fault, "code": text})
    assert back == wire.StageFault(9, Code.UNKNOWN, "too big", None)


@pytest.mark.parametrize("value", [5, None, True, ["busy"], {"busy": 1}])
def test_a_code_that_is_not_text_is_a_protocol_error(value: object) -> None:
    body = {**_body(wire.Error(Code.BUSY, "later")), "code": value}
    with pytest.raises(wire.ProtocolError):
        _decode(wire.MsgType.ERROR, body)
    fault = {**_body(wire.StageFault(9, Code.MEMORY, "too big", None)), "code": value}
    with pytest.raises(wire.ProtocolError):
        _decode(wire.MsgType.STAGE_FAULT, fault)


@pytest.mark.timeout(30)
async def test_a_newer_peers_codes_keep_the_connection(tmp_path: Path) -> None:
    """A peer that sends codes we do not know (as a newer version would): its refusal reaches
    the asker as a refusal of code UNKNOWN, its fault as a fault, and the connection stays up
    (before, the refusal carried the peer's raw text as its code, and the fault, a bad frame
    on the control stream, closed the connection)."""
    newer = cast(wire.FaultCode, "reboot-first")  # what a newer peer's enum may hold
    async with mesh_nodes(tmp_path) as mesh:
        a, b = await mesh.new(), await mesh.new()
        await b.join(a.create_invite())
        await a.wait_for_peer(b.node_id)
        faults: list[wire.StageFault] = []
        b.on_arrival(wire.StageFault, lambda _p, m: faults.append(m))
        a.on(wire.Ping, lambda _n, m: wire.Error(newer, "restart me") if m.seq else wire.Pong(0))
        with pytest.raises(Refused) as refused:
            await b.request(a.node_id, wire.Ping(1), timeout=5)
        assert refused.value.code is Code.UNKNOWN and refused.value.reason == "restart me"
        await a.send(b.node_id, wire.StageFault(4, newer, "stage gone", None))
        await eventually(lambda: len(faults) == 1)
        assert faults == [wire.StageFault(4, Code.UNKNOWN, "stage gone", None)]
        assert await b.request(a.node_id, wire.Ping(0), timeout=5) == wire.Pong(0)
        conn = b.peer(a.node_id).conn  # type: ignore[union-attr]
        assert conn is not None and not conn.is_closed
