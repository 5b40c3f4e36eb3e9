"""A pipeline whose stages all run in this process (`generate --split` without a mesh).

Stage work runs on the process's compute thread (meshchat.engine.compute), so the event loop
stays free and calls stay ordered: a rollback queued after a cancelled forward waits for that
forward to finish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from meshchat.engine import compute
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import Stage, StageError, StageOptions
from meshchat.model.fingerprint import FingerprintCache
from meshchat.model.gguf_file import read_header
from meshchat.model.slices import LayerRange, SliceCache

T = TypeVar("T")


def build_stages(
    model_path: Path,
    ranges: list[tuple[int, int]],
    slice_dir: Path,
    fingerprint_dir: Path,
    options: StageOptions,
) -> list[Stage]:
    """Load one stage per layer range, writing slice files as needed."""
    header = read_header(model_path)
    total = int(header.get(f"{header.arch}.block_count"))
    fingerprint = FingerprintCache(fingerprint_dir).get(header) if len(ranges) > 1 else None
    cache = SliceCache(slice_dir)
    stages: list[Stage] = []
    try:
        for first, end in ranges:
            layers = LayerRange(first, end)
            path = (
                model_path if fingerprint is None else cache.get(header, fingerprint.model, layers)
            )
            stages.append(Stage(path, layers, total, options))
    except BaseException:
        for stage in stages:
            stage.close()
        raise
    return stages


class LocalPipeline:
    def __init__(self, stages: list[Stage], transport_dtype: str = "f32") -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise StageError("a pipeline needs stages from the first layer to the last")
        self.stages = stages
        # f16 halves the bytes a hop carries; round-tripping here shows its effect exactly.
        self._lossy = transport_dtype == "f16"

    @property
    def n_ctx(self) -> int:
        return min(stage.n_ctx for stage in self.stages)

    async def _run(self, fn: Callable[[], T], short: bool = True) -> T:
        return await compute.run(fn, short=short)

    async def open_session(self, session_id: str) -> None:
        def open_all() -> None:
            for stage in self.stages:
                stage.open_session(session_id)

        await self._run(open_all)

    async def close_session(self, session_id: str) -> None:
        def close_all() -> None:
            for stage in self.stages:
                stage.close_session(session_id)

        await self._run(close_all, short=False)

    async def rollback(self, session_id: str, position: int) -> None:
        def rollback_all() -> None:
            for stage in self.stages:
                stage.rollback(session_id, position)

        await self._run(rollback_all)

    async def configure_sampling(self, session_id: str, params: SamplingParams) -> None:
        await self._run(lambda: self.stages[-1].configure_sampling(session_id, params))

    def forward_sync(self, session_id: str, position: int, tokens: list[int]) -> int:
        hidden: np.ndarray | None = None
        for stage in self.stages:
            output = stage.forward(session_id, position, tokens, hidden)
            hidden = output.hidden
            if self._lossy and hidden is not None:
                hidden = hidden.astype(np.float16).astype(np.float32)
        token = output.token
        assert token is not None
        return token

    async def forward(self, session_id: str, position: int, tokens: list[int]) -> int:
        return await self._run(
            lambda: self.forward_sync(session_id, position, tokens),
            short=compute.is_short(len(tokens), self.stages),
        )

    async def close(self) -> None:
        def close_all() -> None:
            for stage in self.stages:
                stage.close()

        await self._run(close_all, short=False)
