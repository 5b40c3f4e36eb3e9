"""Memory budgets (issue 13, item 1): the planner's estimate against what llama.cpp allocates,
the `--max-memory` setting's bad values, and a stage whose real allocation exceeds its budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf.constants import GGMLQuantizationType

from meshchat import cli
from meshchat.engine.stage import Stage, StageOptions
from meshchat.engine.stage_memory import StageMemory, from_log
from meshchat.inference import capabilities, stage_service
from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import StageLost
from meshchat.inference.planner import STAGE_BATCH, ModelNeeds
from meshchat.inference.protocol import StageRole
from meshchat.inference.stage_service import StageService
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.model.slices import LayerRange
from meshchat.paths import DataDir
from meshchat.tui.mesh_view import NodeMesh, memory_cell
from meshchat.tui.planning import MeshPlanning
from tests.mesh_helpers import eventually, mesh_nodes
from tests.test_hostile_inference import (
    Mesh,
    _generate_under,
    _honest_pipeline,
    _nothing,
    _scene,
    reference,  # noqa: F401  (fixture)
)
from tests.test_stage_service import _greedy, mesh_fixture  # noqa: F401  (the fixture "mesh")
from tests.tiny_models import TinyConfig, write_tiny_model

MIB = 1 << 20
Q4_0 = GGMLQuantizationType.Q4_0
N_CTX = 4096  # a KV cache large enough that splitting the default model saves memory


@pytest.fixture(autouse=True)
def no_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without a budget and leaves none behind (it is process-wide)."""
    monkeypatch.delenv(capabilities.MEMORY_LIMIT_ENV, raising=False)
    capabilities.set_limit(None)
    yield
    capabilities.set_limit(None)


def _ranges(n_layers: int) -> list[tuple[int, int]]:
    third = max(1, n_layers // 3)
    return [(0, third), (third, 2 * third), (2 * third, n_layers), (0, n_layers)]


def _check_estimate(
    path: Path, data: DataDir, n_ctx: int, sessions: int, flash: bool, extra_bufts: bool = False
) -> str:
    """Load every kind of stage of `path`; measured <= predicted for each; a report line."""
    return _run_stages(path, data, n_ctx, sessions, flash, extra_bufts)[0]


def _measure(
    path: Path, data: DataDir, n_ctx: int, sessions: int, flash: bool, extra_bufts: bool
) -> list[StageMemory]:
    return _run_stages(path, data, n_ctx, sessions, flash, extra_bufts)[1]


def _run_stages(
    path: Path, data: DataDir, n_ctx: int, sessions: int, flash: bool, extra_bufts: bool
) -> tuple[str, list[StageMemory]]:
    model = LocalModel.open(path, data)
    needs = ModelNeeds.of(model)
    lines = []
    usages = []
    for first, end in _ranges(model.n_layers):
        last = end == model.n_layers
        options = StageOptions(
            n_ctx=n_ctx,
            max_sessions=sessions,
            n_batch=STAGE_BATCH,
            n_threads=1,
            flash_attn=flash,
            extra_bufts=extra_bufts,
        )
        with Stage(model.stage_file(data, first, end), LayerRange(first, end), model.n_layers,
                   options) as stage:  # fmt: skip
            used = stage.memory
        usages.append(used)
        predicted = needs.memory(first, end, last, n_ctx, sessions)
        # Every kind of buffer was seen in llama.cpp's report (the parse found them).
        assert used.weights > 0 and used.kv > 0 and used.compute > 0 and used.output > 0
        assert used.total <= predicted, (path.name, first, end, used, predicted)
        over = (predicted - used.total) / used.total
        lines.append(
            f"{path.name} [{first},{end}) measured {used.total / MIB:.1f} MiB "
            f"(w {used.weights / MIB:.1f} kv {used.kv / MIB:.1f} compute "
            f"{used.compute / MIB:.1f} out {used.output / MIB:.1f}), predicted "
            f"{predicted / MIB:.1f} MiB: +{over:.0%}"
        )
    return "\n".join(lines), usages


@pytest.mark.parametrize("flash", [False, True])
def test_measured_allocation_of_default_model_stages_is_within_the_estimate(
    smollm2: Path, tmp_path: Path, flash: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _check_estimate(smollm2, DataDir(tmp_path), 1024, 2, flash)
    with capsys.disabled():
        print(f"\n{report}")


@pytest.mark.parametrize("extra_bufts", [False, True])  # repacked weights: another buffer
def test_measured_allocation_of_tiny_model_stages_is_within_the_estimate(
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra_bufts: bool,
) -> None:
    reports = [
        _check_estimate(path, DataDir(tmp_path), 512, 2, False, extra_bufts)
        for path in tiny_models.values()
    ]
    with capsys.disabled():
        print("\n" + "\n".join(reports))


def test_repacked_weights_count_once_and_stay_within_the_estimate(
    smollm2: Path, tmp_path: Path
) -> None:
    # Q4_0 matrices this wide are repacked with extra buffer types on (CPU_REPACK buffer).
    config = TinyConfig("llama", n_layers=6, n_embd=256, n_ff=512, seed=7, weight_type=Q4_0)
    path = write_tiny_model(tmp_path / "q4.gguf", config, smollm2)
    data = DataDir(tmp_path / "data")
    plain = _measure(path, data, 256, 1, False, extra_bufts=False)
    repacked = _measure(path, data, 256, 1, False, extra_bufts=True)
    for a, b in zip(plain, repacked, strict=True):  # the repacked copy replaces mapped pages
        assert abs(a.weights - b.weights) < MIB


def test_buffer_report_parsing() -> None:
    lines = [  # llama.cpp 0.3.36's own lines, from a Q4_0 model loaded with extra buffers
        "load_tensors:   CPU_Mapped model buffer size =    32.45 MiB",
        "load_tensors:   CPU_REPACK model buffer size =     8.65 MiB",
        "llama_context:        CPU  output buffer size =     0.19 MiB",
        "llama_kv_cache:        CPU KV buffer size =     0.75 MiB",
        "sched_reserve:        CPU compute buffer size =    48.50 MiB",
        "~llama_context:        CPU compute buffer size is  48.5010 MiB, matches expectation",
    ]
    used = from_log(lines)
    assert used == StageMemory(
        weights=round(32.45 * MIB), kv=round(0.75 * MIB), compute=round(48.5 * MIB),
        output=round(0.19 * MIB),
    )  # fmt: skip
    # Without a map, repacked weights are the only copy of those tensors: they count.
    unmapped = from_log([lines[0].replace("CPU_Mapped", "CPU"), *lines[1:]])
    assert unmapped.weights == round(32.45 * MIB) + round(8.65 * MIB)
    assert unmapped.with_output_peak(10 * MIB).output == 10 * MIB
    assert from_log([]).total == 0


# -- the setting ---------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("bad", ["lots", "-1G", "0", "12Q", "nan", "1e40T"])
def test_a_max_memory_that_is_not_a_size_is_one_line_and_exit_2(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path)]
    for argv in (
        [*data, f"--max-memory={bad}", "generate", "hi"],
        [*data, "generate", "hi", f"--max-memory={bad}"],
        [*data, "--headless", f"--max-memory={bad}"],
    ):
        code, err = _run(argv, capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and "--max-memory wants a size like 300M" in err, err


def test_bad_sizes_from_the_environment_and_the_config_name_their_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    monkeypatch.setenv("MESHCHAT_CONFIG_DIR", str(config))
    (config / "config.toml").write_text('max_memory = "plenty"\n')
    argv = ["--data-dir", str(tmp_path), "generate", "hi"]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "max_memory in config.toml" in err, err
    monkeypatch.setenv(capabilities.MEMORY_LIMIT_ENV, "-5M")  # the environment wins over it
    code, err = _run(argv, capsys)
    assert code == 2 and "MESHCHAT_MEMORY_LIMIT wants a size" in err, err
    code, err = _run([*argv, "--max-memory", "x"], capsys)  # and the flag over both
    assert code == 2 and "--max-memory wants a size" in err, err


def test_a_budget_smaller_than_the_smallest_stage_is_refused(
    smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    smallest = ModelNeeds.of(LocalModel.open(smollm2, DataDir(tmp_path))).smallest_stage(4096)
    small = f"{smallest // MIB - 1}M"
    common = ["--data-dir", str(tmp_path), "--model", str(smollm2)]
    for argv in (
        [*common, "--max-memory", small, "generate", "hi"],
        [*common, "--max-memory", "20M", "--headless", "--listen", "127.0.0.1:0"],
        [*common, "--max-memory", "20M"],  # the app: refused before its screen starts
    ):
        code, err = _run(argv, capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and "cannot hold any stage" in err, err
        assert "the smallest needs" in err


# -- a stage whose real allocation exceeds the budget ----------------------------------------------


async def test_a_stage_over_its_budget_after_loading_refuses_the_plan_and_frees_it(
    mesh: Mesh,
    reference: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scene = await _scene(mesh)
    needs = ModelNeeds.of(scene.model)
    honest = needs.memory(4, 8, True, 256, 2)  # the honest head's plan (two sessions)
    # An estimate that is far too low (as for buffers the planner does not model): the worker's
    # check before loading passes, and only the measurement after loading can catch it.
    real_check = stage_service.check_plan

    def underestimate(*args: Any) -> StageRole | None:
        role = real_check(*args)
        return None if role is None else dataclasses.replace(role, memory=1)

    monkeypatch.setattr(stage_service, "check_plan", underestimate)
    capabilities.set_limit(honest // 4)
    with pytest.raises(StageLost) as lost:
        await _honest_pipeline(scene)
    assert lost.value.code is wire.FaultCode.MEMORY
    assert lost.value.node == scene.worker.node_id
    assert "measured" in str(lost.value) and "after load" in str(lost.value)
    # Nothing stays loaded, and the status file says so.
    assert scene.service._assignment is None and scene.service.layers is None
    status = scene.worker.status()
    assert status["layers"] is None
    assert status["memory"] == {"offer": honest // 4, "used": 0, "left": honest // 4, "stage": None}
    # The worker still serves a plan its budget holds.
    monkeypatch.setattr(stage_service, "check_plan", real_check)
    capabilities.set_limit(honest)
    pipeline = await _honest_pipeline(scene)
    try:
        assert await _generate_under(pipeline, _nothing) == reference
        memory = scene.worker.status()["memory"]
        assert 0 < memory["used"] == memory["stage"]["total"] <= honest
        assert memory["left"] == memory["offer"] - memory["used"]
        # The head's peers table hears it too (the worker's Status message).
        await eventually(lambda: _peer_memory(scene) == (memory["offer"], memory["used"]))
        row = next(r for r in NodeMesh(scene.head).peers() if r.key == scene.worker.node_id)
        assert row.memory == memory_cell(memory["offer"], memory["used"])  # the peers table
    finally:
        await pipeline.close()


async def _solo(model: LocalModel, data: DataDir, flash: bool) -> list[int]:
    """Greedy tokens of the whole model in this process, with the profile the plan's stages
    load (meshchat.inference.capabilities.plan_profile)."""
    profile = capabilities.plan_profile(model, data, 1, flash)
    options = StageOptions(n_ctx=N_CTX, max_sessions=1).with_profile(profile)
    stages = build_stages(
        model.path, [(0, model.n_layers)], data.slices, data.fingerprints, options
    )
    local = LocalPipeline(stages)
    try:
        return await _greedy(local)
    finally:
        await local.close()


def _peer_memory(scene: Any) -> tuple[int, int] | None:
    peer = scene.head.peer(scene.worker.node_id)
    report = peer.memory if peer else None
    return (report.offer, report.used) if report else None


class _Overstated(StageService):
    """A worker that offers the mesh far more memory than its budget holds (a mistaken or
    lying offer): the plan it is given does not fit once it checks for itself."""

    async def _on_caps(self, peer: NodeId, msg: wire.CapsQuery) -> wire.Message:
        reply = await super()._on_caps(peer, msg)
        assert isinstance(reply, wire.Ack)
        return wire.Ack(body={**reply.body, "free_memory": 1 << 40})


@pytest.mark.slow  # the default model's calibration on first use
async def test_a_node_that_refuses_its_plan_for_memory_is_left_out_of_the_next(
    smollm2: Path, tmp_path: Path
) -> None:
    # The default model: the tiny ones are all buffers, so splitting them saves no memory.
    path = smollm2
    async with mesh_nodes(tmp_path / "nodes") as nodes:
        head = await nodes.new()
        workers: list[tuple[Node, StageService]] = []
        for name, kind in (("over", _Overstated), ("honest", StageService)):
            node = await nodes.new()
            data = DataDir(tmp_path / name)
            service = kind(node, LocalModel.open(path, data), data, threads=1)
            await service.start()
            await node.join(head.create_invite())
            workers.append((node, service))
        (over, over_service), (honest, _) = workers
        await eventually(lambda: {over.node_id, honest.node_id} <= set(head.connected()), 15)
        data = DataDir(tmp_path / "head")
        model = LocalModel.open(path, data)
        needs = ModelNeeds.of(model)
        notes: list[str] = []
        coordinator = MeshCoordinator(
            head, model, data, threads=1, n_ctx=N_CTX, notify=notes.append
        )
        # Every node's budget holds half the model, not all of it (one process: one budget).
        two = coordinator.planner([await coordinator.own_caps()]).split_memory(2)
        assert two is not None and two < needs.memory(0, model.n_layers, True, N_CTX, 1)
        capabilities.set_limit(two + MIB)
        plan, _choice, _planner = await coordinator.choose()
        assert plan.nodes == [over.node_id]  # only its offer holds the whole model
        pipeline = await coordinator.start(plan)
        try:
            assert over.node_id not in pipeline._plan.nodes  # type: ignore[union-attr]
            assert len(pipeline._plan.stages) == 2  # type: ignore[union-attr]
            assert any("planning again without node" in n for n in notes), notes
            assert over_service.layers is None  # it loaded nothing, or freed what it loaded
            # The split editor's memory per stage: the estimate of what each node offers.
            planning = MeshPlanning(coordinator)
            await planning.refresh()
            split = planning.from_plan(pipeline._plan, model.n_layers)  # type: ignore[arg-type]
            labels = planning.memory(split)
            assert len(labels) == 2
            for label in labels:
                need, offer = (int(x) for x in label.removesuffix(" MiB").split("/"))
                assert need <= offer <= two // MIB + 1
            tokens = await _greedy(pipeline)
            assert tokens == await _solo(model, data, bool(coordinator.flash_attn))
        finally:
            await pipeline.close()
            for _node, service in workers:
                await service.stop()
