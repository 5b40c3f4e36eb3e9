"""The app's rule between turns (issue 16): when a member joins or returns, move to a plan the
real planner predicts clearly faster (20%), never during an answer; plan again when the last
plan had failed. A scripted mesh, and a coordinator that offers fixed capabilities to a real
`Planner` and `clearly_better`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import ModelNeeds, Plan, Planner
from meshchat.mesh.identity import NodeId
from meshchat.paths import DataDir
from meshchat.tui import messages as msg
from meshchat.tui.app import MeshchatApp
from meshchat.tui.planning import MeshPlanning
from meshchat.tui.split import SELF
from tests.node_names import HEAD
from tests.tui_helpers import GREEDY, PEER_A, make_app, ready, two_peers, wait_for

SLOW = 1e-8  # seconds per byte of weights: this node
FAST = SLOW / 4  # the joining node: predicted far more than 20% faster


class _Node:
    def __init__(self) -> None:
        self.up: list[NodeId] = []

    def connected(self) -> list[NodeId]:
        return list(self.up)


class _Model:
    def status(self) -> dict[str, Any]:
        return {}


class _Coordinator:
    """What MeshPlanning and clearly_better ask of a coordinator, with fixed offers. Starting
    a plan hands back the app's own local pipeline: the test is about when the app moves."""

    head = HEAD

    def __init__(self, app: MeshchatApp, needs: ModelNeeds) -> None:
        self.app, self.needs = app, needs
        self.node = _Node()
        self.model = _Model()
        self.offers = [self._offer(HEAD, SLOW)]
        self.gathers_during_answer = 0
        self.started: list[tuple[Plan, bool]] = []  # (plan, an answer was being written)

    def _offer(self, node: NodeId, per_byte: float) -> NodeCaps:
        return NodeCaps(node, 1 << 33, self.needs.fingerprint, per_byte, per_byte, rtt_ms={})

    def join(self, node: NodeId, per_byte: float) -> None:
        self.offers.append(self._offer(node, per_byte))
        self.node.up.append(node)

    async def gather(self, exclude: Any = ()) -> list[NodeCaps]:
        self.gathers_during_answer += self.app.generation is not None
        return [c for c in self.offers if c.node_id == HEAD or c.node_id in self.node.up]

    def planner(self, caps: list[NodeCaps]) -> Planner:
        return Planner(self.needs, caps, HEAD, n_ctx=256, sessions=1)

    def mismatch_notes(self, planner: Planner) -> list[str]:
        return []

    async def choose(self, *args: Any, **kwargs: Any) -> tuple[Plan, Any, Planner]:
        planner = self.planner(await self.gather())
        choice = planner.best()
        return choice.plan, choice, planner

    async def start(self, plan: Plan) -> Any:
        self.started.append((plan, self.app.generation is not None))
        assert self.app.engine is not None
        pipeline = self.app.engine.pipeline
        pipeline.broken = None  # type: ignore[attr-defined]  # as MeshPipeline.apply does
        return pipeline


async def test_a_faster_joiner_is_moved_to_between_turns_and_a_failed_plan_is_redone(
    tmp_path: Path, smollm2: Path
) -> None:
    mesh = two_peers()
    mesh.rows = [replace(mesh.rows[0], state="lost")]  # known, not up yet
    app = make_app(tmp_path, smollm2, mesh=mesh, sampling=replace(GREEDY, max_tokens=160))
    async with app.run_test(size=(110, 34)) as pilot:
        await wait_for(pilot, lambda: app.engine or app.model_error, 180, "model load")
        await ready(pilot)
        coordinator = _Coordinator(app, ModelNeeds.of(LocalModel.open(smollm2, DataDir(tmp_path))))
        planning = MeshPlanning(coordinator)  # type: ignore[arg-type]
        await planning.refresh()
        app.post_message(msg.PlanningReady(planning))
        await wait_for(pilot, lambda: app.planning is planning, what="planner")
        panel = app.mesh_panel

        # A member returns while an answer is being written: the app asks the nodes, and
        # waits for the answer to end before it moves.
        app.prompt.text = "Count from 1 to 60, separated by commas."
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generation and app.generation.view.text, what="1st")
        coordinator.join(PEER_A, FAST)
        mesh.rows = [replace(mesh.rows[0], state="idle")]
        await wait_for(pilot, lambda: coordinator.gathers_during_answer, 30, "caps asked")
        assert app.generation is not None, "the answer ended before the node came (too fast)"
        assert not coordinator.started and app.split.applied and app.split.applied.is_local
        await wait_for(pilot, lambda: panel.moves == 1, 120, "the move")
        assert [during for _, during in coordinator.started] == [False]
        assert app.split.applied.nodes == [PEER_A]
        assert f"node {PEER_A.short} returned" in panel.line
        assert "predicted" in panel.line and "re-planned once between turns" in panel.line
        assert "moved to" in app.split.message and not app.split.is_error
        assert len(app.messages) == 2 and not app.messages[-1].meta.get("error")

        # The running plan failed (no plan fitted the nodes left): when the member returns,
        # the app plans again at once, without a turn or a restart.
        pipeline = app.engine.pipeline if app.engine else None
        pipeline.broken = "no plan fits the remaining nodes"  # type: ignore[union-attr]
        mesh.rows = [replace(mesh.rows[0], state="lost")]
        await wait_for(pilot, lambda: app.mesh_watch.peer_states.get(PEER_A) == "lost", what="lost")
        mesh.rows = [replace(mesh.rows[0], state="idle")]
        await wait_for(pilot, lambda: panel.moves == 2, 60, "the re-plan")
        assert len(coordinator.started) == 2
        assert "the last plan had failed" in panel.line and "2 times" in panel.line
        assert app.split.applied.nodes == [PEER_A] and SELF not in app.split.applied.nodes
