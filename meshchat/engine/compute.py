"""Which thread of this process runs llama.cpp graphs.

Two facts measured on 2 cores set the rules here:

1. llama.cpp's CPU backend runs a graph on an OpenMP team, and every op ends at an OpenMP
   barrier. libgomp gives each thread that computes a team of its own, kept while that thread
   lives; once the process holds more OpenMP threads than cores, libgomp cuts every barrier's
   spin short and barriers sleep in the kernel. A decode step of 15 layers took 3.9 ms when one
   thread ever computed, 8.5 ms once a second long-lived thread had computed too.
2. Handing a step to another thread and back costs two thread wake-ups (about 0.1 ms each
   here), per stage and per token: on a mesh that is most of a hop's cost.

So the process has one long-lived compute thread, its *owner*:
- by default a dedicated worker thread, started on first use (the app, local generation);
- or an event loop's own thread, which adopts the role (`adopt_loop`): a mesh node that runs
  stages then computes a decode step right where its message arrived, with no thread hop.
Short work runs on the owner. Long work (prompt chunks, calibration) that would block an owning
event loop runs on a short-lived thread instead: its OpenMP team ends with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

THREAD_NAME = "llama-compute"
# Work on at most this many tokens is short: inline on an owning event loop (a few ms at most).
SHORT_TOKENS = 8

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_thread: threading.Thread | None = None
_owner_loop: asyncio.AbstractEventLoop | None = None
_owner_thread: threading.Thread | None = None
_local = threading.local()  # .computes: this short-lived thread may compute in place


def _note_executor_thread() -> None:
    global _executor_thread
    _executor_thread = threading.current_thread()


def _executor_now() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=THREAD_NAME, initializer=_note_executor_thread
            )
        return _executor


def _owning_loop() -> asyncio.AbstractEventLoop | None:
    """The adopted loop, while it still runs (a closed loop gives the role back)."""
    loop = _owner_loop
    if loop is not None and loop.is_running():
        return loop
    return None


def adopt_loop() -> None:
    """Make the running event loop's thread this process's compute thread.

    Call it before the first compute. A default compute thread that exists already is let go,
    so its OpenMP team does not outlive it.
    """
    global _owner_loop, _owner_thread, _executor, _executor_thread
    loop = asyncio.get_running_loop()
    with _lock:
        _owner_loop, _owner_thread = loop, threading.current_thread()
        old, _executor, _executor_thread = _executor, None, None
    if old is not None:
        old.shutdown(wait=False)


def on_compute_thread() -> bool:
    """True where llama.cpp may compute right now without a hop."""
    if getattr(_local, "computes", False):
        return True
    current = threading.current_thread()
    if _owning_loop() is not None:
        return current is _owner_thread
    return current is _executor_thread


def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` on the compute thread and wait for it (directly if already there)."""
    if on_compute_thread():
        return fn(*args)
    loop = _owning_loop()
    if loop is None:
        return _executor_now().submit(fn, *args).result()
    done: Future[T] = Future()

    def call() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:
            done.set_exception(exc)

    loop.call_soon_threadsafe(call)
    return done.result()


class _Holdable(Protocol):
    @property
    def busy(self) -> bool: ...


def is_short(tokens: int, stages: Iterable[_Holdable] = ()) -> bool:
    """Whether work on `tokens` tokens is short. Not if one of the `stages` it needs is busy
    with other work: waiting for that would block an owning event loop."""
    return tokens <= SHORT_TOKENS and not any(stage.busy for stage in stages)


async def run(fn: Callable[..., T], *args: Any, short: bool = True) -> T:
    """Await `fn(*args)` where this module's rules say; `short`: it takes a few ms at most."""
    loop = _owning_loop()
    if loop is None:
        return await asyncio.get_running_loop().run_in_executor(_executor_now(), fn, *args)
    if asyncio.get_running_loop() is not loop:
        hop = asyncio.run_coroutine_threadsafe(run(fn, *args, short=short), loop)
        return await asyncio.wrap_future(hop)
    if short:
        return fn(*args)
    return await _run_in_short_thread(fn, *args)


async def _run_in_short_thread(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        _local.computes = True
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=f"{THREAD_NAME}-long", daemon=True).start()
    return await done
