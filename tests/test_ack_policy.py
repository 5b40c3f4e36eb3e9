"""The transport's ACK policy: a lone message's ACK rides on the reply; transfers ack as before.

It reads aioquic internals (the 1-RTT packet space's `ack_at`): this fails loudly if they move.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from meshchat.mesh import wire
from meshchat.mesh.transport import ACK_DELAY
from tests.mesh_helpers import mesh_nodes

pytestmark = pytest.mark.timeout(60)


def _count_sends(node: object) -> list[int]:
    sizes: list[int] = []
    transport = node.endpoint._transport  # type: ignore[attr-defined]
    original = transport.sendto

    def counting(data: bytes, addr: object = None) -> None:
        sizes.append(len(data))
        original(data, addr)

    transport.sendto = counting
    return sizes


async def test_a_lone_message_is_acked_by_the_reply_not_alone(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        a = await mesh.new(ping_interval=30)
        b = await mesh.new(ping_interval=30)
        await b.join(a.create_invite())
        await a.wait_for_peer(b.node_id)
        got: asyncio.Queue[wire.Message] = asyncio.Queue()
        b.on_arrival(wire.Token, lambda _p, m: got.put_nowait(m))
        a.on_arrival(wire.Token, lambda _p, m: got.put_nowait(m))
        await asyncio.sleep(0.1)  # let the handshake's own traffic settle
        conn = b.peer(a.node_id).conn  # type: ignore[union-attr]
        assert conn is not None and conn._ack_space() is not None, "aioquic changed: fix ACKs"
        sent_by_b = _count_sends(b)
        await a.send(b.node_id, wire.Token(1, 1, 1))
        await asyncio.wait_for(got.get(), 5)
        await asyncio.sleep(ACK_DELAY / 4)
        assert sent_by_b == [], "b sent a lone ACK instead of waiting for its reply"
        started = time.monotonic()
        await b.send(a.node_id, wire.Token(1, 2, 2))  # carries the ACK
        await asyncio.wait_for(got.get(), 5)
        assert len(sent_by_b) == 1
        # Nothing more to say: the ACK for the reply still goes out, within ACK_DELAY.
        sent_by_a = _count_sends(a)
        await asyncio.sleep(ACK_DELAY * 2)
        assert 1 <= len(sent_by_a) <= 2 and time.monotonic() - started < 1


async def test_a_transfer_is_acked_promptly(tmp_path: Path) -> None:
    async with mesh_nodes(tmp_path) as mesh:
        a = await mesh.new(ping_interval=30)
        b = await mesh.new(ping_interval=30)
        await b.join(a.create_invite())
        await a.wait_for_peer(b.node_id)
        done = asyncio.Event()
        b.on_arrival(wire.Activations, lambda _p, _m: done.set())
        data = bytes(512 * 576 * 4)  # a prompt's activations: 1.2 MB
        msg = wire.Activations(1, 0, 0, tuple(range(512)), wire.DType.F32, 576, data)
        started = time.monotonic()
        await a.send(b.node_id, msg)
        await asyncio.wait_for(done.wait(), 10)
        # With ACKs held back 20 ms per burst this takes seconds; acked as before, well under.
        assert time.monotonic() - started < 2.0
