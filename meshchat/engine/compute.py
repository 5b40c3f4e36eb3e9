"""The one thread of this process that runs llama.cpp graphs.

llama.cpp's CPU backend runs a graph on an OpenMP team, and every op of the graph ends at an
OpenMP barrier. libgomp gives each thread that starts parallel work a team of its own, and once
the process holds more OpenMP threads than the machine has cores, it cuts the spin of every
barrier short ("throttled" spinning), so each barrier sleeps and wakes through the kernel.
Measured on 2 cores (15 layers of SmolLM2, one decode step): 3.9 ms when one thread ever
computes, 8.5 ms once a second thread has computed too, for every thread from then on.

So all compute goes through this one thread: `Stage.forward` moves itself here when called
from anywhere else, and async code awaits `run` so its event loop stays free meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

THREAD_NAME = "llama-compute"

_executor: ThreadPoolExecutor | None = None
_compute_thread: threading.Thread | None = None
_lock = threading.Lock()


def _note_thread() -> None:
    global _compute_thread
    _compute_thread = threading.current_thread()


def executor() -> ThreadPoolExecutor:
    """The process's compute executor (one worker thread, started on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=THREAD_NAME, initializer=_note_thread
            )
        return _executor


def on_compute_thread() -> bool:
    return threading.current_thread() is _compute_thread


def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` on the compute thread and wait for it (directly if already there)."""
    if on_compute_thread():
        return fn(*args)
    return executor().submit(fn, *args).result()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` run on the compute thread."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)
