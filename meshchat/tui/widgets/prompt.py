"""The multi-line prompt: Enter sends, Ctrl+J (or Shift+Enter where the terminal reports it)
starts a new line. Both are bindings with ids, so `[keys]` in config.toml can change them.

Up on the first line hands focus to the chat log (to pick a message to copy or edit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    BINDINGS: ClassVar[list[BindingType]] = [
        # Priority: TextArea would otherwise take Enter as a newline before any binding runs.
        Binding("enter", "submit", "Send", id="send", priority=True, show=False),
        Binding(
            "ctrl+j,shift+enter", "newline", "New line", id="newline", priority=True, show=False
        ),
    ]

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

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            "",
            id=id,
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            highlight_cursor_line=False,
        )
        self.border_title = "Message"
        self.border_subtitle = "Enter send · Ctrl+J new line"

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.post_message(self.Submitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0:
            self.post_message(self.LeaveUp())
            return
        super().action_cursor_up(select)

    def set_editing(self, editing: bool) -> None:
        self.set_class(editing, "-editing")
        if editing:
            self.border_title = "Editing a message"
            self.border_subtitle = "Enter resend · Esc keep the chat as it is"
        else:
            self.border_title = "Message"
            self.border_subtitle = "Enter send · Ctrl+J new line"
