"""A bounded pool of head sessions shared by API requests.

Each request gets a session of its own (its own KV cache on every stage). Idle sessions are
kept so a follow-up request that repeats a conversation reuses the cached prefix: the pool
hands out the idle session sharing the longest prefix with the new prompt. When every session
is busy, up to `max_waiting` requests wait their turn; beyond that the pool refuses at once
(HTTP 429) rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from meshchat.engine.tokenizer import Tokenizer
from meshchat.errors import MeshchatError
from meshchat.inference.head import HeadSession, common_prefix
from meshchat.inference.pipeline import Pipeline


class PoolBusyError(MeshchatError):
    """Every session is busy and the wait queue is full."""


class SessionPool:
    def __init__(
        self, pipeline: Pipeline, tokenizer: Tokenizer, max_sessions: int, max_waiting: int
    ) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.max_sessions = max_sessions
        self.max_waiting = max_waiting
        self._idle: list[HeadSession] = []
        self._busy = 0
        self._waiting = 0
        self._freed = asyncio.Condition()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextlib.asynccontextmanager
    async def session(self, prompt_tokens: list[int]) -> AsyncIterator[HeadSession]:
        """A session for one request; freed (KV dropped) if the request fails or is cancelled."""
        session = await self._acquire(prompt_tokens)
        healthy = False
        try:
            yield session
            healthy = True
        finally:
            await self._release(session, keep=healthy)

    async def _acquire(self, prompt_tokens: list[int]) -> HeadSession:
        async with self._freed:
            if self._busy >= self.max_sessions:
                if self._waiting >= self.max_waiting:
                    raise PoolBusyError(
                        f"all {self.max_sessions} sessions are busy and "
                        f"{self._waiting} requests are waiting; try again shortly"
                    )
                self._waiting += 1
                try:
                    await self._freed.wait_for(lambda: self._busy < self.max_sessions)
                finally:
                    self._waiting -= 1
            self._busy += 1
        if self._idle:
            best = max(self._idle, key=lambda s: common_prefix(s.tokens, prompt_tokens))
            self._idle.remove(best)
            return best
        return HeadSession(self.pipeline, self.tokenizer)

    async def _release(self, session: HeadSession, keep: bool) -> None:
        if keep:
            self._idle.append(session)
        else:
            # A failed or abandoned request frees its KV on every stage at once.
            with contextlib.suppress(Exception):
                await asyncio.shield(session.close())
        async with self._freed:
            self._busy -= 1
            self._freed.notify()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def drop_idle(self) -> None:
        """Close the sessions kept only for prefix reuse (before a plan change)."""
        idle, self._idle = self._idle, []
        for session in idle:
            with contextlib.suppress(Exception):
                await session.close()

    async def close(self) -> None:
        for session in self._idle:
            with contextlib.suppress(Exception):
                await session.close()
        self._idle.clear()
