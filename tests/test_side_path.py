"""The side path (meshchat.mesh.sidepath): decode steps as AES-GCM datagrams on real sockets.

Loss, reordering, replay and forgery are made by wrapping a node's outgoing side packets (or
handing its endpoint packets by hand); every test ends by showing the connection still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from meshchat.mesh import sidepath, transport, wire
from meshchat.mesh.node import Node
from meshchat.mesh.transport import DEFAULT_TUNING, Connection, Tuning
from meshchat.timeouts import TIMEOUTS
from tests.mesh_helpers import eventually, mesh_nodes

pytestmark = pytest.mark.timeout(60)

WIDTH = 2048  # the 1B synthetic model's activation: 8 KB


def _step(i: int, width: int = WIDTH) -> wire.Activations:
    data = os.urandom(width * 4)
    return wire.Activations(7, i, 0, (i,), wire.DType.F32, width, data, True, (0,))


def _conn(node: Node, peer: Node) -> Connection:
    conn = node.peer(peer.node_id).conn  # type: ignore[union-attr]
    assert conn is not None
    return conn


class Pair:
    """Two joined nodes, a sending to b; b records what arrives, in order."""

    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b
        self.got: list[wire.Message] = []
        self.out, self.into = _conn(a, b), _conn(b, a)  # a's connection to b, and b's to a
        for kind in (wire.Activations, wire.Token, wire.Cancel):
            b.on_arrival(kind, lambda _p, m: self.got.append(m))

    def tap(self, change: Callable[[bytes, Callable[[bytes], None]], None]) -> None:
        """Route a's outgoing side packets through `change(packet, send)`."""
        side = self.out.side
        assert side is not None
        send = side._send_packet
        side._send_packet = lambda packet: change(packet, send)

    async def arrive_in_order(self, *msgs: wire.Message) -> None:
        """Send `msgs` from a to b; b gets exactly them, in that order."""
        for msg in msgs:
            await self.a.send(self.b.node_id, msg)
        await eventually(lambda: len(self.got) >= len(msgs))
        assert self.got == list(msgs)

    async def still_works(self) -> None:
        before = len(self.got)
        msg = _step(999)
        await self.a.send(self.b.node_id, msg)
        await eventually(lambda: len(self.got) > before)
        assert self.got[-1] == msg and not self.out.is_closed


async def _pair(mesh: object, tuning: Tuning = DEFAULT_TUNING) -> Pair:
    a = await mesh.new(tuning=tuning, ping_interval=30)  # type: ignore[attr-defined]
    b = await mesh.new(tuning=tuning, ping_interval=30)  # type: ignore[attr-defined]
    await b.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    await b.wait_for_peer(a.node_id)
    pair = Pair(a, b)
    for conn in (pair.out, pair.into):
        await eventually(lambda conn=conn: conn.side is not None and conn.side.ready)  # type: ignore[misc]
    return pair


class _Socket:
    """A connection's socket with its `sendto` replaced."""

    def __init__(self, sendto: Callable[[bytes, object], None]) -> None:
        self.sendto = sendto


def _wrap_sends(conn: Connection, sendto: Callable[[bytes, object, Callable], None]) -> None:
    original = conn._transport.sendto  # type: ignore[union-attr]
    conn._transport = _Socket(lambda data, addr=None: sendto(data, addr, original))  # type: ignore[assignment]


async def test_decode_steps_go_beside_aioquic_exactly_and_in_order(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        stream_bytes = p.out._control_out
        sent: list[wire.Message] = []
        for i in range(sidepath.WINDOW // 2):  # more in flight go on the stream
            sent.append(_step(i))
            sent.append(wire.Token(7, i, i + 100, [i]))
            for msg in sent[-2:]:
                await p.a.send(p.b.node_id, msg)
        await eventually(lambda: len(p.got) == len(sent))
        assert p.got == sent
        assert p.out._control_out == stream_bytes, "a decode step went on the control stream"


async def test_a_prompt_and_session_ops_stay_on_the_stream(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        stream_bytes = p.out._control_out
        prompt = wire.Activations(7, 0, 0, (1, 2), wire.DType.F32, 4, bytes(32))
        await p.a.send(p.b.node_id, prompt)
        await eventually(lambda: len(p.got) == 1)
        assert p.got == [prompt] and p.out._control_out > stream_bytes


async def test_a_decode_step_over_the_side_limit_is_framed_once_for_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-token step too large for the side path (a very wide model) takes the stream, with
    the frame built to measure it: not built a second time."""
    framed: list[wire.Message] = []
    real = transport.frame_parts

    def counted(msg: wire.Message) -> list[bytes | memoryview]:
        framed.append(msg)
        return real(msg)

    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        wide = _step(0, width=sidepath.MAX_MESSAGE // 4 + 1)
        stream_bytes = p.out._control_out
        monkeypatch.setattr(transport, "frame_parts", counted)
        await p.a.send(p.b.node_id, wide)
        await eventually(lambda: len(p.got) == 1)
        assert p.got == [wide] and framed == [wide]
        assert p.out._control_out - stream_bytes == len(b"".join(real(wide)))
        monkeypatch.undo()
        await p.still_works()


async def test_order_with_the_stream_kept_when_side_packets_are_late(tmp_path: Path) -> None:
    """A stream message sent after a side message waits for it (side packets held 50 ms)."""
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        loop = asyncio.get_running_loop()
        p.tap(lambda packet, send: loop.call_later(0.05, send, packet))
        await p.arrive_in_order(_step(1), wire.Cancel(7, "stop", 1))


async def test_order_with_the_stream_kept_when_stream_packets_are_late(tmp_path: Path) -> None:
    """A side message that overtakes the stream frame sent before it waits for that frame."""
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        loop = asyncio.get_running_loop()

        def late_quic(data: bytes, addr: object, send: Callable[[bytes, object], None]) -> None:
            if sidepath.is_side_packet(data):
                send(data, addr)
            else:
                loop.call_later(0.05, send, data, addr)

        _wrap_sends(p.out, late_quic)
        await p.arrive_in_order(wire.Cancel(7, "stop", 1), _step(1))


async def test_loss_is_recovered_by_resends(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh, dataclasses.replace(DEFAULT_TUNING, loopback_datagram_size=1200))
        count = [0]

        def drop_every_third(packet: bytes, send: Callable[[bytes], None]) -> None:
            count[0] += 1
            if count[0] % 3:
                send(packet)

        p.tap(drop_every_third)
        sent = [_step(i) for i in range(10)]
        for msg in sent:
            await p.a.send(p.b.node_id, msg)
        await eventually(lambda: len(p.got) == len(sent))
        assert p.got == sent and count[0] > 10 * 8  # 8 fragments each, some sent again
        await p.still_works()


async def test_reordered_fragments_are_delivered_in_order(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh, dataclasses.replace(DEFAULT_TUNING, loopback_datagram_size=1200))
        held: list[bytes] = []
        p.tap(lambda packet, send: held.append(packet))
        sent = [_step(i) for i in range(3)]
        for msg in sent:
            await p.a.send(p.b.node_id, msg)
        assert len(held) >= 3 * 8  # 8 KB in fragments of at most 1200 bytes
        assert max(len(x) for x in held) <= 1200
        side = p.out.side
        assert side is not None
        side._send_packet = lambda x: p.b.endpoint.datagram_received(x, ("127.0.0.1", 1))
        for packet in reversed(held):
            p.b.endpoint.datagram_received(packet, ("127.0.0.1", 1))
        await eventually(lambda: len(p.got) == 3)
        assert p.got == sent


async def test_replayed_packets_are_used_once(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        captured: list[bytes] = []

        def keep(packet: bytes, send: Callable[[bytes], None]) -> None:
            captured.append(packet)
            send(packet)

        p.tap(keep)
        sent = [_step(i) for i in range(3)]
        for msg in sent:
            await p.a.send(p.b.node_id, msg)
        await eventually(lambda: len(p.got) == 3)
        for packet in captured * 3:
            p.b.endpoint.datagram_received(packet, ("127.0.0.1", 9))
        await asyncio.sleep(0.05)
        assert p.got == sent
        await p.still_works()


async def test_forged_and_truncated_packets_are_dropped(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        captured: list[bytes] = []
        p.tap(lambda packet, send: captured.append(packet))
        await p.a.send(p.b.node_id, _step(1))
        packet = captured[0]
        tag = packet[1:9]
        flipped = bytearray(packet)
        flipped[-20] ^= 1
        forged = [
            bytes(flipped),  # ciphertext changed
            packet[: sidepath.HEAD.size + 10],  # truncated
            packet[:-1],
            bytes([0x11]) + tag + os.urandom(200),  # the right tag, garbage after it
            bytes([0x11]) + tag + bytes(28) + os.urandom(50),  # packet number 0
            b"\x00",
            bytes(3000),
            bytes([packet[0]]) + os.urandom(8) + packet[9:],  # an unknown tag
        ]
        for bad in forged:
            p.b.endpoint.datagram_received(bad, ("127.0.0.1", 9))
        assert p.got == []
        side = p.out.side
        assert side is not None
        side._send_packet = lambda x: p.b.endpoint.datagram_received(x, ("127.0.0.1", 1))
        p.b.endpoint.datagram_received(packet, ("127.0.0.1", 1))  # the real one still counts
        await eventually(lambda: len(p.got) == 1)
        side._send_packet = p.out._send_side_packet
        await p.still_works()


async def test_an_authentic_bad_frame_closes_the_connection(tmp_path: Path) -> None:
    """A member whose side message is not a decode step is cut off, as on the stream."""
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        side = p.out.side
        assert side is not None
        side.send(wire.encode(wire.Cancel(7, "not a step")), p.out._control_out)
        await eventually(lambda: p.into.is_closed)
        assert p.got == []


async def test_a_peer_without_it_gets_the_stream(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        a = await mesh.new(ping_interval=30)
        b = await mesh.new(ping_interval=30, tuning=Tuning(side_path=False))
        await b.join(a.create_invite())
        await a.wait_for_peer(b.node_id)
        await b.wait_for_peer(a.node_id)
        p = Pair(a, b)
        sent = [_step(i) for i in range(3)]
        for msg in sent:
            await a.send(b.node_id, msg)
        await eventually(lambda: len(p.got) == 3)
        assert p.got == sent and p.out.side is not None and not p.out.side.ready


async def test_a_path_that_loses_everything_closes_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TIMEOUTS, "side_path_give_up_s", 0.3)
    async with mesh_nodes(tmp_path) as mesh:
        p = await _pair(mesh)
        p.tap(lambda packet, send: None)
        await p.a.send(p.b.node_id, _step(1))
        sending = asyncio.ensure_future(p.a.send(p.b.node_id, wire.Cancel(7, "stop", 1)))
        await eventually(lambda: p.out.is_closed and sending.done())
        assert isinstance(sending.exception(), Exception) and p.got == []


async def test_a_member_cannot_grow_the_reassembly_table() -> None:
    """Fragments of messages that never complete, from a holder of the keys: at most WINDOW
    messages are held, later ones are refused; the held ones complete when the rest comes."""
    binding, got = os.urandom(32), list[wire.Message]()
    packets: list[bytes] = []
    sender = sidepath.SidePath(binding, True, 1200, packets.append, got.append, print)
    receiver = sidepath.SidePath(binding, False, 1200, lambda _p: None, got.append, print)
    for i in range(sidepath.WINDOW * 4):
        sender.send(wire.encode(_step(i)), 0)
    refused = 0
    held_back = packets[1::3]  # a fragment of nearly every message
    for packet in packets:
        if packet in held_back:
            continue
        try:
            receiver.receive(packet)
        except sidepath.SideError:
            refused += 1
    assert len(receiver._incoming) <= sidepath.WINDOW and refused > 0
    for packet in packets:  # now the held-back fragments (the rest are replays: refused)
        with contextlib.suppress(sidepath.SideError):
            receiver.receive(packet)
    assert [m.position for m in got] == list(range(sidepath.WINDOW))  # type: ignore[attr-defined]
    sender.close()
    receiver.close()


async def test_a_key_holder_jumping_the_packet_number_costs_nothing() -> None:
    """Packets numbered near 2**64 by a holder of the keys: the replay window moves without a
    2**64-bit shift (before: the receiver built that integer and ran out of memory), and the
    window still refuses a replay."""
    binding, got = os.urandom(32), list[wire.Message]()
    packets: list[bytes] = []
    sender = sidepath.SidePath(binding, True, 1200, packets.append, got.append, print)
    receiver = sidepath.SidePath(binding, False, 1200, lambda _p: None, got.append, print)
    sender.send(wire.encode(_step(0)), 0)
    sender._seq = 2**64 - 100  # the largest numbers the header holds
    sender.send(wire.encode(_step(1)), 0)
    for packet in packets:
        receiver.receive(packet)
    assert [m.position for m in got] == [0, 1]  # type: ignore[attr-defined]
    with pytest.raises(sidepath.SideError, match="replayed"):
        receiver.receive(packets[-1])
    sender.close()
    receiver.close()
