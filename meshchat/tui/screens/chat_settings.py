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

from meshchat.config import ChatSettings
from meshchat.tui.screens.dialogs import DIALOG_CSS

FIELDS: list[tuple[str, str, type]] = [
    ("temperature", "Temperature (0 = greedy)", float),
    ("top_p", "Top-p", float),
    ("top_k", "Top-k (0 = off)", int),
    ("min_p", "Min-p", float),
    ("repeat_penalty", "Repeat penalty", float),
    ("max_tokens", "Max tokens", int),
    ("seed", "Seed (empty = random)", int),
]


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
        if key == "seed" and not text:
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
    DEFAULT_CSS = (
        """
        ChatSettingsScreen { align: center middle; }
        ChatSettingsScreen .dialog { width: 80; }
        ChatSettingsScreen TextArea { height: 5; }
        ChatSettingsScreen Grid {
            grid-size: 2; grid-columns: 1fr 1fr; height: auto; grid-gutter: 0 2;
        }
        ChatSettingsScreen Grid Label { margin-top: 1; }
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
            yield TextArea(self._system, id="system", soft_wrap=True, show_line_numbers=False)
            with Grid():
                for key, label, _ in FIELDS:
                    value = getattr(current, key)
                    with Vertical():
                        yield Label(label)
                        yield Input("" if value is None else str(value), id=key)
            yield Static("", classes="error", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save (Ctrl+S)", id="save", variant="primary")

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
