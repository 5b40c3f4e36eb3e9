"""Planning with seeding (issue 14): who counts, what each must fetch, and hostile caps."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.config import parse_config
from meshchat.errors import MeshchatError, UsageError
from meshchat.headless import accept_layers_budget
from meshchat.inference.capabilities import LayerFile, NodeCaps
from meshchat.inference.planner import Plan, StagePlan
from meshchat.inference.seeding import transfers, with_seedable
from meshchat.mesh.identity import NodeId
from tests.node_names import HEAD, B, C
from tests.test_planner import FP, MIB, N_LAYERS, NEEDS, caps, planner

OFFER = (LayerFile(FP.model, 0, N_LAYERS),)


def bare(node: NodeId, budget: int = 1 << 30) -> NodeCaps:
    """A node with no model file and no speeds of its own (it cannot measure a model)."""
    return replace(caps(node), fingerprint=None, decode_s_per_byte=0.0, prefill_s_per_byte=0.0,
                   accept_layers=budget)  # fmt: skip


def test_a_member_that_accepts_layers_counts_when_someone_offers_the_file() -> None:
    head = replace(caps(HEAD), layer_files=OFFER)
    found = with_seedable([head, bare(B), bare(C, budget=0)], head)
    b, c = found[1], found[2]
    assert b.fingerprint == FP and b.decode_s_per_byte == head.decode_s_per_byte
    assert c.fingerprint is None  # it did not say it takes layers
    plan = planner(*found).assign([(0, 15), (15, 30)], connected=[B, C])
    assert plan.stages[1].node == B


def test_a_small_disk_budget_keeps_big_ranges_away() -> None:
    head = replace(caps(HEAD, memory_mib=60), layer_files=OFFER)
    found = with_seedable([head, bare(B, budget=30 * MIB)], head)
    assert found[1].free_memory == 15 * MIB
    p = planner(*found)
    # 25 layers of 2 MiB plus KV and buffers cannot fit b's budget: refused with the reason.
    assert p.violations(Plan((StagePlan(HEAD, 0, 5), StagePlan(B, 5, 30))))


def test_nobody_offers_the_file_nobody_is_counted_in() -> None:
    head = caps(HEAD)  # runs the model but serves no file
    found = with_seedable([head, bare(B)], head)
    assert found[1].fingerprint is None


def test_transfers_list_only_nodes_without_the_file_with_their_bytes() -> None:
    raw = [replace(caps(HEAD), layer_files=OFFER), bare(B), caps(C)]
    plan = Plan((StagePlan(HEAD, 0, 10), StagePlan(B, 10, 20), StagePlan(C, 20, 30)))
    (t,) = transfers(plan, raw, NEEDS)
    # Ten layers and the global tensors (counted as the output matrix).
    assert (t.node, t.first, t.end, t.bytes) == (B, 10, 20, 20 * MIB + 30 * MIB)
    assert "layers [10,20) from the LAN first: 52 MB" in t.note()
    last = Plan((StagePlan(HEAD, 0, 10), StagePlan(B, 10, 30)))
    assert transfers(last, raw, NEEDS)[0].bytes == 40 * MIB + 30 * MIB


def test_caps_round_trip_layer_files_and_budget() -> None:
    mine = replace(caps(B), layer_files=OFFER, accept_layers=5 << 30)
    back = NodeCaps.from_json(B, mine.to_json())
    assert back.layer_files == OFFER and back.accept_layers == 5 << 30
    assert back.offers(FP.model, 10, 20) and not back.offers("x" * 64, 10, 20)


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_files", [["m" * 64, 5, 5]]),  # empty range
        ("layer_files", [["m" * 64, -1, 5]]),
        ("layer_files", [["m" * 200, 0, 5]]),  # digest too long
        ("layer_files", [["m" * 64, 0, 5]] * 65),  # too many files
        ("layer_files", [["m" * 64, 0, True]]),  # a boolean is not a layer
        ("layer_files", {"m": [0, 5]}),
        ("accept_layers", -1),
        ("accept_layers", 1.5),
        ("accept_layers", 1 << 62),
    ],
)
def test_hostile_caps_are_refused_whole(field: str, value: object) -> None:
    good = caps(B).to_json()
    with pytest.raises(MeshchatError, match="malformed capabilities"):
        NodeCaps.from_json(B, {**good, field: value})


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8), st.lists, max_leaves=12))
def test_any_layer_files_value_parses_or_is_refused(value: object) -> None:
    good = caps(B).to_json()
    try:
        parsed = NodeCaps.from_json(B, {**good, "layer_files": value})
    except MeshchatError:
        return
    assert all(0 <= f.first < f.end for f in parsed.layer_files)


def test_accept_layers_from_flag_or_config() -> None:
    assert accept_layers_budget(argparse.Namespace(accept_layers="1G")) == 1 << 30
    with pytest.raises(UsageError, match="--accept-layers wants a size"):
        accept_layers_budget(argparse.Namespace(accept_layers="lots"))
    config = parse_config('accept_layers = "4G"\n')
    assert config.accept_layers == "4G" and not config.problems
    assert "accept_layers" in parse_config("accept_layers = 4\n").problems[0]
