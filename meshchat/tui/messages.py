"""Messages that workers post to the app; the app's handlers own every state change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.message import Message

from meshchat.inference.mesh_pipeline import FailoverNote
from meshchat.tui.engine import ChatEngine
from meshchat.tui.mesh_view import MeshView
from meshchat.tui.planning import MeshPlanning
from meshchat.tui.split import SplitPlan


class EngineLoaded(Message):
    def __init__(self, engine: ChatEngine) -> None:
        super().__init__()
        self.engine = engine


class ModelChosen(Message):
    """The user picked another model; the old one is closed: load this one."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path


class EngineFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class GenChunk(Message):
    def __init__(self, generation: int, text: str) -> None:
        super().__init__()
        self.generation = generation
        self.text = text


class GenDone(Message):
    """An answer ended: finished, cut at max tokens, cancelled, or failed (`error`)."""

    def __init__(self, generation: int, meta: dict[str, Any]) -> None:
        super().__init__()
        self.generation = generation
        self.meta = meta


class MeshReady(Message):
    def __init__(self, mesh: MeshView) -> None:
        super().__init__()
        self.mesh = mesh


class MeshFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class SplitApplied(Message):
    """`plan` runs now; `reason` is set when the app moved to it on its own (not the user)."""

    def __init__(self, plan: SplitPlan, reason: str = "") -> None:
        super().__init__()
        self.plan = plan
        self.reason = reason


class TurnEnded(Message):
    """An answer ended (however): what waited for the turn to end may run now."""


class SplitFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class FailoverNoted(Message):
    """The mesh pipeline lost a stage's node and re-plans (or has re-planned)."""

    def __init__(self, note: FailoverNote) -> None:
        super().__init__()
        self.note = note


class MeshActionDone(Message):
    """A join or removal finished; `error` is empty on success."""

    def __init__(self, text: str, error: str = "") -> None:
        super().__init__()
        self.text = text
        self.error = error


class PlanningReady(Message):
    """The planner knows the nodes' capabilities (again)."""

    def __init__(self, planning: MeshPlanning) -> None:
        super().__init__()
        self.planning = planning
