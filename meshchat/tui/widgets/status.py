"""The status line under the chat: model, time to first token, tok/s, context use, state."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.cells import cell_len
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

    def on_resize(self) -> None:
        self._render_info()

    def set(self, **changes: object) -> None:
        self.info = replace(self.info, **changes)  # type: ignore[arg-type]
        self._render_info()

    def _render_info(self) -> None:
        self.update(render_status(self.info, self.content_size.width or 200))


_STATE_STYLE = {
    "ready": "bold green",
    "generating": "bold yellow",
    "loading": "bold cyan",
    "error": "bold red",
}


def render_status(info: StatusInfo, width: int) -> Text:
    """The status line in `width` cells: what is unknown yet ("—") goes first, then the model
    name is shortened, so the state, speed, context and layer range stay readable at 80
    columns (the model name is in the header's title bar too)."""
    state = (f"● {info.state}", _STATE_STYLE.get(info.state, "bold"))
    ttft = f"TTFT {_fmt_ttft(info.ttft_s)}" if info.ttft_s is not None else ""
    speed = f"{info.tok_s:.1f} tok/s" if info.tok_s else ""
    context = f"ctx {info.context_used}/{info.context_size}" if info.context_size else ""
    fixed = [p for p in (ttft, speed, context, info.layout) if p]
    used = cell_len(state[0]) + sum(2 + cell_len(p) for p in fixed)
    model = info.model
    room = width - used - 2
    if cell_len(model) > room:
        model = model[: max(0, room - 1)] + "…" if room > 4 else ""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(state[0], style=state[1])
    for part in ([model] if model else []) + fixed:
        text.append(f"  {part}")
    if info.error:
        text.append(f"  {info.error}", style="red")
    return text
