"""Pilot tests of the chat pane with the real default model, driven through keys."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from meshchat.config import ChatSettings, Config
from meshchat.tui.history import History
from meshchat.tui.widgets.chat import MessageView
from tests.tui_helpers import CAPITAL, CODE, GREEDY, ask, make_app, ready, wait_for

pytestmark = pytest.mark.timeout(120)


async def test_send_streams_an_answer_and_keeps_it(
    tmp_path: Path, smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []  # what the answer's Markdown widget held after each fragment
    append = MessageView.append

    async def spy(self: MessageView, fragment: str) -> None:
        await append(self, fragment)
        await asyncio.sleep(0.01)  # let the MarkdownStream task render
        shown.append(self.body.source)

    monkeypatch.setattr(MessageView, "append", spy)
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert app.engine is not None
        await pilot.press(*CAPITAL)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.messages) == 2 and not app.generation, what="answer")
        assert app.prompt.text == ""  # the sent text left the box
        answer = app.messages[-1]
        assert answer.role == "assistant" and "Paris" in answer.content
        assert answer.meta["tokens"] > 0 and answer.meta["finish_reason"] in ("stop", "length")
        # Streamed: the widget showed growing prefixes before the end...
        partial = [s for s in shown if s and len(s) < len(answer.content)]
        assert len(partial) >= 3 and all(answer.content.startswith(s) for s in partial)
        # ...and the final full render holds the whole text.
        view = app.chat_log.views()[-1]
        assert view.body.source == answer.content
        info = app.status.info
        assert info.state == "ready" and info.tok_s and info.ttft_s is not None
        assert 0 < info.context_used <= info.context_size == 4096
    chats = History(tmp_path / "data" / "chats.sqlite3")
    (chat,) = chats.chats()
    assert chat.title == "What is the capital of France? Answer…"
    assert [m.role for m in chats.messages(chat.id)] == ["user", "assistant"]


async def test_newline_key_and_empty_prompt(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        await pilot.press("enter")  # nothing to send
        assert app.messages == [] and app.generation is None
        await pilot.press("a", "ctrl+j", "b")
        assert app.prompt.text == "a\nb"


async def test_escape_cancels_and_keeps_the_prompt(tmp_path: Path, smollm2: Path) -> None:
    config = Config(sampling=replace(GREEDY, max_tokens=400), mdns=False, threads=1)
    app = make_app(tmp_path, smollm2, config=config)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        question = "Write a very long story about a dragon who learns to bake bread."
        app.prompt.text = question
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generation and len(app.generation.view.text) > 20)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.generation is None, timeout=5, what="cancel")
        answer = app.messages[-1]
        assert answer.role == "assistant" and answer.meta.get("cancelled")
        assert answer.meta.get("finish_reason") == "cancelled"
        # The question is back in the box (edit mode): Enter resends it, Esc keeps the chat.
        assert app.prompt.text == question and app.editing == 0
        await pilot.press("escape")
        assert app.editing is None and app.prompt.text == ""
        # The model still works after a cancel: the session rolled back.
        assert "Paris" in await ask(pilot, CAPITAL)


async def test_regenerate_rolls_back_and_gives_the_same_greedy_answer(
    tmp_path: Path, smollm2: Path
) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        first = await ask(pilot, "Name three colours.")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app._generation_ids == 2 and app.generation is None)
        assert [m.role for m in app.messages] == ["user", "assistant"]
        assert app.messages[-1].content == first  # greedy: same tokens again
        assert len(app.chat_log.views()) == 2
        # The regenerated answer reused the cached question: only the answer slot was redone.
        assert app.engine is not None and app.engine.last_stats.prefilled_tokens <= 2


async def test_edit_and_resend_an_earlier_message(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        await ask(pilot, "What is 2+2?")
        await ask(pilot, "Name three colours.")
        assert len(app.messages) == 4
        # Pick the first question in the log (↑ past the two prompts recalled, then ↑↑↑) and
        # edit it.
        await pilot.press("up", "up", "up")
        assert app.prompt.text == ""
        assert app.chat_log.has_focus and app.chat_log.selected == 3
        await pilot.press("up", "up", "up")
        assert app.chat_log.selected == 0
        await pilot.press("e")
        await pilot.pause()
        assert app.editing == 0 and app.prompt.has_focus
        assert app.prompt.text == "What is 2+2?"
        app.prompt.text = CAPITAL
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generation is None and len(app.messages) == 2)
        assert app.messages[0].content == CAPITAL
        assert "Paris" in app.messages[1].content
        assert len(app.chat_log.views()) == 2
        # F4 edits the last question directly.
        await pilot.press("f4")
        assert app.editing == 0 and app.prompt.text == CAPITAL


async def test_copy_message_and_code_block(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        answer = await ask(pilot, CODE)
        await pilot.press("f8")
        assert app.clipboard == answer
        # In the log (↑ past the prompt recalled): b copies the answer's only code block, c
        # the whole message.
        await pilot.press("up", "up")
        assert app.chat_log.selected == 1
        await pilot.press("b")
        await pilot.pause()
        assert app.clipboard.startswith("def add") and "```" not in app.clipboard
        await pilot.press("up", "c")
        await pilot.pause()
        assert app.clipboard == CODE
        # Two code blocks: b offers a choice.
        app.messages[-1].content = "```py\nprint(1)\n```\ntext\n```sh\nls -l\n```"
        await pilot.press("down", "b")
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.clipboard == "ls -l"


async def test_switch_rename_search_delete_chats(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(120, 32)) as pilot:
        await ready(pilot)
        await ask(pilot, "Which planet is called the red planet?")
        first = app.conversation
        await pilot.press("ctrl+n")
        assert app.conversation is None and app.messages == []
        await ask(pilot, "What is 2+2?")
        second = app.conversation
        assert first and second and first.id != second.id
        # Chat list: the newest is on top; Enter on the second row opens the first chat.
        await pilot.press("ctrl+b")
        assert app.chat_list.has_focus and app.chat_list.option_count == 2
        await pilot.press("down", "enter")
        assert app.conversation and app.conversation.id == first.id
        assert app.messages[0].content == "Which planet is called the red planet?"
        assert [v.role for v in app.query(MessageView)] == ["user", "assistant"]
        # Rename (F2).
        await pilot.press("f2")
        await pilot.press(*"Mars", "enter")
        assert app.conversation.title == "Mars" and app.sub_title == "Mars"
        # Search (Ctrl+F) for a word in a message of the other chat.
        await pilot.press("ctrl+f")
        await pilot.press(*"2+2")
        await pilot.press("enter")
        assert app.conversation.id == second.id
        # Delete the current chat from the list, confirming with y.
        await pilot.press("ctrl+b")
        app.chat_list.highlighted = 0
        await pilot.press("d")
        await pilot.press("y")
        assert app.conversation is None
        assert [c.title for c in History(tmp_path / "data" / "chats.sqlite3").chats()] == ["Mars"]


async def test_export_and_chat_settings(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot)
        await ask(pilot, "Say hello.")
        target = tmp_path / "out.md"
        await pilot.press("ctrl+s")
        await pilot.press(*str(target), "enter")
        exported = target.read_text()
        assert exported.startswith("# Say hello.") and "## Assistant" in exported
        # Settings: a bad value is named inline and nothing is saved.
        await pilot.press("f3")
        screen = app.screen
        screen.query_one("#temperature").value = "-1"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        error = str(screen.query_one("#error").render())
        assert "temperature must be >= 0" in error and app.screen is screen
        screen.query_one("#temperature").value = "0.5"  # type: ignore[attr-defined]
        screen.query_one("#max_tokens").value = "8"  # type: ignore[attr-defined]
        screen.query_one("#system").text = "Answer in French."  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        assert app.screen is not screen
        assert app.conversation is not None
        assert app.conversation.settings == ChatSettings(
            temperature=0.5, max_tokens=8, seed=1, top_k=40, top_p=0.95, min_p=0.05
        )
        stored = History(tmp_path / "data" / "chats.sqlite3").get(app.conversation.id)
        assert stored and stored.system_prompt == "Answer in French."
        await ask(pilot, "Say hello again.")
        assert app.messages[-1].meta["tokens"] <= 8
