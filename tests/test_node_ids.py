"""A NodeID is a NodeId inside the program: a peer's text becomes one at the edge, or is refused
there (wire.ProtocolError, malformed capabilities, an ignored mDNS record)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import ServiceInfo

from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import MAX_PEERS, NodeCaps
from meshchat.mesh import discovery, wire
from meshchat.mesh.identity import Identity, NodeId, _b32
from meshchat.mesh.transport import CONTROL_STREAM
from meshchat.timeouts import TIMEOUTS
from meshchat.tui.split import SELF, SplitPlan
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes
from tests.node_names import HEAD, B
from tests.test_planner import caps
from tests.test_preauth import still_admits, stranger_conn

pytestmark = pytest.mark.timeout(60)

NODE = Identity.generate().node_id
TEXT = str(NODE)
# The same key under another checksum: a typo the text form exists to catch.
TYPO = _b32(NODE.raw + bytes(a ^ 1 for a in hashlib.sha256(NODE.raw).digest()[:2]))
NOT_A_NODE_ID = ["", "abc", TYPO, 7, None, "x" * 500]


def _decode(kind: wire.MsgType, body: dict[str, Any]) -> wire.Message:
    return wire.decode_body(kind, json.dumps(body).encode())


# --- the wire decoder ----------------------------------------------------------------------------


def test_wire_bodies_carry_node_ids_and_their_text_only_on_the_wire() -> None:
    for msg in (
        wire.Hello(NODE, "m" * 16, ["127.0.0.1:1"]),
        wire.Welcome(NODE, "m" * 16),
        wire.Peers({NODE: ["127.0.0.1:1"], B: []}),
        wire.StageFault(1, wire.FaultCode.BAD_INPUT, "bad", NODE),
    ):
        body = wire.encode_body(msg)
        assert TEXT.encode() in body
        assert wire.decode_body(msg.TYPE, body) == msg


@pytest.mark.parametrize("bad", NOT_A_NODE_ID)
def test_a_peer_text_that_is_no_node_id_is_a_protocol_error(bad: Any) -> None:
    cases = [
        (wire.MsgType.HELLO, {"node_id": bad}),
        (wire.MsgType.WELCOME, {"node_id": bad, "mesh_id": "m"}),
    ]
    if bad is not None:  # a fault without a culprit says null
        fault = {"session": 1, "code": "bad-input", "reason": "", "culprit": bad}
        cases.append((wire.MsgType.STAGE_FAULT, fault))
    if isinstance(bad, str):  # JSON object keys are text
        cases.append((wire.MsgType.PEERS, {"peers": {TEXT: [], bad: []}}))
    for kind, body in cases:
        with pytest.raises(wire.ProtocolError, match="NodeID"):
            _decode(kind, body)


def test_a_peers_table_beyond_the_bound_is_refused_before_any_key_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[str] = []
    real = NodeId.parse
    monkeypatch.setattr(NodeId, "parse", lambda text: parsed.append(text) or real(text))
    keys = {f"{TEXT[:-4]}{i:04d}": [] for i in range(wire.MAX_NODE_KEYS + 1)}
    with pytest.raises(wire.ProtocolError, match=f"more than {wire.MAX_NODE_KEYS}"):
        _decode(wire.MsgType.PEERS, {"peers": keys})
    assert parsed == []
    assert _decode(wire.MsgType.PEERS, {"peers": {TEXT: []}}) == wire.Peers({NODE: []})


# --- capabilities (JSON in an ACK) ---------------------------------------------------------------


def test_capabilities_name_their_peers_by_node_id_and_refuse_any_other_text() -> None:
    mine = caps(HEAD)
    good = {**mine.to_json(), "rtt_ms": {TEXT: 1.5}, "peers": [TEXT, str(B)]}
    back = NodeCaps.from_json(HEAD, good)
    assert back.rtt_ms == {NODE: 1.5} and back.peers == (NODE, B)
    assert back.to_json() == good  # the JSON is what it was
    for bad in NOT_A_NODE_ID:
        for field in ({"peers": [TEXT, bad]}, {"rtt_ms": {str(bad): 1.0}}):
            with pytest.raises(MeshchatError, match="malformed capabilities"):
                NodeCaps.from_json(HEAD, {**good, **field})
    too_many = {f"{TEXT[:-4]}{i:04d}": 1.0 for i in range(MAX_PEERS + 1)}
    with pytest.raises(MeshchatError, match=f"rtt_ms of more than {MAX_PEERS}"):
        NodeCaps.from_json(HEAD, {**good, "rtt_ms": too_many})


# --- mDNS TXT records ----------------------------------------------------------------------------


def _txt(node_id: str) -> ServiceInfo:
    props = {"v": "2", "id": node_id, "n": "00" * 16, "t": "1", "p": "7000", "a": "10.0.0.1"}
    return ServiceInfo(discovery.SERVICE_TYPE, f"x.{discovery.SERVICE_TYPE}", properties=props)


def test_an_announcement_names_its_node_by_the_canonical_node_id_text() -> None:
    parsed = discovery._parse_info(_txt(TEXT))
    assert parsed is not None and parsed.node_id == NODE
    # The tag covers the text: another spelling of the same key would be a second identity.
    assert NodeId.parse(TEXT.upper()) == NODE
    fit = [b for b in NOT_A_NODE_ID if b and len(str(b)) < 200]  # a TXT string is < 256 bytes
    for other in (TEXT.upper(), f"{TEXT[:5]}-{TEXT[5:]}", *fit):
        assert discovery._parse_info(_txt(str(other))) is None


# --- the split editor ----------------------------------------------------------------------------


def test_this_machine_is_a_typed_owner_not_a_node_id_text() -> None:
    plan = SplitPlan.from_ranges(30, [(0, 15), (15, 30)], [SELF, B])
    assert plan.nodes == [SELF, B] and not plan.is_local
    assert "self" not in plan.nodes and str(SELF) == "self"  # the peers table's row key
    assert plan.assign(1, SELF).is_local
    assert f"node {B.short}, which is not connected" in plan.validate(range(1, 30), [])[0]


# --- attacks on loopback -------------------------------------------------------------------------


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


async def test_a_hello_without_a_node_id_is_refused_at_decode(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TIMEOUTS, "auth_s", 600.0)  # only the decoder can close it
    a = await mesh.new()
    conn = await stranger_conn(mesh, a)
    body = json.dumps({"node_id": "not-a-node-id", "mesh_id": None, "addresses": []}).encode()
    conn._quic.send_stream_data(CONTROL_STREAM, wire.encode_header(wire.MsgType.HELLO, len(body)))
    conn._quic.send_stream_data(CONTROL_STREAM, body)
    conn.transmit()
    await asyncio.wait_for(conn.closed, 30)
    assert "HELLO.node_id: not a NodeID" in conn.close_reason, conn.close_reason
    await eventually(lambda: not a.endpoint.connections)
    await still_admits(a, await mesh.new())


async def test_a_member_gossiping_a_junk_node_id_changes_nothing(mesh: MeshNodes) -> None:
    a, b = await mesh.new(), await mesh.new()
    await b.join(a.create_invite())
    held = (await a.wait_for_peer(b.node_id)).conn
    before = set(a._peers)
    conn = b.peer(a.node_id).conn  # type: ignore[union-attr]
    assert conn is not None and held is not None
    fake = str(Identity.generate().node_id)
    body = json.dumps({"peers": {fake: ["127.0.0.1:9"], "junk": ["127.0.0.1:9"]}}).encode()
    conn._quic.send_stream_data(CONTROL_STREAM, wire.encode_header(wire.MsgType.PEERS, len(body)))
    conn._quic.send_stream_data(CONTROL_STREAM, body)
    conn.transmit()
    # The frame is a protocol error as a whole: a closes that connection (b redials)...
    await asyncio.wait_for(asyncio.shield(held.closed), 15)
    assert "PEERS.peers: not a NodeID" in held.close_reason, held.close_reason
    # ...and learns no node from it: its table holds the same nodes as before.
    assert set(a._peers) == before and not a._nearby
    await a.wait_for_peer(b.node_id, timeout=15)  # the honest redial comes back
    await still_admits(a, await mesh.new())
