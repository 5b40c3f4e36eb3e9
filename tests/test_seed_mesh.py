"""Layers from the LAN with real processes (issue 14): a worker without the model file takes a
stage, fetches exactly its range from the members over QUIC, serves it, and the mesh's greedy
text equals the solo text."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.mesh.layer_transfer import CORRUPT_ENV
from meshchat.model.gguf_file import read_header
from meshchat.model.synthetic import synthetic_model
from meshchat.timeouts import LOAD_ENV
from tests.mesh_cluster import CMD, ENV, Cluster, Worker, read_json, solo_text, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Once upon a time, in a small village by the sea,"
TOKENS = "48"


class BareWorker(Worker):
    """A headless worker with no model file that takes layers from peers."""

    def __init__(self, root: Path, name: str, join: str, *extra: str) -> None:
        self.name = name
        self.dir = root / name
        self.status = root / f"{name}.status.json"
        self.invite_file = root / f"{name}.invite"
        self.log = root / f"{name}.log"
        args = [
            *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(self.dir),
            "--status-file", str(self.status), "--invite-file", str(self.invite_file),
            "--join", join, *extra,
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env=ENV, stdout=log, stderr=log)


def _bare_worker(cluster: Cluster, root: Path, *extra: str) -> BareWorker:
    """A BareWorker joined to `cluster` (with `extra` arguments), ready and connected to all."""
    bare = BareWorker(root, "bare", cluster.invite, *extra)
    cluster.workers.append(bare)
    wait_for(bare.ready, what="bare worker ready")
    cluster.wait_connected()
    return bare


@pytest.fixture
def cluster(smollm2: Path, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2)
        yield cluster
    finally:
        cluster.close()


def _generate(
    cluster: Cluster, model: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A head run; the first one of a test run waits for the machine's calibration, which takes
    minutes on this shared machine: a longer wait than Cluster.generate's."""
    return subprocess.run(
        cluster.head_args(PROMPT, model, "head", *extra),
        env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=500,
    )  # fmt: skip


def test_worker_without_model_gets_its_slice_and_text_equals_solo(
    cluster: Cluster, smollm2: Path, tmp_path: Path
) -> None:
    bare = _bare_worker(cluster, tmp_path, "--accept-layers", "500M")
    result = _generate(cluster, smollm2, "--max-tokens", TOKENS, "--split", "10,20")
    assert result.returncode == 0, result.stderr + bare.log.read_text()
    assert result.stdout == solo_text(smollm2, tmp_path, PROMPT, TOKENS)
    # The head said what the bare worker must fetch before the plan applied.
    assert "from the LAN first" in result.stderr
    # ... and, from the worker's status while the plan applied, when its fetch was done.
    assert f"node {bare.node_id[:8]}: got [" in result.stderr
    layers = bare.layers
    assert layers is not None
    seeded = list((bare.dir / "models" / "seeded").glob("*.gguf"))
    assert [p.name.rsplit("-", 2)[1:] for p in seeded] == [[str(layers[0]), f"{layers[1]}.gguf"]]
    status = read_json(bare.status)
    assert status["seeding"]["bytes"] == status["seeding"]["total"] > 0
    assert "seeding layers" in bare.log.read_text()
    # Once: a second run loads the stored slice; nothing is fetched again.
    mtime = seeded[0].stat().st_mtime_ns
    again = _generate(cluster, smollm2, "--max-tokens", "8", "--split", "10,20")
    assert again.returncode == 0, again.stderr
    assert seeded[0].stat().st_mtime_ns == mtime


def test_worker_without_accept_layers_gets_no_layers(
    cluster: Cluster, smollm2: Path, tmp_path: Path
) -> None:
    bare = _bare_worker(cluster, tmp_path)
    result = _generate(cluster, smollm2, "--max-tokens", "4", "--split", "10,20")
    # Three stages need three nodes holding the model: the bare worker does not count.
    assert result.returncode != 0
    assert not (bare.dir / "models" / "seeded").exists()
    wait_for(lambda: read_json(bare.status), what="status")
    assert "seeding" not in read_json(bare.status)


def test_corrupt_sender_is_caught_and_another_member_sends(
    cluster: Cluster, smollm2: Path, tmp_path: Path
) -> None:
    """The head's server spoils every chunk of the token embeddings (test hook): the bare worker
    names it in one line, fetches the layers from the other member, and the text is solo's."""
    cluster.add(smollm2)
    bare = _bare_worker(cluster, tmp_path, "--accept-layers", "500M")
    # Four stages on four nodes: the bare worker is sure to take one.
    split = ("--max-tokens", TOKENS, "--split", "8,16,23")
    result = _generate(cluster, smollm2, *split, env={CORRUPT_ENV: "token_embd"})
    assert result.returncode == 0, result.stderr + bare.log.read_text()
    assert result.stdout == solo_text(smollm2, tmp_path, PROMPT, TOKENS)
    blamed = [line for line in bare.log.read_text().splitlines() if "not used again" in line]
    assert len(blamed) == 1 and "the global tensors that do not match" in blamed[0]
    (entry,) = (bare.dir / "models" / "seeded").glob("*.json")
    origin = json.loads(entry.read_text())["origin"]
    # An honest holder sent the embeddings (the head sent the header, which was fine).
    assert {w.node_id for w in cluster.workers[:2]} & set(origin)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_at_plan_time_falls_back_to_the_holders(
    cluster: Cluster, smollm2: Path, tmp_path: Path
) -> None:
    """The bare worker's store is a 4 MiB tmpfs: its fetch fails with one line, the head plans
    again without it over the nodes that hold the layers, and the text is still solo's."""
    seeded = tmp_path / "bare" / "models" / "seeded"
    seeded.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(seeded)], check=True)
    try:
        bare = _bare_worker(cluster, tmp_path, "--accept-layers", "500M")
        result = _generate(cluster, smollm2, "--max-tokens", TOKENS, "--split", "10,20")
        assert result.returncode == 0, result.stderr + bare.log.read_text()
        assert result.stdout == solo_text(smollm2, tmp_path, PROMPT, TOKENS)
        why = [line for line in result.stderr.splitlines() if "planning again" in line]
        assert len(why) == 1, result.stderr
        assert f"node {bare.node_id[:8]}" in why[0] and "could not get layers" in why[0]
        assert f"without node {bare.node_id[:8]}" in why[0] and "disk" in why[0]
        assert bare.layers is None  # it serves nothing; the two holders run the model
        assert list(seeded.iterdir()) in ([], [seeded / "partial"]) and not any(
            seeded.rglob("*.gguf")
        )
    finally:
        cluster.close()
        subprocess.run(["umount", "-l", str(seeded)], check=False)


def test_big_fetch_is_outside_the_load_timeout(smollm2: Path, tmp_path: Path) -> None:
    """The head's load timeout is cut to 3 s (test hook) while the bare worker's slice of a
    synthetic model takes longer than that to fetch: the fetch has its own allowance (from its
    size), before the load, so the plan applies and the text is solo's."""
    model = synthetic_model("600M", smollm2, tmp_path / "cache")
    header = read_header(model)
    n_layers = int(header.get(f"{header.arch}.block_count", 0))
    cluster = Cluster(tmp_path)
    try:
        first = cluster.add(model)
        bare = _bare_worker(cluster, tmp_path, "--accept-layers", "2G")
        split = ("--max-tokens", "16", "--split", f"{n_layers // 3},{2 * n_layers // 3}")
        result = _generate(cluster, model, *split, env={LOAD_ENV: "3"})
        assert result.returncode == 0, result.stderr + bare.log.read_text()
        assert result.stdout == solo_text(model, tmp_path, PROMPT, "16")
        status = read_json(bare.status)["seeding"]
        assert status["bytes"] == status["total"] > 0
        # The fetch alone took longer than the whole load timeout: it was not inside it.
        assert status["elapsed_s"] > 3.0, status
        assert first.layers is not None and bare.layers is not None
    finally:
        cluster.close()


def test_wrong_bytes_from_every_source_falls_back_to_the_holders(
    smollm2: Path, tmp_path: Path
) -> None:
    """Both holders' servers spoil the token embeddings (test hook): the bare worker names each
    in one line, gives up on its range, and the head plans again without it; solo text."""
    spoil = {CORRUPT_ENV: "token_embd"}
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2, spoil)
        bare = _bare_worker(cluster, tmp_path, "--accept-layers", "500M")
        result = _generate(cluster, smollm2, "--max-tokens", TOKENS, "--split", "10,20", env=spoil)
        assert result.returncode == 0, result.stderr + bare.log.read_text()
        assert result.stdout == solo_text(smollm2, tmp_path, PROMPT, TOKENS)
        why = [line for line in result.stderr.splitlines() if "planning again" in line]
        assert len(why) == 1 and f"without node {bare.node_id[:8]}" in why[0], result.stderr
        assert "no member can send layers" in why[0]
        blamed = [line for line in bare.log.read_text().splitlines() if "not used again" in line]
        assert len(blamed) == 2, blamed  # each holder named once
        assert bare.layers is None
        assert not list((bare.dir / "models" / "seeded").glob("*.gguf"))
    finally:
        cluster.close()
