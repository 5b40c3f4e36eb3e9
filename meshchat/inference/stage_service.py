"""The stage service: a node runs the layer range a head assigned it, for that head's sessions.

- Plan (request from a head): load the range from this node's own model file (a cached slice;
  weights never cross the network), after checking the head's per-layer fingerprints against
  ours. A new plan while idle swaps the range in place; the process keeps running.
- SessionOp and Activations arrive from the previous stage (or the head) on one ordered
  stream, so a stage applies them in order; each is passed on to the next stage, and the last
  stage answers the head (SessionDone, or Token with the sampled id). A chain, not a star.
- Everything that touches llama.cpp runs on the process's compute thread, in arrival order.
- Bad input (unknown session, wrong sender, wrong shape, stale plan) gets a StageFault to the
  sender and the head; it never stops the node. A head that leaves loses its sessions here,
  so no KV cache outlives the conversation it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshchat.engine import compute
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import ContextOverflowError, Stage, StageOptions, StageOutput
from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import Calibration, calibration, local_caps, plan_profile
from meshchat.inference.local_model import LocalModel, fingerprint_from_json
from meshchat.inference.planner import Plan
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node, NodeEvent
from meshchat.mesh.transport import ConnectionLost
from meshchat.model.slices import LayerRange
from meshchat.paths import DataDir

log = logging.getLogger(__name__)

MAX_QUEUED = 8192  # work items waiting for the stage thread
MAX_QUEUED_BYTES = 256 << 20  # activation bytes waiting: a peer cannot make us hoard more
MAX_SESSIONS = 16
_NP_DTYPE = {wire.DType.F32: np.float32, wire.DType.F16: np.float16}


class Fault(MeshchatError):
    """A step or op cannot run here; `code` tells the head what to do about it."""

    def __init__(self, code: str, reason: str, culprit: NodeId | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.culprit = culprit


@dataclass
class _Assignment:
    plan_id: str
    head: NodeId
    first: int
    end: int
    prev: NodeId  # who sends us work: the head or the previous stage
    next: NodeId | None  # None: this is the last stage, tokens go to the head
    dtype: wire.DType
    stage: Stage
    options: StageOptions


@dataclass
class _Session:
    local_id: str
    head: NodeId
    cancelled: int = -1  # drop activations whose epoch is at most this


class StageService:
    """Serves this node's share of a model on the mesh. `start()` installs the handlers."""

    def __init__(
        self,
        node: Node,
        model: LocalModel | None,
        data: DataDir,
        threads: int,
        n_batch: int = 512,
    ) -> None:
        self.node = node
        self.model = model
        self.data = data
        self.threads = threads
        self.n_batch = n_batch
        self._jobs: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._assignment: _Assignment | None = None
        self._sessions: dict[int, _Session] = {}
        self._calibration: asyncio.Future[Calibration | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._queued_bytes = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        node = self.node
        node.on(wire.CapsQuery, self._on_caps)
        node.on(wire.Plan, self._on_plan)
        node.on_arrival(wire.Activations, self._enqueue)
        node.on_arrival(wire.SessionOp, self._enqueue)
        node.on_arrival(wire.Cancel, self._on_cancel)
        node.add_listener(self._on_event)
        self._worker = asyncio.ensure_future(self._work())
        if self.model is not None:
            node.set_status(None, self.model.status())
            self._calibration = asyncio.ensure_future(self._calibrate())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._calibration is not None and not self._calibration.done():
            self._calibration.cancel()
        assignment, self._assignment = self._assignment, None
        self._sessions.clear()
        if assignment is not None:
            await self._run(assignment.stage.close)

    @property
    def layers(self) -> tuple[int, int] | None:
        a = self._assignment
        return (a.first, a.end) if a else None

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def _run(self, fn: Any, *args: Any, short: bool = True) -> Any:
        return await compute.run(fn, *args, short=short)

    async def _calibrate(self) -> Calibration | None:
        assert self.model is not None
        try:
            calib = await self._run(calibration, self.model, self.data, self.threads, short=False)
        except Exception as exc:
            log.warning("calibration failed: %s", exc)
            return None
        self.node.engine = {"chosen": calib.profile.to_json(), "running": None}
        return calib

    # -- capabilities ----------------------------------------------------------------------------

    async def _on_caps(self, _peer: NodeId, _msg: wire.CapsQuery) -> wire.Message:
        calib = None
        if self._calibration is not None:
            with contextlib.suppress(TimeoutError):
                calib = await asyncio.wait_for(asyncio.shield(self._calibration), 120)
        rtts = {str(p.node_id): p.rtt_ms for p in self.node.peers(False) if p.rtt_ms is not None}
        peers = [str(n) for n in self.node.connected()]
        caps = local_caps(str(self.node.node_id), self.model, calib, rtts, peers)
        return wire.Ack(body=caps.to_json())

    # -- plans ---------------------------------------------------------------------------------

    async def _on_plan(self, peer: NodeId, msg: wire.Plan) -> wire.Message:
        done: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(("plan", peer, msg, done))
        return await done

    async def _apply_plan(self, head: NodeId, msg: wire.Plan) -> wire.Message:
        body = msg.body
        try:
            plan = Plan.from_json(body.get("stages"), msg.plan_id)
        except MeshchatError as exc:
            return wire.Error("plan", str(exc))
        me = str(self.node.node_id)
        mine = plan.stage_of(me)
        busy = {s.head for s in self._sessions.values()} - {head}
        if busy:
            return wire.Error(
                "busy", f"node {self.node.node_id.short} serves another head's sessions"
            )
        if mine is None:
            if self._assignment is not None and self._assignment.head != head:
                return wire.Ack(body={"layers": list(self.layers or ())})  # not theirs to free
            await self._drop_sessions(lambda _s: True)
            await self._release()
            return wire.Ack(body={"layers": None})
        await self._drop_sessions(lambda _s: True)  # they belong to the old plan
        model = self.model
        if model is None:
            return wire.Error("no-model", f"node {self.node.node_id.short} has no model file")
        theirs = fingerprint_from_json(body.get("model"))
        if theirs is None or not model.fingerprint.layers_match(theirs, mine.first, mine.end):
            return wire.Error(
                "fingerprint",
                f"node {self.node.node_id.short} has a different model file for layers "
                f"{mine} ({model.path.name}, fingerprint {model.fingerprint.short})",
            )
        index = plan.stages.index(mine)
        chain_ok = all(a.end == b.first for a, b in zip(plan.stages, plan.stages[1:], strict=False))
        if not chain_ok or plan.stages[0].first != 0 or plan.stages[-1].end != model.n_layers:
            return wire.Error("plan", "the plan does not cover the model's layers in order")
        try:
            prev = head if index == 0 else NodeId.parse(plan.stages[index - 1].node)
            nxt = (
                None if index == len(plan.stages) - 1 else NodeId.parse(plan.stages[index + 1].node)
            )
            dtype = wire.DType.F16 if body.get("dtype") == "f16" else wire.DType.F32
            n_ctx = max(16, min(int(body.get("n_ctx", 4096)), model.spec.context_length))
            sessions = max(1, min(int(body.get("max_sessions", 2)), MAX_SESSIONS))
            flash_attn = body.get("flash_attn", False)
            if not isinstance(flash_attn, bool):
                raise ValueError("flash_attn must be true or false")
        except (MeshchatError, TypeError, ValueError) as exc:
            return wire.Error("plan", f"malformed plan: {exc}")
        try:
            profile = await self._run(
                plan_profile, model, self.data, self.threads, flash_attn, short=False
            )
        except MeshchatError as exc:
            return wire.Error("load", str(exc))
        options = StageOptions(
            n_ctx=n_ctx, max_sessions=sessions, n_batch=self.n_batch, n_threads=self.threads
        ).with_profile(profile)
        started = time.perf_counter()
        current = self._assignment
        if current and (current.first, current.end, current.options) == (
            mine.first,
            mine.end,
            options,
        ):
            stage = current.stage  # same range: keep the loaded stage
        else:
            await self._release()
            try:
                stage = await self._run(
                    self._load, model, mine.first, mine.end, options, short=False
                )
            except MeshchatError as exc:
                return wire.Error("load", f"cannot load layers {mine}: {exc}")
        self._assignment = _Assignment(
            plan.plan_id, head, mine.first, mine.end, prev, nxt, dtype, stage, options
        )
        self.node.set_status((mine.first, mine.end), model.status())
        self.node.engine = {**(self.node.engine or {}), "running": options.profile.to_json()}
        load_s = time.perf_counter() - started
        log.info("serving layers %s for %s (%.2f s)", mine, head.short, load_s)
        return wire.Ack(
            body={"layers": [mine.first, mine.end], "n_ctx": stage.n_ctx, "load_s": load_s}
        )

    def _load(self, model: LocalModel, first: int, end: int, options: StageOptions) -> Stage:
        path = model.stage_file(self.data, first, end)
        return Stage(path, LayerRange(first, end), model.n_layers, options)

    async def _release(self) -> None:
        assignment, self._assignment = self._assignment, None
        if assignment is not None:
            await self._run(assignment.stage.close)
        self.node.set_status(None, self.model.status() if self.model else None)

    async def _drop_sessions(self, which: Any) -> None:
        a = self._assignment
        for key in [k for k, s in self._sessions.items() if which(s)]:
            session = self._sessions.pop(key)
            if a is not None:
                await self._run(a.stage.close_session, session.local_id)

    # -- work ----------------------------------------------------------------------------------

    def _enqueue(self, peer: NodeId, msg: wire.Message) -> None:
        size = len(msg.data) if isinstance(msg, wire.Activations) else 0
        if self._jobs.qsize() >= MAX_QUEUED or self._queued_bytes + size > MAX_QUEUED_BYTES:
            self._spawn_fault(getattr(msg, "session", 0), [peer], "overload", "stage queue full")
            return
        self._queued_bytes += size
        self._jobs.put_nowait(("msg", peer, msg, None))

    def _on_cancel(self, peer: NodeId, msg: wire.Cancel) -> None:
        session = self._sessions.get(msg.session)
        if session is not None and session.head == peer:
            session.cancelled = max(session.cancelled, msg.epoch)

    def _on_event(self, event: NodeEvent) -> None:
        if event.kind == "left" and any(s.head == event.node_id for s in self._sessions.values()):
            self._jobs.put_nowait(("head-left", event.node_id, None, None))

    async def _work(self) -> None:
        while True:
            kind, peer, msg, done = await self._jobs.get()
            if isinstance(msg, wire.Activations):
                self._queued_bytes -= len(msg.data)
            try:
                if kind == "plan":
                    reply = await self._apply_plan(peer, msg)
                    if not done.done():
                        done.set_result(reply)
                elif kind == "head-left":
                    await self._drop_sessions(lambda s, head=peer: s.head == head)
                elif isinstance(msg, wire.Activations):
                    await self._forward(peer, msg)
                else:
                    await self._session_op(peer, msg)
            except Fault as exc:
                await self._fault(msg, peer, exc)
            except Exception as exc:
                log.exception("stage work failed")
                if done is not None and not done.done():
                    done.set_result(wire.Error("internal", f"stage failed: {exc!r}"))
                elif msg is not None:
                    await self._fault(msg, peer, Fault("internal", f"stage failed: {exc!r}"))

    def _route(self, peer: NodeId, session_key: int) -> tuple[_Assignment, _Session]:
        a = self._assignment
        session = self._sessions.get(session_key)
        if a is None or session is None:
            raise Fault(
                "unknown-session",
                f"node {self.node.node_id.short} has no session {session_key}",
                culprit=None,
            )
        if peer != a.prev:
            raise Fault(
                "bad-input",
                f"node {peer.short} sent work for session {session_key} but is not its "
                "previous stage",
                culprit=peer,
            )
        return a, session

    async def _forward(self, peer: NodeId, msg: wire.Activations) -> None:
        a, session = self._route(peer, msg.session)
        if msg.epoch <= session.cancelled:
            return  # the head cancelled this work
        stage = a.stage
        if stage.is_first != (msg.dtype is None) or (
            msg.dtype is not None and msg.width != stage.n_embd
        ):
            want = "token ids only" if stage.is_first else f"hidden states {stage.n_embd} wide"
            raise Fault(
                "bad-input",
                f"stage {LayerRange(a.first, a.end)} wants {want}, got width {msg.width}",
                culprit=peer,
            )
        try:
            output, micros = await self._run(
                self._compute, stage, session.local_id, msg, short=compute.is_short(len(msg.tokens))
            )
        except ContextOverflowError as exc:
            raise Fault("overflow", str(exc)) from None
        except MeshchatError as exc:
            raise Fault("stage", str(exc)) from None
        trace = (*msg.trace, micros)[-wire.MAX_TRACE :]
        if a.next is not None:
            hidden = output.hidden
            assert hidden is not None
            if a.dtype is wire.DType.F16:
                hidden = hidden.astype(np.float16)
            out = wire.Activations(
                msg.session, msg.position, msg.epoch, msg.tokens, a.dtype, stage.n_embd,
                memoryview(hidden).cast("B"), msg.want_token, trace,
            )  # fmt: skip
            await self._send(a.next, out, msg.session, session.head)
        elif msg.want_token:
            assert output.token is not None
            token = wire.Token(msg.session, msg.position, output.token, list(trace))
            await self._send(session.head, token, msg.session, session.head)

    @staticmethod
    def _compute(stage: Stage, local_id: str, msg: wire.Activations) -> tuple[StageOutput, int]:
        hidden = None
        if msg.dtype is not None:
            hidden = np.frombuffer(msg.data, dtype=_NP_DTYPE[msg.dtype])
            hidden = hidden.reshape(len(msg.tokens), msg.width)
            if hidden.dtype != np.float32:
                hidden = hidden.astype(np.float32)
        started = time.perf_counter()
        output = stage.forward(local_id, msg.position, list(msg.tokens), hidden, msg.want_token)
        return output, int((time.perf_counter() - started) * 1e6)

    async def _session_op(self, peer: NodeId, msg: wire.SessionOp) -> None:
        if msg.op == "open":
            a, session = await self._open(peer, msg)
        else:
            a, session = self._route(peer, msg.session)
            try:
                await self._apply_op(a.stage, session, msg)
            except (TypeError, ValueError) as exc:
                raise Fault("bad-input", f"{msg.op}: {exc}", culprit=peer) from None
            except Fault:
                raise
            except MeshchatError as exc:
                raise Fault("stage", f"{msg.op} failed: {exc}") from None
            if msg.op == "close":
                self._sessions.pop(msg.session, None)
        if a.next is not None:
            await self._send(a.next, msg, msg.session, session.head)
        else:
            done = wire.SessionDone(msg.session, msg.seq)
            await self._send(session.head, done, msg.session, session.head)

    async def _apply_op(self, stage: Stage, session: _Session, msg: wire.SessionOp) -> None:
        if msg.op == "close":
            await self._run(stage.close_session, session.local_id)
        elif msg.op == "rollback":
            await self._run(stage.rollback, session.local_id, msg.position)
        elif msg.op == "sample":
            params = SamplingParams.from_dict(msg.body)
            await self._run(stage.configure_sampling, session.local_id, params)
        elif msg.op != "sync":
            raise ValueError(f"unknown session op {msg.op!r}")

    async def _open(self, peer: NodeId, msg: wire.SessionOp) -> tuple[_Assignment, _Session]:
        a = self._assignment
        plan_id = msg.body.get("plan")
        if a is None or plan_id != a.plan_id:
            raise Fault("stale-plan", f"node {self.node.node_id.short} is not on plan {plan_id}")
        if peer != a.prev:
            raise Fault("bad-input", f"node {peer.short} is not the previous stage", culprit=peer)
        old = self._sessions.pop(msg.session, None)
        if old is not None:
            await self._run(a.stage.close_session, old.local_id)  # a replay starts from scratch
        session = _Session(f"{a.head.short}-{msg.session}", a.head)
        try:
            await self._run(a.stage.open_session, session.local_id)
        except MeshchatError as exc:
            raise Fault("no-slot", str(exc)) from None
        self._sessions[msg.session] = session
        return a, session

    async def _send(self, to: NodeId, msg: wire.Message, session: int, head: NodeId) -> None:
        try:
            await self.node.send(to, msg)
        except ConnectionLost as exc:
            if to != head:
                raise Fault(
                    "lost", f"next stage {to.short} unreachable: {exc}", culprit=to
                ) from None

    async def _fault(self, msg: Any, peer: NodeId, fault: Fault) -> None:
        """Tell the sender and the session's head (if known) why work failed."""
        key = getattr(msg, "session", 0)
        session = self._sessions.get(key)
        targets = [peer]
        head = session.head if session else (self._assignment.head if self._assignment else None)
        if head is not None and head != peer:
            targets.append(head)
        log.info("fault on session %s: %s", key, fault)
        await self._send_fault(key, targets, fault.code, str(fault), fault.culprit)

    def _spawn_fault(self, key: int, targets: list[NodeId], code: str, reason: str) -> None:
        task = asyncio.ensure_future(self._send_fault(key, targets, code, reason, None))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_fault(
        self, key: int, targets: list[NodeId], code: str, reason: str, culprit: NodeId | None
    ) -> None:
        fault = wire.StageFault(key, code, reason[:500], str(culprit) if culprit else None)
        for target in targets:
            with contextlib.suppress(ConnectionLost):
                await self.node.send(target, fault)
