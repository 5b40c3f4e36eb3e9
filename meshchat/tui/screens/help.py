"""The key-bindings help screen (F1): every binding with its id, for `[keys]` in config.toml.

Rich tables, one per section, so keys and descriptions wrap to the terminal instead of being
cut; the id column is narrow and dim (it is only needed to rebind).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import groupby
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from meshchat.tui.keys import KeyHelp, key_help
from meshchat.tui.screens.dialogs import DIALOG_CSS


def keys_tables(rows: list[KeyHelp]) -> RenderableType:
    tables = []
    for section, items in groupby(rows, key=lambda r: r.section):
        table = Table(
            title=Text(section, style="bold underline"),
            title_justify="left",
            show_header=False,
            box=None,
            padding=(0, 1),
            expand=True,
        )
        table.add_column("Key", style="bold", ratio=3)
        table.add_column("Does", ratio=5)
        table.add_column("Id", style="dim", ratio=3, overflow="fold")
        for row in items:
            table.add_row(row.keys, row.description, row.id)
        tables.append(table)
    return Group(*tables)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "dismiss(None)", "Close")]
    DEFAULT_CSS = (
        """
        HelpScreen { align: center middle; }
        HelpScreen .dialog { width: 100; height: 90%; padding: 0 1; }
        HelpScreen VerticalScroll { height: 1fr; }
        """
        + DIALOG_CSS
    )

    def __init__(self, keymap: Mapping[str, str], config_path: str) -> None:
        super().__init__()
        self._config_path = config_path
        self.rows = key_help(keymap)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Keys (↑/↓/PageUp/PageDown scroll)", classes="title")
            with VerticalScroll(id="keys"):
                yield Static(keys_tables(self.rows))
            yield Static(
                Text(
                    f"Rebind in {self._config_path} under [keys], by id: "
                    'e.g. regenerate = "ctrl+g". Themes: Ctrl+P, then "theme". Esc closes.'
                ),
                classes="hint",
            )

    def on_mount(self) -> None:
        self.query_one("#keys").focus()
