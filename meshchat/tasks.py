"""Background tasks, held by their owner: the one pattern for work nobody awaits.

asyncio keeps only a weak reference to a task, so a task nobody holds can vanish mid-flight,
and an exception in one nobody awaits is reported only when it is garbage-collected, if ever.
A `BackgroundTasks` holds its owner's tasks until they end, logs a failure once (errors the
owner expects, such as a peer that went away, at debug level), counts them (so an owner can
bound work a peer's input starts), and cancels and awaits them all when its owner stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundTasks:
    def __init__(
        self,
        log: logging.Logger,
        what: str,
        expected: tuple[type[BaseException], ...] = (),
        level: int = logging.ERROR,
    ) -> None:
        self._log = log
        self._what = what  # names the work in a failure's log line
        self._expected = expected
        self._level = level  # of an unexpected failure's log line
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run `work` in the background."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, self._expected):
            self._log.debug("%s ended: %s", self._what, exc)
        else:
            self._log.log(self._level, "%s failed", self._what, exc_info=exc)

    def cancel(self) -> None:
        """Cancel every task (they end at their next await)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task and wait until all have ended."""
        tasks = list(self._tasks)
        self.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
