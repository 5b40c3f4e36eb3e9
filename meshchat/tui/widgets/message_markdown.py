"""The Markdown of a chat message: code blocks in a frame labelled with their language.

Textual draws a fence as a tinted block and a fence without a language as plain indented text;
in a chat, where an answer is mostly prose, a frame and a label ("python", or "code" when the
fence names none) show where the code starts and ends and what the `b` copy key will take.
"""

from __future__ import annotations

from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownBlock, MarkdownFence


class FramedFence(MarkdownFence):
    DEFAULT_CSS = """
    FramedFence {
        border: round $foreground 30%;
        border-title-color: $text-muted;
        border-title-align: right;
        margin: 1 0;
        & > Label { padding: 0 1; }
    }
    """

    def on_mount(self) -> None:
        self._label()

    def _copy_context(self, block: MarkdownBlock) -> None:
        # A streamed answer updates fences in place; the language may arrive after the ```.
        super()._copy_context(block)
        self._label()

    def _label(self) -> None:
        self.border_title = self.lexer.strip().split(" ")[0] if self.lexer.strip() else "code"


class MessageMarkdown(Markdown):
    BLOCKS = {  # noqa: RUF012 - Markdown declares it an instance variable (mypy)
        **Markdown.BLOCKS,
        "fence": FramedFence,
        "code_block": FramedFence,
    }
