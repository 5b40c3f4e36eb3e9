"""The status line under the chat: model, time to first token, tok/s, context use, state."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.text import Text
from textual.widgets import Static


@dataclass(frozen=True)
class StatusInfo:
    model: str = "no model"
    state: str = "starting"  # starting | loading | ready | generating | error
    ttft_s: float | None = None
    tok_s: float | None = None
    context_used: int = 0
    context_size: int = 0
    layout: str = ""  # where the layers run, e.g. "local [0,30)"
    error: str = ""


def _fmt_ttft(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.info = StatusInfo()

    def on_mount(self) -> None:
        self._render_info()

    def set(self, **changes: object) -> None:
        self.info = replace(self.info, **changes)  # type: ignore[arg-type]
        self._render_info()

    def _render_info(self) -> None:
        info = self.info
        text = Text(no_wrap=True, overflow="ellipsis")
        state_style = {
            "ready": "bold green",
            "generating": "bold yellow",
            "loading": "bold cyan",
            "error": "bold red",
        }.get(info.state, "bold")
        text.append(f"● {info.state} ", style=state_style)
        text.append(f"  {info.model}")
        text.append(f"  TTFT {_fmt_ttft(info.ttft_s)}")
        text.append(f"  {info.tok_s:.1f} tok/s" if info.tok_s else "  — tok/s")
        if info.context_size:
            text.append(f"  ctx {info.context_used}/{info.context_size}")
        if info.layout:
            text.append(f"  {info.layout}")
        if info.error:
            text.append(f"  {info.error}", style="red")
        self.update(text)
