"""How a `meshchat` process ends on SIGINT or SIGTERM: its exit code, and never under llama.cpp.

Exit codes: a headless worker's normal way to end is a signal, so it exits 0; every other
command exits 128 + the signal number, the shell's convention (130 for SIGINT, as the CLI has
always done; 143 for SIGTERM). Never a death by signal.

SIGTERM takes the path SIGINT takes, so the same `finally` blocks run: under asyncio.run the main
task is cancelled, elsewhere KeyboardInterrupt is raised. (Raising in the main thread at any
point is not safe where it computes: the exception lands in llama.cpp's eval callback and the
decode fails.) Commands that run their own loop handlers (headless, the app) replace this one
while their loop runs.

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
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

from meshchat.engine import compute

# One forward pass is at most n_batch tokens: well under a second for models this size on
# 2 cores. Past the bound os._exit is safe too (no destructors run), it only skips clean-up.
STOP_WAIT_S = 3.0
REDELIVER_S = 0.05  # a stop swallowed by a ctypes callback is delivered again after this


_stopped_by = signal.SIGINT  # the signal that stopped the command: SIGINT unless SIGTERM came


def stop_code(headless: bool) -> int:
    """The exit code after a stop by signal (the command ended in KeyboardInterrupt)."""
    return 0 if headless else 128 + int(_stopped_by)


def _term_as_int(signum: int, frame: FrameType | None) -> None:
    global _stopped_by
    _stopped_by = signal.SIGTERM
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        # asyncio.run's own handler cancels its main task (no exception thrown into whatever
        # runs now: on an event loop that computes, a llama.cpp callback); the default one
        # raises KeyboardInterrupt.
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): TERM must still stop the command
        raise KeyboardInterrupt


def _redeliver_swallowed(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    """A sys.unraisablehook. A ctypes callback run on the main thread (llama.cpp's log callback
    while a model loads there) swallows the KeyboardInterrupt a signal raised inside it, and the
    stop would be lost: deliver it again shortly, until it lands in the command's own code.
    Anything else goes to the `previous` hook."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            again = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), _stopped_by))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM does what SIGINT does, and no stop is lost in a ctypes callback
    (in the main thread; elsewhere a no-op)."""
    global _stopped_by
    _stopped_by = signal.SIGINT
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _term_as_int)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
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
            print(
                f"meshchat: still computing after {STOP_WAIT_S:g} s; exiting now",
                file=sys.stderr,
            )
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
