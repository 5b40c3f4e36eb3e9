"""Search every chat's title and messages; Enter opens the chosen chat at the match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from meshchat.tui.history import History, HistoryError
from meshchat.tui.screens.dialogs import DIALOG_CSS


@dataclass(frozen=True)
class SearchChoice:
    conversation_id: int
    query: str  # the words searched for, to find and highlight the message in the chat


class SearchScreen(ModalScreen[SearchChoice | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("down", "results", "Results", show=False),
    ]
    DEFAULT_CSS = (
        "SearchScreen { align: center middle; } SearchScreen OptionList { height: auto; "
        "max-height: 18; margin-top: 1; }" + DIALOG_CSS
    )

    def __init__(self, history: History) -> None:
        super().__init__()
        self._history = history

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Search chats", classes="title")
            yield Input(placeholder="words in a title or a message", id="query")
            yield OptionList(id="results")

    def on_mount(self) -> None:
        self._search("")

    def on_input_changed(self, event: Input.Changed) -> None:
        self._search(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        results = self.query_one(OptionList)
        if results.option_count:
            option = results.get_option_at_index(results.highlighted or 0)
            if option.id is not None:
                self._choose(option.id)

    def action_results(self) -> None:
        self.query_one(OptionList).focus()

    def _search(self, query: str) -> None:
        results = self.query_one(OptionList)
        results.clear_options()
        try:
            hits = self._history.search(query)
        except HistoryError as exc:
            results.add_option(Option(Text(str(exc), style="red"), disabled=True))
            return
        for hit in hits:
            label = Text(hit.conversation.title, style="bold")
            if hit.snippet:
                label.append("\n  " + hit.snippet, style="dim")
            results.add_option(Option(label, id=str(hit.conversation.id)))
        if hits:
            results.highlighted = 0
        elif query:
            results.add_option(
                Option(Text(f"nothing matches {query!r}", style="dim"), disabled=True)
            )

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self._choose(event.option.id)

    def _choose(self, option_id: str) -> None:
        query = self.query_one("#query", Input).value.strip()
        self.dismiss(SearchChoice(int(option_id), query))
