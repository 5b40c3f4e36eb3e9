"""Regenerate and edit-and-resend keep the answers they replace: "answer 2/2" under the
message, [ and ] on a picked answer switch versions (with the question each answered), and the
history keeps them."""

from __future__ import annotations

from pathlib import Path

from meshchat.tui.history import History
from meshchat.tui.versions import MAX_VERSIONS, Version, add_version, all_versions, position
from meshchat.tui.widgets.chat import describe_meta
from tests.tui_helpers import CAPITAL, ask, make_app, ready, wait_for

TWO = "What is 2+2?"


def _footer(app: object) -> str:
    view = app.chat_log.views()[-1]  # type: ignore[attr-defined]
    return str(view._meta.render())


async def test_edit_and_regenerate_keep_the_old_answers_and_keys_switch(
    tmp_path: Path, smollm2: Path
) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        first = await ask(pilot, TWO)
        await pilot.press("f4")  # edit the question and send it again
        app.prompt.text = CAPITAL
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generation is None and len(app.messages) == 2, 60)
        second = app.messages[1].content
        assert "Paris" in second and app.messages[0].content == CAPITAL
        assert _footer(app).startswith("answer 2/2")
        # Pick the answer in the log and go to the earlier version: its question comes back.
        app.chat_log.pick(1)
        await pilot.press("left_square_bracket")
        await pilot.pause()
        assert [m.content for m in app.messages] == [TWO, first]
        assert _footer(app).startswith("answer 1/2") and app.chat_log.selected == 1
        await pilot.press("left_square_bracket")  # nothing earlier: stays
        assert app.messages[1].content == first
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert [m.content for m in app.messages] == [CAPITAL, second]
        # Ctrl+R: a third version (greedy: the same words), the other two kept.
        app.prompt.focus()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app._generation_ids == 3 and app.generation is None, 60)
        assert _footer(app).startswith("answer 3/3")
        assert app.messages[1].content == second
        # The history holds every version; a reopened chat switches the same way.
        assert app.conversation is not None
        chat_id = app.conversation.id
    history = History(tmp_path / "data" / "chats.sqlite3")
    stored = history.messages(chat_id)
    history.close()
    assert [m.content for m in stored] == [CAPITAL, second]
    versions, at = all_versions(stored[1].content, stored[0].content, stored[1].meta)
    assert at == 2 and [v.content for v in versions] == [first, second, second]
    assert [v.prompt for v in versions] == [TWO, CAPITAL, CAPITAL]


def test_versions_are_bounded_and_a_hand_edited_history_is_read_safely() -> None:
    versions: list[Version] = []
    for i in range(MAX_VERSIONS + 3):
        versions, at = add_version(versions, Version(f"a{i}", "q"))
    assert len(versions) == MAX_VERSIONS and versions[0].content == "a3"
    meta = {"versions": [{"content": "old", "prompt": "q"}, 7, {"content": 1}], "version_at": 99}
    assert position(meta) == (2, 2)
    assert "answer 2/2" in describe_meta(meta)
    found, at = all_versions("new", "q", meta)
    assert [v.content for v in found] == ["old", "new"] and at == 1
    assert position({"versions": "junk"}) is None and "answer" not in describe_meta({})
