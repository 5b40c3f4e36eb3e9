"""Small modal dialogs: ask for a line of text, confirm, pick one of a list, show an invite."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

DIALOG_CSS = """
.dialog {
    width: 72;
    max-width: 95%;
    height: auto;
    max-height: 90%;
    border: round $primary;
    background: $surface;
    padding: 1 2;
}
.dialog > .title { text-style: bold; margin-bottom: 1; }
.dialog > .error { color: $error; height: auto; }
.dialog > .hint { color: $text-muted; height: auto; }
.dialog .buttons { height: auto; align-horizontal: right; margin-top: 1; }
.dialog .buttons Button { margin-left: 1; min-width: 10; }
"""


class AskText(ModalScreen[str | None]):
    """One line of input. `check` returns an error to show inline, or None when fine."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = "AskText { align: center middle; }" + DIALOG_CSS

    def __init__(
        self,
        title: str,
        value: str = "",
        *,
        placeholder: str = "",
        hint: str = "",
        check: Callable[[str], str | None] | None = None,
        enter: str = "OK",
    ) -> None:
        super().__init__()
        self._title, self._value, self._placeholder = title, value, placeholder
        self._hint, self._check = hint, check
        self._keys = f"Enter {enter} · Esc cancel"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="title")
            yield Input(self._value, placeholder=self._placeholder, id="answer")
            yield Static("", classes="error", id="error")
            if self._hint:
                yield Static(self._hint, classes="hint")
            yield Static(self._keys, classes="hint keys")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        value = event.value.strip()
        problem = self._check(value) if self._check else (None if value else "type something")
        if problem:
            self.query_one("#error", Static).update(problem)
            return
        self.dismiss(value)


class Confirm(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "dismiss(False)", "No"),
        Binding("y", "dismiss(True)", "Yes"),
    ]
    DEFAULT_CSS = "Confirm { align: center middle; }" + DIALOG_CSS

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self._question, self._yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self._question, classes="title")
            with Horizontal(classes="buttons"):
                yield Button("Cancel (n)", id="no")
                yield Button(f"{self._yes} (y)", id="yes", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class Pick(ModalScreen[str | None]):
    """Choose one of (key, label) pairs."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = (
        "Pick { align: center middle; } Pick OptionList { height: auto; max-height: 16; }"
        + DIALOG_CSS
    )

    def __init__(self, title: str, choices: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self._title, self._choices = title, list(choices)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="title")
            yield OptionList(*(Option(label, id=key) for key, label in self._choices))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)


class ShowInvite(ModalScreen[None]):
    """An invite code, with a copy button: paste it into `meshchat --join` on the other node."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "dismiss(None)", "Close"),
        Binding("c", "copy", "Copy"),
    ]
    DEFAULT_CSS = (
        # No border around the code, and the dialog as wide as the screen allows: a terminal
        # selection of it (over SSH, where Copy cannot reach the clipboard without OSC 52) must
        # take the code and nothing else.
        "ShowInvite { align: center middle; } ShowInvite .dialog { width: auto; padding: 1; }"
        "ShowInvite #code { color: $accent; text-style: bold; width: auto; margin-bottom: 1; }"
        + DIALOG_CSS
    )

    def __init__(self, code: str, expires: str) -> None:
        super().__init__()
        self.code, self._expires = code, expires

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Invite another machine", classes="title")
            yield Static(Text(self.code, overflow="fold"), id="code")
            yield Static(
                f"On the other machine run:  meshchat --join {self.code[:12]}…\n"
                f"or press F6 there and paste it. One use, {self._expires}.\n"
                "c copy · Esc close",
                classes="hint",
            )
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")
                yield Button("Copy (c)", id="copy", variant="primary")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.code)
        self.notify("Invite code copied to the clipboard")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)
