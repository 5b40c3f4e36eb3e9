"""hop_timing: the per-hop split adds up, on made-up marks and on the real path (QUIC, llama)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.engine.sampling import SamplingParams
from meshchat.inference import hop_timing
from meshchat.inference.hop_timing import END, Event, Mark, per_hop_summary, stage_order, tokens
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.planner import Plan, StagePlan
from meshchat.inference.stage_service import StageService
from meshchat.paths import DataDir
from tests.mesh_helpers import eventually, mesh_nodes

pytestmark = pytest.mark.timeout(120)

HEAD_OUT = (Mark.START, Mark.COMPUTE, Mark.COMPUTED, Mark.FRAMED, Mark.SENT)
STAGE = (Mark.RECEIVED, Mark.ARRIVED, Mark.DEQUEUED, Mark.COMPUTE, Mark.COMPUTED, Mark.FRAMED,
         Mark.SENT)  # fmt: skip
HEAD_IN = (Mark.RECEIVED, Mark.ARRIVED, Mark.END)


def _token(steps: list[float], stages: int, session: int = 7, position: int = 3) -> list[Event]:
    """Marks of one token along head → `stages` stages → head, `steps` apart (seconds)."""
    visits = [(0, HEAD_OUT)]
    visits += [(stage_order(10 * i), STAGE) for i in range(stages)]
    visits.append((END, HEAD_IN))
    events, t, k = [], 100.0, 0
    for order, marks in visits:
        for mark in marks:
            events.append(Event(session, position, order, mark, t))
            t += steps[k % len(steps)]
            k += 1
    return events


def test_a_token_splits_into_parts_that_add_up_to_its_overhead() -> None:
    events = _token([0.001], 2)  # every mark 1 ms after the one before
    [token] = tokens(events)
    assert token.hops == 3
    # 5 + 7 + 7 + 3 marks, 21 steps of 1 ms from START to END; 3 of them are compute.
    assert token.wall == pytest.approx(0.021)
    assert token.compute == pytest.approx(0.003)
    assert sum(token.parts.values()) == pytest.approx(token.wall - token.compute)
    assert token.parts["wire"] == pytest.approx(0.003)  # one per hop
    assert token.parts["queue"] == pytest.approx(0.002)  # stages only
    assert token.overhead_per_hop == pytest.approx(0.006)
    summary = per_hop_summary(events)
    assert summary == {
        "3 hops": {
            "tokens": 1, "p50_ms": 6.0, "p99_ms": 6.0, "encode_ms": 1.0, "send_ms": 1.0,
            "wire_ms": 1.0, "receive_ms": 1.0, "queue_ms": 0.667, "decode_ms": 0.667,
            "head_ms": 0.667,
        }
    }  # fmt: skip


def test_incomplete_tokens_and_torn_lines_are_left_out(tmp_path: Path) -> None:
    whole = _token([0.001], 1, position=1)
    partial = [e for e in _token([0.001], 1, position=2) if e.mark is not Mark.DEQUEUED]
    assert [t.hops for t in tokens(whole + partial)] == [2]
    recorder = hop_timing.Recorder(tmp_path)
    for e in whole:
        recorder.mark(e.session, e.position, e.order, e.mark, e.t)
    recorder.close()
    with recorder.path.open("a") as f:
        f.write("1 2 3\nnot a mark at all\n1 2 0 99 1.0\n1 2 0 1")  # torn, foreign, bad mark
    assert hop_timing.load(tmp_path) == whole


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(1e-6, 0.01), min_size=1, max_size=30),
    st.integers(1, 4),
)
def test_parts_and_compute_always_add_up_to_the_wall_time(steps: list[float], stages: int) -> None:
    [token] = tokens(_token(steps, stages))
    assert token.hops == stages + 1
    assert min(token.parts.values()) >= 0
    assert sum(token.parts.values()) + token.compute == pytest.approx(token.wall, rel=1e-9)


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[hop_timing.Recorder]:
    assert hop_timing.RECORDER is None  # off unless asked for
    recorder = hop_timing.RECORDER = hop_timing.Recorder(tmp_path / "trace")
    try:
        yield recorder
    finally:
        hop_timing.RECORDER = None
        recorder.close()


async def test_the_real_path_is_split_sensibly(
    tiny_models: dict[str, Path], tmp_path: Path, recorder: hop_timing.Recorder
) -> None:
    """Head [0,3) → w1 [3,6) → w2 [6,8) → head over real QUIC: every decode token is traced,
    its parts are each >= 0 and with compute add up to its time."""
    model_path = tiny_models["llama"]
    async with mesh_nodes(tmp_path / "nodes") as nodes:
        workers, services = [], []
        for i in range(2):
            node = await nodes.new()
            data = DataDir(tmp_path / f"w{i}")
            service = StageService(node, LocalModel.open(model_path, data), data, threads=1)
            await service.start()
            workers.append(node)
            services.append(service)
        head = await nodes.new()
        for w in workers:
            await w.join(head.create_invite())
        await eventually(lambda: all(w.node_id in head.connected() for w in workers), 15)
        await eventually(lambda: workers[0].node_id in workers[1].connected(), 15)
        data = DataDir(tmp_path / "head")
        pipeline = MeshPipeline(head, LocalModel.open(model_path, data), data, threads=1, n_ctx=256)
        ids = [n.node_id for n in (head, *workers)]
        try:
            await pipeline.apply(
                Plan((StagePlan(ids[0], 0, 3), StagePlan(ids[1], 3, 6), StagePlan(ids[2], 6, 8)))
            )
            session = uuid.uuid4().hex
            await pipeline.open_session(session)
            await pipeline.configure_sampling(session, SamplingParams(temperature=0.0))
            token = await pipeline.forward(session, 0, [1, 17, 400, 9000, 23])
            for position in range(5, 17):
                token = await pipeline.forward(session, position, [token])
            await pipeline.close_session(session)
        finally:
            await pipeline.close()
            for service in services:
                await service.stop()
    recorder.flush()
    traced = tokens(hop_timing.load(recorder.path.parent))
    assert len(traced) == 12 and {t.hops for t in traced} == {3}
    for t in traced:
        assert min(t.parts.values()) >= 0, t.parts
        assert t.compute > 0
        assert sum(t.parts.values()) + t.compute == pytest.approx(t.wall, rel=1e-6)
        # The network parts of three hops on loopback are there and are not compute.
        assert t.parts["send"] > 0 and t.parts["receive"] > 0 and t.parts["wire"] > 0
    summary = per_hop_summary(hop_timing.load(recorder.path.parent))
    row = summary["3 hops"]
    assert row["tokens"] == 12 and 0 < row["p50_ms"] <= row["p99_ms"]
