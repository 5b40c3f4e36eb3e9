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
    """The status line in `width` cells. When it does not fit, the model name is shortened,
    then parts go in this order: the model name (the title bar has the chat, F1 the keys),
    TTFT (each answer's note keeps it), tok/s, context; the state and the layer range stay,
    which at 80 columns used to be cut off the end."""
    ttft = f"TTFT {_fmt_ttft(info.ttft_s)}" if info.ttft_s is not None else ""
    speed = f"{info.tok_s:.1f} tok/s" if info.tok_s else ""
    context = f"ctx {info.context_used}/{info.context_size}" if info.context_size else ""
    parts = [p for p in (info.model, ttft, speed, context, info.layout) if p]
    droppable = [p for p in (info.model, ttft, speed, context) if p]
    state = f"● {info.state}"

    def length() -> int:
        return cell_len(state) + sum(2 + cell_len(p) for p in parts)

    if length() > width and info.model in parts:
        room = cell_len(info.model) - (length() - width)
        if room >= 8:  # still a recognisable name
            parts[parts.index(info.model)] = info.model[: room - 1] + "…"
    for part in droppable:
        if length() <= width:
            break
        parts = [p for p in parts if p != part and not (part == info.model and p.endswith("…"))]
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(state, style=_STATE_STYLE.get(info.state, "bold"))
    for part in parts:
        text.append(f"  {part}")
    if info.error:
        text.append(f"  {info.error}", style="red")
    return text
