"""Polling where a decode step is due (meshchat.mesh.polling): the selector, the windows it is
given, and two real nodes whose decode-step messages arrive inside those windows."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshchat.mesh import polling, wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.mesh.polling import (
    BACKOFF_SENDS,
    CROWDED_IN_A_ROW,
    LEAD_S,
    MAX_POLL_S,
    MIN_GAPS,
    PollingEventLoop,
    PollingSelector,
)
from tests.mesh_helpers import eventually, mesh_nodes

pytestmark = pytest.mark.timeout(60)


SPARE = 1 << 20  # CPUs: a selector that always finds a core to spare (the other rules alone)


def _readable_pair(cpus: int = SPARE) -> tuple[PollingSelector, socket.socket, socket.socket]:
    reader, writer = socket.socketpair()
    selector = PollingSelector(cpus)
    selector.register(reader, 1)  # EVENT_READ
    return selector, reader, writer


def test_a_closed_window_sleeps_and_an_open_one_polls() -> None:
    selector, reader, writer = _readable_pair()
    with reader, writer, selector:
        assert selector.core_to_spare()  # it reads the kernel's count of runnable tasks
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


def test_a_window_ends_when_another_task_wants_the_core() -> None:
    selector, reader, writer = _readable_pair()
    cpu = min(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(0, {cpu})  # this thread and the busy process share one core
        time.sleep(0.1)
        with reader, writer, selector:
            selector.poll_until = time.monotonic() + 10
            assert selector.select(0.2) == []
            assert selector.yielded == 1 and selector.poll_until == 0.0
    finally:
        os.sched_setaffinity(0, allowed)
        busy.kill()
        busy.wait()


def test_no_window_polls_while_every_core_has_work() -> None:
    selector, reader, writer = _readable_pair(cpus=os.cpu_count())
    spin = "while True: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.2)
        with reader, writer, selector:
            assert not selector.core_to_spare()
            selector.poll_until = time.monotonic() + 10
            assert selector.select(0.05) == []
            assert selector.crowded == 1 and selector.poll_until == 0.0
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_windows_follow_the_gap_between_a_send_and_the_next_arrival() -> None:
    async def steps() -> None:
        loop = asyncio.get_running_loop()
        arrivals = polling.arrivals(loop)
        assert arrivals is not None
        gaps = []
        for _ in range(MIN_GAPS):
            sent = loop.time()
            arrivals.sent()
            assert arrivals.window is None  # not enough rhythm yet
            await asyncio.sleep(0.02)
            arrivals.arrived()
            gaps.append(loop.time() - sent)
        sent = loop.time()
        arrivals.sent()
        assert arrivals.window is not None
        start, end = arrivals.window
        # From just before the second-earliest gap (one outlier is not the rhythm).
        assert abs(start - (sent + sorted(gaps)[1] - LEAD_S)) < 0.001
        assert start < end <= start + MAX_POLL_S
        await asyncio.sleep(max(0.0, start - loop.time()) + 0.0005)
        assert arrivals.windows == 1  # it opened
        arrivals.arrived()
        assert arrivals.window is None and loop.selector.poll_until == 0.0  # type: ignore[attr-defined]

    with asyncio.Runner(loop_factory=PollingEventLoop) as runner:
        runner.run(steps())


class NoCoreToSpare(PollingSelector):
    """A machine whose every core has work whenever a step is due (the kernel's count of
    runnable tasks, replaced: the test cannot make the real one hold still)."""

    def core_to_spare(self) -> bool:
        return False


def test_windows_that_find_no_core_to_spare_back_off() -> None:
    async def steps() -> None:
        loop = asyncio.get_running_loop()
        arrivals = polling.arrivals(loop)
        assert arrivals is not None

        async def step() -> None:
            arrivals.sent()
            await asyncio.sleep(0.006)  # the window opens 1.5 ms before the 5 ms gap
            arrivals.arrived()

        for _ in range(MIN_GAPS):
            await step()
        for _ in range(CROWDED_IN_A_ROW):
            await step()
        assert arrivals.windows == CROWDED_IN_A_ROW
        assert loop.selector.crowded == CROWDED_IN_A_ROW  # type: ignore[attr-defined]
        for _ in range(BACKOFF_SENDS):
            arrivals.sent()
            assert arrivals.window is None  # backing off: no timer wakes the process
            arrivals.arrived()
        arrivals.sent()
        assert arrivals.window is not None  # and then it tries again

    with asyncio.Runner(loop_factory=lambda: PollingEventLoop(NoCoreToSpare())) as runner:
        runner.run(steps())


def test_a_plain_loop_does_not_poll() -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert runner.run(_running_arrivals()) is None


async def _running_arrivals() -> polling.StepArrivals | None:
    return polling.arrivals(asyncio.get_running_loop())


STEPS = 40  # Tokens passed back and forth


def answer_tokens(me: Node) -> asyncio.Event:
    """Answer each Token with the next one after 10 ms of "compute"; the event is set once
    the last one arrives."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_token(sender: NodeId, msg: wire.Token) -> None:
        if msg.position >= STEPS - 1:
            done.set()
        if msg.position < STEPS:
            reply = wire.Token(7, msg.position + 1, 1, [])
            loop.call_later(0.01, lambda: loop.create_task(me.send(sender, reply)))

    me.on_arrival(wire.Token, on_token)
    return done


ECHO = """
import asyncio, sys
from pathlib import Path
from meshchat.mesh import polling
from tests.mesh_helpers import mesh_nodes
from tests.test_polling import answer_tokens

async def echo():
    async with mesh_nodes(Path(sys.argv[1])) as mesh:
        me = await mesh.new()
        done = answer_tokens(me)
        print(me.create_invite(), flush=True)
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.2)

polling.install()
asyncio.run(echo())
"""


def test_decode_steps_between_two_nodes_arrive_inside_the_windows(tmp_path: Path) -> None:
    """Two real nodes in two processes pass a Token back and forth over the side path, each
    "computing" 10 ms before it answers: the rhythm of a decode. This one learns it, opens
    windows, and hears steps inside them."""
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO, str(tmp_path / "echo")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip

    async def play() -> polling.StepArrivals:
        loop = asyncio.get_running_loop()
        async with mesh_nodes(tmp_path / "here") as mesh:
            me = await mesh.new()
            assert echo.stdout is not None
            peer = await me.join(await asyncio.to_thread(echo.stdout.readline))
            done = answer_tokens(me)
            await me.wait_for_peer(peer)
            conn = me.peer(peer).conn
            assert conn is not None
            await eventually(lambda: conn.side is not None and conn.side.ready)
            await me.send(peer, wire.Token(7, 0, 1, []))
            await asyncio.wait_for(done.wait(), 30)
            arrivals = polling.arrivals(loop)
            assert arrivals is not None
            await asyncio.sleep(0.1)  # the last reply leaves before the node stops
            return arrivals

    try:
        # A core to spare, whatever else runs now: the test is about the windows.
        with asyncio.Runner(loop_factory=lambda: PollingEventLoop(PollingSelector(SPARE))) as r:
            arrivals = r.run(play())
    finally:
        echo.wait(30)
    # 20 steps come back here; the rhythm is learnt after 4: windows open, steps land in them.
    assert arrivals.windows > 0 and arrivals.caught > 0
