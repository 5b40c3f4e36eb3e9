"""The list of chats (sidebar, Ctrl+B): Enter opens, r renames, d deletes.

It shows itself only where it leaves the chat room (WIDE columns and more) and there is a chat
to list, unless the user asked for it (Ctrl+B): at 80 columns a 30-column empty sidebar took
36% of the width on a first run.
"""

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
    ChatList, ChatList:focus {
        width: 30; height: 1fr; padding: 0;
        border: none; border-top: hkey $panel; border-right: vkey $panel;
        border-title-align: left; border-title-color: $text-muted;
    }
    ChatList:focus { border-top: hkey $accent; border-title-color: $accent; }
    """

    WIDE = 110  # terminal columns from which the list shows by itself

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Chats"
        self.chosen_display: bool | None = None  # the user's Ctrl+B choice, when made

    def fit(self, screen_width: int) -> None:
        """Show or hide by the width and the chats, unless the user chose."""
        if self.chosen_display is not None:
            self.display = self.chosen_display
        else:
            self.display = screen_width >= self.WIDE and self._has_chats()

    def choose_display(self, shown: bool) -> None:
        self.chosen_display = shown
        self.display = shown

    def _has_chats(self) -> bool:
        return self.option_count > 0 and self.get_option_at_index(0).id is not None

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
        if not chats:
            self.add_option(Option(Text("no chats yet", style="dim italic"), disabled=True))
        if current is not None:
            for index, chat in enumerate(chats):
                if chat.id == current:
                    self.highlighted = index
        if self.is_attached:
            self.fit(self.app.size.width)

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
