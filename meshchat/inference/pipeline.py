"""What a head session needs from the stages that run a model, wherever they are.

A pipeline is the chain stage 0 → … → last stage for one model. It keeps per-session state on
every stage (KV caches, the sampler on the last stage). The local pipeline runs all stages in
this process; the mesh pipeline runs them on other nodes. Both speak this protocol.
"""

from __future__ import annotations

from typing import Protocol

from meshchat.engine.sampling import SamplingParams


class Pipeline(Protocol):
    @property
    def n_ctx(self) -> int:
        """Tokens one session can hold."""
        ...

    async def open_session(self, session_id: str) -> None: ...

    async def close_session(self, session_id: str) -> None: ...

    async def rollback(self, session_id: str, position: int) -> None:
        """Drop tokens at and after `position` on every stage."""
        ...

    async def configure_sampling(self, session_id: str, params: SamplingParams) -> None:
        """Start a fresh sampler for a new generation (same seed → same tokens)."""
        ...

    async def forward(self, session_id: str, position: int, tokens: list[int]) -> int:
        """Run `tokens` (at `position`) through every stage; return the sampled next token."""
        ...

    async def close(self) -> None: ...
