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

A process must not exit while any thread is inside llama.cpp: exit() runs the libraries'
destructors, ggml-cpu's table of extra buffer types goes, and the thread still in `llama_decode`
reads it (SIGSEGV in ggml_cpu_extra_compute_forward; a core dump of a headless node stopped in
its calibration showed exactly that, 4 of 6 tries here). So this module counts the work running
off the owner thread, and `stop_and_wait` stops new forward passes and waits for that work to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from meshchat.errors import MeshchatError

T = TypeVar("T")
log = logging.getLogger(__name__)

THREAD_NAME = "llama-compute"
# Work on at most this many tokens is short: inline on an owning event loop (a few ms at most).
SHORT_TOKENS = 8

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_thread: threading.Thread | None = None
_owner_loop: asyncio.AbstractEventLoop | None = None
_owner_thread: threading.Thread | None = None
_local = threading.local()  # .computes: this short-lived thread may compute in place
_stopping = threading.Event()  # set while the process stops: no new forward pass starts
_running = threading.Condition()  # guards _running_count, notified when it drops to 0
_running_count = 0  # work running on the default compute thread or a short-lived one


class ComputeStopped(MeshchatError):
    """The process is stopping: a forward pass was refused before it started."""


def _work_begins() -> None:
    global _running_count
    with _running:
        _running_count += 1


def _work_ends() -> None:
    global _running_count
    with _running:
        _running_count -= 1
        if _running_count == 0:
            _running.notify_all()


def _counted(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` counted as work that a stopping process must wait for."""
    _work_begins()
    try:
        return fn(*args)
    finally:
        _work_ends()


def check_stop() -> None:
    """ComputeStopped if the process is stopping: long work calls it between its steps (every
    forward pass does, through run_sync), so a stop waits for one step, not the whole work."""
    if _stopping.is_set():
        raise ComputeStopped("stopping: no new llama.cpp work")


def stop_and_wait(timeout: float) -> bool:
    """Refuse new forward passes (`run_sync` raises ComputeStopped), wait up to `timeout`
    seconds for the running work to end, then accept work again. True if it ended: only then
    may the process exit normally; otherwise it must leave by os._exit."""
    _stopping.set()
    try:
        with _running:
            if not _running_count:
                return True
            log.debug("stopping: waiting for %d llama.cpp call(s) to end", _running_count)
            started = time.monotonic()
            ended = _running.wait_for(lambda: _running_count == 0, timeout)
            log.debug("stopping: compute idle=%s after %.2f s", ended, time.monotonic() - started)
            return ended
    finally:
        _stopping.clear()


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
    """Call `fn(*args)` on the compute thread and wait for it (directly if already there).

    Stage.forward comes through here: ComputeStopped if the process is stopping."""
    check_stop()
    if on_compute_thread():
        return fn(*args)
    loop = _owning_loop()
    if loop is None:
        return _executor_now().submit(_counted, fn, *args).result()
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
        return await asyncio.get_running_loop().run_in_executor(
            _executor_now(), _counted, fn, *args
        )
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
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        finally:
            _work_ends()
        # The loop may be closed already (a stopping process waits for this thread elsewhere).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    _work_begins()  # counted from now: a stop right after start() must wait for it too
    try:
        threading.Thread(target=work, name=f"{THREAD_NAME}-long", daemon=True).start()
    except BaseException:
        _work_ends()
        raise
    return await done
