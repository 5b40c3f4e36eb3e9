"""The layer split as the editor sees it: contiguous ranges, each owned by a node. No UI here.

Every edit returns a new plan or raises `SplitEditError` with a sentence the editor shows inline;
an invalid plan is never produced, so "apply" only ever sees plans that could run.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from meshchat.mesh.identity import NodeId


class ThisNode(enum.Enum):
    """This machine in a split, whatever its NodeID: the editor splits layers locally before
    the mesh node has started, and when it cannot start (the app then runs alone), so there
    may be no NodeID to name it by; and a local split stays local across a new identity.
    `MeshPlanning` maps it to the head's NodeID and back."""

    SELF = "self"

    def __str__(self) -> str:
        return self.value  # the peers table's row key, as for a NodeID its text


SELF = ThisNode.SELF
Owner = NodeId | ThisNode  # who runs a segment: this machine, or a peer


class SplitEditError(ValueError):
    """An edit the split editor refuses, with the reason for the user."""


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    node: Owner

    @property
    def count(self) -> int:
        return self.end - self.start

    def label(self) -> str:
        return f"[{self.start},{self.end})"


@dataclass(frozen=True)
class SplitPlan:
    n_layers: int
    segments: tuple[Segment, ...]
    predicted_tok_s: float | None = None  # the planner's prediction, when it made the plan

    @classmethod
    def solo(cls, n_layers: int) -> SplitPlan:
        return cls(n_layers, (Segment(0, n_layers, SELF),))

    @classmethod
    def from_ranges(
        cls,
        n_layers: int,
        ranges: Sequence[tuple[int, int]],
        nodes: Sequence[Owner] | None = None,
    ) -> SplitPlan:
        owners: list[Owner] = list(nodes) if nodes is not None else [SELF] * len(ranges)
        return cls(
            n_layers, tuple(Segment(a, b, n) for (a, b), n in zip(ranges, owners, strict=True))
        )

    @property
    def boundaries(self) -> list[int]:
        return [s.start for s in self.segments[1:]]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.segments]

    @property
    def nodes(self) -> list[Owner]:
        return [s.node for s in self.segments]

    @property
    def is_local(self) -> bool:
        return all(s.node is SELF for s in self.segments)

    def describe(self) -> str:
        return " ".join(s.label() for s in self.segments)

    def segment_at(self, layer: int) -> int:
        """Index of the segment holding `layer`."""
        return bisect.bisect_right(self.boundaries, layer)

    def same_layout(self, other: SplitPlan) -> bool:
        return self.segments == other.segments

    # --- edits ------------------------------------------------------------------------------

    def _with_boundaries(self, boundaries: list[int], owners: list[Owner]) -> SplitPlan:
        edges = [0, *boundaries, self.n_layers]
        segments = tuple(
            Segment(a, b, n) for (a, b), n in zip(itertools.pairwise(edges), owners, strict=True)
        )
        return SplitPlan(self.n_layers, segments)

    def move_boundary(self, index: int, step: int, allowed: Sequence[int]) -> SplitPlan:
        """Move boundary `index` to the next allowed split point `step` (±1) away."""
        bounds = self.boundaries
        if not 0 <= index < len(bounds):
            raise SplitEditError("no boundary selected: add one with +")
        current = bounds[index]
        points = sorted(allowed)
        if step > 0:
            later = [p for p in points if p > current]
            if not later:
                raise SplitEditError(f"no allowed split point after layer {current}")
            target = later[0]
        else:
            earlier = [p for p in points if p < current]
            if not earlier:
                raise SplitEditError(f"no allowed split point before layer {current}")
            target = earlier[-1]
        return self.move_boundary_to(index, target, allowed)

    def move_boundary_to(self, index: int, target: int, allowed: Sequence[int]) -> SplitPlan:
        bounds = self.boundaries
        if not 0 <= index < len(bounds):
            raise SplitEditError("no boundary selected: add one with +")
        if target not in allowed:
            raise SplitEditError(f"layer {target} is not an allowed split point for this model")
        low = bounds[index - 1] if index > 0 else 0
        high = bounds[index + 1] if index + 1 < len(bounds) else self.n_layers
        if target <= low:
            left = self.segments[index]
            raise SplitEditError(
                f"stage {left.label()} would have no layers left; remove the boundary with -"
            )
        if target >= high:
            right = self.segments[index + 1]
            raise SplitEditError(
                f"stage {right.label()} would have no layers left; remove the boundary with -"
            )
        bounds = [*bounds[:index], target, *bounds[index + 1 :]]
        return self._with_boundaries(bounds, self.nodes)

    def add_boundary(self, segment: int, allowed: Sequence[int]) -> tuple[SplitPlan, int]:
        """Split segment `segment` at the allowed point nearest its middle.

        Returns the new plan and the new boundary's index. The new half goes to the same node.
        """
        seg = self.segments[segment]
        inside = [p for p in allowed if seg.start < p < seg.end]
        if not inside:
            raise SplitEditError(f"stage {seg.label()} has no allowed split point inside it")
        middle = (seg.start + seg.end) / 2
        point = min(inside, key=lambda p: (abs(p - middle), p))
        bounds = sorted([*self.boundaries, point])
        owners = [*self.nodes[: segment + 1], seg.node, *self.nodes[segment + 1 :]]
        return self._with_boundaries(bounds, owners), bounds.index(point)

    def remove_boundary(self, index: int) -> SplitPlan:
        """Merge the two stages around boundary `index`; the left stage's node keeps them."""
        bounds = self.boundaries
        if not 0 <= index < len(bounds):
            raise SplitEditError("there is no boundary to remove")
        owners = [*self.nodes[: index + 1], *self.nodes[index + 2 :]]
        return self._with_boundaries([*bounds[:index], *bounds[index + 1 :]], owners)

    def assign(self, segment: int, node: Owner) -> SplitPlan:
        """Give stage `segment` to `node`; two neighbouring stages on one node are allowed."""
        segments = list(self.segments)
        segments[segment] = replace(segments[segment], node=node)
        return SplitPlan(self.n_layers, tuple(segments))

    def validate(self, allowed: Sequence[int], usable_nodes: Sequence[NodeId]) -> list[str]:
        """Why this plan cannot run now (empty when it can)."""
        problems = []
        allowed_set = set(allowed)
        for point in self.boundaries:
            if point not in allowed_set:
                problems.append(f"layer {point} is not an allowed split point")
        for seg in self.segments:
            if isinstance(seg.node, NodeId) and seg.node not in usable_nodes:
                problems.append(
                    f"stage {seg.label()} is on node {seg.node.short}, which is not connected "
                    "or has a different model file"
                )
        return problems


def layout_label(plan: SplitPlan) -> str:
    """The status line's words for where the layers run."""
    if plan.is_local:
        where = "local" if len(plan.segments) == 1 else f"local, {len(plan.segments)} stages"
        return f"{where} {plan.describe()}"
    return f"mesh {plan.describe()}"
