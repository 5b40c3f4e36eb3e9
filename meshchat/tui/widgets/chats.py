"""The list of chats (sidebar, Ctrl+B): Enter opens, r renames, d deletes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from meshchat.tui.history import Conversation


class ChatList(OptionList):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "act('rename')", "Rename", id="chats.rename"),
        Binding("d,delete", "act('delete')", "Delete", id="chats.delete"),
    ]

    DEFAULT_CSS = """
    ChatList { width: 30; height: 1fr; border: none; border-right: vkey $panel; padding: 0; }
    """

    class Chosen(Message):
        def __init__(self, action: str, conversation_id: int) -> None:
            super().__init__()
            self.action = action  # "open" | "rename" | "delete"
            self.conversation_id = conversation_id

    def show(self, chats: Sequence[Conversation], current: int | None) -> None:
        self.clear_options()
        for chat in chats:
            style = "bold" if chat.id == current else ""
            self.add_option(
                Option(
                    Text(chat.title, style=style, overflow="ellipsis", no_wrap=True),
                    id=str(chat.id),
                )
            )
        if current is not None:
            for index, chat in enumerate(chats):
                if chat.id == current:
                    self.highlighted = index

    def _current_id(self) -> int | None:
        if self.highlighted is None or not self.option_count:
            return None
        option = self.get_option_at_index(self.highlighted)
        return int(option.id) if option.id else None

    def action_act(self, action: str) -> None:
        chat = self._current_id()
        if chat is not None:
            self.post_message(self.Chosen(action, chat))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(self.Chosen("open", int(event.option.id)))
