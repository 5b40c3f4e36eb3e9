"""Split planner: memory limits, allowed split points, fingerprints, heterogeneous speeds."""

from __future__ import annotations

import pytest

from meshchat.errors import UsageError
from meshchat.inference.capabilities import NodeCaps, parse_size
from meshchat.inference.coordinator import choose_flash
from meshchat.inference.planner import (
    ModelNeeds,
    Plan,
    PlanError,
    Planner,
    StagePlan,
)
from meshchat.mesh.identity import NodeId
from meshchat.model.fingerprint import Fingerprint
from tests.node_names import HEAD, B, C, named

MIB = 1 << 20
N_LAYERS = 30
FP = Fingerprint("m" * 64, "c" * 64, "g" * 64, tuple(f"l{i}" for i in range(N_LAYERS)))
# 30 layers of 2 MiB, a 30 MiB output matrix: 90 MiB of weights, like SmolLM2-135M.
NEEDS = ModelNeeds(
    n_layers=N_LAYERS,
    layer_bytes=(2 * MIB,) * N_LAYERS,
    output_bytes=30 * MIB,
    kv_bytes_per_token_layer=768,
    hidden_bytes=576 * 4,
    allowed=frozenset(range(1, N_LAYERS)),
    fingerprint=FP,
    n_vocab=49152,
)
SPEED = 1.3e-10  # s per byte: ~80 tok/s for the whole model


def caps(
    node: NodeId, memory_mib: int = 4096, speed: float = SPEED, fp: Fingerprint = FP
) -> NodeCaps:
    return NodeCaps(node, memory_mib * MIB, fp, speed, speed / 10, 2, {}, "")


def planner(*nodes: NodeCaps, n_ctx: int = 1024) -> Planner:
    return Planner(NEEDS, nodes, head=HEAD, n_ctx=n_ctx)


def whole_model_mib(n_ctx: int = 1024) -> int:
    return NEEDS.memory(0, N_LAYERS, True, n_ctx, 1) // MIB


def split_mib(k: int) -> int:
    """A budget that just holds the most even split of the model over `k` nodes."""
    size = planner(caps(HEAD)).split_memory(k)
    assert size is not None
    return size // MIB + 1


def stage_mib(first: int, end: int, n_ctx: int = 1024) -> int:
    """A budget that just holds layers [first, end) (the planner's estimate, rounded up)."""
    return NEEDS.memory(first, end, end == N_LAYERS, n_ctx, 1) // MIB + 1


def test_equal_nodes_keep_the_model_on_the_head_and_say_splitting_is_not_worth_it() -> None:
    choice = planner(caps(HEAD), caps(B), caps(C)).best()
    assert choice.plan.stages == (StagePlan(HEAD, 0, N_LAYERS),)
    assert "not worth it" in choice.advice
    assert choice.single is not None


def test_memory_limit_forces_a_split_and_respects_every_node_budget() -> None:
    need = whole_model_mib()
    half = split_mib(2)
    assert half < need
    p = planner(caps(HEAD, half), caps(B, half), caps(C, half))
    choice = p.best()
    assert len(choice.plan.stages) >= 2
    assert choice.plan.stages[0].node == HEAD
    assert p.violations(choice.plan) == []
    assert "fits on no single node" in choice.advice
    for stage in choice.plan.stages:
        last = stage.end == N_LAYERS
        assert (
            NEEDS.memory(stage.first, stage.end, last, 1024, 1) <= p.nodes[stage.node].free_memory
        )


def test_a_much_faster_node_takes_the_layers() -> None:
    choice = planner(caps(HEAD), caps(named("fast"), speed=SPEED / 4)).best()
    assert choice.plan.nodes == [named("fast")]  # the hops cost less than the speed gained
    assert choice.prediction.decode_tok_s > 1 / (90 * MIB * SPEED)


def test_heterogeneous_memory_and_speed_split_by_capacity() -> None:
    p = planner(
        caps(HEAD, stage_mib(0, 10)), caps(named("fast"), stage_mib(10, 30), speed=SPEED / 2)
    )
    choice = p.best()
    assert choice.plan.nodes == [HEAD, named("fast")]
    head_stage, fast_stage = choice.plan.stages
    # The fast node takes as many layers as its memory allows.
    assert fast_stage.end - fast_stage.first > head_stage.end - head_stage.first
    assert not p.fits(named("fast"), fast_stage.first - 1, N_LAYERS)


def test_allowed_split_points_are_respected() -> None:
    needs = ModelNeeds(**{**NEEDS.__dict__, "allowed": frozenset({10, 20})})
    need = whole_model_mib()
    p = Planner(needs, [caps(HEAD, stage_mib(0, 20)), caps(B, need)], head=HEAD, n_ctx=1024)
    choice = p.best(min_stages=2)
    assert choice.plan.boundaries[0] in (10, 20)
    bad = Plan((StagePlan(HEAD, 0, 15), StagePlan(B, 15, 30)))
    assert any("15 is not an allowed split point" in v for v in p.violations(bad))


def test_fingerprint_mismatch_never_gets_layers() -> None:
    other = Fingerprint("x" * 64, "c" * 64, "g" * 64, tuple(f"z{i}" for i in range(N_LAYERS)))
    need = whole_model_mib()
    p = planner(caps(HEAD, need // 2), caps(named("stranger"), need * 4, fp=other), caps(B, need))
    assert p.mismatched() == [named("stranger")]
    for _, plan in p.search(3):
        assert named("stranger") not in plan.nodes
    bad = Plan((StagePlan(HEAD, 0, 15), StagePlan(named("stranger"), 15, 30)))
    assert any("fingerprint mismatch" in v for v in p.violations(bad))
    with pytest.raises(PlanError, match="fingerprint mismatch"):
        p.check(bad)


def test_partly_matching_file_may_serve_only_the_layers_it_shares() -> None:
    layers = list(FP.layers)
    layers[3] = "changed"  # e.g. a fine-tune that touched layer 3 only
    partial = Fingerprint("y" * 64, FP.config, FP.globals, tuple(layers))
    p = planner(caps(HEAD, stage_mib(0, 10)), caps(named("p"), 4096, speed=SPEED, fp=partial))
    assert p.matches(named("p"), 10, 30) and not p.matches(named("p"), 0, 10)
    choice = p.best()
    assert choice.plan.stage_of(named("p")) is not None
    assert choice.plan.stage_of(named("p")).first >= 4  # type: ignore[union-attr]


def test_hand_plan_gets_one_message_per_violation() -> None:
    p = planner(caps(HEAD, 30), caps(B))
    plan = Plan((StagePlan(HEAD, 0, 10), StagePlan(B, 12, 40), StagePlan(B, 40, 41)))
    problems = p.violations(plan)
    text = "\n".join(problems)
    assert "layers [10,12) are not covered" in text
    assert "runs to layer 41" in text
    assert "appears in more than one stage" in text
    assert "needs about" in text and "offers 30 MiB" in text
    assert len(problems) == len(set(problems))


def test_nothing_fits_gives_a_clear_message() -> None:
    with pytest.raises(PlanError, match="no plan fits") as small:
        planner(caps(HEAD, 50), caps(B, 50)).best()
    short = whole_model_mib() - 50 + 1
    message = str(small.value)
    assert f"{short} MiB more than the largest offer (50 MiB of 2 usable node(s))" in message
    assert "no split needs less than" in message


def test_nothing_fits_says_how_many_nodes_of_what_size_would_run_it() -> None:
    two = split_mib(2)
    with pytest.raises(PlanError, match="no plan fits") as lone:
        planner(caps(HEAD, two)).best()
    assert f"it would run on 2 nodes offering {two} MiB each" in str(lone.value)
    # ... and with a second node of that size it does.
    assert len(planner(caps(HEAD, two), caps(B, two)).best().plan.stages) == 2


def test_assign_maps_a_hand_split_head_first_and_checks_it() -> None:
    p = planner(caps(HEAD), caps(B), caps(C))
    plan = p.assign([(0, 10), (10, 20), (20, 30)], connected=[B, C])
    assert plan.nodes[0] == HEAD and set(plan.nodes) == {HEAD, B, C}
    with pytest.raises(PlanError, match="3 stages but only 2"):
        p.assign([(0, 10), (10, 20), (20, 30)], connected=[B])
    tight = planner(caps(HEAD, stage_mib(0, 5)), caps(B))
    # The head cannot hold 20 layers: the big range goes to b, the head takes the small one.
    plan = tight.assign([(0, 5), (5, 30)], connected=[B])
    assert plan.stages[0].node == HEAD
    with pytest.raises(PlanError, match="needs about"):
        planner(caps(HEAD, 10), caps(B, 10)).assign([(0, 15), (15, 30)], connected=[B])


def test_prediction_adds_hops_and_splitting_is_slower_on_equal_nodes() -> None:
    p = planner(caps(HEAD), caps(B))
    solo = p.predict(Plan((StagePlan(HEAD, 0, 30),)))
    split = p.predict(Plan((StagePlan(HEAD, 0, 15), StagePlan(B, 15, 30))))
    assert solo.network_s == 0
    assert split.network_s > 0 and split.decode_s > solo.decode_s
    assert split.prefill_tok_s > solo.prefill_tok_s  # prompt chunks overlap on two machines


def test_caps_from_peer_json_is_validated() -> None:
    good = caps(B).to_json()
    assert NodeCaps.from_json(B, good).fingerprint == FP
    with pytest.raises(Exception, match="malformed capabilities"):
        NodeCaps.from_json(B, {**good, "free_memory": -1})
    junk = NodeCaps.from_json(B, {**good, "fingerprint": {"model": 3}})
    assert junk.fingerprint is None


def test_parse_size() -> None:
    assert parse_size("300M") == 300 * MIB
    assert parse_size("2g") == 2 << 30
    assert parse_size("1000") == 1000
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    for bad in ("", "lots", "-1G", "0", "nanM", "infG", "1e30T", "0.1"):
        with pytest.raises(UsageError, match="wants a size like 300M"):
            parse_size(bad, "--max-memory")


def test_the_head_keeps_its_flash_setting_unless_the_other_is_clearly_faster() -> None:
    assert choose_flash({False: 0.010, True: 0.0099}, own=False) is False  # within 3%
    assert choose_flash({False: 0.010, True: 0.0090}, own=False) is True  # 10% faster
    assert choose_flash({False: 0.0090, True: 0.010}, own=True) is False
    assert choose_flash({True: 0.010}, own=False) is True  # no plan runs with its own
    assert choose_flash({}, own=True) is True


def test_decode_prediction_counts_the_kv_cache_read_at_half_the_context() -> None:
    whole = Plan((StagePlan(HEAD, 0, N_LAYERS),))
    short, long = planner(caps(HEAD), n_ctx=256), planner(caps(HEAD), n_ctx=4096)
    assert short.extra_context == 0  # within what the calibration's decode already read
    kv_bytes = NEEDS.kv_bytes_per_token_layer * N_LAYERS * long.extra_context
    extra_s = long.predict(whole).compute_s - short.predict(whole).compute_s
    assert extra_s == pytest.approx(kv_bytes * SPEED)
    assert long.extra_context == 2048 - 140  # the probe decodes near position 128 + 24 / 2
