"""Layers from the LAN (issue 14): real QUIC nodes on loopback move a planned layer range.

Each test checks the seeded slice byte for byte against the slice cut from the model itself,
so a transfer that lost, reordered or corrupted a byte cannot pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.inference.seeding import seed_for_plan
from meshchat.mesh import wire
from meshchat.mesh.layer_transfer import (
    LayerFetcher,
    LayerServer,
    Progress,
    SeedError,
    SeedingReport,
    SeedPermits,
)
from meshchat.mesh.node import Node, NodeEvent, Refused
from meshchat.model.fingerprint import Fingerprint, fingerprint_of
from meshchat.model.gguf_file import GGUFHeader, read_header
from meshchat.model.seeded import SeedStore
from meshchat.model.slices import LayerRange, write_slice
from meshchat.paths import DataDir
from meshchat.tui.mesh_view import NodeMesh
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(120)

RANGE = LayerRange(10, 14)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def model(
    smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GGUFHeader, Fingerprint]:
    header = read_header(smollm2)
    return header, fingerprint_of(smollm2, tmp_path_factory.mktemp("fp"))


@pytest.fixture(scope="module")
def expected(
    model: tuple[GGUFHeader, Fingerprint], tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    """The slice cut locally from the model file: what a seeded slice must equal."""
    header, fp = model
    dest = tmp_path_factory.mktemp("expected") / "slice.gguf"
    write_slice(header, RANGE, fp.model, dest)
    return dest.read_bytes()


async def _seeders(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], count: int
) -> tuple[Node, list[tuple[Node, LayerServer]]]:
    """A fetching node joined to `count` nodes that offer the model and plan RANGE for it."""
    header, fp = model
    fetcher = await mesh.new("fetcher")
    servers = []
    for i in range(count):
        node = await mesh.new(f"seed{i}")
        permits = SeedPermits()
        permits.allow(fetcher.node_id, fp.model, RANGE.first, RANGE.end)
        server = LayerServer(node, permits)
        server.offer(fp, header)
        server.start()
        servers.append((node, server))
        await fetcher.join(node.create_invite())
    return fetcher, servers


def _partials(store: SeedStore) -> list[Path]:
    return list(store.partial_dir.iterdir()) if store.partial_dir.is_dir() else []


async def test_slice_arrives_verified_and_identical(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], expected: bytes, tmp_path: Path
) -> None:
    fetcher, servers = await _seeders(mesh, model, 2)
    store = SeedStore(tmp_path / "seeded")
    seen: list[Progress] = []
    job = LayerFetcher(
        fetcher, model[1], RANGE, store, [n.node_id for n, _ in servers], on_progress=seen.append
    )
    path = await job.run()
    assert path.read_bytes() == expected
    (entry,) = store.slices()
    assert entry.layers == RANGE and entry.fingerprint == model[1]
    # Both members sent units: several sources at once.
    assert set(entry.origin) == {n.node_id for n, _ in servers}
    assert job.progress.done == job.progress.total > 0 and seen
    assert _partials(store) == []
    # Once: asking again reads the store, no byte travels.
    again = LayerFetcher(fetcher, model[1], RANGE, store, [servers[0][0].node_id])
    assert await again.run() == path and again.progress.fetched == 0


def _model_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshchat.cli", "model", *args, "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_model_list_shows_seeded_slices_and_rm_frees_them(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], tmp_path: Path
) -> None:
    fetcher, [(seed, _)] = await _seeders(mesh, model, 1)
    data = tmp_path / "data"
    store = SeedStore.in_store(data / "models")
    path = await LayerFetcher(fetcher, model[1], RANGE, store, [seed.node_id]).run()
    listed = _model_cli(data, "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if path.name in line)
    assert f"seeded layers {RANGE}" in line and str(seed.node_id)[:12] in line and "MB" in line
    assert _model_cli(data, "rm", "nothing-like-this").returncode == 2
    removed = _model_cli(data, "rm", model[1].model[:12])
    assert removed.returncode == 0, removed.stderr
    assert not path.exists() and store.slices() == [] and store.used() == 0


async def test_unplanned_range_and_unoffered_model_refused(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], tmp_path: Path
) -> None:
    fetcher, [(seed, _)] = await _seeders(mesh, model, 1)
    fp = model[1]
    store = SeedStore(tmp_path / "seeded")
    with pytest.raises(SeedError, match="no member sent the header"):
        await LayerFetcher(fetcher, fp, LayerRange(0, 10), store, [seed.node_id]).run()
    for msg in (
        wire.LayerFetch(fp.model, 0, 10, "blk.0.attn_q.weight", 0, 1024),  # not planned for us
        wire.LayerFetch("0" * 64, RANGE.first, RANGE.end, "", 0, 1024),  # not offered
        wire.LayerFetch(fp.model, RANGE.first, RANGE.end, "blk.0.attn_q.weight", 0, 1024),
        wire.LayerFetch(fp.model, RANGE.first, RANGE.end, "blk.10.attn_q.weight", 1 << 40, 16),
    ):
        with pytest.raises(Refused):
            await fetcher.request(seed.node_id, msg)
    assert store.slices() == [] and _partials(store) == []
    # The sender still serves what is planned.
    reply = await fetcher.request(
        seed.node_id, wire.LayerFetch(fp.model, RANGE.first, RANGE.end, "", 0, 64)
    )
    assert isinstance(reply, wire.LayerData) and bytes(reply.data[:4]) == b"GGUF"


async def test_corrupt_chunk_caught_sender_named_and_refetched(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], expected: bytes, tmp_path: Path
) -> None:
    fetcher, servers = await _seeders(mesh, model, 2)
    bad, bad_server = servers[0]
    bad_server.corrupt = "token_embd"  # what CORRUPT_ENV sets; the first source gets globals
    store = SeedStore(tmp_path / "seeded")
    lines: list[str] = []
    job = LayerFetcher(
        fetcher, model[1], RANGE, store, [n.node_id for n, _ in servers], warn=lines.append
    )
    path = await job.run()
    assert path.read_bytes() == expected
    assert job.banned == {bad.node_id}
    assert len(lines) == 1 and str(bad.node_id) in lines[0] and "not used again" in lines[0]


async def test_corrupt_only_source_stores_nothing(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], tmp_path: Path
) -> None:
    fetcher, [(seed, server)] = await _seeders(mesh, model, 1)
    server.corrupt = "blk.1"  # every layer of RANGE
    store = SeedStore(tmp_path / "seeded")
    with pytest.raises(SeedError, match="no member can send"):
        await LayerFetcher(fetcher, model[1], RANGE, store, [seed.node_id]).run()
    assert store.slices() == []


async def test_sender_leaves_midway_second_source_finishes(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], expected: bytes, tmp_path: Path
) -> None:
    fetcher, servers = await _seeders(mesh, model, 2)
    first, _ = servers[0]
    stopping: list[asyncio.Task[None]] = []

    def on_progress(p: Progress) -> None:
        if p.fetched > 0 and not stopping:
            stopping.append(asyncio.ensure_future(first.stop()))

    store = SeedStore(tmp_path / "seeded")
    job = LayerFetcher(
        fetcher, model[1], RANGE, store, [n.node_id for n, _ in servers], on_progress=on_progress
    )
    path = await job.run()
    assert stopping and path.read_bytes() == expected


async def test_restart_resumes_where_it_stopped(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], expected: bytes, tmp_path: Path
) -> None:
    fetcher, [(seed, _)] = await _seeders(mesh, model, 1)
    store = SeedStore(tmp_path / "seeded")
    half: asyncio.Event = asyncio.Event()

    def on_progress(p: Progress) -> None:
        if p.done > p.total // 2:
            half.set()

    job = LayerFetcher(fetcher, model[1], RANGE, store, [seed.node_id], on_progress=on_progress)
    task = asyncio.ensure_future(job.run())
    await half.wait()
    task.cancel()  # the process stops here (as a restart would)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert _partials(store) and store.slices() == []
    resumed = LayerFetcher(fetcher, model[1], RANGE, store, [seed.node_id])
    path = await resumed.run()
    assert path.read_bytes() == expected
    # At least the bytes of the last resume record (every 8 MiB) were not fetched again.
    assert 0 < resumed.progress.fetched <= resumed.progress.total - (8 << 20)
    assert _partials(store) == []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_full_disk_one_line_partial_removed(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], tmp_path: Path
) -> None:
    fetcher, [(seed, _)] = await _seeders(mesh, model, 1)
    with _tmpfs(tmp_path / "small", "96m") as disk:
        store = SeedStore(disk / "seeded")
        filled: list[bool] = []

        def fill_disk(p: Progress) -> None:
            # Another program takes the disk once the transfer has passed its room check.
            if p.fetched and not filled:
                filled.append(True)
                with contextlib.suppress(OSError), open(disk / "filler", "wb") as out:
                    while True:
                        out.write(b"\0" * (1 << 20))

        job = LayerFetcher(fetcher, model[1], RANGE, store, [seed.node_id], on_progress=fill_disk)
        with pytest.raises(SeedError, match="no space left") as caught:
            await job.run()
        assert "\n" not in str(caught.value) and filled
        assert store.slices() == [] and _partials(store) == []
        (disk / "filler").unlink()
        # Over the disk budget: refused before a layer moves.
        small = SeedStore(disk / "s2", budget=8 << 20)
        with pytest.raises(SeedError, match="disk budget"):
            await LayerFetcher(fetcher, model[1], RANGE, small, [seed.node_id]).run()
        assert small.slices() == [] and _partials(small) == []


def test_layer_frames_out_of_bounds_are_protocol_errors() -> None:
    head = wire.LAYER_DATA_HEAD
    for body in (
        b"\0" * 5,  # truncated header
        head.pack(10, 5, 100) + b"x",  # chunk past the end of its part
        head.pack(0, 100, 50) + b"x",  # part larger than the file
    ):
        with pytest.raises(wire.ProtocolError):
            wire.decode_body(wire.MsgType.LAYER_DATA, body)
    too_long = wire.encode_header(wire.MsgType.LAYER_DATA, 1) + b""
    oversized = bytearray(too_long)
    oversized[4:8] = (head.size + wire.MAX_LAYER_CHUNK + 1).to_bytes(4, "big")
    with pytest.raises(wire.ProtocolError, match="exceeds limit"):
        wire.check_header(bytes(oversized))
    good = {"model": "m" * 64, "first": 0, "end": 4, "part": "", "offset": 0, "length": 16}
    for bad in ({"length": 0}, {"length": wire.MAX_LAYER_CHUNK + 1}, {"first": 4}, {"end": 5000},
                {"offset": -1}, {"part": "p" * 300}, {"model": ""}):  # fmt: skip
        body = json.dumps({**good, **bad}).encode()
        with pytest.raises(wire.ProtocolError):
            wire.decode_body(wire.MsgType.LAYER_FETCH, body)
    msg = wire.decode_body(wire.MsgType.LAYER_FETCH, json.dumps(good).encode())
    assert msg == wire.LayerFetch("m" * 64, 0, 4, "", 0, 16)
    data = wire.LayerData(3, 10, 20, b"abc")
    assert wire.decode_body(wire.MsgType.LAYER_DATA, wire.encode_body(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_layer_data_body_decodes_or_is_a_protocol_error(body: bytes) -> None:
    try:
        msg = wire.decode_body(wire.MsgType.LAYER_DATA, body)
    except wire.ProtocolError:
        return
    assert isinstance(msg, wire.LayerData) and msg.offset + len(msg.data) <= msg.total


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    layers=_JSON | st.lists(st.integers(), min_size=2, max_size=2),
    done=_JSON,
    total=_JSON,
    rate=_JSON,
    eta=_JSON,
)
def test_a_peers_seeding_report_is_shown_or_dropped_never_raises(
    layers: object, done: object, total: object, rate: object, eta: object
) -> None:
    """A member's status is peer input: any shape gives a cell or None, never an exception."""
    body = {"layers": layers, "bytes": done, "total": total, "rate_mb_s": rate, "eta_s": eta}
    report = SeedingReport.from_json(body)
    if report is not None:
        assert report.cell().startswith(("getting [", "got ["))
    assert SeedingReport.from_json([body]) is None


def test_seeding_report_cell_text() -> None:
    body = {"layers": [10, 20], "bytes": 50, "total": 200, "rate_mb_s": 21.4, "eta_s": 75.0}
    report = SeedingReport.from_json(body)
    assert report is not None and report.cell() == "getting [10,20) 25% 21 MB/s 1:15 left"
    done = SeedingReport.from_json({**body, "bytes": 200, "eta_s": None})
    assert done is not None and done.cell() == "got [10,20)"
    for bad in ({"bytes": 201}, {"layers": [20, 10]}, {"rate_mb_s": float("nan")}, {"bytes": True}):
        assert SeedingReport.from_json({**body, **bad}) is None


async def test_members_see_a_transfer_in_their_peers_table_then_the_state_again(
    mesh: MeshNodes, model: tuple[GGUFHeader, Fingerprint], tmp_path: Path
) -> None:
    """seed_for_plan tells the members how its fetch goes (status, at most once a second and at
    the end); the sender's peers table shows it on the fetcher's row, then nothing once done."""
    fp = model[1]
    fetcher, [(seed, _)] = await _seeders(mesh, model, 1)
    tail = await mesh.new("tail")  # the plan's last stage (not a source: it is not connected)
    stages = (
        wire.PlanStage(seed.node_id, 0, RANGE.first),
        wire.PlanStage(fetcher.node_id, RANGE.first, RANGE.end),
        wire.PlanStage(tail.node_id, RANGE.end, len(fp.layers)),
    )
    msg = wire.Plan("p1", stages, fp, 256, 1, wire.DType.F32, False)
    view = NodeMesh(seed)
    cells: list[str] = []

    def on_event(event: NodeEvent) -> None:
        if event.kind == "status" and event.node_id == fetcher.node_id:
            cells.extend(r.seeding for r in view.peers() if r.key == fetcher.node_id)

    seed.add_listener(on_event)
    seeded = await seed_for_plan(fetcher, DataDir(tmp_path / "f"), 1 << 30, seed.node_id, msg)
    assert seeded.held == RANGE
    await eventually(lambda: bool(cells) and cells[-1] == "")
    shown = [c for c in cells if c]
    assert shown[0].startswith("getting [10,14) ") and shown[-1] == "got [10,14)", cells
