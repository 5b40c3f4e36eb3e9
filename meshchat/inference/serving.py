"""A long-lived head on a changing mesh: when to re-plan, and the gate requests pass through.

Shared by the API and the app (no textual here):
- `worth_moving`: the rule for re-planning for the better (a plan predicted clearly faster).
- `PlanGate`: requests run while a plan is up; a plan change waits for the running ones to end
  and holds new ones meanwhile, so a plan never changes in the middle of a request.
- `ReplanLog`: the recent re-plans and why they happened (bounded), for the status file.
- `MeshServing`: the API head's re-planner. It plans at start if it can, serves "unavailable,
  retry later" while nothing fits, and plans again when members join or return, or when a
  joining node makes a plan clearly faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from meshchat.errors import MeshchatError
from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.planner import Plan, label
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import NodeEvent

log = logging.getLogger(__name__)

FASTER_BY = 0.20  # move to a new plan only if it predicts at least 20% more tokens/s
MAX_REPLANS_KEPT = 16
RETRY_AFTER_S = 5  # what a client is told to wait while no plan runs
RETRY_PLAN_S = 5.0  # how often a head with no plan tries again without any member event
SETTLE_S = 1.0  # after a member joins, wait this long for more to join (one re-plan, not N)


def worth_moving(current_decode_s: float, candidate_decode_s: float) -> bool:
    """A plan predicting `candidate_decode_s` per token is worth moving to (between requests or
    turns) from one predicting `current_decode_s`: at least FASTER_BY more tokens/s. Moving
    costs a reload on every node and a replay of every session, so small gains stay put."""
    if candidate_decode_s <= 0 or current_decode_s <= 0:
        return False
    return 1 / candidate_decode_s >= (1 + FASTER_BY) / current_decode_s


async def clearly_better(coordinator: MeshCoordinator, current: Plan) -> tuple[Plan, str] | None:
    """The best plan over every connected member and why, if `worth_moving` to it from
    `current`; None otherwise (or if a node of `current` cannot be assessed: failover's job).
    For any head between requests or turns (the API's `MeshServing`, the app)."""
    try:
        # Every hop priced alike: RTTs to the nodes of the running plan are measured while
        # they compute our requests (pings wait behind the work), which made a busy node
        # look 10x slower than an idle one here and moved the plan at every join.
        caps = [replace(c, rtt_ms={}) for c in await coordinator.gather()]
        planner = coordinator.planner(caps)
        choice = planner.best()
        if any(n not in planner.nodes for n in current.nodes):
            return None
        now_s = planner.predict(current).decode_s
    except MeshchatError as exc:
        log.info("no better plan: %s", exc)
        return None
    if choice.plan.stages == current.stages or not worth_moving(now_s, choice.prediction.decode_s):
        return None
    why = f"predicted {choice.prediction.decode_tok_s:.1f} tok/s against {1 / now_s:.1f} now"
    return choice.plan, why


class ReplanReason(enum.Enum):
    START = "start"
    STAGE_LOST = "stage lost"
    MEMBER_JOINED = "member joined"
    FASTER = "faster plan"
    RETRY = "retry"


@dataclass(frozen=True)
class Replan:
    at: float  # wall clock, seconds
    reason: ReplanReason
    plan: str | None  # the plan now running, described; None if none runs
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "reason": self.reason.value,
            "plan": self.plan,
            "detail": self.detail[:300],
        }


class ReplanLog:
    """The last MAX_REPLANS_KEPT re-plans, oldest first."""

    def __init__(self) -> None:
        self.entries: deque[Replan] = deque(maxlen=MAX_REPLANS_KEPT)

    def add(self, reason: ReplanReason, plan: str | None, detail: str) -> Replan:
        entry = Replan(time.time(), reason, plan, detail)
        self.entries.append(entry)
        return entry

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]


class Unavailable(MeshchatError):
    """No plan runs now; `retry_after` seconds is a fair wait before asking again."""

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class GateFull(MeshchatError):
    """Too many requests wait for a plan change to finish."""


class PlanGate:
    """Requests pass while a plan runs; a plan change waits until none runs (see module doc)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.unavailable: str | None = "no plan yet"  # why requests are refused, if they are
        self._running = 0
        self._waiting = 0
        self._changing = False
        self._cond = asyncio.Condition()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        async with self._cond:
            if self._changing:
                if self._waiting >= self.max_waiting:
                    raise GateFull(f"{self._waiting} requests wait for a re-plan to finish")
                self._waiting += 1
                try:
                    await self._cond.wait_for(lambda: not self._changing)
                finally:
                    self._waiting -= 1
            if self.unavailable is not None:
                raise Unavailable(self.unavailable)
            self._running += 1
        try:
            yield
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """Hold new requests, wait for the running ones to end, then let the caller re-plan."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._changing)
            self._changing = True
            try:
                await self._cond.wait_for(lambda: self._running == 0)
            except BaseException:
                self._changing = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._changing = False
                self._cond.notify_all()


class MeshServing:
    """Keeps a plan running under a long-lived head (the API's) while members come and go.

    `drop_idle` is called with requests held, before a plan change: it closes sessions kept
    only for prefix reuse, so a new plan replays nothing nobody waits for.
    """

    def __init__(
        self,
        coordinator: MeshCoordinator,
        pipeline: MeshPipeline,
        gate: PlanGate,
        drop_idle: Callable[[], Awaitable[None]],
        notify: Callable[[str], None],
    ) -> None:
        self.coordinator = coordinator
        self.pipeline = pipeline
        self.gate = gate
        self.drop_idle = drop_idle
        self.notify = notify
        self.log = ReplanLog()
        self._wake = asyncio.Event()
        self._joined = False
        self._task: asyncio.Task[None] | None = None
        pipeline.replanner = self._failover_plan
        coordinator.node.add_listener(self._on_event)

    @property
    def me(self) -> NodeId:
        return self.coordinator.head

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        self.coordinator.node.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_event(self, event: NodeEvent) -> None:
        if event.kind == "joined":
            self._joined = True
            self._wake.set()
        elif event.kind == "left" and self._in_plan(event.node_id):
            self._wake.set()

    def _in_plan(self, node: NodeId) -> bool:
        plan = self.pipeline.plan
        return plan is not None and node in plan.nodes

    # -- planning --------------------------------------------------------------------------------

    async def plan_now(self, reason: ReplanReason) -> bool:
        """Plan over every connected member and run the plan (requests held only while it
        installs, not while the nodes are asked). False, with requests refused and the reason
        kept, if nothing fits now."""
        before = self.pipeline.plan
        try:
            plan, choice, planner = await self.coordinator.choose()
        except MeshchatError as exc:
            return self._no_plan(reason, str(exc))
        for note in self.coordinator.mismatch_notes(planner):
            self.notify(note)
        async with self.gate.change():
            if self.pipeline.plan is not before and not self.pipeline.broken:
                self.gate.unavailable = None  # a request's failover installed one meanwhile
                return True
            return await self._install(plan, reason, choice.advice if choice else "")

    async def _install(self, plan: Plan, reason: ReplanReason, why: str) -> bool:
        await self.drop_idle()
        try:
            await self.pipeline.apply(plan)
        except MeshchatError as exc:
            return self._no_plan(reason, f"the plan did not start: {exc}")
        self.gate.unavailable = None
        described = plan.describe(self.me)
        self.log.add(reason, described, why)
        flash = "on" if self.coordinator.flash_attn else "off"
        self.notify(f"API plan {described} (flash attention {flash}; {reason.value})")
        return True

    def _no_plan(self, reason: ReplanReason, why: str) -> bool:
        unavailable = f"the mesh cannot run the model now: {why}"
        if unavailable == self.gate.unavailable:
            return False  # the same answer as the last try: nothing new to record
        self.gate.unavailable = unavailable
        self.log.add(reason, None, why)
        self.notify(f"no plan runs ({reason.value}): {why}; waiting for members")
        return False

    async def _better(self) -> None:
        """Move to the best plan over every member if it is clearly faster than the running one."""
        current = self.pipeline.plan
        if current is None:
            return
        better = await clearly_better(self.coordinator, current)
        if better is None:
            return
        plan, why = better
        async with self.gate.change():
            if self.pipeline.plan is current and not self.pipeline.broken:
                await self._install(plan, ReplanReason.FASTER, why)

    async def _failover_plan(self, exclude: set[NodeId]) -> Plan:
        """The pipeline's replanner inside a request (a stage was lost): recorded here."""
        try:
            plan = await self.coordinator.replan(exclude)
        except MeshchatError as exc:
            self._no_plan(ReplanReason.STAGE_LOST, str(exc))
            raise
        left_out = ", ".join(sorted(label(node) for node in exclude)) or "none"
        self.log.add(ReplanReason.STAGE_LOST, plan.describe(self.me), f"left out: {left_out}")
        return plan

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_PLAN_S)
            if self._wake.is_set():
                await asyncio.sleep(SETTLE_S)  # let a burst of joins settle into one re-plan
            self._wake.clear()
            joined, self._joined = self._joined, False
            try:
                await self._step(joined)
            except MeshchatError as exc:
                log.info("re-plan failed: %s", exc)

    async def _step(self, joined: bool) -> None:
        if self.gate.unavailable is not None or self.pipeline.broken is not None:
            reason = ReplanReason.MEMBER_JOINED if joined else ReplanReason.RETRY
            await self.plan_now(reason)
        elif self._lost_stage():
            # Idle with a stage gone: re-plan now rather than in the next request.
            await self.plan_now(ReplanReason.STAGE_LOST)
        elif joined:
            await self._better()

    def _lost_stage(self) -> bool:
        plan = self.pipeline.plan
        if plan is None:
            return False
        connected = set(self.coordinator.node.connected())
        return any(n != self.me and n not in connected for n in plan.nodes)

    def status(self) -> dict[str, Any]:
        plan = self.pipeline.plan
        return {
            "plan": plan.describe(self.me) if plan is not None else None,
            "unavailable": self.gate.unavailable,
            "replans": self.log.to_json(),
        }
