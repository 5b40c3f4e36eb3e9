"""Stage service and mesh pipeline in one process (real QUIC on 127.0.0.1, a tiny model).

Fast checks of the protocol: parity with the local pipeline, re-planning while idle, KV
sessions released, and bad input (wrong shape, unknown session, wrong sender, a different
model file) answered with a fault instead of a crash.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import StageOptions
from meshchat.errors import MeshchatError
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.planner import Plan, StagePlan
from meshchat.inference.stage_service import StageService
from meshchat.mesh import wire
from meshchat.mesh.node import Node
from meshchat.paths import DataDir
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(120)
GREEDY = SamplingParams(temperature=0.0)
PROMPT = [1, 17, 400, 9000, 23, 77, 5, 311, 42, 8]


class Mesh:
    def __init__(self, nodes: MeshNodes, model_path: Path, root: Path) -> None:
        self.nodes = nodes
        self.model_path = model_path
        self.root = root
        self.services: list[StageService] = []

    async def worker(self, path: Path | None = None) -> tuple[Node, StageService]:
        node = await self.nodes.new()
        data = DataDir(self.root / f"w{len(self.services)}")
        model = LocalModel.open(path or self.model_path, data)
        service = StageService(node, model, data, threads=1)
        await service.start()
        self.services.append(service)
        return node, service

    async def head(self, *workers: Node) -> tuple[Node, LocalModel, DataDir]:
        """A head whose mesh the workers join; returns once every pair is connected."""
        node = await self.nodes.new()
        for worker in workers:
            await worker.join(node.create_invite())
        await self.connected(node, *workers)
        data = DataDir(self.root / "head")
        return node, LocalModel.open(self.model_path, data), data

    async def connected(self, *nodes: Node) -> None:
        def all_pairs() -> bool:
            return all(b.node_id in a.connected() for a in nodes for b in nodes if a is not b)

        await eventually(all_pairs, timeout=15)

    async def close(self) -> None:
        for service in self.services:
            await service.stop()


@pytest.fixture(name="mesh")  # other test modules import it as mesh_fixture
async def mesh_fixture(tiny_models: dict[str, Path], tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_nodes(tmp_path / "nodes") as nodes:
        m = Mesh(nodes, tiny_models["llama"], tmp_path)
        try:
            yield m
        finally:
            await m.close()


def halves(head: Node, worker: Node) -> Plan:
    """The tiny model's 8 layers: [0,4) on the head, [4,8) on the worker."""
    return Plan((StagePlan(head.node_id, 0, 4), StagePlan(worker.node_id, 4, 8)))


def _pipeline(node: Node, model: LocalModel, data: DataDir, **kw: object) -> MeshPipeline:
    return MeshPipeline(node, model, data, threads=1, n_ctx=256, **kw)  # type: ignore[arg-type]


async def _greedy(pipeline: object, n: int = 12) -> list[int]:
    session = uuid.uuid4().hex
    p = pipeline  # Pipeline protocol
    await p.open_session(session)  # type: ignore[attr-defined]
    await p.configure_sampling(session, GREEDY)  # type: ignore[attr-defined]
    out = [await p.forward(session, 0, PROMPT)]  # type: ignore[attr-defined]
    for i in range(n - 1):
        out.append(await p.forward(session, len(PROMPT) + i, [out[-1]]))  # type: ignore[attr-defined]
    await p.close_session(session)  # type: ignore[attr-defined]
    return out


async def _local_reference(model_path: Path, tmp_path: Path) -> list[int]:
    stages = build_stages(
        model_path,
        [(0, 8)],
        tmp_path / "ref-slices",
        tmp_path / "ref-fp",
        StageOptions(n_ctx=256, max_sessions=1, n_threads=1),
    )
    local = LocalPipeline(stages)
    try:
        return await _greedy(local)
    finally:
        await local.close()


async def test_chain_equals_local_and_replans_while_idle(mesh: Mesh, tmp_path: Path) -> None:
    reference = await _local_reference(mesh.model_path, tmp_path)
    w1, s1 = await mesh.worker()
    w2, s2 = await mesh.worker()
    head, model, data = await mesh.head(w1, w2)
    me = head.node_id
    pipeline = _pipeline(head, model, data, prefill_chunk=4)
    try:
        await pipeline.apply(
            Plan(
                (
                    StagePlan(me, 0, 3),
                    StagePlan(w1.node_id, 3, 6),
                    StagePlan(w2.node_id, 6, 8),
                )
            )
        )
        assert s1.layers == (3, 6) and s2.layers == (6, 8)
        assert await _greedy(pipeline) == reference
        assert s1.session_count == 0 and s2.session_count == 0  # closed sessions free their KV
        # Re-plan while idle: ranges move, nothing restarts, output unchanged.
        await pipeline.apply(Plan((StagePlan(w2.node_id, 0, 5), StagePlan(w1.node_id, 5, 8))))
        assert s2.layers == (0, 5) and s1.layers == (5, 8)
        assert await _greedy(pipeline) == reference
        # And back to the head alone: the workers are told to let go of their layers.
        await pipeline.apply(Plan((StagePlan(me, 0, 8),)))
        await eventually(lambda: s1.layers is None and s2.layers is None)
        assert await _greedy(pipeline) == reference
    finally:
        await pipeline.close()


async def test_open_session_survives_a_replan(mesh: Mesh, tmp_path: Path) -> None:
    reference = await _local_reference(mesh.model_path, tmp_path)
    w1, _ = await mesh.worker()
    head, model, data = await mesh.head(w1)
    me = head.node_id
    pipeline = _pipeline(head, model, data)
    try:
        await pipeline.apply(halves(head, w1))
        session = "s"
        await pipeline.open_session(session)
        await pipeline.configure_sampling(session, GREEDY)
        out = [await pipeline.forward(session, 0, PROMPT)]
        for i in range(5):
            out.append(await pipeline.forward(session, len(PROMPT) + i, [out[-1]]))
        # Move the split mid-conversation: the session's history is replayed on the new plan.
        await pipeline.apply(Plan((StagePlan(me, 0, 6), StagePlan(w1.node_id, 6, 8))))
        for i in range(5, 11):
            out.append(await pipeline.forward(session, len(PROMPT) + i, [out[-1]]))
        assert out == reference
    finally:
        await pipeline.close()


async def _fault_from(node: Node) -> asyncio.Queue[tuple[str, wire.StageFault]]:
    faults: asyncio.Queue[tuple[str, wire.StageFault]] = asyncio.Queue()
    node.on_arrival(wire.StageFault, lambda peer, msg: faults.put_nowait((str(peer), msg)))
    return faults


async def test_bad_input_gets_a_fault_and_the_stage_keeps_serving(
    mesh: Mesh, tmp_path: Path
) -> None:
    reference = await _local_reference(mesh.model_path, tmp_path)
    w1, service = await mesh.worker()
    head, model, data = await mesh.head(w1)
    stranger = await mesh.nodes.new()
    await stranger.join(head.create_invite())
    await mesh.connected(stranger, w1)
    pipeline = _pipeline(head, model, data)
    try:
        await pipeline.apply(halves(head, w1))
        session = "s"
        await pipeline.open_session(session)
        wire_id = pipeline._sessions[session].wire_id
        faults = await _fault_from(stranger)

        # A node that is not the previous stage feeds a session, unknown or real: refused
        # on arrival, and only the sender hears of it.
        for session_key in (12345, wire_id):
            await stranger.send(
                w1.node_id,
                wire.Activations(session_key, 0, 5, (1,), wire.DType.F32, 64, bytes(256)),
            )
            _, fault = await asyncio.wait_for(faults.get(), 10)
            assert fault.code is wire.FaultCode.BAD_INPUT
            assert fault.culprit == stranger.node_id
        # Unknown session from the rightful sender (the head).
        head_faults = await _fault_from(head)
        await head.send(
            w1.node_id, wire.Activations(12345, 0, 0, (1,), wire.DType.F32, 64, bytes(256))
        )
        _, fault = await asyncio.wait_for(head_faults.get(), 10)
        assert fault.code is wire.FaultCode.UNKNOWN_SESSION
        # Wrong shape from the rightful sender: a fault, not a crash.
        await head.send(
            w1.node_id, wire.Activations(wire_id, 0, 5, (1,), wire.DType.F32, 32, bytes(128))
        )
        _, fault = await asyncio.wait_for(head_faults.get(), 10)
        assert fault.code is wire.FaultCode.BAD_INPUT and "64 wide" in fault.reason
        # Undecodable frame on a request stream: the stream is refused, the node lives on.
        with pytest.raises(MeshchatError):
            explode = wire.SessionOp(1, 1, "explode")  # type: ignore[arg-type]
            await stranger.request(w1.node_id, explode, timeout=5)
        await pipeline.close_session(session)
        # Restore the pipeline's fault handler (the test borrowed it) and check it still runs.
        head.on_arrival(wire.StageFault, pipeline._on_fault)
        assert await _greedy(pipeline) == reference
        assert service.session_count == 0
    finally:
        await pipeline.close()


async def test_a_different_model_file_is_refused_by_the_stage(
    mesh: Mesh, tiny_models: dict[str, Path]
) -> None:
    w1, service = await mesh.worker(tiny_models["qwen2"])
    head, model, data = await mesh.head(w1)
    pipeline = _pipeline(head, model, data)
    try:
        with pytest.raises(MeshchatError, match="different model file"):
            await pipeline.apply(halves(head, w1))
        assert service.layers is None
    finally:
        await pipeline.close()


async def test_sessions_of_a_head_that_leaves_are_dropped(mesh: Mesh) -> None:
    w1, service = await mesh.worker()
    head, model, data = await mesh.head(w1)
    pipeline = _pipeline(head, model, data)
    await pipeline.apply(halves(head, w1))
    await pipeline.open_session("s")
    assert service.session_count == 1
    await head.stop()  # the head goes away without closing its session
    await eventually(lambda: service.session_count == 0, timeout=15)
    await pipeline.close()


async def test_cancelled_step_is_dropped_and_the_session_continues(
    mesh: Mesh, tmp_path: Path
) -> None:
    reference = await _local_reference(mesh.model_path, tmp_path)
    w1, service = await mesh.worker()
    head, model, data = await mesh.head(w1)
    pipeline = _pipeline(head, model, data, prefill_chunk=2)
    try:
        await pipeline.apply(halves(head, w1))
        session = "s"
        await pipeline.open_session(session)
        await pipeline.configure_sampling(session, GREEDY)
        long_prompt = [(7 + 13 * i) % 2000 for i in range(200)]
        step = asyncio.ensure_future(pipeline.forward(session, 0, long_prompt))
        await asyncio.sleep(0.05)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        # As HeadSession does after a cancel: roll back to what is known, then go on.
        await pipeline.rollback(session, 0)
        await pipeline.configure_sampling(session, GREEDY)
        out = [await pipeline.forward(session, 0, PROMPT)]
        for i in range(11):
            out.append(await pipeline.forward(session, len(PROMPT) + i, [out[-1]]))
        assert out == reference
        await pipeline.close_session(session)
        await eventually(lambda: service.session_count == 0)
    finally:
        await pipeline.close()
