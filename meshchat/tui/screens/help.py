"""The key-bindings help screen (F1): every binding with its id, for `[keys]` in config.toml."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

from meshchat.tui.keys import key_help
from meshchat.tui.screens.dialogs import DIALOG_CSS


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "dismiss(None)", "Close")]
    DEFAULT_CSS = (
        """
        HelpScreen { align: center middle; }
        HelpScreen .dialog { width: 90; height: 90%; }
        HelpScreen DataTable { height: 1fr; }
        """
        + DIALOG_CSS
    )

    def __init__(self, keymap: Mapping[str, str], config_path: str) -> None:
        super().__init__()
        self._keymap, self._config_path = keymap, config_path

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Keys", classes="title")
            yield DataTable(cursor_type="row", zebra_stripes=True, id="keys")
            yield Static(
                Text(
                    f"Rebind in {self._config_path} under [keys], by id: "
                    'e.g. regenerate = "ctrl+g". Esc closes.'
                ),
                classes="hint",
            )

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Key", key="key", width=18)
        table.add_column("Does", key="does", width=30)
        table.add_column("Id", key="id")
        section = None
        for row in key_help(self._keymap):
            if row.section != section:
                section = row.section
                table.add_row(Text(section, style="bold underline"), "", "")
            table.add_row(Text(row.keys, style="bold"), row.description, Text(row.id, style="dim"))
        table.focus()
