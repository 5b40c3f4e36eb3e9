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
- Members are not trusted blindly: a plan is checked against this node's model and memory
  before anything is loaded; a node installed for one head is busy for every other head until
  that head lets go or leaves; work is queued only from the previous stage of the plan, within
  a per-sender byte budget, so another member cannot fill the queue the real steps need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshchat.engine import compute
from meshchat.engine.stage import ContextOverflowError, Stage, StageOptions, StageOutput
from meshchat.errors import MeshchatError
from meshchat.inference import hop_timing
from meshchat.inference.capabilities import (
    Calibration,
    LayerFile,
    calibration,
    free_memory,
    local_caps,
    plan_profile,
)
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import STAGE_BATCH
from meshchat.inference.protocol import PlanRefused, StageRole, check_plan, sampling_from_wire
from meshchat.inference.seeding import SeededModel, seed_for_plan, seeded_profile
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import seeding_for
from meshchat.mesh.node import Node, NodeEvent
from meshchat.mesh.transport import ConnectionLost
from meshchat.model.slices import LayerRange
from meshchat.paths import DataDir
from meshchat.tasks import BackgroundTasks

log = logging.getLogger(__name__)

MAX_QUEUED = 8192  # work items waiting for the stage thread
MAX_QUEUED_BYTES = 256 << 20  # activation bytes waiting: a peer cannot make us hoard more
MAX_PEER_QUEUED_BYTES = 128 << 20  # one sender's share of them
MAX_PEER_PLANS = 2  # plan requests of one peer waiting for the stage thread
MAX_PENDING_FAULTS = 64  # fault replies in flight; beyond that, bad input is dropped silently
_NP_DTYPE = {wire.DType.F32: np.float32, wire.DType.F16: np.float16}
Code = wire.FaultCode


class Fault(MeshchatError):
    """A step or op cannot run here; `code` tells the head what to do about it."""

    def __init__(self, code: wire.FaultCode, reason: str, culprit: NodeId | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.culprit = culprit


@dataclass
class _Assignment:
    plan_id: str
    head: NodeId
    role: StageRole
    dtype: wire.DType
    stage: Stage
    options: StageOptions
    owned: bool = True  # False once the head left: any head may then install a plan here

    @property
    def first(self) -> int:
        return self.role.first

    @property
    def end(self) -> int:
        return self.role.end

    @property
    def prev(self) -> NodeId:
        return self.role.prev

    @property
    def next(self) -> NodeId | None:
        return self.role.next


@dataclass
class _Session:
    local_id: str
    head: NodeId
    plan_id: str
    cancelled: int = -1  # drop activations whose epoch is at most this


# The stage thread's work, in arrival order.
@dataclass(frozen=True)
class _PlanJob:
    head: NodeId
    msg: wire.Plan
    done: asyncio.Future[wire.Message] = field(compare=False)


@dataclass(frozen=True)
class _StepJob:
    peer: NodeId
    msg: wire.Activations


@dataclass(frozen=True)
class _OpJob:
    peer: NodeId
    msg: wire.SessionOp


@dataclass(frozen=True)
class _HeadLeftJob:
    head: NodeId


_Job = _PlanJob | _StepJob | _OpJob | _HeadLeftJob


class StageService:
    """Serves this node's share of a model on the mesh. `start()` installs the handlers."""

    def __init__(
        self,
        node: Node,
        model: LocalModel | None,
        data: DataDir,
        threads: int,
        n_batch: int = STAGE_BATCH,
        accept_layers: int = 0,
    ) -> None:
        self.node = node
        self.model = model
        self.accept_layers = accept_layers  # disk budget for layers fetched from peers; 0: none
        self.seeding = seeding_for(node)
        if model is not None:
            self.seeding.server.offer(model.fingerprint, model.header)
        self.data = data
        self.threads = threads
        self.n_batch = n_batch
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._assignment: _Assignment | None = None
        self._sessions: dict[int, _Session] = {}
        self._calibration: asyncio.Future[Calibration | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._faults = BackgroundTasks(log, "fault reply")  # answers to refused input
        self._queued_bytes = 0
        self._peer_bytes: dict[NodeId, int] = {}  # activation bytes queued, per sender
        self._peer_plans: dict[NodeId, int] = {}  # plan requests queued, per sender
        self._registered = False

    # -- lifecycle -----------------------------------------------------------------------------

    def register(self) -> None:
        """Take this node's requests (idempotent); callable before the node listens."""
        if self._registered:
            return
        self._registered = True
        hop_timing.enable_from_env()
        node = self.node
        node.on(wire.CapsQuery, self._on_caps)
        node.on(wire.Plan, self._on_plan)
        node.on_arrival(wire.Activations, self._on_activations)
        node.on_arrival(wire.SessionOp, self._on_session_op)
        node.on_arrival(wire.Cancel, self._on_cancel)
        node.add_listener(self._on_event)

    async def start(self) -> None:
        node = self.node
        self.register()
        self._worker = asyncio.ensure_future(self._work())
        self._publish_memory()
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

    @property
    def queued_jobs(self) -> int:
        """Work waiting for the stage thread (0 when idle)."""
        return self._jobs.qsize()

    async def _run(self, fn: Callable[..., object], *args: object, short: bool = True) -> Any:
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

    async def _on_caps(self, peer: NodeId, _msg: wire.CapsQuery) -> wire.Message:
        calib = None
        if self._calibration is not None:
            with contextlib.suppress(TimeoutError):
                calib = await asyncio.wait_for(asyncio.shield(self._calibration), 120)
        rtts = {p.node_id: p.rtt_ms for p in self.node.peers(False) if p.rtt_ms is not None}
        peers = list(self.node.connected())
        files = tuple(LayerFile(**f) for f in self.seeding.server.offers())
        caps = local_caps(
            self.node.node_id,
            self.model,
            calib,
            rtts,
            peers,
            held=self._held_for(peer),
            layer_files=files,
            accept_layers=self.accept_layers,
        )
        return wire.Ack(body=caps.to_json())

    def _held_for(self, head: NodeId) -> int:
        """Memory our loaded stage would free for a plan by `head` (see `_apply_plan`): all of
        it when that head may replace it, none while another head holds it."""
        if self._held_by_other(head) is not None:
            return 0
        return self._holding

    # -- plans ---------------------------------------------------------------------------------

    async def _on_plan(self, peer: NodeId, msg: wire.Plan) -> wire.Message:
        pending = self._peer_plans.get(peer, 0)
        if pending >= MAX_PEER_PLANS:
            return wire.Error(Code.BUSY, f"node {self.node.node_id.short} has your plans queued")
        self._peer_plans[peer] = pending + 1
        self.seeding.permits.allow_plan(msg)  # the plan's stages may fetch their layers here
        done: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_PlanJob(peer, msg, done))
        return await done

    def _held_by_other(self, head: NodeId) -> NodeId | None:
        """The head this node's layers are installed for, if not `head` and still here."""
        a = self._assignment
        if a is None or not a.owned or a.head == head:
            return None
        return a.head if a.head in self.node.connected() else None

    async def _apply_plan(self, head: NodeId, msg: wire.Plan) -> wire.Message:
        me = self.node.node_id
        if (holder := self._held_by_other(head)) is not None:
            return wire.Error(Code.BUSY, f"node {me.short} serves head {holder.short}")
        if msg.stage_of(me) is None:
            await self._drop_sessions(lambda _s: True)
            await self._release()
            return wire.Ack(body={"layers": None})
        model = self.model
        stage_msg = msg.stages[msg.stage_of(me) or 0]
        if self.accept_layers and (
            model is None
            or not model.fingerprint.layers_match(msg.model, stage_msg.first, stage_msg.end)
        ):
            try:
                model = await seed_for_plan(self.node, self.data, self.accept_layers, head, msg)
            except MeshchatError as exc:
                got = f"layers [{stage_msg.first},{stage_msg.end})"
                return wire.Error(Code.SEED, f"node {me.short} could not get {got}: {exc}")
        if model is None:
            return wire.Error(Code.NO_MODEL, f"node {me.short} has no model file")
        try:
            role = check_plan(msg, me, head, model)
        except PlanRefused as exc:
            return wire.Error(exc.code, str(exc))
        assert role is not None
        current = self._assignment
        budget = free_memory(held=self._holding)  # ours is freed first
        if role.memory > budget:
            return wire.Error(
                Code.MEMORY,
                f"layers [{role.first},{role.end}) with {msg.max_sessions} sessions of "
                f"{msg.n_ctx} tokens need {role.memory >> 20} MiB; node {me.short} has "
                f"{budget >> 20} MiB",
            )
        try:
            if isinstance(model, SeededModel):
                profile = seeded_profile(model, self.threads, msg.flash_attn)
            else:
                profile = await self._run(
                    plan_profile, model, self.data, self.threads, msg.flash_attn, short=False
                )
        except MeshchatError as exc:
            return wire.Error(Code.LOAD, str(exc))
        options = StageOptions(
            n_ctx=msg.n_ctx, max_sessions=msg.max_sessions, n_batch=self.n_batch,
            n_threads=self.threads,
        ).with_profile(profile)  # fmt: skip
        keep = current is not None and (current.first, current.end, current.options) == (
            role.first, role.end, options,
        )  # fmt: skip
        await self._drop_sessions(lambda _s: True)  # they belong to the old plan
        started = time.perf_counter()
        if keep:
            assert current is not None
            stage = current.stage  # same range: keep the loaded stage
        else:
            await self._release()
            try:
                stage = await self._run(
                    self._load, model, role.first, role.end, options, short=False
                )
            except MeshchatError as exc:
                return wire.Error(Code.LOAD, f"cannot load layers [{role.first},{role.end}): {exc}")
            if (refusal := await self._over_budget(stage, budget)) is not None:
                return refusal
        self._assignment = _Assignment(msg.plan_id, head, role, msg.dtype, stage, options)
        self._publish_memory()
        self.node.set_status((role.first, role.end), model.status())
        self.node.engine = {**(self.node.engine or {}), "running": options.profile.to_json()}
        load_s = time.perf_counter() - started
        log.info("serving layers [%d,%d) for %s (%.2f s)", role.first, role.end, head.short, load_s)
        return wire.Ack(
            body={"layers": [role.first, role.end], "n_ctx": stage.n_ctx, "load_s": load_s}
        )

    async def _over_budget(self, stage: Stage, budget: int) -> wire.Error | None:
        """Refuse a loaded stage whose measured buffers exceed the budget (the estimate was
        wrong): free it now, before its buffers are touched and the machine swaps."""
        used = stage.memory
        if used.total <= budget:
            return None
        await self._run(stage.close)
        self.node.set_status(None, self.model.status() if self.model else None)
        self._publish_memory()
        layers = stage.layers
        log.info("layers %s measured %d MiB, over the budget", layers, used.total >> 20)
        return wire.Error(
            Code.MEMORY,
            f"layers {layers} measured {used.total >> 20} MiB after load (weights "
            f"{used.weights >> 20}, KV {used.kv >> 20}, buffers "
            f"{(used.compute + used.output) >> 20}); node {self.node.node_id.short} has "
            f"{budget >> 20} MiB",
        )

    @property
    def _holding(self) -> int:
        """Bytes the stage this node holds uses (measured after its load)."""
        return self._assignment.stage.memory.total if self._assignment else 0

    def _publish_memory(self) -> None:
        """What this node offers, what its stage uses (as llama.cpp reported its buffers) and
        so what is left: in the status file and the peers' tables."""
        used = self._assignment.stage.memory if self._assignment else None
        total = used.total if used else 0
        offer = free_memory(total)
        self.node.set_memory(wire.MemoryReport(offer, total), used.to_json() if used else None)

    def _load(self, model: LocalModel, first: int, end: int, options: StageOptions) -> Stage:
        path = model.stage_file(self.data, first, end)
        return Stage(path, LayerRange(first, end), model.n_layers, options)

    async def _release(self) -> None:
        assignment, self._assignment = self._assignment, None
        if assignment is not None:
            await self._run(assignment.stage.close)
        self.node.set_status(None, self.model.status() if self.model else None)
        self._publish_memory()

    async def _drop_sessions(self, which: Callable[[_Session], bool]) -> None:
        a = self._assignment
        for key in [k for k, s in self._sessions.items() if which(s)]:
            session = self._sessions.pop(key)
            if a is not None:
                await self._run(a.stage.close_session, session.local_id)

    # -- work ----------------------------------------------------------------------------------

    def _on_activations(self, peer: NodeId, msg: wire.Activations) -> None:
        if (rec := hop_timing.RECORDER) is not None and _traced(msg):
            rec.arrived(self.node, peer, msg.session, msg.position, self._order())
        self._admit(peer, _StepJob(peer, msg), msg.session, len(msg.data))

    def _order(self) -> int:
        return hop_timing.stage_order(self._assignment.first) if self._assignment else -1

    def _on_session_op(self, peer: NodeId, msg: wire.SessionOp) -> None:
        self._admit(peer, _OpJob(peer, msg), msg.session, 0)

    def _admit(self, peer: NodeId, job: _StepJob | _OpJob, session: int, size: int) -> None:
        """Queue work from the previous stage of our plan, within its budget; refuse the rest
        before it takes any room (a member cannot crowd out the plan's real steps)."""
        a = self._assignment
        if a is None or not a.owned:
            self._spawn_fault(session, peer, Code.STALE_PLAN, "no plan installed here")
            return
        if peer != a.prev:
            reason = f"node {peer.short} is not the previous stage of this node's plan"
            self._spawn_fault(session, peer, Code.BAD_INPUT, reason, culprit=peer)
            return
        queued = self._peer_bytes.get(peer, 0)
        if (
            self._jobs.qsize() >= MAX_QUEUED
            or self._queued_bytes + size > MAX_QUEUED_BYTES
            or queued + size > MAX_PEER_QUEUED_BYTES
        ):
            self._spawn_fault(session, peer, Code.OVERLOAD, "stage queue full")
            return
        self._queued_bytes += size
        if size:
            self._peer_bytes[peer] = queued + size
        self._jobs.put_nowait(job)

    def _dequeued(self, job: _Job) -> None:
        if isinstance(job, _StepJob):
            self._queued_bytes -= len(job.msg.data)
            _count_down(self._peer_bytes, job.peer, len(job.msg.data))
        elif isinstance(job, _PlanJob):
            _count_down(self._peer_plans, job.head, 1)

    def _on_cancel(self, peer: NodeId, msg: wire.Cancel) -> None:
        session = self._sessions.get(msg.session)
        if session is not None and session.head == peer:
            session.cancelled = max(session.cancelled, msg.epoch)

    def _on_event(self, event: NodeEvent) -> None:
        if event.kind != "left":
            return
        a = self._assignment
        if (a is not None and a.head == event.node_id) or any(
            s.head == event.node_id for s in self._sessions.values()
        ):
            self._jobs.put_nowait(_HeadLeftJob(event.node_id))

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            self._dequeued(job)
            try:
                await self._do(job)
            except Fault as exc:
                assert not isinstance(job, _PlanJob | _HeadLeftJob)
                await self._fault(job.msg, job.peer, exc)
            except Exception as exc:
                log.exception("stage work failed")
                if isinstance(job, _PlanJob):
                    if not job.done.done():
                        job.done.set_result(wire.Error(Code.INTERNAL, f"stage failed: {exc!r}"))
                elif not isinstance(job, _HeadLeftJob):
                    fault = Fault(Code.INTERNAL, f"stage failed: {exc!r}")
                    await self._fault(job.msg, job.peer, fault)

    async def _do(self, job: _Job) -> None:
        match job:
            case _PlanJob(head, msg, done):
                reply = await self._apply_plan(head, msg)
                if not done.done():
                    done.set_result(reply)
            case _HeadLeftJob(head):
                await self._drop_sessions(lambda s: s.head == head)
                a = self._assignment
                if a is not None and a.head == head:
                    a.owned = False  # keep the loaded range for reuse, but let any head take it
            case _StepJob(peer, msg):
                await self._forward(peer, msg)
            case _OpJob(peer, msg):
                await self._session_op(peer, msg)

    def _route(self, peer: NodeId, session_key: int) -> tuple[_Assignment, _Session]:
        a = self._assignment
        session = self._sessions.get(session_key)
        if a is None or session is None or (session.head, session.plan_id) != (a.head, a.plan_id):
            raise Fault(
                Code.UNKNOWN_SESSION,
                f"node {self.node.node_id.short} has no session {session_key}",
                culprit=None,
            )
        if peer != a.prev:
            raise Fault(
                Code.BAD_INPUT,
                f"node {peer.short} sent work for session {session_key} but is not its "
                "previous stage",
                culprit=peer,
            )
        return a, session

    async def _forward(self, peer: NodeId, msg: wire.Activations) -> None:
        if (rec := hop_timing.RECORDER) is not None and _traced(msg):
            rec.mark(msg.session, msg.position, self._order(), hop_timing.Mark.DEQUEUED)
        a, session = self._route(peer, msg.session)
        if msg.epoch <= session.cancelled:
            return  # the head cancelled this work
        stage = a.stage
        if stage.is_first != (msg.dtype is None) or (
            msg.dtype is not None and msg.width != stage.n_embd
        ):
            want = "token ids only" if stage.is_first else f"hidden states {stage.n_embd} wide"
            raise Fault(
                Code.BAD_INPUT,
                f"stage {LayerRange(a.first, a.end)} wants {want}, got width {msg.width}",
                culprit=peer,
            )
        try:
            output, micros = await self._run(
                self._compute, stage, session.local_id, msg, short=compute.is_short(len(msg.tokens))
            )
        except ContextOverflowError as exc:
            raise Fault(Code.OVERFLOW, str(exc)) from None
        except MeshchatError as exc:
            raise Fault(Code.STAGE, str(exc)) from None
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
            to = a.next
        elif msg.want_token:
            assert output.token is not None
            token = wire.Token(msg.session, msg.position, output.token, list(trace))
            await self._send(session.head, token, msg.session, session.head)
            to = session.head
        else:
            return
        if (rec := hop_timing.RECORDER) is not None and _traced(msg):
            rec.sent(self.node, to, msg.session, msg.position, hop_timing.stage_order(a.first))

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
        ended = time.perf_counter()
        if (rec := hop_timing.RECORDER) is not None and _traced(msg):
            order = hop_timing.stage_order(stage.layers.first)
            rec.mark(msg.session, msg.position, order, hop_timing.Mark.COMPUTE, started)
            rec.mark(msg.session, msg.position, order, hop_timing.Mark.COMPUTED, ended)
        return output, int((ended - started) * 1e6)

    async def _session_op(self, peer: NodeId, msg: wire.SessionOp) -> None:
        if msg.op is wire.SessionOpKind.OPEN:
            a, session = await self._open(peer, msg)
        else:
            a, session = self._route(peer, msg.session)
            try:
                await self._apply_op(a, session, msg)
            except ValueError as exc:
                raise Fault(Code.BAD_INPUT, f"{msg.op}: {exc}", culprit=peer) from None
            except MeshchatError as exc:
                raise Fault(Code.STAGE, f"{msg.op} failed: {exc}") from None
            if msg.op is wire.SessionOpKind.CLOSE:
                self._sessions.pop(msg.session, None)
        if a.next is not None:
            await self._send(a.next, msg, msg.session, session.head)
        else:
            done = wire.SessionDone(msg.session, msg.seq)
            await self._send(session.head, done, msg.session, session.head)

    async def _apply_op(self, a: _Assignment, session: _Session, msg: wire.SessionOp) -> None:
        stage = a.stage
        match msg.op:
            case wire.SessionOpKind.CLOSE:
                await self._run(stage.close_session, session.local_id)
            case wire.SessionOpKind.ROLLBACK:
                await self._run(stage.rollback, session.local_id, msg.position)
            case wire.SessionOpKind.SAMPLE:
                assert msg.sampling is not None  # wire.SessionOp checks the body matches the op
                params = sampling_from_wire(msg.sampling, a.options.n_ctx)
                await self._run(stage.configure_sampling, session.local_id, params)
            case wire.SessionOpKind.SYNC | wire.SessionOpKind.OPEN:
                pass

    async def _open(self, peer: NodeId, msg: wire.SessionOp) -> tuple[_Assignment, _Session]:
        a = self._assignment
        if a is None or not a.owned or msg.plan_id != a.plan_id:
            raise Fault(
                Code.STALE_PLAN, f"node {self.node.node_id.short} is not on plan {msg.plan_id}"
            )
        if peer != a.prev:
            raise Fault(
                Code.BAD_INPUT, f"node {peer.short} is not the previous stage", culprit=peer
            )
        old = self._sessions.pop(msg.session, None)
        if old is not None:
            await self._run(a.stage.close_session, old.local_id)  # a replay starts from scratch
        session = _Session(f"{a.head.short}-{msg.session}", a.head, a.plan_id)
        try:
            await self._run(a.stage.open_session, session.local_id)
        except MeshchatError as exc:
            raise Fault(Code.NO_SLOT, str(exc)) from None
        self._sessions[msg.session] = session
        return a, session

    async def _send(self, to: NodeId, msg: wire.Message, session: int, head: NodeId) -> None:
        try:
            await self.node.send(to, msg)
        except ConnectionLost as exc:
            if to != head:
                raise Fault(
                    Code.LOST, f"next stage {to.short} unreachable: {exc}", culprit=to
                ) from None

    async def _fault(
        self, msg: wire.Activations | wire.SessionOp, peer: NodeId, fault: Fault
    ) -> None:
        """Tell the sender and the session's head (if known) why work failed."""
        key = msg.session
        session = self._sessions.get(key)
        targets = [peer]
        head = session.head if session else (self._assignment.head if self._assignment else None)
        if head is not None and head != peer:
            targets.append(head)
        log.info("fault on session %s: %s", key, fault)
        await self._send_fault(key, targets, fault.code, str(fault), fault.culprit)

    def _spawn_fault(
        self,
        key: int,
        target: NodeId,
        code: wire.FaultCode,
        reason: str,
        culprit: NodeId | None = None,
    ) -> None:
        """Answer refused input without waiting; a flood of it gets no more answers than
        MAX_PENDING_FAULTS at a time."""
        if len(self._faults) < MAX_PENDING_FAULTS:
            self._faults.spawn(self._send_fault(key, [target], code, reason, culprit))

    async def _send_fault(
        self,
        key: int,
        targets: list[NodeId],
        code: wire.FaultCode,
        reason: str,
        culprit: NodeId | None,
    ) -> None:
        fault = wire.StageFault(key, code, reason[:500], culprit)
        for target in targets:
            with contextlib.suppress(ConnectionLost):
                await self.node.send(target, fault)


def _traced(msg: wire.Activations) -> bool:
    """A decode step (hop_timing): one token, sampled at the end (a replay wants none)."""
    return msg.want_token and len(msg.tokens) == 1


def _count_down(counts: dict[NodeId, int], key: NodeId, by: int) -> None:
    """Take `by` off a per-peer count; a count that reaches zero leaves the table."""
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
