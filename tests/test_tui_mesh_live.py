"""The app on a real mesh: a headless worker on loopback joins, takes layers from the split
editor, and serves them; answers stay the same as on one machine (greedy)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.mesh.identity import NodeId
from meshchat.tui.split import SELF
from tests.cli_helpers import stop_process
from tests.tui_helpers import CAPITAL, ask, make_app, ready, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def worker(tmp_path: Path, smollm2: Path) -> Iterator[tuple[str, str]]:
    """A `meshchat --headless` worker with the model; yields (its NodeID, an invite code)."""
    invite = tmp_path / "invite"
    env = {**os.environ, "MESHCHAT_MDNS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "meshchat.cli", "--headless", "--data-dir", str(tmp_path / "w"),
         "--listen", "127.0.0.1:0", "--invite-file", str(invite), "--model", str(smollm2)],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "worker.err").open("w"), text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("node_id: "), (tmp_path / "worker.err").read_text()
        deadline = time.monotonic() + 60
        while not (invite.exists() and invite.read_text().strip()):
            assert time.monotonic() < deadline, "no invite file"
            time.sleep(0.1)
        yield first.split()[1], invite.read_text().strip()
    finally:
        stop_process(process, timeout=20)


async def test_worker_takes_layers_and_answers_stay_the_same(
    tmp_path: Path, smollm2: Path, worker: tuple[str, str]
) -> None:
    worker_id, code = worker
    worker_node = NodeId.parse(worker_id)
    app = make_app(tmp_path, smollm2, real_mesh=True, join_code=code)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        solo = await ask(pilot, CAPITAL)
        table = app.peers_table
        await wait_for(pilot, lambda: worker_id in [k.value for k in table.rows], 30, "row")
        await wait_for(pilot, lambda: table.get_cell(worker_id, "rtt").plain != "—", 30, "RTT")
        await wait_for(
            pilot, lambda: app.planning and worker_node in app.planning.usable(), 120, "planner"
        )
        # The planner says once what it would do with the worker (its advice).
        await wait_for(pilot, lambda: any("predict" in n.message for n in app._notifications))
        # Split in two, give the second stage to the worker, apply.
        await pilot.press("ctrl+l", "plus", "right_square_bracket", "n")
        split = app.split
        assert split.plan and split.plan.nodes == [SELF, worker_node]
        await pilot.press("enter")
        await wait_for(pilot, lambda: not split.busy, 120, "apply")
        assert not split.is_error, split.message
        assert app.engine and not app.engine.is_local
        assert split.applied and split.applied.ranges == [(0, 15), (15, 30)]
        await wait_for(
            pilot, lambda: table.get_cell(worker_id, "layers").plain == "[15,30)", 30, "status"
        )
        # The same greedy answer, now computed on two nodes.
        await pilot.press("ctrl+n")
        assert await ask(pilot, CAPITAL) == solo
        await pilot.pause(1.2)
        assert table.get_cell(worker_id, "share").plain.startswith("compute ")
        assert "net " in table.get_cell(str(SELF), "share").plain
        # Move the boundary and apply: the worker now serves [17,30).
        await pilot.press("ctrl+l", "left_square_bracket", "right", "right", "enter")
        await wait_for(pilot, lambda: not split.busy, 120, "re-plan")
        assert not split.is_error, split.message
        await wait_for(
            pilot, lambda: table.get_cell(worker_id, "layers").plain == "[17,30)", 30, "moved"
        )
        assert await ask(pilot, "What is 2+2?")
