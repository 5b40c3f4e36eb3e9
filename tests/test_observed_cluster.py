"""Observed stage compute reaches the head's planner, on real nodes over QUIC on loopback; and a
member that lies about its compute moves the planner's view of it by the clamp at most."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.local_model import LocalModel
from meshchat.inference.observed_speed import CLAMP, MIN_SAMPLES
from meshchat.inference.planner import Plan, StagePlan
from meshchat.inference.stage_service import StageService
from meshchat.mesh.identity import NodeId
from meshchat.paths import DataDir
from tests.mesh_cluster import Cluster
from tests.mesh_helpers import eventually, mesh_nodes
from tests.test_stage_service import _greedy

N_CTX = 512
TOKENS = 12  # 11 decode steps: more than MIN_SAMPLES


async def _run_half_and_half(
    coordinator: MeshCoordinator, worker: NodeId
) -> tuple[list[int], dict[str, Any]]:
    """Plan head [0, n/2) → worker [n/2, n), generate greedily, return the tokens and the
    worker's speed as calibrated and as the planner now sees it."""
    n = coordinator.model.n_layers
    caps = await coordinator.gather()
    plan = Plan((StagePlan(coordinator.head, 0, n // 2), StagePlan(worker, n // 2, n)))
    before = coordinator.planner(caps).nodes[worker].decode_s_per_byte
    pipeline = await coordinator.start(plan)
    try:
        tokens = await _greedy(pipeline, TOKENS)
    finally:
        await pipeline.close()
    after = coordinator.planner(caps).nodes[worker].decode_s_per_byte
    observed = coordinator.observed
    return tokens, {
        "before": before,
        "after": after,
        "factor": observed.factor(worker),
        "samples": observed.samples(worker),
        "head_samples": observed.samples(coordinator.head),
    }


@pytest.mark.slow  # the default model's calibration on first use
async def test_observed_stage_compute_reaches_the_planner(smollm2: Path, tmp_path: Path) -> None:
    """A `meshchat --headless` worker (tests/mesh_cluster.py) runs half the model for an
    in-process head: every decode step's stage compute comes back in the trace, and the next
    planner's speed for the worker is its calibration times the observed factor."""
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster")
    try:
        worker = await asyncio.to_thread(cluster.add, smollm2, {"MESHCHAT_THREADS": "1"})
        async with mesh_nodes(tmp_path / "nodes") as nodes:
            head = await nodes.new()
            await head.join(cluster.invite)
            await eventually(lambda: NodeId.parse(worker.node_id) in head.connected(), 15)
            data = DataDir(tmp_path / "head")
            model = LocalModel.open(smollm2, data)
            coordinator = MeshCoordinator(head, model, data, threads=1, n_ctx=N_CTX)
            tokens, seen = await _run_half_and_half(coordinator, NodeId.parse(worker.node_id))
    finally:
        cluster.close()
    assert len(tokens) == TOKENS
    assert seen["samples"] >= MIN_SAMPLES and seen["head_samples"] >= MIN_SAMPLES
    assert 1 / CLAMP <= seen["factor"] <= CLAMP and seen["factor"] != 1.0
    assert seen["after"] == pytest.approx(seen["before"] * seen["factor"])


class _Boasting(StageService):
    """A member that reports its compute as nothing at all, or as a thousand seconds: it would
    have the planner give it every layer, or make an honest chain look broken."""

    claim_us = 0

    async def _run(self, fn: Any, *args: object, short: bool = True) -> Any:
        result = await super()._run(fn, *args, short=short)
        if getattr(fn, "__name__", "") == "_compute":
            output, _micros = result
            return output, self.claim_us
        return result


@pytest.mark.slow
@pytest.mark.parametrize("claim_us", [0, 1_000_000_000])
async def test_a_member_lying_about_its_compute_moves_its_speed_by_the_clamp_at_most(
    smollm2: Path, tmp_path: Path, claim_us: int
) -> None:
    async with mesh_nodes(tmp_path / "nodes") as nodes:
        head = await nodes.new()
        node = await nodes.new()
        data = DataDir(tmp_path / "liar")
        liar = _Boasting(node, LocalModel.open(smollm2, data), data, threads=1)
        liar.claim_us = claim_us
        await liar.start()
        await node.join(head.create_invite())
        await eventually(lambda: node.node_id in head.connected(), 15)
        head_data = DataDir(tmp_path / "head")
        model = LocalModel.open(smollm2, head_data)
        coordinator = MeshCoordinator(head, model, head_data, threads=1, n_ctx=N_CTX)
        try:
            tokens, seen = await _run_half_and_half(coordinator, node.node_id)
            # The service still works for an honest head: generation is unaffected.
            again, _ = await _run_half_and_half(coordinator, node.node_id)
        finally:
            await liar.stop()
    assert again == tokens and len(tokens) == TOKENS
    if claim_us == 0:  # believed, within the clamp: at most CLAMP times faster
        assert seen["factor"] == pytest.approx(1 / CLAMP)
        assert seen["after"] == pytest.approx(seen["before"] / CLAMP)
    else:  # more than the whole step took: every such step is dropped
        assert seen["samples"] == 0 and seen["after"] == seen["before"]
    assert seen["head_samples"] == (0 if claim_us else TOKENS - 1)
