"""Memory budgets on real processes (issue 13, item 1): budgets that force a three-way split.

Two `meshchat --headless --max-memory SIZE` workers and a `meshchat generate --join
--max-memory SIZE` head; greedy output must equal solo exactly, and each worker's status file
shows what it offers, what its stage uses (as llama.cpp reported it) and what is left.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from meshchat.commands.generate import DEFAULT_CONTEXT
from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import ModelNeeds, Planner
from meshchat.paths import DataDir
from tests.mesh_cluster import CMD, ENV, Cluster, read_json
from tests.node_names import HEAD
from tests.test_mesh_generate import PROMPT, _plan_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MIB = 1 << 20
BUDGET = 180  # MiB a node: a three-way split of the default model fits, a two-way one does not
TOKENS = "64"


@pytest.fixture(scope="module")
def solo(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The greedy text on one machine (its first run measures the engine settings, which
    takes minutes on a loaded machine: hence the long timeout)."""
    root = tmp_path_factory.mktemp("solo")
    result = subprocess.run(
        [*CMD, "generate", PROMPT, "--raw", "--temperature", "0", "--max-tokens", TOKENS,
         "--model", str(smollm2), "--data-dir", str(root)],
        env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 100  # not an early end-of-text
    return result.stdout


def test_budgets_that_force_a_three_way_split_give_the_solo_output(
    smollm2: Path, tmp_path: Path, solo: str
) -> None:
    model = LocalModel.open(smollm2, DataDir(tmp_path / "probe"))
    needs = ModelNeeds.of(model)
    planner = Planner(needs, [NodeCaps(HEAD, 1 << 40, model.fingerprint, 1.0, 1.0)], HEAD,
                      DEFAULT_CONTEXT)  # fmt: skip
    three, two = planner.split_memory(3), planner.split_memory(2)
    assert three is not None and two is not None
    assert three < BUDGET * MIB < two  # the budget forces exactly three stages on three nodes
    flag = ("--max-memory", f"{BUDGET}M")
    cluster = Cluster(tmp_path)
    try:
        workers = [cluster.add(smollm2, None, *flag) for _ in range(2)]
        cluster.wait_connected()
        args = cluster.head_args(PROMPT, smollm2, "head", "--max-tokens", TOKENS, *flag)
        head = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        # Each worker's status while it holds its stage: a head that ends cleanly says goodbye,
        # and the workers free their stages at once, so the files are read during the run.
        loaded: dict[int, dict[str, Any]] = {}
        while head.poll() is None:
            for i, worker in enumerate(workers):
                with contextlib.suppress(OSError, ValueError):
                    status = read_json(worker.status)
                    if (status.get("memory") or {}).get("stage"):
                        loaded[i] = status
            time.sleep(0.2)
        stdout, stderr = head.communicate(timeout=60)
    finally:
        cluster.close()
    assert head.returncode == 0, stderr
    assert stdout == solo
    plan = _plan_line(stderr)
    assert plan.count(" on ") == 3 and "(head)" in plan, stderr
    assert "fits on no single node" in stderr
    # Status files are written once a second and the run takes a few: at least one is caught.
    assert loaded, "no worker's status showed its stage"
    for status in loaded.values():
        memory = status["memory"]
        assert memory["offer"] == BUDGET * MIB
        assert 0 < memory["used"] == memory["stage"]["total"] <= BUDGET * MIB
        assert memory["left"] == memory["offer"] - memory["used"]
