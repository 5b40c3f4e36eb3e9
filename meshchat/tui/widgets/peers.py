"""The peers table: every node of the mesh plus nearby non-members, one row per NodeID.

Rows are keyed by NodeID (its text: a DataTable key is a string) and cells are changed with
`update_cell` only when their text changes, so the table is never rebuilt (the cursor and
scroll position stay put while RTTs tick).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable

from meshchat.tui.mesh_view import PeerRow
from meshchat.tui.split import Owner

# Most telling first: on an 80-column terminal the last columns are the ones cut off.
COLUMNS = (
    ("node", "Node"),
    ("rtt", "RTT"),
    ("layers", "Layers"),
    ("state", "State"),
    ("share", "Time share"),
    ("address", "Address"),
    ("via", "Found via"),
    ("memory", "Memory used/offered"),
)
_STATE = 3  # index of the state column (coloured by state)

_STATE_STYLE = {
    "serving": "green",
    "idle": "",
    "loading": "cyan",
    "generating": "yellow",
    "connecting": "yellow",
    "lost": "red",
    "left": "dim",
    "nearby": "dim",
}


def _rtt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} ms" if value >= 1 else f"{value * 1000:.0f} µs"


class PeersTable(DataTable[Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("delete,d", "remove", "Remove member", id="peers.remove"),
    ]

    class RemoveRequested(Message):
        def __init__(self, key: Owner) -> None:
            super().__init__()
            self.key = key

    DEFAULT_CSS = """
    PeersTable { scrollbar-size-horizontal: 0; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False, show_cursor=True)
        self._cells: dict[Owner, tuple[str, ...]] = {}
        self._owners: dict[str, Owner] = {}  # row key → whose row it is

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def _cells_for(self, row: PeerRow, share: str) -> tuple[str, ...]:
        layers = f"[{row.layers[0]},{row.layers[1]})" if row.layers else "—"
        via = row.via if row.member else f"{row.via}, not a member"
        state = f"{row.state} · {row.seeding}" if row.seeding else row.state
        cells = (row.name, _rtt(row.rtt_ms), layers, state, share, row.address or "—", via)
        return (*cells, row.memory or "—")

    def sync(self, rows: Sequence[PeerRow], shares: Mapping[Owner, str] | None = None) -> None:
        """Make the table show `rows`: update changed cells, add new rows, drop gone ones."""
        shares = shares or {}
        seen = set()
        for row in rows:
            seen.add(row.key)
            cells = self._cells_for(row, shares.get(row.key, "—"))
            old = self._cells.get(row.key)
            styled = [Text(c) for c in cells]
            styled[_STATE].stylize(_STATE_STYLE.get(row.state, ""))
            if old is None:
                self.add_row(*styled, key=str(row.key))
                self._owners[str(row.key)] = row.key
            else:
                for (col, _), before, after, text in zip(COLUMNS, old, cells, styled, strict=True):
                    if before != after:
                        self.update_cell(str(row.key), col, text, update_width=True)
            self._cells[row.key] = cells
        for key in [k for k in self._cells if k not in seen]:
            self.remove_row(str(key))
            del self._cells[key]
            del self._owners[str(key)]

    def selected_key(self) -> Owner | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return self._owners.get(row_key.value) if row_key.value is not None else None

    def action_remove(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(self.RemoveRequested(key))
