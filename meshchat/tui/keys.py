"""Every key binding of the app, by id: the defaults, the user's `[keys]` overrides, the help.

Bindings carry ids so `config.toml` can rebind them (`regenerate = "ctrl+g"`); Textual's keymap
applies the overrides wherever the binding lives (app, prompt, chat log, split editor, peers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from textual.binding import Binding, BindingType

from meshchat.tui.widgets.chat import ChatLog
from meshchat.tui.widgets.chats import ChatList
from meshchat.tui.widgets.peers import PeersTable
from meshchat.tui.widgets.prompt import PromptInput
from meshchat.tui.widgets.split_editor import SplitEditor

# F-keys are priority bindings: the message box (a TextArea) would take F6/F7 otherwise.
APP_BINDINGS: list[BindingType] = [
    Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
    Binding("f1", "help", "Help", id="help", priority=True),
    Binding("escape", "cancel", "Stop/back", id="cancel"),
    Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
    Binding("f4", "edit_last", "Edit last message", id="edit_last", show=False, priority=True),
    Binding("f8", "copy_answer", "Copy last answer", id="copy_answer", show=False, priority=True),
    Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
    Binding("ctrl+b", "toggle_chats", "Chats", id="chats"),
    Binding("ctrl+f", "search", "Search", id="search", show=False),
    Binding("f2", "rename_chat", "Rename chat", id="rename_chat", show=False, priority=True),
    Binding("f3", "chat_settings", "Chat settings", id="chat_settings", show=False, priority=True),
    Binding("ctrl+s", "export_chat", "Export chat", id="export_chat", show=False),
    Binding("ctrl+l", "focus_split", "Split", id="split_editor"),
    Binding("ctrl+t", "focus_peers", "Peers", id="peers", show=False),
    Binding("f5", "invite", "Invite", id="invite", priority=True),
    Binding("f6", "join", "Join", id="join", show=False, priority=True),
    Binding("f7", "remove_member", "Remove member", id="remove_member", show=False, priority=True),
    Binding("f9", "toggle_mesh", "Mesh panel", id="toggle_mesh", show=False, priority=True),
    Binding("ctrl+o", "choose_model", "Model", id="choose_model", show=False, priority=True),
]

SECTIONS: list[tuple[str, list[BindingType]]] = [
    ("Anywhere", APP_BINDINGS),
    ("Message box", PromptInput.BINDINGS),
    ("Chat log (↑ past the earlier prompts, then ↑/↓ pick a message)", ChatLog.BINDINGS),
    ("Layer-split editor (Ctrl+L)", SplitEditor.BINDINGS),
    ("Peers table (Ctrl+T)", PeersTable.BINDINGS),
    ("Chat list (Ctrl+B)", ChatList.BINDINGS),
]


@dataclass(frozen=True)
class KeyHelp:
    section: str
    id: str
    keys: str
    description: str


def _bindings(items: Iterable[BindingType]) -> list[Binding]:
    return [b for b in items if isinstance(b, Binding) and b.id]


def binding_ids() -> set[str]:
    return {b.id for _, items in SECTIONS for b in _bindings(items) if b.id}


def display_keys(keys: str) -> str:
    """ "ctrl+r,f5" → "Ctrl+R / F5"."""
    names = {
        "plus": "+",
        "left_square_bracket": "[",
        "right_square_bracket": "]",
        "minus": "-",
        "equals_sign": "=",
        "delete": "Del",
        "escape": "Esc",
        "pageup": "PageUp",
        "pagedown": "PageDown",
    }
    shown = []
    for key in keys.split(","):
        parts = key.strip().split("+")
        shown.append(
            "+".join(names.get(p) or (p.capitalize() if len(p) > 1 else p.upper()) for p in parts)
        )
    return " / ".join(shown)


def _binding(binding_id: str) -> Binding:
    for _, items in SECTIONS:
        for binding in _bindings(items):
            if binding.id == binding_id:
                return binding
    raise KeyError(binding_id)


def keys_for(binding_id: str, keymap: Mapping[str, str]) -> str:
    """The keys that run a binding now, as people read them: the user's `[keys]` win."""
    return display_keys(keymap.get(binding_id) or _binding(binding_id).key)


# Not bindings of ours: Textual's command palette, and its theme picker inside it.
PALETTE_ROWS = [
    KeyHelp("Anywhere", "command_palette", "Ctrl+P", "Command palette: every action"),
    KeyHelp("Anywhere", "theme", "Ctrl+P, theme", "Change the colour theme (saved)"),
]


def key_help(keymap: Mapping[str, str]) -> list[KeyHelp]:
    rows = []
    for section, items in SECTIONS:
        for binding in _bindings(items):
            assert binding.id is not None
            keys = keymap.get(binding.id, binding.key)
            rows.append(KeyHelp(section, binding.id, display_keys(keys), binding.description))
        if section == "Anywhere":
            rows += PALETTE_ROWS
    return rows


def markdown_table(rows: Iterable[KeyHelp]) -> str:
    """The keys as the README shows them (tests/test_tui_screens.py checks they agree)."""
    lines = ["| Keys | Does | Id |", "|---|---|---|"]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"| **{section}** | | |")
        lines.append(f"| {row.keys} | {row.description} | `{row.id}` |")
    return "\n".join(lines) + "\n"


def check_keymap(keys: Mapping[str, str]) -> list[str]:
    """Problems with the user's `[keys]` table (unknown ids)."""
    known = binding_ids()
    return [
        f"config [keys]: no binding has the id {name!r} (see F1 for the ids)"
        for name in keys
        if name not in known
    ]
