"""Pilot tests of the screens' UX fixes (issue 15), one or more per point, named by it.

Most run without a model (the app stays up and says so): the screens, not the answers, are
under test, so each takes a second or two.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.widgets import Button, Input, Static
from textual.widgets._footer import FooterKey
from textual.widgets.markdown import MarkdownBlock

from meshchat.config import ChatSettings, Config
from meshchat.tui.app import MeshchatApp
from meshchat.tui.history import History, StoredMessage
from meshchat.tui.keys import key_help, keys_for, markdown_table
from meshchat.tui.screens.chat_settings import FIELDS, ChatSettingsScreen
from meshchat.tui.screens.dialogs import AskText, ShowInvite
from meshchat.tui.screens.help import HelpScreen, keys_tables
from meshchat.tui.theming import BUILTIN_DIR
from meshchat.tui.widgets.chat import FOUND_STYLE, MessageView
from meshchat.tui.widgets.message_markdown import FramedFence
from meshchat.tui.widgets.status import StatusInfo, render_status
from tests.tui_helpers import GREEDY, make_app, ready, two_peers, wait_for

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).parent.parent / "README.md"
SMALL, LARGE = (80, 24), (120, 40)


def _app(tmp_path: Path, chats: list[list[StoredMessage]] | None = None, **kw: Any) -> MeshchatApp:
    """The app without a model, on a history holding `chats` (oldest first)."""
    history = History(tmp_path / "data" / "chats.sqlite3")
    for number, messages in enumerate(chats or []):
        chat = history.create(f"Chat {number}", settings=ChatSettings())
        for message in messages:
            history.append(chat.id, message)
    history.close()
    return make_app(tmp_path, None, model_error="no model in this test", **kw)


def _turns(count: int) -> list[StoredMessage]:
    return [
        StoredMessage("user" if i % 2 == 0 else "assistant", f"message number {i}\n\nline two")
        for i in range(count)
    ]


def _on_screen(app: Any, widget: Any) -> bool:
    width, height = app.size
    region = widget.region
    return region.width > 0 and region.right <= width and region.bottom <= height


# --- 1. chat settings ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_point1_settings_dialog_shows_buttons_and_tab_walks_fields(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(pilot)
        await pilot.press("f3")
        screen = app.screen
        assert isinstance(screen, ChatSettingsScreen)
        for button in screen.query(Button):
            assert _on_screen(app, button), button
        assert _on_screen(app, screen.query_one("#error"))
        assert app.focused is screen.query_one("#system")
        order = [key for key, _, _ in FIELDS]  # the schema's order, row by row
        assert order[0] == "temperature" and order[-1] == "seed"
        for field in order:
            await pilot.press("tab")
            assert app.focused is not None and app.focused.id == field
        await pilot.press("shift+tab")
        assert app.focused is not None and app.focused.id == "max_tokens"


@pytest.mark.parametrize(("typed", "key"), [("abc", "enter"), ("-1", "ctrl+s")])
async def test_point1_settings_bad_temperature_is_named_inline(
    tmp_path: Path, typed: str, key: str
) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("f3", "tab")
        screen = app.screen
        temperature = screen.query_one("#temperature", Input)
        assert app.focused is temperature
        temperature.value = ""
        await pilot.press(*typed, key)
        error = screen.query_one("#error", Static)
        assert "emperature" in str(error.render()) and _on_screen(app, error)
        assert app.screen is screen  # nothing saved, the dialog stays
        assert app.conversation is None


# --- 6. space -----------------------------------------------------------------------------


async def test_point6_sidebar_hidden_without_chats_and_on_narrow_terminals(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        assert not app.chat_list.display  # wide, but nothing to list
        await pilot.press("ctrl+b")  # asked for: shown, with its heading and an empty note
        assert app.chat_list.display and app.chat_list.border_title == "Chats"
        option = app.chat_list.get_option_at_index(0)
        assert "no chats yet" in str(option.prompt) and option.disabled


async def test_point6_sidebar_follows_the_width_when_there_are_chats(tmp_path: Path) -> None:
    app = _app(tmp_path, [_turns(2)])
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        assert app.chat_list.display
        await pilot.resize_terminal(*SMALL)
        await pilot.pause()
        assert not app.chat_list.display
        await pilot.resize_terminal(*LARGE)
        await pilot.pause()
        assert app.chat_list.display


def test_point6_status_line_keeps_the_layer_range_at_80_columns() -> None:
    info = StatusInfo(
        model="SmolLM2-135M-Instruct.Q4_1",
        state="generating",
        ttft_s=0.25,
        tok_s=95.0,
        context_used=1234,
        context_size=4096,
        layout="local [0,12) · peeraaaaaa [12,30)",
    )
    text = render_status(info, 78).plain  # 80 columns less the status line's padding
    assert len(text) <= 78
    for part in ("● generating", "95.0 tok/s", "ctx 1234/4096", "peeraaaaaa [12,30)"):
        assert part in text
    one_node = render_status(replace(info, layout="local [0,30)"), 78).plain
    assert len(one_node) <= 78 and "local [0,30)" in one_node and "250 ms" in one_node
    assert "SmolLM2" in one_node  # shortened, not dropped, while there is room
    wide = render_status(info, 200).plain
    assert "SmolLM2-135M-Instruct.Q4_1" in wide and "250 ms" in wide


async def test_point6_footer_keys_are_whole_at_80x24(tmp_path: Path) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.pause()
        keys = [k for k in app.screen.query(FooterKey) if k.display]
        palette = [k for k in keys if k.has_class("-command-palette")]
        assert len(palette) == 1 and len(keys) >= 4
        for key in keys:
            if key not in palette:
                assert key.region.right <= palette[0].region.x, key.description
                assert key.region.width >= len(key.key_display) + len(key.description) + 2


# --- 7. code blocks -----------------------------------------------------------------------


async def test_point7_code_blocks_are_framed_and_labelled(tmp_path: Path) -> None:
    answer = "Two:\n\n```python\nprint(1)\n```\n\nand\n\n```\nplain text\n```\n"
    app = _app(tmp_path, [[StoredMessage("user", "code?"), StoredMessage("assistant", answer)]])
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: len(app.screen.query(FramedFence)) == 2)
        fences = list(app.screen.query(FramedFence))
        assert [f.border_title for f in fences] == ["python", "code"]
        for fence in fences:
            assert fence.styles.border_top[0] == "round" and fence.styles.border_left[0] == "round"


# --- 8. scrolling from the keyboard -------------------------------------------------------


async def test_point8_page_keys_scroll_the_chat_from_the_message_box(tmp_path: Path) -> None:
    app = _app(tmp_path, [_turns(30)])
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.pause()
        log = app.chat_log
        assert app.prompt.has_focus and log.max_scroll_y > 0
        bottom = log.scroll_y
        assert bottom >= log.max_scroll_y - 1  # opened at the end
        await pilot.press("pageup")
        await pilot.pause()
        up = log.scroll_y
        assert up < bottom - log.size.height // 2 and app.prompt.has_focus
        await pilot.press("pagedown")
        await pilot.pause()
        assert log.scroll_y > up and app.prompt.has_focus
        ids = {row.id for row in key_help({})}
        assert {"chat.page_up", "chat.page_down"} <= ids  # F1 lists them


# --- 9. help and hints --------------------------------------------------------------------


def test_point9_help_table_wraps_instead_of_cutting() -> None:
    rows = key_help({})
    for width in (70, 96):  # the help dialog's inside at 80 and 120 columns
        console = Console(width=width, record=True, color_system=None)
        console.print(keys_tables(rows))
        shown = " ".join(console.export_text().split())
        assert "…" not in shown
        for row in rows:
            for word in row.description.split():
                assert word in shown, (width, row)
    assert any("theme" in row.description for row in rows)  # theme switching is named


async def test_point9_help_screen_names_themes_and_fits(tmp_path: Path) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("f1")
        screen = app.screen
        assert isinstance(screen, HelpScreen)
        hint = " ".join(str(s.render()) for s in screen.query(".hint"))
        assert "theme" in hint and "Esc" in hint


@pytest.mark.parametrize(
    ("key", "keys_hint"),
    [("f2", "Enter rename · Esc cancel"), ("ctrl+s", "Enter export · Esc cancel")],
)
async def test_point9_rename_and_export_dialogs_show_their_keys(
    tmp_path: Path, key: str, keys_hint: str
) -> None:
    app = _app(tmp_path, [_turns(2)])
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        await pilot.press(key)
        assert isinstance(app.screen, AskText)
        assert keys_hint in str(app.screen.query_one(".keys", Static).render())


async def test_point9_join_dialog_shows_its_keys(tmp_path: Path) -> None:
    app = _app(tmp_path, mesh=two_peers())
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        await pilot.press("f6")
        await wait_for(pilot, lambda: isinstance(app.screen, AskText), timeout=5)
        assert "Esc cancel" in str(app.screen.query_one(".keys", Static).render())


async def test_point9_chat_shows_system_prompt_and_greedy(tmp_path: Path) -> None:
    app = _app(tmp_path, config=Config(sampling=GREEDY, mdns=False))
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        assert "temperature 0" in str(app.prompt.border_title)
        assert "system prompt" not in str(app.prompt.border_title)
        await pilot.press("f3")
        app.screen.query_one("#system").text = "Answer in French."  # type: ignore[attr-defined]
        app.screen.query_one("#temperature", Input).value = "0.5"
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, ChatSettingsScreen)
        title = str(app.prompt.border_title)
        assert "system prompt on" in title and "temperature 0" not in title


async def test_point9_palette_hints_follow_rebinding(tmp_path: Path) -> None:
    config = Config(sampling=GREEDY, mdns=False, keys={"new_chat": "ctrl+k"})
    app = _app(tmp_path, config=config)
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        commands = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert "(Ctrl+K)" in commands["New chat"] and "Ctrl+N" not in commands["New chat"]
        assert keys_for("new_chat", app._keymap) == "Ctrl+K"
        await pilot.press("f1")
        assert any(
            r.id == "new_chat" and r.keys == "Ctrl+K"
            for r in app.screen.rows  # type: ignore[attr-defined]
        )


def test_point9_readme_keys_table_is_f1() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- keys:start -->\n(.*?)<!-- keys:end -->", text, re.DOTALL)
    assert found, "README lacks the keys table markers"
    assert found.group(1) == markdown_table(key_help({}))


# --- 10. search ---------------------------------------------------------------------------


async def test_point10_search_opens_the_chat_at_the_match_highlighted(tmp_path: Path) -> None:
    turns = _turns(30)
    turns[3] = StoredMessage("assistant", "the zanzibar answer\n\nline two")
    app = _app(tmp_path, [turns, _turns(2)])  # the newest (shown first) is the other chat
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+f", *"Zanzibar", "enter")
        await pilot.pause()
        await pilot.pause()
        assert app.conversation is not None and app.conversation.title == "Chat 0"
        views = list(app.query(MessageView))
        found = [i for i, v in enumerate(views) if v.has_class("-found")]
        assert found == [3]
        log = app.chat_log.region
        match = views[3].region
        assert log.y <= match.y < log.bottom  # in view, not scrolled to the bottom
        assert app.chat_log.scroll_y < app.chat_log.max_scroll_y
        # The words found are highlighted inside the message, as it is drawn on screen.
        found_words = [
            span
            for block in views[3].query(MarkdownBlock)
            for span in block.visual.spans  # type: ignore[attr-defined]
            if span.style == FOUND_STYLE
        ]
        assert len(found_words) == 1
        paragraph = next(b for b in views[3].query(MarkdownBlock) if "zanzibar" in str(b.visual))
        span = found_words[0]
        assert str(paragraph.visual)[span.start : span.end] == "zanzibar"
        assert log.y <= paragraph.region.y < log.bottom
        # A new message ends the search's marks.
        app.prompt.text = "hello"
        await app.chat_log.add("user", "hello")
        assert not views[3].has_class("-found") and not views[3]._marked


# --- smaller ------------------------------------------------------------------------------


async def test_invite_code_has_no_border_around_it(tmp_path: Path) -> None:
    app = _app(tmp_path, mesh=two_peers())
    async with app.run_test(size=LARGE) as pilot:
        await ready(pilot)
        await pilot.press("f5")
        await wait_for(pilot, lambda: isinstance(app.screen, ShowInvite), timeout=5)
        code = app.screen.query_one("#code")
        assert all(edge[0] in ("", "none") for edge in code.styles.border)
        assert str(code.render()) == app.screen.code  # type: ignore[attr-defined]


# --- structure ----------------------------------------------------------------------------


def test_builtin_themes_ship_in_the_package(tmp_path: Path) -> None:
    """The top-level `themes/` folder lands in the wheel as `meshchat/themes/`, where
    BUILTIN_DIR looks first (build_py lays out what the wheel holds)."""
    root = README.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    for folder in ("meshchat", "themes"):
        shutil.copytree(
            root / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", "out"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    shipped = sorted(p.name for p in (tmp_path / "out" / "meshchat" / "themes").glob("*.toml"))
    assert shipped == sorted(p.name for p in BUILTIN_DIR.glob("*.toml"))
    assert len(shipped) == 3 and root / "themes" == BUILTIN_DIR  # a checkout reads the folder


async def test_ctrl_up_recalls_earlier_prompts(tmp_path: Path) -> None:
    app = _app(tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        for text in ("first question", "second question"):
            app.prompt.text = text
            await pilot.press("enter")  # no model: refused, but the prompt is remembered
        app.prompt.text = "half-typed"
        seen = []
        for key in ("ctrl+up", "ctrl+up", "ctrl+up", "ctrl+down", "ctrl+down"):
            await pilot.press(key)
            seen.append(app.prompt.text)
        assert seen == [
            "second question",
            "first question",
            "first question",  # the oldest stays
            "second question",
            "half-typed",  # past the newest: what was being typed comes back
        ]
        assert app.prompt.has_focus


async def test_up_in_an_empty_box_recalls_this_chats_prompts(tmp_path: Path) -> None:
    chat = [
        StoredMessage("user", "first question"),
        StoredMessage("assistant", "one"),
        StoredMessage("user", "second question"),
        StoredMessage("assistant", "two"),
    ]
    app = _app(tmp_path, [chat])
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: len(app.messages) == 4, timeout=5)
        app.prompt.focus()
        seen = []
        for key in ("up", "up", "down", "down"):
            await pilot.press(key)
            seen.append(app.prompt.text)
        assert seen == ["second question", "first question", "second question", ""]
        assert app.prompt.has_focus
        # Past the oldest: the chat log, to pick a message; the box is empty again.
        await pilot.press("up", "up", "up")
        assert app.chat_log.has_focus and app.prompt.text == ""
        # On typed text ↑ goes to the chat log, the text stays.
        app.prompt.focus()
        app.prompt.text = "typed"
        await pilot.press("up")
        assert app.chat_log.has_focus and app.prompt.text == "typed"
        # A new chat has no prompts of its own to recall.
        app.prompt.text = ""
        await pilot.press("ctrl+n")
        await pilot.pause()
        app.prompt.focus()
        await pilot.press("up")
        assert app.prompt.text == ""
