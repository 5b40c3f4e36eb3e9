"""The split editor's link to the mesh planner: predictions, checks, the auto plan, applying.

Wraps `meshchat.inference.coordinator.MeshCoordinator`: it asks every connected node for its
capabilities (memory, model fingerprint, measured speed), and from those a `Planner` predicts
tok/s for any plan, lists what is wrong with a hand plan, and finds the best one. Applying a plan
that uses other nodes starts (or re-plans) a `MeshPipeline`. No textual here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.pipeline import Pipeline
from meshchat.inference.planner import Plan, Planner, StagePlan
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.paths import DataDir
from meshchat.tui.split import SELF, Segment, SplitPlan

log = logging.getLogger(__name__)


class MeshPlanning:
    def __init__(self, coordinator: MeshCoordinator) -> None:
        self.coordinator = coordinator
        self.planner: Planner | None = None
        self.notes: list[str] = []  # nodes that cannot take layers, and why

    @classmethod
    def create(
        cls,
        node: Node,
        model_path: Path,
        data: DataDir,
        *,
        threads: int,
        n_ctx: int,
        notify: Callable[[str], None],
    ) -> MeshPlanning:
        """Blocking: reads the model's fingerprint (hashed once, then cached on disk)."""
        model = LocalModel.open(model_path, data)
        return cls(MeshCoordinator(node, model, data, threads=threads, n_ctx=n_ctx, notify=notify))

    @property
    def head(self) -> NodeId:
        return self.coordinator.head

    @property
    def model_status(self) -> dict[str, Any]:
        return self.coordinator.model.status()

    async def refresh(self) -> None:
        """Ask every connected node again (after peers come or go)."""
        caps = await self.coordinator.gather()
        self.planner = self.coordinator.planner(caps)
        self.notes = self.coordinator.mismatch_notes(self.planner)

    def _connected(self) -> list[NodeId]:
        return self.coordinator.node.connected()

    # --- plans both ways --------------------------------------------------------------------

    def to_plan(self, split: SplitPlan) -> Plan:
        return Plan(
            tuple(
                StagePlan(self.head if s.node is SELF else s.node, s.start, s.end)
                for s in split.segments
            )
        )

    def from_plan(self, plan: Plan, n_layers: int) -> SplitPlan:
        segments = tuple(
            Segment(s.first, s.end, SELF if s.node == self.head else s.node) for s in plan.stages
        )
        return SplitPlan(n_layers, segments, self.predict_plan(plan))

    # --- what the editor asks ---------------------------------------------------------------

    def usable(self) -> list[NodeId]:
        """Connected nodes whose model file matches ours: they may take layers."""
        if self.planner is None:
            return []
        mismatched = set(self.planner.mismatched())
        connected = set(self._connected())
        return [
            n
            for n in self.planner.nodes
            if n != self.head and n in connected and n not in mismatched
        ]

    def predict_plan(self, plan: Plan) -> float | None:
        if self.planner is None or any(s.node not in self.planner.nodes for s in plan.stages):
            return None
        try:
            return self.planner.predict(plan).decode_tok_s
        except (KeyError, ValueError, ZeroDivisionError):
            return None

    def predict(self, split: SplitPlan) -> float | None:
        return self.predict_plan(self.to_plan(split))

    def memory(self, split: SplitPlan) -> list[str]:
        """Per stage: the memory it needs (the planner's estimate) of what its node offers,
        e.g. "174/180 MiB"; empty until the planner knows every node of the plan."""
        planner = self.planner
        plan = self.to_plan(split)
        if planner is None or any(s.node not in planner.nodes for s in plan.stages):
            return []
        labels = []
        for s in plan.stages:
            last = s.end == planner.needs.n_layers
            need = planner.needs.memory(s.first, s.end, last, planner.n_ctx, planner.sessions)
            labels.append(f"{need >> 20}/{planner.nodes[s.node].free_memory >> 20} MiB")
        return labels

    def violations(self, split: SplitPlan) -> list[str]:
        """Why the plan cannot run on the mesh now (empty: it can)."""
        if self.planner is None:
            return ["the planner is still asking the nodes what they can run; try again"]
        problems = []
        if split.segments[0].node is not SELF and any(s.node is SELF for s in split.segments):
            problems.append("this node (the head) can only run the first stage")
        return problems + self.planner.violations(self.to_plan(split), self._connected())

    def auto(self, n_layers: int) -> tuple[SplitPlan, str]:
        """The planner's best plan and its advice (PlanError if nothing fits)."""
        if self.planner is None:
            raise ValueError("the planner is still asking the nodes what they can run")
        choice = self.planner.best()
        return self.from_plan(choice.plan, n_layers), choice.advice

    async def start(self, split: SplitPlan, current: Pipeline) -> MeshPipeline:
        """Run `split` on the mesh: re-plan the running mesh pipeline, or start one."""
        plan = self.to_plan(split)
        if isinstance(current, MeshPipeline):
            await current.apply(plan)
            return current
        return await self.coordinator.start(plan)

    def running(self, pipeline: Pipeline, n_layers: int) -> SplitPlan | None:
        """The plan a mesh pipeline runs now (it changes after a failover)."""
        if isinstance(pipeline, MeshPipeline) and pipeline.plan is not None:
            return self.from_plan(pipeline.plan, n_layers)
        return None
