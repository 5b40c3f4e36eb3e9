"""BackgroundTasks (meshchat.tasks): held until they end, failures logged once, closed on stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshchat.errors import MeshchatError
from meshchat.tasks import BackgroundTasks

log = logging.getLogger("test.tasks")


async def test_a_task_is_held_until_it_ends() -> None:
    tasks = BackgroundTasks(log, "work")
    gate = asyncio.Event()
    task = tasks.spawn(gate.wait())
    assert len(tasks) == 1
    gate.set()
    assert await task is True
    await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_failures_are_logged_once_and_expected_ones_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks(log, "work", expected=(MeshchatError,))

    async def fail(exc: Exception) -> None:
        raise exc

    caplog.set_level(logging.DEBUG, logger="test.tasks")
    for exc in (RuntimeError("a bug"), MeshchatError("peer went away")):
        task = tasks.spawn(fail(exc))
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert [r.getMessage() for r in errors] == ["work failed"]
    assert errors[0].exc_info is not None and "a bug" in str(errors[0].exc_info[1])
    assert [r.getMessage() for r in debug] == ["work ended: peer went away"]


async def test_aclose_cancels_and_waits_for_every_task() -> None:
    tasks = BackgroundTasks(log, "work")
    started = [tasks.spawn(asyncio.sleep(60)) for _ in range(3)]
    await tasks.aclose()
    assert all(t.cancelled() for t in started) and len(tasks) == 0
