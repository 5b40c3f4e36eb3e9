"""Distributed generation with real processes on 127.0.0.1: parity with solo, and failover.

Two `meshchat --headless` workers plus a `meshchat generate --join` head. Greedy output must
equal the solo `meshchat generate` output exactly, with hand splits, with an automatic plan,
and when the middle stage is killed (SIGKILL) or frozen (SIGSTOP past the dead-peer timeout)
at a random point of a long generation.
"""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.engine.probe import FAULT_ENV
from tests.mesh_cluster import CMD, ENV, Cluster, StreamingHead, read_json, solo_text, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Once upon a time, in a small village by the sea,"
LONG_TOKENS = "200"


@pytest.fixture(scope="module")
def solo_long(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    text = solo_text(smollm2, tmp_path_factory.mktemp("solo"), PROMPT, LONG_TOKENS)
    assert len(text) > 400  # a long greedy generation, not an early end-of-text
    return text


@pytest.fixture(scope="module")
def mesh(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two workers that outlive the tests which do not harm them."""
    cluster = Cluster(tmp_path_factory.mktemp("mesh"))
    try:
        cluster.add(smollm2)
        cluster.add(smollm2)
        cluster.wait_connected()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def fresh_mesh(smollm2: Path, tmp_path: Path) -> Iterator[Cluster]:
    """Two workers for a test that kills or freezes one of them."""
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2)
        cluster.add(smollm2)
        cluster.wait_connected()
        yield cluster
    finally:
        cluster.close()


def _plan_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "plan [" in line)


@pytest.mark.parametrize("split", ["10,20", "7,22", "15"])
def test_hand_split_equals_solo(mesh: Cluster, smollm2: Path, solo_long: str, split: str) -> None:
    result = mesh.generate(PROMPT, smollm2, "--max-tokens", LONG_TOKENS, "--split", split)
    assert result.returncode == 0, result.stderr
    assert result.stdout == solo_long
    plan = _plan_line(result.stderr)
    stages = split.count(",") + 2
    assert plan.count(" on ") == stages and "(head)" in plan
    for boundary in split.split(","):
        assert f",{boundary})" in plan


def test_auto_plan_splits_when_no_node_holds_the_model(
    smollm2: Path, tmp_path: Path, solo_long: str
) -> None:
    # 200 MiB holds a two-way split (192 MiB a node, planner estimate), not the whole model
    # (243 MiB) with its 4096-token KV cache: the planner must split.
    small = {"MESHCHAT_MEMORY_LIMIT": "200M"}
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2, env=small)
        cluster.add(smollm2, env=small)
        cluster.wait_connected()
        result = cluster.generate(PROMPT, smollm2, "--max-tokens", LONG_TOKENS, env=small)
    finally:
        cluster.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == solo_long
    plan = _plan_line(result.stderr)
    assert plan.count(" on ") >= 2 and "(head)" in plan, result.stderr
    assert "fits on no single node" in result.stderr


def test_auto_plan_says_when_splitting_is_not_worth_it(mesh: Cluster, smollm2: Path) -> None:
    result = mesh.generate(PROMPT, smollm2, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "splitting is not worth it" in result.stderr
    assert _plan_line(result.stderr).count(" on ") == 1


def test_workers_show_their_layer_range_in_the_status_file(mesh: Cluster, smollm2: Path) -> None:
    result = mesh.generate(PROMPT, smollm2, "--max-tokens", "4", "--split", "10,20")
    assert result.returncode == 0, result.stderr
    # The status file is rewritten every second.
    wanted = [(10, 20), (20, 30)]
    wait_for(lambda: sorted(tuple(w.layers or ()) for w in mesh.workers) == wanted, 5)
    status = read_json(mesh.workers[0].status)
    assert status["model"]["fingerprint"]


def test_a_node_with_another_model_gets_no_layers(
    mesh: Cluster, smollm2: Path, tiny_models: dict[str, Path]
) -> None:
    stranger = mesh.add(tiny_models["llama"])
    try:
        wait_for(lambda: stranger.layers is None and read_json(stranger.status), what="stranger")
        result = mesh.generate(
            PROMPT, smollm2, "--max-tokens", "4", env={"MESHCHAT_MEMORY_LIMIT": "200M"}
        )
        assert result.returncode == 0, result.stderr
        short = stranger.node_id[:8]
        assert f"node {short} has a different model" in result.stderr
        assert short not in _plan_line(result.stderr)
        assert stranger.layers is None
        # A hand plan cannot force it either: three stages need three matching nodes... and
        # with the stranger as the only spare node the split is refused with a reason.
        refused = mesh.generate(PROMPT, smollm2, "--max-tokens", "4", "--split", "5,10,20")
        assert refused.returncode == 1
        assert "fingerprint mismatch" in refused.stderr or "can take part" in refused.stderr
        assert len(refused.stderr.strip().splitlines()[-1]) > 0
    finally:
        stranger.stop()
        mesh.workers.remove(stranger)


def _strike(cluster: Cluster, smollm2: Path, solo: str, sig: signal.Signals) -> str:
    """Run a long generation over three stages and hit the middle one mid-way."""
    head = StreamingHead(
        cluster.head_args(PROMPT, smollm2, "head", "--max-tokens", LONG_TOKENS, "--split", "10,20")
    )
    wait_for(lambda: all(w.layers for w in cluster.workers), what="stages loaded")
    middle = next(w for w in cluster.workers if w.layers == [10, 20])
    head.wait_output(random.randint(len(solo) // 10, len(solo) // 2))
    middle.proc.send_signal(sig)
    code, out, err = head.finish()
    assert code == 0, err
    assert out == solo, err
    assert "left the mesh" in err and "new plan" in err
    return err


def test_sigkill_of_the_middle_stage_keeps_the_output(
    fresh_mesh: Cluster, smollm2: Path, solo_long: str
) -> None:
    _strike(fresh_mesh, smollm2, solo_long, signal.SIGKILL)


def test_sigstop_past_the_dead_peer_timeout_keeps_the_output(
    fresh_mesh: Cluster, smollm2: Path, solo_long: str
) -> None:
    _strike(fresh_mesh, smollm2, solo_long, signal.SIGSTOP)
    frozen = next(w for w in fresh_mesh.workers if w.proc.poll() is None and w.layers == [10, 20])
    frozen.proc.send_signal(signal.SIGCONT)
    # The node comes back: it drops the old head's sessions and keeps serving.
    wait_for(lambda: read_json(frozen.status)["peers"], what="frozen node alive")
    again = fresh_mesh.generate(PROMPT, smollm2, "--max-tokens", "8", "--split", "10,20")
    assert again.returncode == 0, again.stderr
    assert solo_long.startswith(again.stdout.rstrip("\n"))


def test_no_plan_fits_the_survivors_fails_with_a_clear_message(
    smollm2: Path, tmp_path: Path, solo_long: str
) -> None:
    # Three nodes of 180 MiB each can hold the model (174 MiB a node); two cannot (192).
    small = {"MESHCHAT_MEMORY_LIMIT": "180M"}
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2, env=small)
        cluster.add(smollm2, env=small)
        cluster.wait_connected()
        head = StreamingHead(
            cluster.head_args(PROMPT, smollm2, "head", "--max-tokens", LONG_TOKENS), env=small
        )
        wait_for(lambda: all(w.layers for w in cluster.workers), what="stages loaded")
        head.wait_output(len(solo_long) // 5)
        cluster.workers[-1].proc.kill()
        code, out, err = head.finish(timeout=60)
    finally:
        cluster.close()
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "no plan fits the remaining nodes" in last and "conversation is kept" in last, err
    assert solo_long.startswith(out) and len(out) >= len(solo_long) // 5  # nothing shown is lost


@pytest.mark.parametrize("flash", ["off", "on"])
def test_mesh_parity_with_flash_attention_fixed_by_the_plan(
    smollm2: Path, tmp_path: Path, flash: str
) -> None:
    """Every node can run only one flash attention setting (the other's probe crashes, by the
    test switch): the plan carries that setting, every stage applies it, and the mesh's text
    is exactly solo's with the same setting."""
    other = "on" if flash == "off" else "off"
    env = {FAULT_ENV: f"crash:flash_attn={other}"}
    solo = subprocess.run(
        [*CMD, "generate", PROMPT, "--raw", "--temperature", "0", "--max-tokens", "96",
         "--model", str(smollm2), "--data-dir", str(tmp_path / "solo")],
        env={**ENV, **env}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert solo.returncode == 0, solo.stderr
    cluster = Cluster(tmp_path)
    try:
        cluster.add(smollm2, env=env)
        result = cluster.generate(PROMPT, smollm2, "--max-tokens", "96", "--split", "12", env=env)
    finally:
        cluster.close()
    assert result.returncode == 0, result.stderr
    assert f"flash attention {flash})" in _plan_line(result.stderr)
    assert result.stdout == solo.stdout
