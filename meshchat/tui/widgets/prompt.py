"""The multi-line prompt: Enter sends, Ctrl+J (or Shift+Enter where the terminal reports it)
starts a new line. Both are bindings with ids, so `[keys]` in config.toml can change them.

Up in an empty box recalls this chat's earlier prompts (as oterm does), Down comes back; Up on
the first line of typed text, or past the oldest prompt, hands focus to the chat log (to pick a
message to copy or edit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import events
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    # Listed for the help screen and `[keys]`; the keys themselves are handled in `_on_key`.
    # Not priority bindings: those run as the key arrives at the app, before characters typed
    # just ahead of it reach this widget, so a fast typist (or a paste) would send half a line.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "submit", "Send", id="send", show=False),
        Binding("ctrl+j,shift+enter", "newline", "New line", id="newline", show=False),
        # The message box keeps focus while the user reads back: page keys scroll the chat.
        Binding("pageup", "scroll_chat(-1)", "Scroll the chat up", id="chat.page_up", show=False),
        Binding(
            "pagedown", "scroll_chat(1)", "Scroll the chat down", id="chat.page_down", show=False
        ),
        # Plain ↑ in an empty box does the same (in `action_cursor_up`, not a binding: on
        # typed text it moves the cursor, then goes to the chat log).
        Binding("ctrl+up", "recall(-1)", "Earlier prompt", id="prompt.recall_prev", show=False),
        Binding("ctrl+down", "recall(1)", "Later prompt", id="prompt.recall_next", show=False),
    ]

    RECALL_LIMIT = 100  # prompts kept for ↑ (this chat's, oldest dropped first)

    DEFAULT_CSS = """
    PromptInput {
        height: auto;
        min-height: 3;
        max-height: 10;
        border: round $primary 50%;
        padding: 0 1;
    }
    PromptInput:focus { border: round $primary; }
    PromptInput.-editing { border: round $accent; }
    """

    @dataclass
    class Submitted(Message):
        text: str

    @dataclass
    class LeaveUp(Message):
        """Up was pressed on the first line."""

    @dataclass
    class ScrollChat(Message):
        """Page the chat log: -1 up, +1 down."""

        pages: int

    def __init__(
        self,
        *,
        id: str | None = None,
        send_keys: str = "enter",
        newline_keys: str = "ctrl+j,shift+enter",
    ) -> None:
        self.send_keys = {k.strip() for k in send_keys.split(",")}
        self.newline_keys = {k.strip() for k in newline_keys.split(",")}
        # The first key of each, as people read it ("enter" → "Enter").
        self._send_name = _key_name(send_keys)
        self._newline_name = _key_name(newline_keys)
        self._notes = ""  # what is special about this chat's setup, shown in the border title
        self._sent: list[str] = []  # this chat's earlier prompts, oldest first (↑ recalls them)
        self._recall: int | None = None  # index into _sent while recalling
        self._unsent = ""  # what the box held before recalling began
        super().__init__(
            "",
            id=id,
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            highlight_cursor_line=False,
        )
        self.set_editing(False)

    @property
    def hint(self) -> str:
        return f"{self._send_name} send · {self._newline_name} new line"

    async def _on_key(self, event: events.Key) -> None:
        # In order with the characters before it (see BINDINGS).
        if event.key in self.send_keys:
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in self.newline_keys:
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.remember(self.text)
            self.post_message(self.Submitted(self.text))

    def remember(self, text: str) -> None:
        """Keep a sent prompt for recall (not twice in a row)."""
        self._recall = None
        if not self._sent or self._sent[-1] != text:
            self._sent = [*self._sent, text][-self.RECALL_LIMIT :]

    def set_recall(self, prompts: list[str]) -> None:
        """Another chat is shown: ↑ recalls its prompts."""
        self._sent = prompts[-self.RECALL_LIMIT :]
        self._recall = None

    @property
    def recalling(self) -> bool:
        """The box shows a recalled prompt, unchanged."""
        return self._recall is not None and self.text == self._sent[self._recall]

    def action_recall(self, step: int) -> None:
        """Ctrl+↑ an earlier prompt, Ctrl+↓ a later one, past the newest what was typed."""
        if not self._sent:
            return
        if self._recall is None:
            if step > 0:
                return
            self._unsent, self._recall = self.text, len(self._sent)
        index = self._recall + step
        if index < 0:
            return
        self._recall = index if index < len(self._sent) else None
        self.text = self._sent[index] if self._recall is not None else self._unsent
        self.move_cursor(self.document.end)

    def action_scroll_chat(self, pages: int) -> None:
        self.post_message(self.ScrollChat(pages))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0:
            if (not self.text or self.recalling) and self._recall != 0 and self._sent:
                self.action_recall(-1)
            else:  # typed text, or past the oldest prompt: pick a message in the chat log
                if self.recalling:  # the box gets back what it held before recalling
                    self.text, self._recall = self._unsent, None
                self.post_message(self.LeaveUp())
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last = self.document.line_count - 1
        if not select and self.cursor_location[0] == last and self.recalling:
            self.action_recall(1)
            return
        super().action_cursor_down(select)

    def set_notes(self, notes: list[str]) -> None:
        """Name what shapes the answers of this chat (a system prompt, greedy sampling)."""
        self._notes = "".join(f" · {note}" for note in notes)
        self.set_editing(self.has_class("-editing"))

    def set_editing(self, editing: bool) -> None:
        self.set_class(editing, "-editing")
        if editing:
            self.border_title = "Editing a message" + self._notes
            self.border_subtitle = f"{self._send_name} resend · Esc keep the chat as it is"
        else:
            self.border_title = "Message" + self._notes
            self.border_subtitle = self.hint


def _key_name(keys: str) -> str:
    first = keys.split(",")[0].strip()
    return "+".join(
        part.capitalize() if len(part) > 1 else part.upper() for part in first.split("+")
    )
