"""The mesh as the app shows it (issue 15): the failover note inside the answer, "left" vs
"lost", refused joins, a stale join's progress and lasting error, the one-line panel alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from meshchat.errors import MeshchatError
from meshchat.inference.mesh_pipeline import FailoverNote
from meshchat.mesh.layer_transfer import SeedingReport
from meshchat.paths import DataDir
from meshchat.tui.app_base import worker_error
from meshchat.tui.screens.dialogs import AskText, Pick
from meshchat.tui.widgets.chat import MessageView, describe_meta
from meshchat.tui.widgets.mesh_panel import ALONE_HINT
from tests.tui_helpers import (
    GREEDY,
    PEER_A,
    FakeMesh,
    ask,
    make_app,
    ready,
    two_peers,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

NO_MODEL = "model file not found: /nowhere.gguf"


def _toasts(app: object, needle: str) -> list[str]:
    notes = getattr(app, "_notifications")  # noqa: B009 (textual keeps them there)
    return [n.message for n in notes if needle in n.message]


async def test_failover_note_sits_in_the_answer_and_the_footer_counts_it(
    tmp_path: Path, smollm2: Path
) -> None:
    mesh = two_peers()
    mesh.rows[0] = replace(mesh.rows[0], state="serving", layers=(15, 30))
    app = make_app(tmp_path, smollm2, mesh=mesh, sampling=replace(GREEDY, max_tokens=160))
    async with app.run_test(size=(110, 34)) as pilot:
        # The run's first model load probes the engine settings: slow on a busy machine.
        await wait_for(pilot, lambda: app.engine or app.model_error, 180, "model load")
        await ready(pilot)
        app.prompt.text = "Count from 1 to 60, separated by commas."
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generation and app.generation.view.text, what="1st")
        # What the mesh pipeline does when the worker goes: the node is lost, then re-planned.
        mesh.rows[0] = replace(mesh.rows[0], state="lost", layers=None)
        app._on_failover(FailoverNote(PEER_A, f"node {PEER_A.short} left the mesh"))
        app._on_failover(FailoverNote(PEER_A, "left", f"[0,30) on {app.mesh.name[:8]}"))
        # The answer is kept (appended) after `generation` is cleared: wait for the message.
        await wait_for(pilot, lambda: len(app.messages) == 2, 90, "answer")
        view = app.chat_log.views()[-1]
        assert len(view.notes) == 1
        offset, note = view.notes[0]
        assert 0 < offset < len(view.text)  # where it happened, not at the start or the end
        assert note.startswith(f"⚠ worker {PEER_A.short} lost; continuing on [0,30)")
        meta = app.messages[-1].meta
        assert meta["replans"] == 1 and meta["notes"] == [[offset, note]]
        assert "re-planned once" in describe_meta(meta)
        await pilot.pause(1.2)  # a peers refresh: the lost node's toast is not shown twice
        assert not _toasts(app, "stopped answering") and not _toasts(app, "continuing on")
        assert app.peers_table.get_cell(str(PEER_A), "layers").plain == "—"
        # Reopened from the history, the note is in the same place.
        assert app.conversation is not None
        await app._show_conversation(app.conversation)
        again = app.chat_log.views()[-1]
        assert isinstance(again, MessageView) and again.notes == [(offset, note)]


async def test_clean_stop_says_left_and_a_crash_says_lost(tmp_path: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: app.mesh_watch.peer_states.get(PEER_A) == "idle", what="idle")
        mesh.rows[0] = replace(mesh.rows[0], state="left")
        await wait_for(pilot, lambda: _toasts(app, "left the mesh"), 5, "left toast")
        assert not _toasts(app, "stopped answering")
        mesh.rows[0] = replace(mesh.rows[0], state="idle")
        await wait_for(pilot, lambda: _toasts(app, "is back"), 5, "back")
        mesh.rows[0] = replace(mesh.rows[0], state="lost")
        await wait_for(pilot, lambda: _toasts(app, "stopped answering"), 5, "lost toast")


async def test_a_refused_join_is_told(tmp_path: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        mesh.refused.append("refused a connection from 127.0.0.1:17901: invite refused: used up")
        await wait_for(pilot, lambda: _toasts(app, "127.0.0.1:17901"), 5, "refusal toast")


class SlowJoinMesh(FakeMesh):
    """A join that waits for the test, then fails as a stale code does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def join(self, code: str) -> str:
        await self.release.wait()
        raise MeshchatError("invite refused: this invite was already used")


async def test_stale_join_shows_progress_then_an_error_that_stays(tmp_path: Path) -> None:
    mesh = SlowJoinMesh()
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        panel = app.mesh_panel
        assert panel.compact and panel.line == ALONE_HINT
        app._join("mc1stale")
        await wait_for(pilot, lambda: panel.line.startswith("joining"), 5, "progress")
        mesh.release.set()
        await wait_for(pilot, lambda: panel.line.startswith("join failed"), 5, "error")
        assert "already used" in panel.line and panel.query_one("#mesh-line").has_class("-error")
        await pilot.pause(2.5)  # peers refreshes and planner notes come and go
        assert panel.line.startswith("join failed: invite refused")


async def test_mesh_panel_is_one_line_alone_and_opens_for_the_split_editor(
    tmp_path: Path,
) -> None:
    mesh = FakeMesh()
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        panel = app.mesh_panel
        await pilot.pause(0.1)
        assert panel.compact and panel.outer_size.height == 1
        assert not app.split.display or not app.split.region.height
        await pilot.press("ctrl+l")
        await pilot.pause(0.1)
        assert not panel.compact and app.split.has_focus
        assert panel.outer_size.height > 1
    other = make_app(tmp_path / "two", None, mesh=two_peers(), model_error=NO_MODEL)
    async with other.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: not other.mesh_panel.compact, 5, "peers open it")


def test_worker_error_says_what_is_wrong_and_logs_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    assert worker_error(MeshchatError("invite expired"), "join") == "invite expired"
    assert not caplog.records
    try:
        raise KeyError("slot")
    except KeyError as exc:
        assert worker_error(exc, "remove") == "internal error: KeyError('slot')"
    assert caplog.records[-1].exc_info is not None  # the traceback is in the log


class BrokenRemoveMesh(FakeMesh):
    async def remove(self, key: str) -> None:
        raise RuntimeError("bug in remove")


async def test_a_bug_in_remove_is_shown_not_silent(tmp_path: Path) -> None:
    mesh = BrokenRemoveMesh(rows=two_peers().rows)
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        app._remove(PEER_A)
        await wait_for(pilot, lambda: _toasts(app, "remove failed: internal error"), 5, "toast")


async def test_model_choice_in_the_app_from_the_store_and_a_path(
    tmp_path: Path, smollm2: Path, tiny_models: dict[str, Path]
) -> None:
    app = make_app(tmp_path, None, model_error=NO_MODEL)
    models = DataDir(tmp_path / "data").ensure(DataDir(tmp_path / "data").models)
    (models / smollm2.name).symlink_to(smollm2)
    async with app.run_test(size=(110, 34)) as pilot:
        await ready(pilot)
        welcome = app.chat_log.query_one("#welcome", Static)
        assert "Ctrl+O" in str(welcome.render()) and "Ask anything" not in str(welcome.render())
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, Pick), 5, "model list")
        await pilot.press("enter")  # the store's model, first in the list
        await wait_for(pilot, lambda: app.engine is not None, 180, "model load")
        assert app.engine.info.path == models / smollm2.name
        assert "Ask anything" in str(app.chat_log.query_one("#welcome", Static).render())
        # Another file, by path: a wrong one is refused in the dialog, a right one loads.
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, Pick), 5, "model list")
        await pilot.press("down", "enter")  # "Another file…"
        await wait_for(pilot, lambda: isinstance(app.screen, AskText), 5, "path dialog")
        app.screen.query_one(Input).value = str(tmp_path / "nope.gguf")
        await pilot.press("enter")
        await wait_for(
            pilot, lambda: "no such file" in str(app.screen.query_one("#error", Static).render())
        )
        tiny = tiny_models["llama"]
        app.screen.query_one(Input).value = str(tiny)
        await pilot.press("enter")
        await wait_for(
            pilot, lambda: app.engine is not None and app.engine.info.path == tiny, 120, "tiny"
        )
        # The split editor shows the new model's layers (8), on this node.
        assert app.split.applied is not None and app.split.applied.n_layers == 8
        assert await ask(pilot, "Hi") is not None


async def test_a_members_layer_transfer_shows_in_its_state_cell(tmp_path: Path) -> None:
    """A member fetching its layers (its status says so; NodeMesh turns that into the row's
    `seeding` text) shows progress, rate and time left next to its state, then its state alone."""
    mesh = two_peers()
    app = make_app(tmp_path, None, mesh=mesh, model_error=NO_MODEL)
    report = {"layers": [0, 15], "bytes": 45, "total": 100, "rate_mb_s": 21.4, "eta_s": 12.2}
    seeding = SeedingReport.from_json(report)
    assert seeding is not None
    async with app.run_test(size=(140, 34)) as pilot:
        await ready(pilot)
        table = app.peers_table
        mesh.rows[0] = replace(mesh.rows[0], seeding=seeding.cell())
        want = "idle · getting [0,15) 45% 21 MB/s 0:12 left"
        await wait_for(pilot, lambda: table.get_cell(str(PEER_A), "state").plain == want, 5, "cell")
        mesh.rows[0] = replace(mesh.rows[0], seeding="")
        await wait_for(
            pilot, lambda: table.get_cell(str(PEER_A), "state").plain == "idle", 5, "idle"
        )
        # the transfer is not a state change
        assert app.mesh_watch.peer_states.get(PEER_A) == "idle"
