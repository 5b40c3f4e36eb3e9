"""The cost model's newer terms: cores shared by nodes on one host, the context term, speeds
learned from observed stage compute (with hostile figures bounded), calibrations under load."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.errors import MeshchatError
from meshchat.inference import observed_speed, profiling
from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.host import host_id
from meshchat.inference.local_model import LocalModel
from meshchat.inference.observed_speed import CLAMP, MAX_NODES, MIN_SAMPLES, ObservedSpeeds
from meshchat.inference.planner import (
    SHARE_COST,
    STAGE_OVERHEAD_S,
    Plan,
    Planner,
    StagePlan,
    extra_context,
)
from meshchat.paths import DataDir
from tests.node_names import HEAD, B, C, named
from tests.test_engine_profile import _calibrate
from tests.test_planner import N_LAYERS, NEEDS, SPEED, caps, split_mib


def on_host(node: NodeCaps, host: str = "ab" * 8, cpus: int = 2, threads: int = 2) -> NodeCaps:
    return replace(node, host=host, cpus=cpus, threads=threads)


THIRDS = Plan((StagePlan(HEAD, 0, 10), StagePlan(B, 10, 20), StagePlan(C, 20, N_LAYERS)))


def three(host_b: str = "ab" * 8, host_c: str = "ab" * 8, threads: int = 2) -> Planner:
    nodes = [
        on_host(caps(HEAD), threads=threads),
        on_host(caps(B), host_b, threads=threads),
        on_host(caps(C), host_c, threads=threads),
    ]
    return Planner(NEEDS, nodes, head=HEAD, n_ctx=1024)


# -- sharing a host's cores ------------------------------------------------------------------


def test_stages_on_one_host_pay_for_threads_beyond_its_cores() -> None:
    shared = three()
    assert shared.share_charges(THIRDS.nodes) == dict.fromkeys(THIRDS.nodes, 1 + 2 * SHARE_COST)
    apart = three("cd" * 8, "ef" * 8)
    assert apart.share_charges(THIRDS.nodes) == dict.fromkeys(THIRDS.nodes, 1.0)
    # One thread each on two cores: the a-core-per-node bench row, not charged.
    assert three(threads=1).share_charges([HEAD, B]) == {HEAD: 1.0, B: 1.0}
    # Nodes that do not say where they run (older peers) are never charged.
    assert Planner(NEEDS, [caps(HEAD), caps(B)], HEAD, 1024).share_charges([HEAD, B]) == {
        HEAD: 1.0,
        B: 1.0,
    }
    assert shared.predict(THIRDS).compute_s > apart.predict(THIRDS).compute_s


def test_the_mesh3_bench_row_is_charged_for_sharing() -> None:
    """The 1B bench's mesh3 row (3 nodes of 2 threads on 2 vCPUs): stage compute 35.5 ms
    measured, 29.1 ms predicted without the charge; with it, within 5%."""
    shared, apart = three().predict(THIRDS), three("cd" * 8, "ef" * 8).predict(THIRDS)
    overhead = 3 * STAGE_OVERHEAD_S
    scale = (shared.compute_s - overhead) / (apart.compute_s - overhead)
    predicted_ms = (29.1 - overhead * 1000) * scale + overhead * 1000
    assert abs(predicted_ms / 35.5 - 1) < 0.05


def test_sharing_moves_layers_to_a_node_on_another_host() -> None:
    """Two nodes share the head's host, one runs alone on its own: under a budget that forces
    a two-way split, the node on its own host gets the second stage."""
    half = split_mib(2)
    nodes = [
        on_host(caps(HEAD, half)),
        on_host(caps(B, half)),
        on_host(caps(named("z"), half), host="ef" * 8),
    ]
    plan = Planner(NEEDS, nodes, HEAD, 1024).best().plan
    assert plan.nodes == [HEAD, named("z")]


def test_a_host_claim_cannot_make_a_stage_cost_more_than_the_cap() -> None:
    nodes = [on_host(caps(n), cpus=1, threads=4096) for n in (HEAD, B, C)]
    charges = Planner(NEEDS, nodes, HEAD, 1024).share_charges([HEAD, B, C])
    assert all(1 < c <= 4.0 for c in charges.values())


def test_host_identity_is_a_hash_and_parsed_strictly() -> None:
    ours = host_id()
    assert len(ours) == 16 and int(ours, 16) >= 0
    with open("/etc/machine-id") as handle:
        assert ours not in handle.read()
    body = caps(B).to_json()
    assert NodeCaps.from_json(B, {**body, "host": ours, "cpus": 2}).host == ours
    bads = [{"host": "x" * 17}, {"host": "NOT-HEX"}, {"host": 5}, {"cpus": -1}, {"cpus": 1.5},
            {"cpus": 1 << 40}, {"threads": 0}, {"threads": 1 << 30}]  # fmt: skip
    for bad in bads:
        with pytest.raises(MeshchatError, match="malformed capabilities"):
            NodeCaps.from_json(B, {**body, **bad})


# -- the context term ------------------------------------------------------------------------


def test_the_context_term_grows_a_stage_with_its_kv_cache() -> None:
    p = Planner(NEEDS, [caps(HEAD)], HEAD, n_ctx=1024)
    (cost,) = p.stage_costs(Plan((StagePlan(HEAD, 0, N_LAYERS),)))
    assert extra_context(100) == 0  # within what the calibration decoded at
    at_calibration, far = cost.seconds(extra_context(140)), cost.seconds(extra_context(4140))
    assert far - at_calibration == pytest.approx(4000 * NEEDS.kv_bytes_per_token_layer * 30 * SPEED)
    # predict() is the same model, at half the context.
    assert p.predict(Plan((StagePlan(HEAD, 0, N_LAYERS),))).compute_s == pytest.approx(
        cost.seconds(p.extra_context)
    )


def test_a_measured_context_term_replaces_the_kv_bytes() -> None:
    """A node whose calibration decoded 5% slower 384 tokens further on (the 1B synthetic
    model's figure) is predicted that much slower there, whatever its KV cache's bytes."""
    rate = 0.05 / 384 * SPEED
    p = Planner(NEEDS, [replace(caps(HEAD), context_s_per_byte=rate)], HEAD, n_ctx=1024)
    (cost,) = p.stage_costs(Plan((StagePlan(HEAD, 0, N_LAYERS),)))
    near, far = cost.seconds(0) - STAGE_OVERHEAD_S, cost.seconds(384) - STAGE_OVERHEAD_S
    assert far / near == pytest.approx(1.05)


def test_context_terms_travel_in_capabilities_and_bad_ones_are_refused() -> None:
    speed = profiling.Speed(SPEED, SPEED / 10, 1e-14)
    node = replace(caps(B), context_s_per_byte=1e-14, flash_speeds={False: speed})
    back = NodeCaps.from_json(B, node.to_json())
    assert back.context_s_per_byte == 1e-14 and back.flash_speeds == {False: speed}
    assert back.for_flash(False) == back
    # A node from before the context term: two figures a setting, none at the top level.
    old = {**node.to_json(), "flash_speeds": {"off": [SPEED, SPEED / 10]}}
    del old["context_s_per_byte"]
    parsed = NodeCaps.from_json(B, old)
    assert parsed.context_s_per_byte == 0 and parsed.flash_speeds[False].context_s_per_byte == 0
    bads = [{"context_s_per_byte": -1.0}, {"context_s_per_byte": math.nan},
            {"context_s_per_byte": math.inf}, {"flash_speeds": {"off": [SPEED, SPEED, -1.0]}},
            {"flash_speeds": {"off": [SPEED, SPEED, 1.0, 1.0]}}]  # fmt: skip
    for bad in bads:
        with pytest.raises(MeshchatError, match="malformed capabilities"):
            NodeCaps.from_json(B, {**node.to_json(), **bad})


def test_the_probe_decodes_again_far_into_the_context(
    smollm2: Path, tmp_path: Path, data_dir: DataDir
) -> None:
    model = LocalModel.open(smollm2, data_dir)
    target = profiling.probe_target(model, data_dir, 8 << 30)
    (trial,) = profiling.run_trials(target, profiling.candidates(1)[:1], rounds=1)
    assert trial.speed is not None
    assert 0 <= trial.speed.context_s_per_byte < math.inf
    record = profiling.Trial.from_json(trial.to_json())
    assert record.speed == trial.speed


# -- learning from observation ---------------------------------------------------------------


def _feed(seen: ObservedSpeeds, p: Planner, plan: Plan, slow: dict[str, float], n: int) -> None:
    costs = p.stage_costs(plan)
    for _ in range(n):
        compute = [
            (c.seconds(0) - STAGE_OVERHEAD_S) * slow.get(c.node, 1.0) + STAGE_OVERHEAD_S
            for c in costs
        ]
        seen.observe(costs, 0, sum(compute) * 1.05, compute)


def test_observed_compute_corrects_the_node_and_the_next_plan() -> None:
    p = Planner(NEEDS, [caps(HEAD), caps(B)], HEAD, 1024)
    plan = Plan((StagePlan(HEAD, 0, 15), StagePlan(B, 15, N_LAYERS)))
    seen = ObservedSpeeds()
    _feed(seen, p, plan, {HEAD: 1.3}, MIN_SAMPLES - 1)
    assert seen.factor(HEAD) == 1.0  # too few samples yet
    _feed(seen, p, plan, {HEAD: 1.3}, 1)
    assert seen.factor(HEAD) == pytest.approx(1.3, rel=0.01)
    assert seen.factor(B) == pytest.approx(1.0, rel=0.01)
    corrected = Planner(NEEDS, [seen.corrected(c) for c in p.nodes.values()], HEAD, 1024)
    # The head is slower than its calibration said: the whole model moves to b.
    assert p.best().plan.nodes == [HEAD]
    assert corrected.best().plan.nodes == [B]


def test_an_outlier_step_does_not_move_the_estimate() -> None:
    p = Planner(NEEDS, [caps(HEAD)], HEAD, 1024)
    plan = Plan((StagePlan(HEAD, 0, N_LAYERS),))
    seen = ObservedSpeeds()
    _feed(seen, p, plan, {HEAD: 1.1}, 20)
    _feed(seen, p, plan, {HEAD: 3.5}, 2)  # a step stalled by another program
    assert seen.factor(HEAD) == pytest.approx(1.1, rel=0.01)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_hostile_reports_keep_every_speed_within_the_clamp(
    steps: list[tuple[float, float, float]],
) -> None:
    """Whatever a lying member writes in the trace (zero, negative, huge, NaN), each node's
    speed stays within CLAMP of its calibration, and every plan's prediction is finite."""
    p = Planner(NEEDS, [caps(HEAD), caps(B)], HEAD, 1024)
    plan = Plan((StagePlan(HEAD, 0, 15), StagePlan(B, 15, N_LAYERS)))
    costs = p.stage_costs(plan)
    seen = ObservedSpeeds()
    for wall, a, b in steps:
        seen.observe(costs, 500, wall, [a, b])
        seen.observe(costs, 500, wall, [a])  # the wrong number of stages: ignored
    for node in (HEAD, B):
        assert 1 / CLAMP <= seen.factor(node) <= CLAMP
    corrected = Planner(NEEDS, [seen.corrected(c) for c in p.nodes.values()], HEAD, 1024)
    for _, candidate in corrected.search(2):
        assert 0 < corrected.predict(candidate).decode_tok_s < math.inf


def test_a_stage_claiming_more_than_the_whole_step_is_ignored() -> None:
    p = Planner(NEEDS, [caps(HEAD), caps(B)], HEAD, 1024)
    plan = Plan((StagePlan(HEAD, 0, 15), StagePlan(B, 15, N_LAYERS)))
    costs = p.stage_costs(plan)
    seen = ObservedSpeeds()
    for _ in range(MIN_SAMPLES * 2):
        honest = costs[0].seconds(0)
        assert seen.observe(costs, 0, honest + 0.001, [honest, 10.0]) == 0
    assert seen.samples(B) == 0 and seen.factor(B) == 1.0


def test_the_table_of_observed_nodes_is_bounded() -> None:
    seen = ObservedSpeeds()
    names = [f"n{i}" for i in range(MAX_NODES + 10)]
    nodes = [caps(HEAD, 64 * 1024)] + [caps(n) for n in names]
    p = Planner(NEEDS, nodes, HEAD, 1024)
    for name in names:
        costs = p.stage_costs(Plan((StagePlan(name, 0, N_LAYERS),)))
        seen.observe(costs, 0, 1.0, [costs[0].seconds(0)])
    assert len(seen._ratios) == MAX_NODES
    assert seen.samples(names[0]) == 0 and seen.samples(names[-1]) == 1
    assert observed_speed.WINDOW >= MIN_SAMPLES


# -- calibration under load ------------------------------------------------------------------


def test_a_calibration_taken_under_load_is_measured_again_once_quiet(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_models["llama"]
    probes: list[int] = []
    real_trials = profiling.run_trials

    def counted(*args: Any, **kw: Any) -> Any:
        probes.append(1)
        return real_trials(*args, **kw)

    monkeypatch.setattr(profiling, "run_trials", counted)
    monkeypatch.setattr(profiling, "load_per_cpu", lambda: 0.9)
    busy = _calibrate(model, tmp_path, monkeypatch)
    assert busy.load_per_cpu == 0.9 and probes == [1]
    assert _calibrate(model, tmp_path, monkeypatch) == busy and probes == [1]  # still busy
    monkeypatch.setattr(profiling, "load_per_cpu", lambda: 0.1)
    quiet = _calibrate(model, tmp_path, monkeypatch)
    assert quiet.load_per_cpu == 0.1 and probes == [1, 1]
    assert _calibrate(model, tmp_path, monkeypatch) == quiet and probes == [1, 1]
    # Records from before the load was recorded stay valid.
    record = quiet.to_json()
    del record["load_per_cpu"]
    assert profiling.Calibration.from_json(record).load_per_cpu is None
    with pytest.raises(ValueError):
        profiling.Calibration.from_json({**quiet.to_json(), "load_per_cpu": -1})


def test_load_per_cpu_divides_by_the_hosts_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition of the host's CPUs (host.host_cpus), not a count of its own."""
    monkeypatch.setattr(profiling.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    monkeypatch.setattr(profiling, "host_cpus", lambda: 6)
    assert profiling.load_per_cpu() == 0.5


def test_load_per_cpu_is_none_where_the_os_does_not_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average")

    monkeypatch.setattr(profiling.os, "getloadavg", no_load)
    assert profiling.load_per_cpu() is None
