"""Polling where a decode step is due (meshchat.mesh.polling): the selector, the windows it is
given, and two real nodes whose decode-step messages arrive inside those windows."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from meshchat.mesh import polling, wire
from meshchat.mesh.polling import LEAD_S, MAX_POLL_S, MIN_GAPS, PollingEventLoop, PollingSelector
from tests.mesh_helpers import eventually, mesh_nodes

pytestmark = pytest.mark.timeout(60)


def _readable_pair() -> tuple[PollingSelector, socket.socket, socket.socket]:
    reader, writer = socket.socketpair()
    selector = PollingSelector()
    selector.register(reader, 1)  # EVENT_READ
    return selector, reader, writer


def test_a_closed_window_sleeps_and_an_open_one_polls() -> None:
    selector, reader, writer = _readable_pair()
    with reader, writer, selector:
        assert selector.select(0.01) == []
        assert selector.polled_s == 0.0  # no window: epoll slept
        selector.poll_until = time.monotonic() + 10
        assert selector.select(0.01) == []  # the loop's own timeout still ends the poll
        assert selector.polled_s > 0.0


def test_an_open_window_returns_what_is_ready_and_then_sleeps() -> None:
    selector, reader, writer = _readable_pair()
    with reader, writer, selector:
        selector.poll_until = time.monotonic() + 10
        writer.send(b"x")
        ready = selector.select(1.0)
        assert [key.fileobj for key, _ in ready] == [reader]
        reader.recv(1)
        # A window that closes before the message comes: the rest of the wait sleeps in epoll.
        selector.poll_until = time.monotonic() + 0.005
        late = threading.Timer(0.2, writer.send, (b"y",))
        late.start()
        ready = selector.select(5.0)
        late.join()
        assert [key.fileobj for key, _ in ready] == [reader]
        assert selector.polled_s < 0.2  # it did not poll through the wait


def test_windows_follow_the_gap_between_a_send_and_the_next_arrival() -> None:
    async def steps() -> None:
        loop = asyncio.get_running_loop()
        arrivals = polling.arrivals(loop)
        assert arrivals is not None
        for _ in range(MIN_GAPS):
            arrivals.sent()
            assert arrivals.window is None  # not enough rhythm yet
            await asyncio.sleep(0.02)
            arrivals.arrived()
        arrivals.sent()
        sent = loop.time()
        assert arrivals.window is not None
        start, end = arrivals.window
        assert sent + 0.02 - LEAD_S - 0.001 <= start <= sent + 0.02  # sleep(0.02) is >= 20 ms
        assert start < end <= start + MAX_POLL_S
        await asyncio.sleep(max(0.0, start - loop.time()) + 0.0005)
        assert arrivals.windows == 1  # opened: the selector polls now
        arrivals.arrived()
        assert arrivals.caught == 1 and arrivals.window is None

    with asyncio.Runner(loop_factory=PollingEventLoop) as runner:
        runner.run(steps())


def test_a_plain_loop_does_not_poll() -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert runner.run(_running_arrivals()) is None


async def _running_arrivals() -> polling.StepArrivals | None:
    return polling.arrivals(asyncio.get_running_loop())


STEPS = 40


def test_decode_steps_between_two_nodes_arrive_inside_the_windows(tmp_path: Path) -> None:
    """Two real nodes on one PollingEventLoop pass a Token back and forth over the side path,
    each "computing" 10 ms before answering: the rhythm a decode has."""

    async def ping_pong() -> None:
        async with mesh_nodes(tmp_path) as mesh:
            a, b = await mesh.new(), await mesh.new()
            await b.join(a.create_invite())
            await a.wait_for_peer(b.node_id)
            await b.wait_for_peer(a.node_id)
            for x, y in ((a, b), (b, a)):
                conn = x.peer(y.node_id).conn  # type: ignore[union-attr]
                await eventually(lambda c=conn: c.side is not None and c.side.ready)  # type: ignore[misc]
            done = asyncio.Event()

            def answer(me: object, to: object) -> None:
                def on_token(_peer: object, msg: wire.Message) -> None:
                    assert isinstance(msg, wire.Token)
                    if msg.position >= STEPS:
                        done.set()
                        return
                    reply = wire.Token(7, msg.position + 1, 1, [])
                    loop.call_later(0.01, lambda: asyncio.ensure_future(me.send(to, reply)))  # type: ignore[attr-defined]

                me.on_arrival(wire.Token, on_token)  # type: ignore[attr-defined]

            loop = asyncio.get_running_loop()
            answer(a, b.node_id)
            answer(b, a.node_id)
            await a.send(b.node_id, wire.Token(7, 0, 1, []))
            await asyncio.wait_for(done.wait(), 30)
            arrivals = polling.arrivals(loop)
            assert arrivals is not None
            assert arrivals.windows > 0 and arrivals.caught > 0
            assert arrivals.window is None  # the last arrival closed its window

    with asyncio.Runner(loop_factory=PollingEventLoop) as runner:
        runner.run(ping_pong())
