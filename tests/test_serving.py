"""The pieces a long-lived head keeps serving with (fast, in one process): the re-plan rule,
the plan gate, the bounded re-plan log, and no pipeline slot kept by a request that failed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.planner import ModelNeeds, Plan, PlanError, Planner, StagePlan
from meshchat.inference.serving import (
    MAX_REPLANS_KEPT,
    PlanGate,
    ReplanLog,
    ReplanReason,
    Unavailable,
    clearly_better,
    worth_moving,
)
from meshchat.mesh.identity import NodeId
from meshchat.paths import DataDir
from tests.node_names import HEAD, named
from tests.test_stage_service import Mesh, mesh_fixture  # noqa: F401  (the fixture "mesh")

pytestmark = pytest.mark.timeout(120)


def test_worth_moving_needs_twenty_percent_more_tokens_per_second() -> None:
    assert worth_moving(0.012, 0.010)  # 100 tok/s against 83.3: +20%
    assert not worth_moving(0.012, 0.0101)  # +18.8%
    assert not worth_moving(0.010, 0.012)  # slower
    assert not worth_moving(0.010, 0.0) and not worth_moving(0.0, 0.010)  # no figure


async def test_gate_holds_new_requests_while_a_change_waits_for_running_ones() -> None:
    gate = PlanGate(max_waiting=4)
    gate.unavailable = None
    order: list[str] = []
    release = asyncio.Event()

    async def running() -> None:
        async with gate.request():
            order.append("running")
            await release.wait()
            order.append("running done")

    async def change() -> None:
        async with gate.change():
            order.append("changing")

    async def late() -> None:
        async with gate.request():
            order.append("late")

    first = asyncio.ensure_future(running())
    await asyncio.sleep(0.01)
    changer = asyncio.ensure_future(change())
    await asyncio.sleep(0.01)
    newcomer = asyncio.ensure_future(late())
    await asyncio.sleep(0.01)
    assert order == ["running"] and gate.waiting == 1  # neither the change nor the late one
    release.set()
    await asyncio.gather(first, changer, newcomer)
    assert order == ["running", "running done", "changing", "late"]
    assert gate.running == 0 and gate.waiting == 0


async def test_gate_refuses_with_its_reason_while_no_plan_runs() -> None:
    gate = PlanGate(max_waiting=4)
    gate.unavailable = "no plan fits: the model needs about 496 MiB"
    with pytest.raises(Unavailable, match="496 MiB") as refused:
        async with gate.request():
            pass
    assert refused.value.retry_after > 0 and gate.running == 0


def test_replan_log_keeps_the_last_ones() -> None:
    log = ReplanLog()
    for i in range(MAX_REPLANS_KEPT + 5):
        log.add(ReplanReason.MEMBER_JOINED, f"plan {i}", "why")
    kept = log.to_json()
    assert len(kept) == MAX_REPLANS_KEPT
    assert kept[-1]["plan"] == f"plan {MAX_REPLANS_KEPT + 4}"
    assert kept[0]["reason"] == "member joined"


async def test_a_failed_open_keeps_no_pipeline_slot(mesh: Mesh) -> None:
    """Opening a session while the plan's worker is gone and nothing else fits fails, and
    leaves no slot taken: before, four such requests filled every slot for good."""
    worker, _service = await mesh.worker()
    head, model, data = await mesh.head(worker)

    async def nothing_fits(_exclude: set[NodeId]) -> Plan:
        raise PlanError("no plan fits")

    pipeline = MeshPipeline(
        head, model, data, threads=1, n_ctx=256, max_sessions=2, replanner=nothing_fits
    )
    try:
        plan = Plan((StagePlan(head.node_id, 0, 4), StagePlan(worker.node_id, 4, 8)))
        await pipeline.apply(plan)
        await worker.stop()
        for i in range(4):
            with pytest.raises(MeshchatError):
                await pipeline.open_session(f"s{i}")
            assert pipeline.open_sessions == 0
        assert pipeline.waiting_replies == 0
    finally:
        await pipeline.close()


class _Coordinator:
    """Just what `clearly_better` asks of a coordinator: every node's offer, and a planner."""

    def __init__(self, needs: ModelNeeds, caps: list[NodeCaps]) -> None:
        self.needs, self.caps = needs, caps

    async def gather(self) -> list[NodeCaps]:
        return self.caps

    def planner(self, caps: list[NodeCaps]) -> Planner:
        return Planner(self.needs, caps, HEAD, n_ctx=256, sessions=1)


async def test_a_join_moves_the_plan_only_when_clearly_faster(
    smollm2: Path, tmp_path: Path
) -> None:
    model = LocalModel.open(smollm2, DataDir(tmp_path))
    needs = ModelNeeds.of(model)
    slow = 1e-9

    def offer(node: NodeId, per_byte: float) -> NodeCaps:
        # The head has no room for layers; any worker holds the whole model. The running
        # stage's pings wait behind our own work: its RTT reads 90 ms, and must not count.
        memory = 0 if node == HEAD else 1 << 33
        rtt = {HEAD: 90.0} if node == named("slow") else {}
        return NodeCaps(node, memory, model.fingerprint, per_byte, per_byte, rtt_ms=rtt)

    current = Plan((StagePlan(named("slow"), 0, needs.n_layers),))
    for joiner, moves in ((slow / 1.1, False), (slow / 2, True)):
        caps = [offer(HEAD, slow), offer(named("slow"), slow), offer(named("new"), joiner)]
        better = await clearly_better(_Coordinator(needs, caps), current)  # type: ignore[arg-type]
        if moves:
            assert better is not None and better[0].nodes == [named("new")], better
        else:
            assert better is None
