"""The mesh panel: the split editor, the peers table and one line saying what the mesh does.

The panel owns its state in reactives (is this node alone, what is going on, what failed);
the app tells it things with messages (`Nodes`, `Activity`), and the watchers redraw. Alone, the
panel is one line (the split bar and a one-row table say nothing then); it opens again when
another node appears or when the user goes to the split editor or the table.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from meshchat.tui.widgets.peers import PeersTable
from meshchat.tui.widgets.split_editor import SplitEditor

ALONE_HINT = "only this node · F5 invite · F6 join · Ctrl+L split"


class MeshPanel(Vertical):
    DEFAULT_CSS = """
    MeshPanel { height: auto; }
    MeshPanel > #mesh-line { height: 1; padding: 0 2; color: $text-muted; }
    MeshPanel > #mesh-line.-error { color: $error; }
    MeshPanel.-alone > SplitEditor, MeshPanel.-alone > PeersTable { display: none; }
    """

    class Nodes(Message, bubble=False):
        """App → panel: how many other nodes the table shows (members and nearby)."""

        def __init__(self, others: int) -> None:
            super().__init__()
            self.others = others

    class Activity(Message, bubble=False):
        """App → panel: what the mesh is doing now ("joining…"), or what failed (`error`).

        An error stays until the next activity: a failed join must not fade like a toast."""

        def __init__(self, text: str, error: bool = False) -> None:
            super().__init__()
            self.text = text
            self.error = error

    class Moved(Message, bubble=False):
        """App → panel: the app moved to another plan on its own, and why (it is counted)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    alone: reactive[bool] = reactive(True)
    opened: reactive[bool] = reactive(False)  # the user asked for the full panel
    activity: reactive[str] = reactive("")
    problem: reactive[str] = reactive("")
    moved: reactive[str] = reactive("")  # the last plan the app moved to by itself, and why
    moves: reactive[int] = reactive(0)  # how many times it did

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._mounted = False

    def compose(self) -> ComposeResult:
        yield Static("", id="mesh-line")
        yield SplitEditor(id="split")
        yield PeersTable(id="peers")

    def on_mount(self) -> None:
        self._mounted = True
        self._redraw()

    def on_mesh_panel_nodes(self, message: MeshPanel.Nodes) -> None:
        self.alone = message.others == 0

    def on_mesh_panel_activity(self, message: MeshPanel.Activity) -> None:
        if message.error:
            self.problem, self.activity = message.text, ""
        elif message.text:  # a new action: the last failure is history
            self.problem, self.activity = "", message.text
        else:  # done: a failure stays on screen
            self.activity = ""

    def on_mesh_panel_moved(self, message: MeshPanel.Moved) -> None:
        self.moves += 1
        self.moved = message.text

    def open(self) -> None:
        """Show the split editor and table even when alone (before focusing one of them)."""
        self.opened = True

    def watch_alone(self) -> None:
        self._redraw()

    def watch_opened(self) -> None:
        self._redraw()

    def watch_activity(self) -> None:
        self._redraw()

    def watch_problem(self) -> None:
        self._redraw()

    def watch_moved(self) -> None:
        self._redraw()

    @property
    def compact(self) -> bool:
        return self.alone and not self.opened

    @property
    def line(self) -> str:
        """The text of the panel's one line (for tests and screen readers)."""
        if self.problem:
            return self.problem
        if self.activity:
            return self.activity
        if self.moved:
            times = "once" if self.moves == 1 else f"{self.moves} times"
            return f"re-planned {times} between turns; {self.moved}"
        return ALONE_HINT if self.compact else ""

    def _redraw(self) -> None:
        if not self._mounted:
            return  # the watchers of the initial values run before compose
        self.set_class(self.compact, "-alone")
        line = self.query_one("#mesh-line", Static)
        text = self.line
        line.update(text)
        line.set_class(bool(self.problem), "-error")
        line.display = bool(text)
