"""A network partition of the middle stage mid-generation, across three namespaces.

Workers in n1 and n2, the `generate --join` head in n3, three stages. Cutting n2 off the bridge
halfway through a long greedy generation must leave the output equal to the solo run: the head
notices the silence (dead-peer timeout), re-plans over n1 and itself, replays, and goes on.
Healing n2 afterwards must not disturb anything. Needs root (skips with the reason otherwise).
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mesh_cluster import ENV, StreamingHead, read_json, wait_for
from tests.netns_helpers import REPO, netns, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Once upon a time, in a small village by the sea,"


def _worker(lab: object, node: str, tmp: Path, model: Path, *extra: str) -> Path:
    status = tmp / f"{node}.status.json"
    argv = [
        sys.executable, "-m", "meshchat.cli", "--headless", "--listen", "0.0.0.0:47470",
        "--data-dir", str(tmp / node), "--model", str(model), "--status-file", str(status),
        "--invite-file", str(tmp / f"{node}.invite"), "--invite-uses", "5", *extra,
    ]  # fmt: skip
    log = (tmp / f"{node}.log").open("ab")
    env = {**ENV, "PYTHONPATH": str(REPO)}
    lab.popen(node, argv, stdout=log, stderr=log, env=env, cwd=REPO)  # type: ignore[attr-defined]
    return status


def test_partition_of_the_middle_stage_keeps_the_output(smollm2: Path, tmp_path: Path) -> None:
    require_netns()
    solo = subprocess.run(
        [sys.executable, "-m", "meshchat.cli", "generate", PROMPT, "--raw", "--temperature", "0",
         "--max-tokens", "200", "--model", str(smollm2), "--data-dir", str(tmp_path / "solo")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert solo.returncode == 0, solo.stderr
    # The solo run above measured this machine's engine profile into the run's machine cache,
    # which every node below shares: none calibrates mid-test.
    with netns.NetnsLab(3) as lab:
        s1 = _worker(lab, "n1", tmp_path, smollm2)
        wait_for(lambda: (tmp_path / "n1.invite").exists() and read_json(s1), what="n1 up")
        invite = (tmp_path / "n1.invite").read_text().strip()
        s2 = _worker(lab, "n2", tmp_path, smollm2, "--join", invite)
        wait_for(
            lambda: (
                read_json(s2) and any(p["state"] == "connected" for p in read_json(s2)["peers"])
            ),
            what="n2 joined",
        )
        head = StreamingHead(
            lab.argv("n3", [
                sys.executable, "-m", "meshchat.cli", "generate", PROMPT, "--raw",
                "--temperature", "0", "--max-tokens", "200", "--model", str(smollm2),
                "--data-dir", str(tmp_path / "n3"), "--join", invite, "--split", "10,20",
            ]),
            env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
        wait_for(lambda: read_json(s1)["layers"] and read_json(s2)["layers"], what="stages")
        middle = "n1" if read_json(s1)["layers"] == [10, 20] else "n2"
        head.wait_output(random.randint(len(solo.stdout) // 10, len(solo.stdout) // 3))
        lab.partition(middle)
        started = time.monotonic()
        code, out, err = head.finish(timeout=120)
        lab.heal(middle)
        assert code == 0, err
        assert out == solo.stdout, err
        assert "left the mesh" in err and "new plan" in err
        assert time.monotonic() - started < 60
