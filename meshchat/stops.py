"""How a `meshchat` process ends on SIGINT or SIGTERM: its exit code, and never under llama.cpp.

Exit codes: a headless worker's normal way to end is a signal, so it exits 0; every other
command exits 128 + the signal number, the shell's convention (130 for SIGINT, as the CLI has
always done; 143 for SIGTERM). Never a death by signal.

SIGTERM takes the path SIGINT takes: it raises `Stopped` (a KeyboardInterrupt) in the main
thread, so the same `finally` blocks and asyncio task cancellation run. Commands that run an
event loop install their own handlers on it (headless, the app), which replace this one while
the loop runs.

Before the process exits, `leave` waits for llama.cpp work still running on other threads
(see meshchat.engine.compute for why exiting under it crashes); if it does not end in
STOP_WAIT_S, the process leaves at once by os._exit, which runs no library destructors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

from meshchat.engine import compute

# One forward pass is at most n_batch tokens: well under a second for models this size on
# 2 cores, a few seconds for big ones. A service manager's KILL usually comes after 10 s.
STOP_WAIT_S = 5.0

log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_code(exc: KeyboardInterrupt, headless: bool) -> int:
    """The exit code after a stop by signal (`exc` from SIGINT or `Stopped`)."""
    if headless:
        return 0
    signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
    return 128 + int(signum)


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises Stopped in the main thread (elsewhere: a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_on_signal(code: int) -> dict[int, Any]:
    """From now on SIGINT/SIGTERM end the process at once with os._exit(`code`): for a process
    already stopping, a second signal means "now". Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def now(_signum: int, _frame: FrameType | None) -> None:
        _exit_now(code)

    return {sig: signal.signal(sig, now) for sig in (signal.SIGINT, signal.SIGTERM)}


def leave(code: int) -> int:
    """Return `code` once no llama.cpp work runs on another thread. If some still runs after
    STOP_WAIT_S, or another SIGINT/SIGTERM comes meanwhile, exit now with os._exit(code)."""
    previous = exit_on_signal(code)
    try:
        if not compute.stop_and_wait(STOP_WAIT_S):
            log.warning("llama.cpp work still running after %.0f s: exiting now", STOP_WAIT_S)
            _exit_now(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _exit_now(code: int) -> NoReturn:
    """Flush what can be flushed and leave without finalising (see the module docstring)."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
