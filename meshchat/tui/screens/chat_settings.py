"""Per-chat settings: system prompt and sampling (temperature, top-p, top-k, min-p, repeat
penalty, max tokens, seed). Bad values are named inline and nothing is saved until all are good.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from meshchat.config import SAMPLING_SCHEMA, ChatSettings
from meshchat.tui.screens.dialogs import DIALOG_CSS

# The form's fields, in the schema's order, as config.py declares them.
FIELDS: list[tuple[str, str, type]] = [(s.key, s.label, s.kind) for s in SAMPLING_SCHEMA]
_OPTIONAL = {s.key for s in SAMPLING_SCHEMA if s.optional}


@dataclass(frozen=True)
class ChatSetup:
    system_prompt: str
    settings: ChatSettings


def parse_settings(values: dict[str, str]) -> tuple[ChatSettings | None, list[str]]:
    """Settings from the form's text fields, or the problems found."""
    parsed: dict[str, Any] = {}
    problems = []
    for key, label, kind in FIELDS:
        text = values.get(key, "").strip()
        if key in _OPTIONAL and not text:
            parsed[key] = None
            continue
        try:
            parsed[key] = kind(text)
        except ValueError:
            problems.append(
                f"{label}: {text!r} is not a{'n integer' if kind is int else ' number'}"
            )
    if problems:
        return None, problems
    settings = ChatSettings(**parsed)
    bad = settings.problems()
    return (None, bad) if bad else (settings, [])


class ChatSettingsScreen(ModalScreen[ChatSetup | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]
    # Compact rows (label | field, two pairs a row) so the whole form, its error line and its
    # buttons fit 80×24; the old one-field-per-cell grid ran off the screen at every size.
    DEFAULT_CSS = (
        """
        ChatSettingsScreen { align: center middle; }
        ChatSettingsScreen .dialog { width: 80; padding: 0 1; }
        ChatSettingsScreen .dialog > .title { margin: 0; }
        ChatSettingsScreen TextArea { height: 4; background: $boost; }
        ChatSettingsScreen Grid {
            grid-size: 4; grid-columns: auto 1fr auto 1fr; grid-rows: 1;
            height: auto; grid-gutter: 1 1; margin: 1 0;
        }
        ChatSettingsScreen Grid Input { background: $boost; }
        ChatSettingsScreen Grid Label { color: $text-muted; }
        """
        + DIALOG_CSS
    )

    def __init__(self, title: str, system_prompt: str, settings: ChatSettings) -> None:
        super().__init__()
        self._title, self._system, self._settings = title, system_prompt, settings

    def compose(self) -> ComposeResult:
        current = self._settings
        with Vertical(classes="dialog"):
            yield Label(f"Settings of “{self._title}”", classes="title")
            yield Label("System prompt")
            # Tab leaves the prompt (the default would indent), so Tab walks every field.
            yield TextArea(
                self._system,
                id="system",
                soft_wrap=True,
                show_line_numbers=False,
                tab_behavior="focus",
                compact=True,
            )
            with Grid():
                for key, label, _ in FIELDS:
                    value = getattr(current, key)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=key, compact=True)
            yield Static("", classes="error", id="error")
            yield Static(
                "Tab/Shift+Tab next/previous field · Enter or Ctrl+S save · Esc cancel",
                classes="hint",
            )
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Save (Ctrl+S)", id="save", variant="primary", compact=True)

    def action_save(self) -> None:
        values = {key: self.query_one(f"#{key}", Input).value for key, _, _ in FIELDS}
        settings, problems = parse_settings(values)
        if settings is None:
            self.query_one("#error", Static).update("\n".join(problems))
            return
        system = self.query_one("#system", TextArea).text.strip()
        self.dismiss(ChatSetup(system, settings))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)
