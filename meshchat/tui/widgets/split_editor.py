"""The layer-split editor: the model's layers as one bar, coloured by the node that runs them.

Select a stage with [ and ] (or Shift+←/→), move its boundary with ←/→ (onto allowed split
points only), split it with +, merge with -, give it to another node with n, restore the
planner's plan with a, revert with u, and apply with Enter. A click on the bar moves the nearest
boundary there. Edits that cannot run are refused with the reason on the line under the bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.color import Color
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from meshchat.errors import MeshchatError
from meshchat.mesh.identity import NodeId
from meshchat.tui.split import SELF, Owner, SplitEditError, SplitPlan

HINT = "←/→ move  [ ] stage  + split  - merge  n node  a auto  u undo  Enter apply"
APPLYING = "applying (nodes load their layers)"
LOADING = "loading the model"
NO_PLANNER = (
    "layers can go to other nodes once this node's mesh is up and has asked them what they run"
)


class PlanAdvisor(Protocol):
    """What the editor asks the mesh planner (tui.planning.MeshPlanning)."""

    def predict(self, split: SplitPlan) -> float | None: ...

    def memory(self, split: SplitPlan) -> list[str]: ...

    def violations(self, split: SplitPlan) -> list[str]: ...

    def auto(self, n_layers: int) -> tuple[SplitPlan, str]: ...


class SplitEditor(Widget, can_focus=True):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left", "move(-1)", "Boundary ←", show=False, id="split.left"),
        Binding("right", "move(1)", "Boundary →", show=False, id="split.right"),
        Binding(
            "left_square_bracket,shift+left", "pick(-1)", "Prev stage", show=False, id="split.prev"
        ),
        Binding(
            "right_square_bracket,shift+right", "pick(1)", "Next stage", show=False, id="split.next"
        ),
        Binding("plus,equals_sign", "split", "Split stage", id="split.add"),
        Binding("minus", "merge", "Merge", id="split.merge"),
        Binding("n", "assign", "Node", id="split.assign"),
        Binding("a", "auto", "Auto", id="split.auto"),
        Binding("u", "revert", "Undo", id="split.revert"),
        Binding("enter", "apply", "Apply", id="split.apply"),
    ]

    DEFAULT_CSS = """
    SplitEditor { height: 3; padding: 0 1; }
    SplitEditor:focus { background: $boost; }
    """

    class Apply(Message):
        def __init__(self, plan: SplitPlan) -> None:
            super().__init__()
            self.plan = plan

    plan: reactive[SplitPlan | None] = reactive(None, layout=False)
    selected: reactive[int] = reactive(0)
    message: reactive[str] = reactive("")
    busy: reactive[str] = reactive("")
    # The mesh planner once it knows the nodes: predictions, checks and the auto plan.
    planner: reactive[PlanAdvisor | None] = reactive(None, layout=False)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.applied: SplitPlan | None = None
        self.allowed: tuple[int, ...] = ()
        self.usable: list[NodeId] = []  # peers that may take layers now
        self.names: dict[Owner, str] = {SELF: "you"}
        self.colours: list[str] = ["#7aa2f7"]
        self.is_error = False
        self.pending: SplitPlan | None = None  # being applied: its nodes load their layers

    # --- what the app reports; the editor decides what it shows ------------------------------

    def model_loading(self) -> None:
        self.busy = LOADING

    def model_loaded(self, plan: SplitPlan, allowed: Sequence[int]) -> None:
        self.busy = ""
        self.load(plan, allowed)

    def model_failed(self, error: str) -> None:
        self.busy = ""
        self.say(f"no model: {error}", error=True)

    def applying(self, plan: SplitPlan) -> None:
        self.pending = plan
        self.busy = APPLYING

    def applied_ok(self, plan: SplitPlan, note: str = "") -> None:
        """`plan` runs now; `note` says why when the app chose it (not the user)."""
        self.pending = None
        self.busy = ""
        self.load(plan, self.allowed)
        self.say(note or f"running {plan.describe()}")

    def apply_failed(self, error: str) -> None:
        self.pending = None
        self.busy = ""
        self.say(f"not applied: {error}", error=True)

    def follow(self, running: SplitPlan) -> bool:
        """The mesh runs `running` now (after a failover): show it, keeping an unapplied edit.
        False when there is nothing to change (or an apply is under way)."""
        if self.busy or self.applied is None or running.same_layout(self.applied):
            return False
        edited, plan = self.edited, self.plan
        self.load(running, self.allowed)
        if edited and plan is not None:
            self.plan = plan
        self.say(f"the mesh re-planned: now {running.describe()}")
        return True

    @property
    def loading_nodes(self) -> set[Owner]:
        """The nodes of the plan being applied (they are loading their layers)."""
        if self.pending is None or not self.busy:
            return set()
        return {s.node for s in self.pending.segments}

    def load(self, plan: SplitPlan, allowed: Sequence[int]) -> None:
        """A model was loaded or a plan applied: show it as the current plan."""
        self.allowed = tuple(allowed)
        self.applied = plan
        self.plan = plan
        self.selected = min(self.selected, len(plan.segments) - 1)
        self.say("")

    def set_nodes(self, names: Mapping[NodeId, str], usable: Sequence[NodeId]) -> None:
        self.names = {SELF: "you"}
        for node, name in names.items():
            self.names[node] = name
        self.usable = list(usable)
        self.refresh()

    def set_colours(self, colours: Sequence[str]) -> None:
        self.colours = list(colours) or self.colours
        self.refresh()

    def say(self, text: str, error: bool = False) -> None:
        self.is_error = error
        self.message = text
        self.refresh()

    @property
    def edited(self) -> bool:
        return (
            self.plan is not None
            and self.applied is not None
            and not self.plan.same_layout(self.applied)
        )

    # --- actions ----------------------------------------------------------------------------

    def _edit(self, make: Callable[[], None]) -> None:
        """Run an edit; show its refusal instead of applying it."""
        try:
            make()
        except SplitEditError as exc:
            self.say(str(exc), error=True)
            self.app.bell()
        else:
            self.say("edited: Enter applies, u undoes" if self.edited else "")

    def _boundary(self) -> int:
        """The boundary the arrows move: the selected stage's end (the last stage: its start)."""
        assert self.plan is not None
        n = len(self.plan.segments)
        return self.selected if self.selected < n - 1 else n - 2

    def action_move(self, step: int) -> None:
        if self.plan is None:
            return

        def move() -> None:
            assert self.plan is not None
            if len(self.plan.segments) == 1:
                raise SplitEditError("one stage holds every layer: press + to split it")
            self.plan = self.plan.move_boundary(self._boundary(), step, self.allowed)

        self._edit(move)

    def action_pick(self, step: int) -> None:
        if self.plan is not None:
            self.selected = max(0, min(len(self.plan.segments) - 1, self.selected + step))
            self.refresh()

    def action_split(self) -> None:
        def split() -> None:
            assert self.plan is not None
            self.plan, _ = self.plan.add_boundary(self.selected, self.allowed)

        if self.plan is not None:
            self._edit(split)

    def action_merge(self) -> None:
        def merge() -> None:
            assert self.plan is not None
            if len(self.plan.segments) == 1:
                raise SplitEditError("there is only one stage: nothing to merge")
            self.plan = self.plan.remove_boundary(self._boundary())
            self.selected = min(self.selected, len(self.plan.segments) - 1)

        if self.plan is not None:
            self._edit(merge)

    def action_assign(self) -> None:
        def assign() -> None:
            assert self.plan is not None
            choices: list[Owner] = [SELF, *self.usable]
            if len(choices) == 1:
                raise SplitEditError(
                    "no other node can take layers: none is connected with the same model file"
                )
            current = self.plan.segments[self.selected].node
            following = (
                choices[(choices.index(current) + 1) % len(choices)]
                if (current in choices)
                else SELF
            )
            self.plan = self.plan.assign(self.selected, following)

        if self.plan is not None:
            self._edit(assign)

    def action_auto(self) -> None:
        if self.plan is None or self.busy == LOADING:
            self.say("no model loaded", error=True)
            return
        n_layers = self.plan.n_layers
        if self.planner is None:
            plan = SplitPlan.solo(n_layers)
            note = "auto: every layer on this node (no other node known yet)"
        else:
            try:
                plan, note = self.planner.auto(n_layers)
            except (MeshchatError, ValueError) as exc:
                self.say(str(exc), error=True)
                return
            note = f"auto: {note}"
        self.plan = plan
        self.selected = 0
        self.say(note + ("; Enter applies" if self.edited else ""))

    def action_revert(self) -> None:
        if self.applied is not None:
            self.plan = self.applied
            self.selected = min(self.selected, len(self.applied.segments) - 1)
            self.say("back to the running plan")

    def action_apply(self) -> None:
        if self.plan is None:
            return
        if self.busy:
            self.say(f"wait: {self.busy}", error=True)
            return
        problems = self.plan.validate(self.allowed, self.usable)
        if not problems and not self.plan.is_local:
            problems = [NO_PLANNER] if self.planner is None else self.planner.violations(self.plan)
        if problems:
            self.say(problems[0], error=True)
            self.app.bell()
            return
        if self.applied is not None and self.plan.same_layout(self.applied):
            self.say("that plan is already running")
            return
        self.post_message(self.Apply(self.plan))

    # --- mouse ------------------------------------------------------------------------------

    def _layer_at(self, x: int) -> int:
        assert self.plan is not None
        width = max(1, self.content_size.width)
        return max(0, min(self.plan.n_layers, round(x * self.plan.n_layers / width)))

    def on_click(self, event: events.Click) -> None:
        if self.plan is None or event.y != 1:
            return
        self.focus()
        layer = self._layer_at(event.x - self.gutter.left)
        bounds = self.plan.boundaries
        if not bounds:
            self.selected = self.plan.segment_at(layer)
            self.say("one stage holds every layer: press + to split it")
            return
        index = min(range(len(bounds)), key=lambda i: abs(bounds[i] - layer))
        target = min(self.allowed, key=lambda p: abs(p - layer)) if self.allowed else layer

        def move() -> None:
            assert self.plan is not None
            self.plan = self.plan.move_boundary_to(index, target, self.allowed)
            self.selected = index

        self._edit(move)

    # --- drawing ----------------------------------------------------------------------------

    def _colour(self, node: Owner, order: list[Owner]) -> str:
        if node not in order:
            order.append(node)
        return self.colours[order.index(node) % len(self.colours)]

    def render(self) -> Text:
        plan = self.plan
        width = max(10, self.content_size.width)
        if plan is None:
            return Text(self.busy or "Layers: no model loaded", style="dim")
        order: list[Owner] = [SELF]
        colours = [self._colour(s.node, order) for s in plan.segments]
        head = Text(no_wrap=True, overflow="ellipsis")
        head.append("Layers ", style="bold")
        memory = self.planner.memory(plan) if self.planner is not None else []
        for i, seg in enumerate(plan.segments):
            if i:
                head.append("  ")
            known = self.names.get(seg.node)
            name = known if known is not None else str(seg.node)[:10]
            style = Style(color=colours[i], bold=i == self.selected, underline=i == self.selected)
            head.append(f"{seg.label()} {name}", style=style)
            if i < len(memory):
                head.append(f" {memory[i]}", style="dim")
        predicted = plan.predicted_tok_s
        if predicted is None and self.planner is not None:
            predicted = self.planner.predict(plan)
        if predicted:
            head.append(f"  · predicted {predicted:.0f} tok/s", style="italic")
        state = self.busy or ("edited" if self.edited else "running")
        head.append(f"  · {state}", style="dim")

        # The bar: each column shows the layer under it in its stage's node colour, with the
        # stage's layer count written inside it where it fits.
        chars = [" "] * width
        for seg in plan.segments:
            start = seg.start * width // plan.n_layers
            end = seg.end * width // plan.n_layers
            label = f"{seg.count}" if end - start < 12 else f"{seg.count} layers"
            if len(label) + 2 <= end - start:
                at = start + (end - start - len(label)) // 2
                chars[at : at + len(label)] = label
        # A thin line in the screen's background colour marks each boundary, so two stages on
        # one node (same colour) still read as two.
        screen_bg = Color.parse(self.app.current_theme.background or "black")
        edge_colour = screen_bg.rich_color
        edges = {p * width // plan.n_layers for p in plan.boundaries}
        bar = Text(no_wrap=True)
        for x in range(width):
            layer = min(plan.n_layers - 1, x * plan.n_layers // width)
            index = plan.segment_at(layer)
            colour = Color.parse(colours[index])
            # Stages not selected fade toward the screen (works for light and dark themes).
            background = colour if index == self.selected else colour.blend(screen_bg, 0.35)
            if x in edges and chars[x] == " ":
                bar.append("▏", style=Style(bgcolor=background.rich_color, color=edge_colour))
                continue
            foreground = "black" if background.brightness > 0.5 else "white"
            bar.append(
                chars[x],
                style=Style(bgcolor=background.rich_color, color=foreground, bold=True),
            )

        axis = Text(no_wrap=True)
        marks = [" "] * width
        editable = self._boundary() if len(plan.segments) > 1 else -1
        for i, point in enumerate(plan.boundaries):
            x = min(width - 1, point * width // plan.n_layers)
            text = ("▲" if i == editable else "│") + str(point)
            for j, ch in enumerate(text):
                if x + j < width:
                    marks[x + j] = ch
        axis.append("".join(marks).rstrip(), style="bold" if self.has_focus else "dim")

        # Line 3: a message (a refusal, say) replaces the boundary marks; otherwise a hint
        # follows them where it fits. Three lines keep the chat roomy on a 24-line terminal.
        if self.message:
            third = Text(no_wrap=True, overflow="ellipsis")
            third.append(self.message, style="bold red" if self.is_error else "italic")
        else:
            hint = HINT if self.has_focus else "Ctrl+L edits the split"
            third = axis
            room = width - len(axis.plain) - 3
            if room >= len(hint):
                third.append(" " * (width - len(axis.plain) - len(hint)))
                third.append(hint, style="dim")
        return Text("\n").join([head, bar, third])

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def watch_selected(self) -> None:
        self.refresh()

    def watch_busy(self) -> None:
        self.refresh()

    def watch_planner(self) -> None:
        self.refresh()
