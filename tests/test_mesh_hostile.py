"""Hostile and broken peers: junk QUIC clients, random datagrams, bad frames, buffer limits."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from meshchat.mesh import wire
from meshchat.mesh.node import Node, PeerState
from meshchat.mesh.transport import Connection, Tuning
from meshchat.timeouts import TIMEOUTS
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


async def paired(mesh: MeshNodes, **kw: object) -> tuple[Node, Node, Connection]:
    a = await mesh.new(**kw)  # type: ignore[arg-type]
    b = await mesh.new()
    await b.join(a.create_invite(uses=5))
    await a.wait_for_peer(b.node_id)
    peer = b.peer(a.node_id)
    assert peer is not None and peer.conn is not None
    a.on(wire.Ping, lambda n, m: wire.Pong(m.seq))
    return a, b, peer.conn


async def still_serving(a: Node, b: Node) -> None:
    """a answers requests from b, and accepts a brand-new node."""
    assert await b.request(a.node_id, wire.Ping(99), timeout=5) == wire.Pong(99)
    assert a.peer(b.node_id).state is PeerState.CONNECTED  # type: ignore[union-attr]


def _client_config(alpn: str) -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE)


async def test_junk_quic_client_wrong_alpn(mesh: MeshNodes) -> None:
    a, b, _ = await paired(mesh)
    host, port = a.endpoint.address
    with pytest.raises(ConnectionError):
        async with connect(host, port, configuration=_client_config("h3"), wait_connected=True):
            pass
    await still_serving(a, b)


async def test_quic_client_without_auth_is_cut_off(mesh: MeshNodes, monkeypatch) -> None:
    monkeypatch.setattr(TIMEOUTS, "auth_s", 0.5)
    a, b, _ = await paired(mesh)
    host, port = a.endpoint.address
    # 1: right ALPN, then silence: closed when the auth deadline passes.
    async with connect(host, port, configuration=_client_config("meshchat/1")) as client:
        await asyncio.wait_for(client.wait_closed(), 3)
    # 2: right ALPN, opens a non-control stream before authenticating: closed at once.
    async with connect(host, port, configuration=_client_config("meshchat/1")) as client:
        client._quic.send_stream_data(4, wire.encode(wire.Ping(1)))
        client.transmit()
        await asyncio.wait_for(client.wait_closed(), 3)
    # 3: garbage on the control stream.
    async with connect(host, port, configuration=_client_config("meshchat/1")) as client:
        client._quic.send_stream_data(0, os.urandom(64))
        client.transmit()
        await asyncio.wait_for(client.wait_closed(), 3)
    await still_serving(a, b)
    assert len(a.endpoint.connections) == 1


async def test_random_datagram_flood(mesh: MeshNodes) -> None:
    a, b, _ = await paired(mesh)
    rng = random.Random(7)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for i in range(1500):
            size = rng.choice([1, 20, 100, 1200, 1300, 1472])
            data = bytearray(rng.randbytes(size))
            if i % 3 == 0 and size >= 1200:
                data[0] = 0xC0 | (data[0] & 0x0F)  # looks like a QUIC v1 long-header Initial
                data[1:5] = b"\x00\x00\x00\x01"
            try:
                sock.sendto(bytes(data), a.endpoint.address)
            except BlockingIOError:
                await asyncio.sleep(0.001)
            if i % 100 == 0:
                await asyncio.sleep(0)
    finally:
        sock.close()
    await asyncio.sleep(0.2)
    await still_serving(a, b)
    c = await mesh.new()
    await c.join(a.create_invite())
    await eventually(lambda: len(a.endpoint.connections) <= 3, timeout=10)


def _raw_request_stream(conn: Connection, data: bytes, end: bool = True) -> int:
    sid = conn._quic.get_next_available_stream_id()
    conn._quic.send_stream_data(sid, data, end_stream=end)
    conn.transmit()
    return sid


async def _reply_on(conn: Connection, sid: int) -> wire.Message:
    fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
    conn._pending[sid] = fut
    return await asyncio.wait_for(fut, 5)


async def test_oversized_and_malformed_frames_close_only_that_stream(mesh: MeshNodes) -> None:
    a, b, conn = await paired(mesh)
    bad_frames = [
        wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.PLAN, 0, wire.MAX_CONTROL_BODY + 1),
        wire.HEADER.pack(9, wire.MsgType.PING, 0, 2) + b"{}",  # unknown version
        wire.HEADER.pack(wire.WIRE_VERSION, 250, 0, 2) + b"{}",  # unknown type
        wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.PING, 0, 5) + b"nojsn",
        wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.PING, 0, 13) + b'{"seq":"no"}x',
        wire.encode(wire.Ping(1))[:-2],  # stream ends inside the frame
    ]
    tensor = bytearray(wire.encode(wire.Tensor(wire.DType.F32, (2, 2), 1, 0, b"\0" * 16)))
    tensor[wire.HEADER_SIZE] = 77  # unknown dtype
    bad_frames.append(bytes(tensor))
    for frame in bad_frames:
        sid = _raw_request_stream(conn, frame)
        reply = await _reply_on(conn, sid)
        assert isinstance(reply, wire.Error) and reply.code is wire.FaultCode.PROTOCOL, reply
    await still_serving(a, b)


async def test_malformed_control_frame_closes_only_that_peer(mesh: MeshNodes) -> None:
    a, _b, conn = await paired(mesh)
    c = await mesh.new()
    await c.join(a.create_invite())
    await a.wait_for_peer(c.node_id)
    conn._quic.send_stream_data(0, wire.HEADER.pack(wire.WIRE_VERSION, 250, 0, 0))
    conn.transmit()
    await asyncio.wait_for(conn.closed, 5)
    assert "protocol error" in conn.close_reason
    assert await c.request(a.node_id, wire.Ping(5)) == wire.Pong(5)


async def test_peer_buffer_limit_cuts_off_the_peer(mesh: MeshNodes) -> None:
    small = Tuning(peer_buffer=200_000)
    a, _b, conn = await paired(mesh, tuning=small)
    c = await mesh.new()
    await c.join(a.create_invite())
    # Many streams, each holding a partial (never finished) large frame.
    header = wire.HEADER.pack(wire.WIRE_VERSION, wire.MsgType.TENSOR, 0, 1_000_000)
    for _ in range(5):
        _raw_request_stream(conn, header + b"\0" * 60_000, end=False)
    await asyncio.wait_for(conn.closed, 5)
    assert "buffer limit" in conn.close_reason
    await a.wait_for_peer(c.node_id)
    assert await c.request(a.node_id, wire.Ping(5)) == wire.Pong(5)


async def test_second_frame_on_a_request_stream_is_refused(mesh: MeshNodes) -> None:
    a, b, conn = await paired(mesh)
    sid = _raw_request_stream(conn, wire.encode(wire.Ping(1)) + wire.encode(wire.Ping(2)))
    reply = await _reply_on(conn, sid)
    assert isinstance(reply, (wire.Pong, wire.Error))
    await still_serving(a, b)
    assert not a.peer(b.node_id).conn._served  # type: ignore[union-attr]
