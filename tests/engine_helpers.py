"""Helpers for engine tests: build stage chains over a model and run them token by token."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import Stage, StageOptions
from meshchat.inference.local import build_stages

GREEDY = SamplingParams(temperature=0.0)
OPTIONS = StageOptions(n_ctx=1024, max_sessions=4, n_batch=128, n_threads=2)


@contextmanager
def stage_chain(
    model: Path, ranges: list[tuple[int, int]], tmp: Path, options: StageOptions = OPTIONS
) -> Iterator[list[Stage]]:
    stages = build_stages(model, ranges, tmp / "slices", tmp / "fingerprints", options)
    try:
        yield stages
    finally:
        for stage in stages:
            stage.close()


def chain_forward(
    stages: list[Stage],
    session: str,
    position: int,
    tokens: list[int],
    all_logits: bool = False,
    f16: bool = False,
) -> tuple[np.ndarray, int]:
    """Run tokens through every stage; (logits, sampled token) from the last."""
    hidden = None
    for stage in stages:
        out = stage.forward(session, position, tokens, hidden, all_logits=all_logits)
        hidden = out.hidden
        if f16 and hidden is not None:
            hidden = hidden.astype(np.float16).astype(np.float32)
    assert out.logits is not None and out.token is not None
    return out.logits, out.token


def open_chain(stages: list[Stage], session: str, params: SamplingParams = GREEDY) -> None:
    for stage in stages:
        stage.open_session(session)
    stages[-1].configure_sampling(session, params)


def greedy_run(
    stages: list[Stage], session: str, prompt: list[int], steps: int, f16: bool = False
) -> tuple[list[np.ndarray], list[int]]:
    """Prefill `prompt` then decode `steps` tokens; all logits rows and the tokens."""
    open_chain(stages, session)
    logits, token = chain_forward(stages, session, 0, prompt, all_logits=True, f16=f16)
    all_logits = [logits]
    tokens = [token]
    position = len(prompt)
    for _ in range(steps - 1):
        logits, token = chain_forward(stages, session, position, [token], f16=f16)
        all_logits.append(logits)
        tokens.append(token)
        position += 1
    return all_logits, tokens
