"""Snapshot tests (pytest-textual-snapshot): the main screen, the split editor, the help screen.

Deterministic by construction: a fixed terminal size, a chat loaded from the history (no
generation, so no timings), a scripted mesh with fixed NodeIDs, addresses and RTTs, no clock.
Update with `pytest tests/test_tui_snapshots.py --snapshot-update` after a deliberate change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshchat.config import Config
from meshchat.tui.history import History, StoredMessage
from tests.tui_helpers import GREEDY, make_app, two_peers, wait_for

pytestmark = pytest.mark.timeout(120)

SIZE = (100, 34)

ANSWER = """Here is a function that adds two numbers:

```python
def add(a, b):
    return a + b
```

Call it as `add(2, 3)`; it returns **5**."""


def _app(tmp_path: Path, model: Path) -> Any:
    history = History(tmp_path / "data" / "chats.sqlite3")
    chat = history.create("Adding numbers")
    history.append(chat.id, StoredMessage("user", "How do I add two numbers in Python?"))
    history.append(
        chat.id,
        StoredMessage("assistant", ANSWER, {"tokens": 42, "tok_s": 95.0, "finish_reason": "stop"}),
    )
    history.close()
    # A fixed config path: the help screen names it, and tmp paths differ between runs.
    config = Config(sampling=GREEDY, mdns=False, threads=1, path=Path("/home/ada/config.toml"))
    return make_app(tmp_path, model, mesh=two_peers(), config=config)


async def _ready(pilot: Any) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.engine is not None and app.mesh is not None)
    app._refresh_peers()
    # A blinking cursor is drawn or not by the clock, and shown only where the focus is: the
    # screen is taken with the message box focused and its cursor steady. TextArea's line cache
    # keys a steady cursor like a blinked-off one, so a line drawn in the blink's off phase
    # (or before the focus came) was reused without its cursor: the cache is cleared too.
    app.prompt.focus()
    await wait_for(pilot, lambda: app.prompt.has_focus)
    app.prompt.cursor_blink = False
    app.prompt.notify_style_update()
    app.prompt.refresh()
    await pilot.pause()


def test_main_screen(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SIZE, run_before=_ready)


def test_split_editor(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    async def edit(pilot: Any) -> None:
        await _ready(pilot)
        # Split in two, move the boundary right twice, give stage 2 to the peer, then try to
        # squeeze stage 1 to nothing: the refusal shows under the bar.
        await pilot.press("ctrl+l", "plus", "right", "right", "right_square_bracket", "n")
        await pilot.press("left_square_bracket", "plus")
        for _ in range(9):
            await pilot.press("right")
        await pilot.pause()

    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SIZE, run_before=edit)


def test_help_screen(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    async def help_(pilot: Any) -> None:
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SIZE, run_before=help_)


# Issue 15: the screens at the two sizes users run most, 80×24 and 120×40. At 80×24 the status
# line must keep the layer range and the footer end on a whole key; the settings dialog must show
# its buttons; the chat list stays away on a first run.
SMALL, LARGE = (80, 24), (120, 40)


def test_main_screen_80x24(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SMALL, run_before=_ready)


def test_main_screen_120x40(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    assert snap_compare(_app(tmp_path, smollm2), terminal_size=LARGE, run_before=_ready)


def test_first_run_120x40(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    config = Config(sampling=GREEDY, mdns=False, threads=1, path=Path("/home/ada/config.toml"))
    app = make_app(tmp_path, smollm2, mesh=two_peers(), config=config)
    assert snap_compare(app, terminal_size=LARGE, run_before=_ready)


async def _settings(pilot: Any) -> None:
    await _ready(pilot)
    await pilot.press("f3", "tab", "ctrl+a")  # to the temperature, a bad value, Enter
    pilot.app.screen.query_one("#temperature").value = "abc"
    await pilot.press("enter")
    await pilot.pause()


def test_chat_settings_80x24(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SMALL, run_before=_settings)


def test_chat_settings_120x40(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    assert snap_compare(_app(tmp_path, smollm2), terminal_size=LARGE, run_before=_settings)


def test_help_screen_80x24(snap_compare: Any, tmp_path: Path, smollm2: Path) -> None:
    async def help_(pilot: Any) -> None:
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(_app(tmp_path, smollm2), terminal_size=SMALL, run_before=help_)
