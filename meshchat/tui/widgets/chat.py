"""The chat pane: one `MessageView` per turn inside a scrolling, keyboard-navigable `ChatLog`.

An answer streams into its Markdown widget through Textual's `MarkdownStream` (which batches
fragments when they come faster than the screen redraws); when it ends, the whole text is
rendered once more, so a code fence that was still open mid-stream comes out right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownBlock, MarkdownStream

from meshchat.tui.versions import position
from meshchat.tui.widgets.message_markdown import MessageMarkdown

ROLE_LABEL = {"user": "You", "assistant": "Assistant"}
FOUND_STYLE = "bold reverse"  # the words a search found, inside the message


def describe_meta(meta: dict[str, Any]) -> str:
    """The small grey note under an answer: how it ended and how fast it came."""
    parts = []
    shown = position(meta)
    if shown is not None:
        parts.append(f"answer {shown[0]}/{shown[1]}")
    if meta.get("error"):
        parts.append(f"failed: {meta['error']}")
    if meta.get("cancelled"):
        parts.append("stopped")
    elif meta.get("finish_reason") == "length":
        parts.append("cut at max tokens")
    if meta.get("tokens"):
        parts.append(f"{meta['tokens']} tokens")
    if meta.get("tok_s"):
        parts.append(f"{meta['tok_s']:.1f} tok/s")
    if meta.get("dropped"):
        parts.append(f"{meta['dropped']} old messages left out of context")
    replans = meta.get("replans")
    if isinstance(replans, int) and replans > 0:
        parts.append("re-planned once" if replans == 1 else f"re-planned {replans} times")
    return " · ".join(parts)


def note_marks(meta: dict[str, Any], text_len: int) -> list[tuple[int, str]]:
    """The notes kept with an answer (meta "notes": [offset, text] pairs), checked: the
    history file is ours, but a hand-edited one must not break the view."""
    marks: list[tuple[int, str]] = []
    raw = meta.get("notes")
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, list | tuple) and len(item) == 2:
            offset, note = item
            if isinstance(offset, int) and isinstance(note, str) and 0 <= offset <= text_len:
                marks.append((offset, note))
    return sorted(marks, key=lambda m: m[0])


class MessageView(Vertical):
    """One message: a role line and its Markdown body."""

    DEFAULT_CSS = """
    MessageView {
        height: auto;
        padding: 0 1;
        margin: 0 0 1 0;
    }
    MessageView > .role { height: 1; color: $text-muted; text-style: bold; }
    MessageView.user > .role { color: $secondary; }
    MessageView.assistant > .role { color: $primary; }
    MessageView > Markdown { padding: 0 1; margin: 0; }
    MessageView > .meta { height: auto; color: $text-muted; padding: 0 1; }
    MessageView > .meta.-error { color: $error; }
    MessageView > .note { height: auto; color: $warning; padding: 0 1; text-style: italic; }
    MessageView > .waiting { height: auto; color: $text-muted; padding: 0 1; }
    MessageView.-selected { background: $boost; border-left: thick $accent; }
    MessageView.-found { background: $accent 15%; border-left: thick $warning; }
    """

    def __init__(self, role: str, text: str = "", meta: dict[str, Any] | None = None) -> None:
        super().__init__(classes=role)
        self.role = role
        self.text = text
        self.meta: dict[str, Any] = dict(meta or {})
        self._stream: MarkdownStream | None = None
        # Notes shown inside the answer where they happened (a failover): (offset, text).
        self.notes: list[tuple[int, str]] = note_marks(self.meta, len(text))
        self._labels: list[Static] = []  # the notes added while streaming
        # Held, not queried: a note mounted mid-stream must not make them hard to find.
        self._waiting = Static("", classes="waiting")
        self._meta = Static(describe_meta(self.meta), classes="meta")
        self._marked: list[tuple[MarkdownBlock, Content]] = []  # (block, its text unmarked)

    def compose(self) -> ComposeResult:
        yield Static(ROLE_LABEL.get(self.role, self.role), classes="role")
        start = 0
        for offset, note in self.notes:
            yield MessageMarkdown(self.text[start:offset])
            yield Static(note, classes="note")
            start = offset
        yield MessageMarkdown(self.text[start:])
        yield self._waiting
        yield self._meta

    def on_mount(self) -> None:
        self._waiting.display = False
        self._show_meta()

    @property
    def body(self) -> Markdown:
        """The Markdown the answer streams into now (the last segment, after any note)."""
        return self.query_children(Markdown).last()

    def _tail(self) -> str:
        """The text after the last note (the body's text)."""
        return self.text[self.notes[-1][0] :] if self.notes else self.text

    def show_waiting(self, text: str) -> None:
        """What the answer waits for before its first token (planning, prefill…)."""
        waiting = self._waiting
        waiting.update(text)
        waiting.display = bool(text)

    async def add_note(self, note: str) -> None:
        """Show `note` inside the answer at this point; the text goes on below it."""
        # Recorded before any await: an update that comes meanwhile finds it.
        offset, tail = len(self.text), self._tail()
        self.notes.append((offset, note))
        label = Static(note, classes="note")
        self._labels.append(label)
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.stop()
        await self.body.update(tail)
        body = Markdown(self.text[offset:])
        await self.mount_all([label, body], before=self._waiting)
        if stream is not None:
            self._stream = Markdown.get_stream(body)

    def update_note(self, note: str) -> None:
        """Change the last note (e.g. "re-planning…" becomes "continuing on …")."""
        if not self.notes:
            return
        self.notes[-1] = (self.notes[-1][0], note)
        if self._labels:
            self._labels[-1].update(note)

    def mark(self, query: str) -> list[str]:
        """Highlight where `query` occurs (any case, as the search matched it) in the rendered
        message; returns the pieces of text highlighted."""
        self.unmark()
        pattern = re.compile(re.escape(query), re.IGNORECASE) if query else None
        found: list[str] = []
        for block in self.query(MarkdownBlock) if pattern else []:
            content = block.content
            if not isinstance(content, Content) or pattern is None:
                continue
            hits = [m.group() for m in pattern.finditer(content.plain)]
            if hits:
                self._marked.append((block, content))
                block.update(content.highlight_regex(pattern, style=FOUND_STYLE))
                found += hits
        return found

    def unmark(self) -> None:
        for block, content in self._marked:
            block.update(content)
        self._marked.clear()

    def refresh_meta(self) -> None:
        """Show `meta` again (after the app changed it)."""
        self._show_meta()

    def _show_meta(self) -> None:
        note = self._meta
        text = describe_meta(self.meta)
        note.update(text)
        note.display = bool(text)
        note.set_class(bool(self.meta.get("error")), "-error")

    def begin_stream(self) -> None:
        self.meta = {}
        self._show_meta()
        self._stream = Markdown.get_stream(self.body)

    async def append(self, fragment: str) -> None:
        self.show_waiting("")
        self.text += fragment
        if self._stream is not None:
            await self._stream.write(fragment)

    async def finish(self, meta: dict[str, Any]) -> None:
        """End the stream and render the whole answer once (closes open code fences)."""
        self.show_waiting("")
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.body.update(self._tail())
        self.meta = dict(meta)
        self._show_meta()

    async def replace_text(self, text: str) -> None:
        self.text = text
        await self.body.update(self._tail())


@dataclass
class LogAction(Message):
    """The user asked for something on one message of the log."""

    action: str  # "copy" | "code" | "edit" | "regenerate" | "older" | "newer" (versions)
    index: int


class ChatLog(VerticalScroll, can_focus=True):
    """The conversation. Focus it (↑ past the prompts recalled) to pick a message and act on it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "select(-1)", "Prev", show=False),
        Binding("down", "select(1)", "Next", show=False),
        Binding("home", "select_edge(0)", "First", show=False),
        Binding("end", "select_edge(-1)", "Last", show=False),
        Binding("c", "act('copy')", "Copy", id="message.copy"),
        Binding("b", "act('code')", "Copy code", id="message.copy_code"),
        Binding("e", "act('edit')", "Edit & resend", id="message.edit"),
        Binding("r", "act('regenerate')", "Regenerate", id="message.regenerate"),
        Binding("left_square_bracket", "act('older')", "Earlier answer", id="message.older"),
        Binding("right_square_bracket", "act('newer')", "Later answer", id="message.newer"),
    ]

    DEFAULT_CSS = """
    ChatLog { height: 1fr; padding: 1 1 0 1; }
    ChatLog > #welcome { color: $text-muted; padding: 1 2; }
    """

    selected: int | None = None
    welcome_text = (
        "Ask anything: type below. [b]Esc[/] stops an answer, ↑ recalls earlier prompts "
        "and then picks a message to copy or edit, [b]F1[/] lists every key."
    )
    _welcome_override: str | None = None

    def set_welcome(self, text: str | None) -> None:
        """What an empty chat says (None: the usual "Ask anything"), e.g. when no model runs."""
        self._welcome_override = text
        for welcome in self.query("#welcome").results(Static):
            welcome.update(self._welcome())

    def _welcome(self) -> str:
        return self._welcome_override or self.welcome_text

    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    async def show(self, messages: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Replace the log with these messages (role, text, meta)."""
        self.selected = None
        await self.remove_children()
        if not messages:
            await self.mount(Static(self._welcome(), id="welcome"))
            return
        await self.mount_all(MessageView(role, text, meta) for role, text, meta in messages)
        self.scroll_end(animate=False)

    async def add(
        self, role: str, text: str = "", meta: dict[str, Any] | None = None
    ) -> MessageView:
        for welcome in self.query("#welcome"):
            await welcome.remove()
        for found in self.query(".-found").results(MessageView):
            found.remove_class("-found")
            found.unmark()
        view = MessageView(role, text, meta)
        await self.mount(view)
        self.anchor()
        self.scroll_end(animate=False)
        return view

    async def drop_from(self, index: int) -> None:
        """Remove the messages at and after `index`."""
        doomed = self.views()[index:]
        if doomed:
            await self.remove_children(doomed)
        if self.selected is not None and self.selected >= index:
            self._select(None)

    def show_match(self, index: int | None, query: str = "") -> None:
        """Scroll to the message a search found and mark it and the words it found (until the
        chat changes)."""
        views = self.views()
        for i, view in enumerate(views):
            view.set_class(i == index, "-found")
            if i == index:
                view.mark(query)
            else:
                view.unmark()
        if index is not None and 0 <= index < len(views):
            self.release_anchor()
            self.call_after_refresh(views[index].scroll_visible, animate=False, top=True)

    def pick(self, index: int) -> None:
        """Focus the log with message `index` selected."""
        self.focus()
        self._select(index)

    def _select(self, index: int | None) -> None:
        views = self.views()
        for i, view in enumerate(views):
            view.set_class(i == index, "-selected")
        self.selected = index
        if index is not None:
            views[index].scroll_visible(animate=False)

    def on_focus(self) -> None:
        if self.selected is None and self.views():
            self._select(len(self.views()) - 1)

    def on_blur(self) -> None:
        self._select(None)

    def action_select(self, step: int) -> None:
        views = self.views()
        if not views:
            return
        current = len(views) if self.selected is None else self.selected
        self._select(max(0, min(len(views) - 1, current + step)))

    def action_select_edge(self, edge: int) -> None:
        views = self.views()
        if views:
            self._select(0 if edge == 0 else len(views) - 1)

    def action_act(self, action: str) -> None:
        if self.selected is not None:
            self.post_message(LogAction(action, self.selected))
