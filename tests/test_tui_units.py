"""Unit tests of the TUI's non-UI parts: chat history, split plans, themes, code blocks, keys."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meshchat.config import ChatSettings
from meshchat.tui.history import (
    SCHEMA_VERSION,
    History,
    HistoryError,
    StoredMessage,
    export_markdown,
    title_from,
)
from meshchat.tui.keys import binding_ids, check_keymap, display_keys
from meshchat.tui.markdown_text import code_blocks
from meshchat.tui.split import SELF, SplitEditError, SplitPlan
from meshchat.tui.theming import BUILTIN_DIR, load_themes, node_colours, theme_from_toml
from tests.node_names import named

# --- history ----------------------------------------------------------------------------------


def test_history_round_trip(tmp_path: Path) -> None:
    history = History(tmp_path / "chats.sqlite3")
    settings = ChatSettings(temperature=0.1, seed=5)
    chat = history.create("First", "Be kind.", settings)
    history.append(chat.id, StoredMessage("user", "hello"))
    history.append(chat.id, StoredMessage("assistant", "hi!", {"tokens": 2}))
    history.append(chat.id, StoredMessage("user", "more"))
    other = history.create("Second")
    history.append(other.id, StoredMessage("user", "unrelated 100%_stuff"))
    assert [c.title for c in history.chats()] == ["Second", "First"]
    again = History(tmp_path / "chats.sqlite3")
    got = again.get(chat.id)
    assert got and got.system_prompt == "Be kind." and got.settings == settings
    assert [(m.role, m.content) for m in again.messages(chat.id)] == [
        ("user", "hello"),
        ("assistant", "hi!"),
        ("user", "more"),
    ]
    assert again.messages(chat.id)[1].meta == {"tokens": 2}
    again.truncate(chat.id, 1)
    assert [m.content for m in again.messages(chat.id)] == ["hello"]
    again.append(chat.id, StoredMessage("assistant", "new"))
    assert [m.content for m in again.messages(chat.id)] == ["hello", "new"]
    again.rename(chat.id, "Renamed")
    again.configure(chat.id, "", ChatSettings())
    assert (c := again.get(chat.id)) and c.title == "Renamed" and c.settings == ChatSettings()
    again.delete(other.id)
    assert again.get(other.id) is None and again.messages(other.id) == []


def test_history_search(tmp_path: Path) -> None:
    history = History(tmp_path / "chats.sqlite3")
    a = history.create("Paris trip")
    b = history.create("Code")
    history.append(b.id, StoredMessage("assistant", "use " + "x" * 80 + " 100% of the time"))
    history.append(a.id, StoredMessage("user", "what to see"))
    assert [h.conversation.id for h in history.search("paris")] == [a.id]
    (hit,) = history.search("100%")  # LIKE wildcards in the query are literal
    assert hit.conversation.id == b.id and "100% of the time" in hit.snippet
    assert history.search("_") == []
    assert len(history.search("")) == 2


def test_history_refuses_garbage_and_newer_schema(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(HistoryError, match="unreadable"):
        History(junk)
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(HistoryError, match="newer meshchat"):
        History(newer)


def test_export_and_titles(tmp_path: Path) -> None:
    history = History(tmp_path / "c.sqlite3")
    chat = history.create("T", "System text")
    messages = [
        StoredMessage("user", "Q?"),
        StoredMessage("assistant", "A.", {"cancelled": True}),
    ]
    text = export_markdown(chat, messages)
    assert text.startswith("# T\n") and "## System\n\nSystem text" in text
    assert "## You\n\nQ?" in text and "## Assistant\n\nA.\n\n*(answer cancelled)*" in text
    assert title_from("  short  ") == "short"
    assert title_from("a " * 40).endswith("…") and len(title_from("a " * 40)) <= 41
    assert title_from("line one\nline two") == "line one"
    assert title_from("") == "New chat"


# --- split plans ------------------------------------------------------------------------------

ALLOWED = list(range(1, 30))
PEER, GONE = named("peer"), named("gone")


def test_split_edits() -> None:
    plan = SplitPlan.solo(30)
    plan, index = plan.add_boundary(0, ALLOWED)
    assert plan.ranges == [(0, 15), (15, 30)] and index == 0
    plan = plan.move_boundary(0, 1, ALLOWED)
    assert plan.boundaries == [16]
    plan = plan.assign(1, PEER)
    assert plan.nodes == [SELF, PEER] and not plan.is_local
    plan, index = plan.add_boundary(1, ALLOWED)  # [16,30) → [16,23) [23,30), both on peer
    assert plan.ranges == [(0, 16), (16, 23), (23, 30)] and index == 1
    assert plan.nodes == [SELF, PEER, PEER]
    assert plan.remove_boundary(0).ranges == [(0, 23), (23, 30)]
    assert plan.remove_boundary(0).nodes == [SELF, PEER]
    assert plan.segment_at(0) == 0 and plan.segment_at(16) == 1 and plan.segment_at(29) == 2


def test_split_refusals() -> None:
    plan = SplitPlan.from_ranges(30, [(0, 10), (10, 11), (11, 30)])
    with pytest.raises(SplitEditError, match=r"stage \[10,11\) would have no layers"):
        plan.move_boundary(0, 1, ALLOWED)
    with pytest.raises(SplitEditError, match="not an allowed split point"):
        plan.move_boundary_to(0, 5, [10, 11, 20])
    with pytest.raises(SplitEditError, match="no allowed split point inside"):
        plan.add_boundary(1, ALLOWED)
    with pytest.raises(SplitEditError, match="no allowed split point after"):
        SplitPlan.from_ranges(30, [(0, 29), (29, 30)]).move_boundary(0, 1, ALLOWED)
    with pytest.raises(SplitEditError, match="no boundary"):
        SplitPlan.solo(30).move_boundary(0, 1, ALLOWED)
    remote = SplitPlan.from_ranges(30, [(0, 15), (15, 30)], [SELF, GONE])
    assert "not connected" in remote.validate(ALLOWED, [])[0]
    assert remote.validate(ALLOWED, [GONE]) == []
    assert "not an allowed" in remote.validate([1, 2], [GONE])[0]


# --- themes -----------------------------------------------------------------------------------


def test_builtin_themes() -> None:
    loaded = load_themes(BUILTIN_DIR)
    assert loaded.problems == []
    names = {t.name for t in loaded.themes}
    assert {"meshchat-dusk", "meshchat-paper", "meshchat-phosphor"} <= names
    for theme in loaded.themes:
        assert len(set(node_colours(theme))) == 6


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name = ", "not valid TOML"),
        ('primary = "#fff"', "needs a name"),
        ('name = "x"', "needs a primary"),
        ('name = "x"\nprimary = "#fff"\nbogus = 1', "unknown fields bogus"),
        ('name = "x"\nprimary = "nope"', "primary = 'nope' is not a colour"),
        ('name = "x"\nprimary = "#fff"\ndark = "yes"', "dark must be"),
        ('name = "x"\nprimary = "#fff"\n[variables]\nmesh-node-1 = "zz"', "mesh-node-1"),
    ],
)
def test_bad_theme_files(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        theme_from_toml(text, "t.toml")


def test_user_themes_override_and_skip_broken(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "meshchat-dusk"\nprimary = "#123456"\n')
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe")
    loaded = load_themes(BUILTIN_DIR, tmp_path, tmp_path / "missing")
    dusk = next(t for t in loaded.themes if t.name == "meshchat-dusk")
    assert dusk.primary == "#123456"
    assert len(loaded.problems) == 1 and "b.toml" in loaded.problems[0]


# --- small helpers ----------------------------------------------------------------------------


def test_code_blocks() -> None:
    text = "intro\n```python\nx = 1\n```\nmid\n~~~\nplain\n~~~\n```sh\nunclosed"
    blocks = code_blocks(text)
    assert [(b.language, b.code) for b in blocks] == [
        ("python", "x = 1"),
        ("", "plain"),
        ("sh", "unclosed"),
    ]
    assert blocks[0].title() == "python: x = 1"
    assert code_blocks("no code here") == []


def test_keys() -> None:
    ids = binding_ids()
    assert {"quit", "send", "newline", "cancel", "regenerate", "split.apply", "invite"} <= ids
    assert check_keymap({"quit": "ctrl+x"}) == []
    assert "'nope'" in check_keymap({"nope": "x"})[0]
    assert display_keys("ctrl+r,f5") == "Ctrl+R / F5"
    assert display_keys("plus,minus") == "+ / -"
