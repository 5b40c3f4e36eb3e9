"""Plain-text helpers for chat messages: finding fenced code blocks to copy. No UI."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A fence opens with ``` or ~~~ (3 or more) and closes with the same character, at least as long.
_FENCE = re.compile(
    r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)"
    r"(?:^ {0,3}(?P=fence)[`~]*[ \t]*$|\Z)",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class CodeBlock:
    language: str
    code: str

    def title(self) -> str:
        first = next((line for line in self.code.splitlines() if line.strip()), "")
        lang = self.language or "code"
        return f"{lang}: {first.strip()[:50]}"


def code_blocks(markdown: str) -> list[CodeBlock]:
    """The fenced code blocks of a message, in order (an unclosed last fence counts)."""
    blocks = []
    for match in _FENCE.finditer(markdown):
        body = match.group("body")
        if body.endswith("\n"):
            body = body[:-1]
        info = match.group("info").strip().split()
        blocks.append(CodeBlock(info[0] if info else "", body))
    return blocks
