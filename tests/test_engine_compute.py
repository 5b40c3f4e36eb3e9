"""All llama.cpp compute of a process runs on its one compute thread (meshchat.engine.compute).

Why it matters: libgomp gives every thread that computes an OpenMP team of its own, and once the
process has more OpenMP threads than cores every barrier of every graph sleeps in the kernel
(decode twice as slow on 2 cores). These tests call stages from several threads and from an
event loop, and check that the decode calls ran on one thread and that no new OS threads (new
OpenMP teams) appeared.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import llama_cpp
import pytest

from meshchat.engine import compute
from tests.engine_helpers import open_chain, stage_chain


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_stage_compute_runs_on_one_thread_from_any_caller(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode_threads: set[int] = set()
    real_decode = llama_cpp.llama_decode

    def recording_decode(ctx: object, batch: object) -> int:
        decode_threads.add(threading.get_ident())
        return int(real_decode(ctx, batch))

    with stage_chain(smollm2, [(0, 30)], tmp_path) as (stage,):
        open_chain([stage], "s")
        stage.forward("s", 0, [1, 2, 3])  # the compute thread's OpenMP team exists from here
        threads_before = _os_threads()
        monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
        position = 3

        def step() -> None:
            nonlocal position
            stage.forward("s", position, [4])
            position += 1

        step()  # from the main thread
        for _ in range(2):  # from two other threads
            caller = threading.Thread(target=step)
            caller.start()
            caller.join()

        async def from_loop() -> None:
            await compute.run(step)

        asyncio.run(from_loop())
        assert position == 7
        assert len(decode_threads) == 1
        assert decode_threads != {threading.get_ident()}
        assert _os_threads() == threads_before  # no second OpenMP team


def test_run_sync_on_the_compute_thread_calls_directly() -> None:
    def thread_name() -> str:
        return threading.current_thread().name

    def nested() -> str:
        # A stage call made from the compute thread must not queue behind itself (deadlock).
        return compute.run_sync(thread_name)

    assert compute.run_sync(nested) == compute.run_sync(thread_name)
    assert compute.run_sync(compute.on_compute_thread) is True
    assert compute.on_compute_thread() is False


def test_an_adopting_event_loop_computes_steps_inline_and_long_work_aside(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode_threads: list[int] = []  # native thread ids
    real_decode = llama_cpp.llama_decode

    def recording_decode(ctx: object, batch: object) -> int:
        decode_threads.append(threading.get_native_id())
        return int(real_decode(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    with stage_chain(smollm2, [(0, 30)], tmp_path) as (stage,):
        open_chain([stage], "s")

        async def serve() -> None:
            compute.adopt_loop()
            loop_thread = threading.get_native_id()
            prompt = list(range(1, 17))
            await compute.run(stage.forward, "s", 0, prompt, short=compute.is_short(len(prompt)))
            (long_thread,) = set(decode_threads)
            assert long_thread != loop_thread  # a prompt does not block the loop
            decode_threads.clear()
            await compute.run(stage.forward, "s", 16, [4])  # a decode step: inline
            await asyncio.to_thread(stage.forward, "s", 17, [5])  # another thread hops here
            assert set(decode_threads) == {loop_thread}
            # The long-work thread ends (and its OpenMP team with it) once it has answered.
            for _ in range(100):
                if not os.path.exists(f"/proc/self/task/{long_thread}"):
                    break
                await asyncio.sleep(0.01)
            assert not os.path.exists(f"/proc/self/task/{long_thread}")

        asyncio.run(serve())
        decode_threads.clear()
        stage.forward("s", 18, [6])  # the loop is gone: the default compute thread takes over
        assert decode_threads and decode_threads[0] != threading.get_native_id()


def test_a_stop_waits_for_running_work_and_refuses_the_next_forward() -> None:
    """stop_and_wait: what a process does before it exits (meshchat.stops)."""
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def long_work() -> None:  # a calibration: forward passes one after the other
        started.set()
        release.wait(10)
        try:
            compute.run_sync(lambda: "the next forward pass")
        except compute.ComputeStopped as exc:
            outcome.append(exc)

    caller = threading.Thread(target=compute.run_sync, args=(long_work,))
    caller.start()
    assert started.wait(10)
    assert compute.stop_and_wait(0.05) is False  # still running: the caller must os._exit
    threading.Timer(0.1, release.set).start()
    assert compute.stop_and_wait(10) is True
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], compute.ComputeStopped)
    assert compute.run_sync(lambda: 7) == 7  # after the wait, work is accepted again
