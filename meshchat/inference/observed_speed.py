"""Each node's decode speed as the running plan shows it, to correct its calibration with.

A calibration is a short probe taken once (meshchat.inference.profiling); what a stage then
does under real conditions (other programs, longer contexts, cores shared with other stages)
can differ by 15% and more. Every decode step reports each stage's compute time (the trace in
the activations, `StepTiming.stage_compute_s`); `ObservedSpeeds` compares it with what the
planner predicted for that stage at that position and keeps, per node, the median of the last
WINDOW ratios. Once MIN_SAMPLES are in, `corrected` scales the node's decode speed by it, so the
next plan and its "worth splitting?" advice use what was seen.

The figures in a trace are hostile input: any member of the chain can write them. A step whose
figures are not finite, negative, or add up to more than the step took is dropped whole; every
ratio is clamped to [1/CLAMP, CLAMP], so a lying member can move a node's speed by that factor
at most, and never to zero or infinity. The table holds at most MAX_NODES nodes.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace

from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.planner import STAGE_OVERHEAD_S, StageCost
from meshchat.mesh.identity import NodeId

WINDOW = 32  # ratios kept per node: the median of them is its estimate
MIN_SAMPLES = 8  # before an estimate is used (the first steps of a plan warm caches)
CLAMP = 4.0  # a node's observed speed stays within this factor of its calibration
MAX_NODES = 64  # nodes with a history (the least recently observed is forgotten)
# The step's wall time may exceed the sum of its stages' compute only: timers on one host
# agree to well under this (the head's wall clock measures from before the first stage).
_WALL_SLACK = 1.01


class ObservedSpeeds:
    def __init__(self) -> None:
        self._ratios: OrderedDict[NodeId, deque[float]] = OrderedDict()

    def observe(
        self,
        costs: Sequence[StageCost],
        extra_context: int,
        wall_s: float,
        compute_s: Sequence[float],
    ) -> int:
        """Take one decode step's stage compute times (plan order); returns the ratios kept."""
        if len(costs) != len(compute_s) or not costs:
            return 0
        if not all(math.isfinite(s) and s >= 0 for s in (wall_s, *compute_s)):
            return 0
        if sum(compute_s) > wall_s * _WALL_SLACK:
            return 0  # a stage claims more time than the whole step took
        for cost, seconds in zip(costs, compute_s, strict=True):
            predicted = cost.seconds(extra_context) - STAGE_OVERHEAD_S
            if not predicted > 0:
                continue
            ratio = max(seconds - STAGE_OVERHEAD_S, 0.0) / predicted
            self._add(cost.node, min(max(ratio, 1 / CLAMP), CLAMP))
        return len(costs)

    def _add(self, node: NodeId, ratio: float) -> None:
        ratios = self._ratios.pop(node, None) or deque(maxlen=WINDOW)
        ratios.append(ratio)
        self._ratios[node] = ratios  # most recently observed last
        while len(self._ratios) > MAX_NODES:
            self._ratios.popitem(last=False)

    def factor(self, node: NodeId) -> float:
        """How much slower (> 1) or faster than its calibration `node` decodes (1.0: unknown)."""
        ratios = self._ratios.get(node)
        if ratios is None or len(ratios) < MIN_SAMPLES:
            return 1.0
        return statistics.median(ratios)

    def samples(self, node: NodeId) -> int:
        ratios = self._ratios.get(node)
        return len(ratios) if ratios else 0

    def corrected(self, caps: NodeCaps) -> NodeCaps:
        """`caps` with its decode speed as observed (unchanged without enough observations)."""
        factor = self.factor(caps.node_id)
        if factor == 1.0:
            return caps
        return replace(
            caps,
            decode_s_per_byte=caps.decode_s_per_byte * factor,
            context_s_per_byte=caps.context_s_per_byte * factor,
        )

    def forget(self, node: NodeId) -> None:
        self._ratios.pop(node, None)
