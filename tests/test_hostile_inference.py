"""A hostile member against a worker that serves an honest head (issue 12, item 3).

The attacker is a real member: a Node on real QUIC that joined with an invite, holds the same
model file, and sends crafted frames through the ordinary mesh API. The worker serves an
honest head's greedy generation on a tiny model meanwhile; each test shows the generation's
tokens are exactly the ones without the attack, no failover happened, and the worker stays
with the honest head.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from meshchat.engine.sampling import SamplingParams
from meshchat.inference import stage_service
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline, StageLost
from meshchat.inference.planner import ModelNeeds, Plan, StagePlan
from meshchat.inference.protocol import sampling_to_wire
from meshchat.inference.stage_service import StageService
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node, Refused
from meshchat.paths import DataDir
from tests.mesh_helpers import eventually
from tests.test_stage_service import (
    GREEDY,
    PROMPT,
    Mesh,
    _fault_from,
    _local_reference,
    halves,
    mesh_fixture,  # noqa: F401  (the fixture "mesh")
)

pytestmark = pytest.mark.timeout(120)
Code = wire.FaultCode
N_TOKENS = 12


@pytest.fixture
async def reference(mesh: Mesh, tmp_path: Path) -> list[int]:
    return await _local_reference(mesh.model_path, tmp_path)


class Scene:
    """Honest head H (layers [0,4)) and worker W ([4,8)), and attacker X, all connected."""

    def __init__(
        self, mesh: Mesh, head: Node, worker: Node, service: StageService, attacker: Node
    ) -> None:
        self.mesh = mesh
        self.head = head
        self.worker = worker
        self.service = service
        self.attacker = attacker
        self.model = LocalModel.open(mesh.model_path, mesh.nodes.nodes[0].data_dir)

    def plan_for(self, stages: list[tuple[NodeId, int, int]], **kw: object) -> wire.Plan:
        """A well-formed plan the attacker sends as if it were a head."""
        fields: dict[str, object] = {
            "n_ctx": 256, "max_sessions": 1, "dtype": wire.DType.F32, "flash_attn": True,
        }  # fmt: skip
        fields.update(kw)
        fp = self.model.fingerprint
        fp = dataclasses.replace(fp, layers=fp.layers[: stages[-1][2]])
        return wire.Plan(
            uuid.uuid4().hex[:16], tuple(wire.PlanStage(*s) for s in stages), fp, **fields
        )  # type: ignore[arg-type]

    async def refused(self, plan: wire.Plan) -> wire.FaultCode:
        """The attacker sends `plan` to W; the code of W's refusal."""
        with pytest.raises(Refused) as info:
            await self.attacker.request(self.worker.node_id, plan, timeout=30)
        return info.value.code

    def serves_head(self) -> bool:
        a = self.service._assignment
        return a is not None and a.head == self.head.node_id and a.owned


async def _scene(mesh: Mesh) -> Scene:
    worker, service = await mesh.worker()
    head = await mesh.nodes.new()
    attacker = await mesh.nodes.new()
    await worker.join(head.create_invite())
    await attacker.join(head.create_invite())
    await mesh.connected(head, worker, attacker)
    return Scene(mesh, head, worker, service, attacker)


async def _honest_pipeline(scene: Scene, **kw: object) -> MeshPipeline:
    """The honest head's pipeline over [0,4) here and [4,8) on the worker, installed."""
    data = DataDir(scene.mesh.root / "head")
    model = LocalModel.open(scene.mesh.model_path, data)
    options: dict[str, object] = {"threads": 1, "n_ctx": 256, **kw}
    pipeline = MeshPipeline(scene.head, model, data, **options)  # type: ignore[arg-type]
    try:
        await pipeline.apply(halves(scene.head, scene.worker))
    except BaseException:
        await pipeline.close()
        raise
    return pipeline


async def _generate_under(
    pipeline: MeshPipeline, attack: Callable[[int], Awaitable[None]]
) -> list[int]:
    """A greedy generation; `attack(session's wire id)` runs alongside its decode steps."""
    session = uuid.uuid4().hex
    await pipeline.open_session(session)
    await pipeline.configure_sampling(session, GREEDY)
    out = [await pipeline.forward(session, 0, PROMPT)]
    strike = asyncio.ensure_future(attack(pipeline._sessions[session].wire_id))
    for i in range(N_TOKENS - 1):
        out.append(await pipeline.forward(session, len(PROMPT) + i, [out[-1]]))
    await strike
    await pipeline.close_session(session)
    return out


async def test_a_member_cannot_take_or_free_a_worker_installed_for_another_head(
    mesh: Mesh, reference: list[int]
) -> None:
    scene = await _scene(mesh)
    x, w = scene.attacker.node_id, scene.worker.node_id
    pipeline = await _honest_pipeline(scene)
    try:
        # Idle between generations (no session open): the worker is still the head's.
        assert scene.service.session_count == 0
        assert await scene.refused(scene.plan_for([(x, 0, 4), (w, 4, 8)])) == Code.BUSY
        assert await scene.refused(scene.plan_for([(w, 0, 8)])) == Code.BUSY
        assert await scene.refused(scene.plan_for([(x, 0, 8)])) == Code.BUSY  # "release" it

        async def takeover(_session: int) -> None:
            for plan in (scene.plan_for([(x, 0, 4), (w, 4, 8)]), scene.plan_for([(x, 0, 8)])):
                assert await scene.refused(plan) == Code.BUSY

        assert await _generate_under(pipeline, takeover) == reference
        assert pipeline.failovers == 0 and scene.serves_head()
        assert scene.service.layers == (4, 8)
        # The head lets go (a plan without the worker): now another head may install it.
        await pipeline.apply(Plan((StagePlan(scene.head.node_id, 0, 8),)))
        await eventually(lambda: scene.service.layers is None)
        reply = await scene.attacker.request(w, scene.plan_for([(x, 0, 4), (w, 4, 8)]))
        assert isinstance(reply, wire.Ack) and reply.body["layers"] == [4, 8]
    finally:
        await pipeline.close()


async def test_a_worker_is_free_again_once_its_head_leaves(mesh: Mesh) -> None:
    scene = await _scene(mesh)
    x, w = scene.attacker.node_id, scene.worker.node_id
    pipeline = await _honest_pipeline(scene)
    assert await scene.refused(scene.plan_for([(x, 0, 4), (w, 4, 8)])) == Code.BUSY
    await scene.head.stop()
    await eventually(lambda: not scene.service._assignment.owned, timeout=15)  # type: ignore[union-attr]
    reply = await scene.attacker.request(w, scene.plan_for([(x, 0, 4), (w, 4, 8)]))
    assert isinstance(reply, wire.Ack) and reply.body["layers"] == [4, 8]
    await pipeline.close()


async def test_work_from_outside_the_plan_is_refused_before_it_is_queued(
    mesh: Mesh, reference: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queue of 1 MiB: four of the attacker's frames would fill it if they were queued.
    monkeypatch.setattr(stage_service, "MAX_QUEUED_BYTES", 1 << 20)
    scene = await _scene(mesh)
    x, w = scene.attacker.node_id, scene.worker.node_id
    queued_from: list[NodeId] = []
    pipeline = await _honest_pipeline(scene)
    jobs = scene.service._jobs
    put = jobs.put_nowait

    def spy(job: stage_service._Job) -> None:
        queued_from.append(getattr(job, "peer", getattr(job, "head", None)))  # type: ignore[arg-type]
        put(job)

    monkeypatch.setattr(jobs, "put_nowait", spy)
    faults = await _fault_from(scene.attacker)
    plan_id = scene.service._assignment.plan_id  # type: ignore[union-attr]
    hot = wire.Sampling(1.5, 0, 1.0, 0.0, 2.0, 1 << 20, 7)
    n_frames = 16

    async def flood(session: int) -> None:
        width = 64
        for i in range(n_frames):  # 256 KiB each: hidden states for 1024 tokens
            tokens = tuple(range(1024))
            data = bytes(len(tokens) * width * 4)
            act = wire.Activations(session, i, 99, tokens, wire.DType.F32, width, data, True)
            await scene.attacker.send(w, act)
        ops = wire.SessionOpKind
        for op in (
            wire.SessionOp(session, 1000, ops.CLOSE),
            wire.SessionOp(session, 1001, ops.ROLLBACK, 0),
            wire.SessionOp(session, 1002, ops.OPEN, 0, plan_id=plan_id),
            wire.SessionOp(session, 1003, ops.SAMPLE, 0, sampling=hot),
        ):
            await scene.attacker.send(w, op)
        await scene.attacker.send(w, wire.Cancel(session, "", 1 << 30))

    assert await _generate_under(pipeline, flood) == reference
    assert pipeline.failovers == 0 and scene.serves_head()
    assert x not in queued_from and scene.head.node_id in queued_from
    got = []
    while not faults.empty():
        got.append((await faults.get())[1])
    assert got and all(f.code is Code.BAD_INPUT and f.culprit == x for f in got)
    assert scene.service._queued_bytes == 0 and not scene.service._peer_bytes
    await pipeline.close()


async def test_a_plan_beyond_the_model_or_the_memory_is_refused_before_loading(
    mesh: Mesh, reference: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = await _scene(mesh)
    x, w = scene.attacker.node_id, scene.worker.node_id
    model = scene.model
    trained = model.spec.context_length
    needs = ModelNeeds.of(model)
    honest = needs.memory(4, 8, True, 256, 2)
    greedy = needs.memory(4, 8, True, trained, wire.MAX_PLAN_SESSIONS)
    assert greedy > honest
    # This worker offers the mesh less than the greedy plan needs (as MESHCHAT_MEMORY_LIMIT).
    monkeypatch.setenv("MESHCHAT_MEMORY_LIMIT", str((honest + greedy) // 2))
    stages = [(x, 0, 4), (w, 4, 8)]
    full = scene.plan_for(stages, n_ctx=trained, max_sessions=wire.MAX_PLAN_SESSIONS)
    assert await scene.refused(full) == Code.MEMORY
    assert await scene.refused(scene.plan_for(stages, n_ctx=trained + 1)) == Code.BAD_PLAN
    short = scene.plan_for([(x, 0, 4), (w, 4, 6)])  # the model has 8 layers
    assert await scene.refused(short) == Code.BAD_PLAN
    # Bodies that break the wire bounds do not even decode: the request stream is refused.
    good = scene.plan_for(stages)
    for bad in ({"max_sessions": 17}, {"n_ctx": 0}, {"n_ctx": 1 << 40}, {"stages": ()}):
        with pytest.raises(Refused) as info:
            await scene.attacker.request(w, _UncheckedPlan.of(good, **bad), timeout=10)
        assert info.value.code is Code.PROTOCOL
    assert scene.service._assignment is None and scene.service.layers is None  # nothing loaded
    # The honest head's plan fits; it hears a refusal's reason typed, too.
    with pytest.raises(StageLost) as lost:
        await _honest_pipeline(scene, n_ctx=trained, max_sessions=wire.MAX_PLAN_SESSIONS)
    assert lost.value.code is Code.MEMORY
    pipeline = await _honest_pipeline(scene)
    try:
        assert await _generate_under(pipeline, _nothing) == reference
        assert scene.serves_head()
    finally:
        await pipeline.close()


async def test_a_sample_op_keeps_repeat_last_n_within_the_context(
    mesh: Mesh, reference: list[int]
) -> None:
    scene = await _scene(mesh)
    pipeline = await _honest_pipeline(scene)
    head_faults = await _fault_from(scene.head)  # borrows the pipeline's fault handler

    async def huge_window(session: int) -> None:
        # From the rightful sender (the head itself): a window far beyond n_ctx = 256.
        bad = sampling_to_wire(SamplingParams(temperature=0.0, repeat_last_n=1 << 20))
        op = wire.SessionOp(session, 500, wire.SessionOpKind.SAMPLE, 0, sampling=bad)
        await scene.head.send(scene.worker.node_id, op)
        _, fault = await asyncio.wait_for(head_faults.get(), 10)
        assert fault.code is Code.BAD_INPUT and "repeat_last_n" in fault.reason
        scene.head.on_arrival(wire.StageFault, pipeline._on_fault)

    assert await _generate_under(pipeline, huge_window) == reference
    assert pipeline.failovers == 0 and scene.serves_head()
    await pipeline.close()


@pytest.mark.parametrize("flash_attn", [True, False])
async def test_flash_attn_travels_with_the_plan(mesh: Mesh, flash_attn: bool) -> None:
    scene = await _scene(mesh)
    pipeline = await _honest_pipeline(scene, flash_attn=flash_attn)
    try:
        a = scene.service._assignment
        assert a is not None and a.options.flash_attn is flash_attn
        assert pipeline._local is not None and pipeline._local.options.flash_attn is flash_attn
    finally:
        await pipeline.close()


async def _nothing(_session: int) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class _UncheckedPlan(wire.Plan):
    """A PLAN frame built without the bounds: what a hostile peer's own code could send."""

    def __post_init__(self) -> None:
        pass

    @classmethod
    def of(cls, plan: wire.Plan, **changes: object) -> _UncheckedPlan:
        values = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
        return cls(**{**values, **changes})  # type: ignore[arg-type]
