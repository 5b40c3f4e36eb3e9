"""Polling the node's socket, for a moment, where a decode step's message is due.

Why: a node that waits for its next decode step sleeps in epoll, and its CPU goes idle. On
this project's CI machine (KVM guest, cpuidle haltpoll with guest_halt_poll_ns=0) an idle vCPU
halts, and the packet that must wake it pays for the VM's wake-up; bare metal pays for a
C-state exit instead. Measured by `meshchat bench --synthetic 1B` (mesh2 with a core per
node, 2 vCPUs, AMD EPYC Zen 5, MESHCHAT_POLL=0 and 1 run in turns): a hop's wire time 0.19-0.21
ms asleep against 0.10-0.11 ms polling, its whole overhead p50 0.52-0.53 → 0.41-0.42 ms. The
sender's `sendto` alone took 83 µs while it had to wake the receiver.

Polling all the time would burn a core, so it is done only in a window: decode steps come in
a steady rhythm, and `StepArrivals` learns, per process, how long after it sends a step the
next step's message arrives (the rest of the chain's compute). After each send it arms a poll
from a little before the earliest recent gap to a little after the latest, at most
MAX_POLL_S. That cost 0.4-1.1 ms of CPU per token per node (scripts/hop_profile.py: 1-3 % of
a core at 36 ms a token), and costs nothing when no decode runs. A poll runs only while the machine
has a core to spare, and yields its core at every turn (`PollingSelector` says why).

The loop: `PollingPolicy` makes every event loop of the process a `PollingEventLoop`;
`arrivals(loop)` returns its `StepArrivals`, or None on any other loop (then nothing polls).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections import deque
from typing import Any

LEAD_S = 0.0015  # poll from this long before the 2nd-shortest recent gap (a timer may be 1 ms late)
MAX_POLL_S = 0.004  # one window's longest poll
MIN_GAPS = 4  # gaps seen before the first window
GAPS_KEPT = 8  # recent gaps the window is drawn from
MAX_GAP_S = 2.0  # a longer wait is not a decode rhythm: no window
ENV = "MESHCHAT_POLL"
# A sched_yield that returns later than this let another task run for a time slice: this core
# has other work. An idle core returns in 0.5 µs (p99 0.6 µs here); a short blip of another
# task (often the very peer that is about to send, when both run on one core) is no reason to
# stop: it ends by sending, and the poll hears it.
BUSY_YIELD_S = 0.0005
RECHECK_S = 0.0002  # how often a poll looks again whether the machine has a core to spare
# After this many windows in a row found no core to spare, the next BACKOFF_SENDS sends arm
# none: on a machine whose cores are busy whenever a step is due (stages sharing the cores,
# each with a thread per core) a window is only a timer that wakes the process for nothing.
CROWDED_IN_A_ROW = 4
BACKOFF_SENDS = 32


class PollingSelector(selectors.EpollSelector):
    """An epoll selector that, until `poll_until` (time.monotonic), polls without sleeping,
    as long as the machine has a core to spare for it.

    A poll only pays while its core would otherwise be idle. Where every core has work (a stage
    computing with a thread per core, another program), it takes a core from that work, and a
    poller that waits for its turn hears the message later than a sleeper the kernel wakes at
    once: measured (scripts/hop_profile.py, 2 hops, while other tests loaded the 2 vCPUs) as
    0.57-0.59 ms a hop polling against 0.53-0.54 asleep. So a poll starts, and goes on, only
    while the kernel's count of runnable tasks (this one included) is at most the CPU count.
    """

    def __init__(self, cpus: int | None = None) -> None:
        super().__init__()
        self.poll_until = 0.0
        self.polled_s = 0.0  # time spent polling (the CPU the windows cost)
        self.yielded = 0  # windows ended because another task took this core
        self.crowded = 0  # windows ended because every core had work
        self._cpus = cpus or os.cpu_count() or 1
        try:
            self._loadavg: int | None = os.open("/proc/loadavg", os.O_RDONLY)
        except OSError:
            self._loadavg = None  # cannot tell: never poll

    def close(self) -> None:
        if self._loadavg is not None:
            os.close(self._loadavg)
            self._loadavg = None
        super().close()

    def core_to_spare(self) -> bool:
        """No more runnable tasks than CPUs, this one included (/proc/loadavg, 4th field)."""
        if self._loadavg is None:
            return False
        try:
            running = int(os.pread(self._loadavg, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return False
        return running <= self._cpus

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        start = time.monotonic()
        if timeout == 0 or start >= self.poll_until:
            return super().select(timeout)
        deadline = start + timeout if timeout is not None else float("inf")
        ready, now = self._poll(min(self.poll_until, deadline))
        self.polled_s += now - start
        if ready or now >= deadline:
            return ready
        rest = None if timeout is None else max(0.0, deadline - now)
        return super().select(rest)

    def _poll(self, stop: float) -> tuple[list[tuple[selectors.SelectorKey, int]], float]:
        """Poll until something is ready, `stop`, or the machine has no core to spare."""
        now = time.monotonic()
        recheck = now
        while True:
            if now >= recheck:
                if not self.core_to_spare():
                    self.poll_until = 0.0
                    self.crowded += 1
                    return [], now
                recheck = now + RECHECK_S
            ready = super().select(0)
            now = time.monotonic()
            if ready or now >= stop:
                return ready, now
            os.sched_yield()
            if time.monotonic() - now > BUSY_YIELD_S:
                self.poll_until = 0.0
                self.yielded += 1
                return [], now


class StepArrivals:
    """When this process's next decode-step message is due, learnt from the last few steps,
    and the polling window it arms after each send."""

    def __init__(self, loop: asyncio.AbstractEventLoop, selector: PollingSelector) -> None:
        self._loop = loop
        self._selector = selector
        self._gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self._sent_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.window: tuple[float, float] | None = None  # (start, end) after our last send
        self.windows = 0  # polling windows opened so far
        self.caught = 0  # messages that arrived while a window was open
        self._crowded_at_open: int | None = None  # selector.crowded when the window opened
        self._crowded_run = 0  # windows in a row that found no core to spare
        self._backoff = 0  # sends left that arm no window

    def sent(self) -> None:
        """This process sent a decode step on: the next step's message is due after a gap."""
        self._sent_at = now = self._loop.time()
        self._cancel()
        if self._backoff > 0:
            self._backoff -= 1
            return
        if len(self._gaps) < MIN_GAPS:
            return
        ordered = sorted(self._gaps)
        earliest, latest = ordered[1], ordered[-2]  # one outlier either way is not the rhythm
        start = now + max(0.0, earliest - LEAD_S)
        end = min(now + latest + LEAD_S, start + MAX_POLL_S)
        self.window = (start, end)
        self._timer = self._loop.call_at(start, self._open, end)

    def arrived(self) -> None:
        """A decode step's message arrived: learn the gap since our send, stop polling."""
        now = self._loop.time()
        if self._selector.poll_until > now:
            self.caught += 1
        if self._sent_at is not None:
            gap = now - self._sent_at
            if gap <= MAX_GAP_S:
                self._gaps.append(gap)
            self._sent_at = None
        self._cancel()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._crowded_at_open is not None:
            self._window_closed(crowded=self._selector.crowded > self._crowded_at_open)
        self.window = None
        self._selector.poll_until = 0.0

    def _open(self, end: float) -> None:
        self._timer = None
        self.windows += 1
        self._crowded_at_open = self._selector.crowded
        self._selector.poll_until = end

    def _window_closed(self, crowded: bool) -> None:
        self._crowded_at_open = None
        self._crowded_run = self._crowded_run + 1 if crowded else 0
        if self._crowded_run >= CROWDED_IN_A_ROW:
            self._crowded_run = 0
            self._backoff = BACKOFF_SENDS


class PollingEventLoop(asyncio.SelectorEventLoop):
    """The default event loop, with a `PollingSelector` and this loop's `StepArrivals`."""

    def __init__(self, selector: PollingSelector | None = None) -> None:
        self.selector = selector or PollingSelector()
        super().__init__(self.selector)
        self.step_arrivals = StepArrivals(self, self.selector)


class PollingPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new event loop is a PollingEventLoop (install it before any loop starts)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return PollingEventLoop()


def install() -> None:
    """Make the loops this process creates from now on poll where decode steps are due
    (MESHCHAT_POLL=0: never, for an A/B measurement)."""
    if hasattr(selectors, "EpollSelector") and os.environ.get(ENV, "1") != "0":
        asyncio.set_event_loop_policy(PollingPolicy())


def arrivals(loop: Any) -> StepArrivals | None:
    """The running loop's StepArrivals, or None on a loop that does not poll."""
    return loop.step_arrivals if isinstance(loop, PollingEventLoop) else None
