"""What each supported architecture needs when its layers are split into slices.

A slice file holds layers [a, b) renumbered from 0. That is exact for architectures whose layers
are all alike. Where a layer's behaviour depends on its index (gemma3's sliding-window pattern:
every 6th layer attends globally, with its own rope base), the per-layer pattern is written into
the slice's metadata as an explicit array, which llama.cpp reads in place of the period. So every
boundary keeps outputs identical, and `allowed_split_points` is where an architecture that could
not carry its pattern would say so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshchat.errors import MeshchatError
from meshchat.model.gguf_file import GGUFHeader

if TYPE_CHECKING:
    from meshchat.model.spec import ModelSpec


@dataclass(frozen=True)
class ArchRules:
    """How to slice one architecture."""

    # The sliding-window period llama.cpp assumes when the GGUF names none (0 = no pattern).
    default_swa_period: int = 0
    # True when the first layer of each period is the global one (llama.cpp's `dense_first`).
    swa_dense_first: bool = False


SUPPORTED: dict[str, ArchRules] = {
    "llama": ArchRules(),
    "mistral": ArchRules(),
    "qwen2": ArchRules(),
    "qwen3": ArchRules(),
    "gemma3": ArchRules(default_swa_period=6),
}


def is_supported(arch: str) -> bool:
    return arch in SUPPORTED


def sliding_window_pattern(header: GGUFHeader, arch: str, n_layers: int) -> tuple[bool, ...] | None:
    """Per layer, True where the layer uses sliding-window attention; None if the arch has none.

    Mirrors llama.cpp: an explicit per-layer array wins, else a period (metadata or default).
    """
    rules = SUPPORTED.get(arch)
    if rules is None or rules.default_swa_period == 0:
        return None
    window = header.get(f"{arch}.attention.sliding_window")
    if window is None or int(window) <= 0:
        return None
    value = header.get(f"{arch}.attention.sliding_window_pattern", rules.default_swa_period)
    if isinstance(value, list):
        return tuple(bool(v) for v in value[:n_layers])
    period = int(value)
    if rules.swa_dense_first:
        return tuple(period == 0 or i % period != 0 for i in range(n_layers))
    return tuple(period == 0 or i % period < period - 1 for i in range(n_layers))


def allowed_split_points(spec: ModelSpec) -> list[int]:
    """Layer indices where a stage may end and the next begin (never 0 or n_layers).

    All supported architectures carry their per-layer differences into the slice metadata,
    so any interior boundary gives the same outputs as the unsplit model.
    """
    if spec.arch not in SUPPORTED:
        return []
    return list(range(1, spec.n_layers))


class SplitError(MeshchatError):
    """A layer split that cannot run this model."""


def split_ranges(spec: ModelSpec, boundaries: list[int]) -> list[tuple[int, int]]:
    """Turn boundaries like [10, 20] into stage ranges [(0, 10), (10, 20), (20, n)].

    Raises SplitError naming the first problem: out of range, not increasing, not allowed.
    """
    allowed = set(allowed_split_points(spec))
    previous = 0
    for point in boundaries:
        if not 0 < point < spec.n_layers:
            raise SplitError(
                f"split point {point} is out of range: the model has layers 0.."
                f"{spec.n_layers - 1}, so boundaries must lie in 1..{spec.n_layers - 1}"
            )
        if point <= previous:
            raise SplitError(f"split points must increase: {point} comes after {previous}")
        if point not in allowed:
            raise SplitError(f"{spec.arch} cannot be split at layer {point}")
        previous = point
    edges = [0, *boundaries, spec.n_layers]
    return list(itertools.pairwise(edges))


def parse_split(text: str) -> list[int]:
    """Parse '10,20' into [10, 20]; a usage error for anything else."""
    from meshchat.errors import UsageError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--split wants comma-separated layer numbers, got {text!r}") from None
