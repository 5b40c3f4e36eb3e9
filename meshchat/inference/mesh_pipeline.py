"""A pipeline whose stages run on mesh nodes: the head's side of distributed generation.

The head usually runs stage 0 itself (a local Stage on the compute thread) and sends each step's
hidden states to the next node; every stage forwards to its successor and the last one sends
the sampled token id back here. Session operations (open, rollback, sampler) travel the same
chain, so each stage applies them in order with the work; the last stage confirms.

Prompts go in chunks (micro-batches): while stage 1 runs chunk n, stage 0 runs chunk n+1.

Failover: when a stage's node leaves (no answer for the mesh's dead-peer timeout), reconnects
(a restart: what was in flight is lost), faults, or the step times out, the head asks its
replanner for a plan over the survivors, installs it (each node loads its new range from its
own file), and replays every open session's tokens so the new stages hold the same KV caches,
then retries the step. The head keeps every session's
token history, so nothing is lost; a greedy run gives the same text as one without the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from meshchat.engine import compute
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import ContextOverflowError, Stage, StageError, StageOptions
from meshchat.errors import MeshchatError
from meshchat.inference import hop_timing
from meshchat.inference.capabilities import plan_profile
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import Plan, PlanError, label
from meshchat.inference.protocol import plan_message, sampling_to_wire
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import seeding_for
from meshchat.mesh.node import Node, NodeEvent, PeerState, Refused
from meshchat.mesh.transport import ConnectionLost
from meshchat.model.slices import LayerRange
from meshchat.paths import DataDir
from meshchat.tasks import BackgroundTasks
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

T = TypeVar("T")
Replanner = Callable[[set[NodeId]], Awaitable[Plan]]

MAX_FAILOVERS = 4


class StageLost(MeshchatError):
    """A stage of the plan went away or failed; `node` is the one to leave out (if known),
    `code` why it refused its plan (if it did) and `refusal` the stage's own words for it."""

    def __init__(
        self,
        node: NodeId | None,
        reason: str,
        code: wire.FaultCode | None = None,
        refusal: str = "",
    ) -> None:
        super().__init__(reason)
        self.node = node
        self.code = code
        self.refusal = refusal


@dataclass(frozen=True)
class FailoverNote:
    """What a failover did, for a UI to show where the answer was when it happened.

    `lost` is the node left out (None: not known, e.g. a timeout); `plan`
    is empty while re-planning and describes the new plan once it runs."""

    lost: NodeId | None
    reason: str
    plan: str = ""


class History:
    """The tokens a session's KV caches hold, kept as the stage calls that put them there.

    llama.cpp's results depend (in the last bits) on how tokens were batched, so a replay that
    must give the same KV caches, and so the same greedy text, repeats the very same calls:
    each segment is one call's tokens and how many of them are still held after rollbacks.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.segments: list[tuple[list[int], int]] = []

    def add(self, fed: list[int]) -> None:
        self.segments.append((fed, len(fed)))
        self.tokens.extend(fed)

    def truncate(self, position: int) -> None:
        if position >= len(self.tokens):
            return
        del self.tokens[position:]
        kept, start = [], 0
        for fed, keep in self.segments:
            if start >= position:
                break
            kept.append((fed, min(keep, position - start)))
            start += keep
        self.segments = kept


@dataclass
class _Session:
    wire_id: int
    local_id: str
    history: History = field(default_factory=History)
    params: SamplingParams | None = None
    seq: int = 0  # session ops sent; the epoch of activations sent after them


@dataclass
class StepTiming:
    """Where the last step's time went (the UI's per-stage compute vs network split)."""

    wall_s: float = 0.0
    stage_compute_s: list[float] = field(default_factory=list)  # per stage, in plan order

    @property
    def network_s(self) -> float:
        return max(0.0, self.wall_s - sum(self.stage_compute_s))


@dataclass
class Totals:
    """Time per stage and on the network, summed over steps since `reset` (for the UI)."""

    steps: int = 0
    wall_s: float = 0.0
    stage_compute_s: list[float] = field(default_factory=list)

    def add(self, step: StepTiming) -> None:
        self.steps += 1
        self.wall_s += step.wall_s
        if len(self.stage_compute_s) != len(step.stage_compute_s):
            self.stage_compute_s = [0.0] * len(step.stage_compute_s)
        for i, seconds in enumerate(step.stage_compute_s):
            self.stage_compute_s[i] += seconds

    @property
    def network_s(self) -> float:
        return max(0.0, self.wall_s - sum(self.stage_compute_s))


class MeshPipeline:
    """Implements `Pipeline` over a plan on the mesh (see module doc)."""

    def __init__(
        self,
        node: Node,
        model: LocalModel,
        data: DataDir,
        *,
        threads: int,
        n_ctx: int,
        flash_attn: bool = False,
        max_sessions: int = 2,
        transport_dtype: str = "f32",
        prefill_chunk: int = 256,
        replanner: Replanner | None = None,
        notify: Callable[[str], None] = lambda _m: None,
        fetch_allowance: Callable[[Plan], dict[NodeId, float]] | None = None,
    ) -> None:
        self.node = node
        self.model = model
        self.data = data
        self.threads = threads
        self.flash_attn = flash_attn  # every stage of every plan: it changes numerics
        self.max_sessions = max_sessions
        self.prefill_chunk = max(1, prefill_chunk)
        self.dtype = wire.DType.F16 if transport_dtype == "f16" else wire.DType.F32
        self.replanner = replanner
        self.notify = notify
        # Seconds each stage that fetches its layers first may take for that, on top of the
        # load's own TIMEOUTS.load_s: a multi-GB slice is not cut off by the load's timeout.
        self.fetch_allowance = fetch_allowance or (lambda _plan: {})
        self._n_ctx = n_ctx
        self._me = node.node_id
        self._plan: Plan | None = None
        self._remote: list[NodeId] = []  # plan nodes after the head's own stage, in order
        self._local: Stage | None = None
        self._sessions: dict[str, _Session] = {}
        self._tokens: dict[tuple[int, int], asyncio.Future[tuple[int, list[int]]]] = {}
        self._tasks = BackgroundTasks(log, "stage message")
        self._dones: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._excluded: set[NodeId] = set()
        self._broken: str | None = None  # why the last failover failed (retried on next use)
        self._failing_over = asyncio.Lock()
        self.last_step = StepTiming()
        self.totals = Totals()  # reset when a plan is applied
        self.hop_samples: deque[float] = deque(maxlen=4096)  # network seconds per hop, decode
        self.wire_bytes = 0  # activation frame bytes the head sent (one hop)
        self.wire_tokens = 0
        self.failovers = 0
        # Told of every decode step's stage compute (the plan, the token's position, the
        # timing): the coordinator learns each node's speed from it (observed_speed).
        self.on_decode_step: Callable[[Plan, int, StepTiming], None] | None = None
        hop_timing.enable_from_env()
        self.on_failover: Callable[[FailoverNote], None] | None = None  # set by a UI
        node.on_arrival(wire.Token, self._on_token)
        node.on_arrival(wire.SessionDone, self._on_done)
        node.on_arrival(wire.StageFault, self._on_fault)
        node.add_listener(self._on_event)

    # -- plan ----------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def broken(self) -> str | None:
        """Why the last failover failed (the next use re-plans), else None."""
        return self._broken

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def waiting_replies(self) -> int:
        """Futures waiting for a token or a confirmation from the stages (0 when idle)."""
        return len(self._tokens) + len(self._dones)

    async def apply(self, plan: Plan) -> None:
        """Install `plan` (at start, or a re-plan while idle): load ranges, replay sessions."""
        self._excluded.clear()
        self.totals = Totals()
        try:
            await self._install(plan)
            await self._replay_all()
        except StageLost as exc:
            self._broken = str(exc)  # the next call re-plans without the node that failed
            if exc.node is not None:
                self._excluded.add(exc.node)
            raise
        self._broken = None

    async def _install(self, plan: Plan) -> None:
        if plan.stages[0].node != self._me and plan.stage_of(self._me) is not None:
            raise PlanError("the head can only run the first stage of a plan")
        old = self._plan
        self._plan = plan
        self._remote = [s.node for s in plan.stages if s.node != self._me]
        mine = plan.stage_of(self._me)
        layers = (mine.first, mine.end) if mine else None
        await self._run(self._set_local, layers, short=False)
        self.node.set_status(layers, self.model.status())
        msg = plan_message(
            plan, self.model, n_ctx=self._n_ctx, max_sessions=self.max_sessions,
            dtype=self.dtype, flash_attn=self.flash_attn,
        )  # fmt: skip
        seeding_for(self.node).permits.allow_plan(msg)  # its stages may fetch layers from us
        # Nodes of the old plan that have no part now free their memory (best effort).
        dropped = {s.node for s in old.stages} - set(plan.nodes) - {self._me} if old else set()
        for node in dropped:
            self._tasks.spawn(self._quiet_request(node, msg))
        fetch_s = self.fetch_allowance(plan)
        results = await asyncio.gather(
            *(self._assign(n, msg, TIMEOUTS.load_s + fetch_s.get(n, 0.0)) for n in self._remote),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _assign(self, node: NodeId, msg: wire.Plan, timeout: float) -> None:
        try:
            reply = await self.node.request(node, msg, timeout=timeout)
        except ConnectionLost as exc:
            raise StageLost(node, f"node {node.short} did not take its layers: {exc}") from None
        except Refused as exc:
            # A refusal (fingerprint, memory, busy...): leave the node out of the next plan.
            raise StageLost(node, str(exc), exc.code, exc.reason) from None
        except MeshchatError as exc:
            raise StageLost(node, str(exc)) from None
        log.info("node %s took layers %s", node.short, getattr(reply, "body", {}))

    def _set_local(self, layers: tuple[int, int] | None) -> None:
        """(Worker thread.) Load, keep or drop the head's own stage."""
        stage = self._local
        if stage is not None and (stage.layers.first, stage.layers.end) == layers:
            for session in self._sessions.values():
                stage.close_session(session.local_id)
            return
        if stage is not None:
            stage.close()
            self._local = None
        if layers is not None:
            path = self.model.stage_file(self.data, *layers)
            options = StageOptions(
                n_ctx=self._n_ctx,
                max_sessions=self.max_sessions,
                n_batch=max(self.prefill_chunk, 32),
                n_threads=self.threads,
            ).with_profile(plan_profile(self.model, self.data, self.threads, self.flash_attn))
            self._local = Stage(path, LayerRange(*layers), self.model.n_layers, options)

    async def _run(self, fn: Callable[..., T], *args: Any, short: bool = True) -> T:
        return await compute.run(fn, *args, short=short)

    async def _compute(self, n_tokens: int, fn: Callable[..., T], *args: Any) -> T:
        """Run stage work on `n_tokens` tokens: a decode step inline when this thread computes
        (meshchat.engine.compute), unless the stage is busy with another session's work."""
        stages = [] if self._local is None else [self._local]
        return await self._run(fn, *args, short=compute.is_short(n_tokens, stages))

    # -- sessions ------------------------------------------------------------------------------

    async def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            return
        if len(self._sessions) >= self.max_sessions:
            raise StageError(f"all {self.max_sessions} session slots are busy")
        wire_id = random.getrandbits(62)
        session = self._sessions[session_id] = _Session(wire_id, f"s{wire_id:x}")
        try:
            await self._guarded(lambda: self._open(session))
        except BaseException:
            # The caller never saw it open, so it will not close it: free the slot here.
            with contextlib.suppress(MeshchatError):
                await self.close_session(session_id)
            raise

    async def _open(self, s: _Session) -> None:
        assert self._plan is not None
        if self._local is not None:
            await self._run(self._local.open_session, s.local_id)
        await self._op(s, wire.SessionOpKind.OPEN, plan_id=self._plan.plan_id)

    async def close_session(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is None:
            return
        if self._local is not None:
            await self._run(self._local.close_session, s.local_id)
        if self._broken:
            return  # the chain is gone; the next plan drops every old session on its stages
        with contextlib.suppress(MeshchatError):
            await self._op(s, wire.SessionOpKind.CLOSE, timeout=5.0)

    async def rollback(self, session_id: str, position: int) -> None:
        s = self._sessions[session_id]
        s.history.truncate(position)
        await self._guarded(lambda: self._rollback(s, position))

    async def _rollback(self, s: _Session, position: int) -> None:
        if self._local is not None:
            await self._run(self._local.rollback, s.local_id, position)
        await self._op(s, wire.SessionOpKind.ROLLBACK, position=position)

    async def configure_sampling(self, session_id: str, params: SamplingParams) -> None:
        s = self._sessions[session_id]
        s.params = params
        await self._guarded(lambda: self._sample(s))

    async def _sample(self, s: _Session) -> None:
        assert s.params is not None
        if self._local is not None:
            await self._run(self._local.configure_sampling, s.local_id, s.params)
        await self._op(s, wire.SessionOpKind.SAMPLE, sampling=sampling_to_wire(s.params))

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run a session op; if a stage is lost meanwhile, fail over (which redoes the op:
        the replay rebuilds each session from the state recorded here before the op)."""
        if self._broken:
            await self._failover(StageLost(None, self._broken))
            return
        try:
            await work()
        except StageLost as lost:
            await self._failover(lost)

    async def _op(
        self,
        s: _Session,
        op: wire.SessionOpKind,
        position: int = 0,
        *,
        plan_id: str | None = None,
        sampling: wire.Sampling | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send a session op down the chain and wait until the last stage confirms it."""
        s.seq += 1
        if not self._remote:
            return
        key = (s.wire_id, s.seq)
        fut = self._dones[key] = asyncio.get_running_loop().create_future()
        try:
            await self._send(
                self._remote[0], wire.SessionOp(s.wire_id, s.seq, op, position, plan_id, sampling)
            )
            await self._wait(fut, timeout or TIMEOUTS.session_op_s)
        finally:
            self._dones.pop(key, None)

    # -- forward -------------------------------------------------------------------------------

    async def forward(self, session_id: str, position: int, tokens: list[int]) -> int:
        s = self._sessions[session_id]
        if self._broken:
            await self._failover(StageLost(None, self._broken))
        chunks = _chunks(tokens, self.prefill_chunk)
        for _attempt in range(MAX_FAILOVERS + 1):
            try:
                token = await self._step(s, position, chunks)
            except StageLost as lost:
                await self._failover(lost)
                continue
            s.history.truncate(position)
            for chunk in chunks:
                s.history.add(chunk)
            return token
        raise MeshchatError(f"generation failed after {MAX_FAILOVERS} failovers")

    async def _step(self, s: _Session, position: int, chunks: list[list[int]]) -> int:
        started = time.perf_counter()
        if not self._remote:
            n_tokens = sum(len(c) for c in chunks)
            token, micros = await self._compute(
                n_tokens, self._local_only, s.local_id, position, chunks
            )
            self.last_step = StepTiming(time.perf_counter() - started, [micros / 1e6])
            self.totals.add(self.last_step)
            if n_tokens == 1:
                self._report_step(position)
            return token
        last_position = position + sum(len(c) for c in chunks[:-1])
        key = (s.wire_id, last_position)
        decode = len(chunks) == 1 and len(chunks[0]) == 1
        if (rec := hop_timing.RECORDER) is not None and decode:
            rec.mark(s.wire_id, position, 0, hop_timing.Mark.START, started)
        fut = self._tokens[key] = asyncio.get_running_loop().create_future()
        try:
            try:
                for i, chunk in enumerate(chunks):
                    await self._send_step(
                        s, position, chunk, want=i == len(chunks) - 1, traced=decode
                    )
                    position += len(chunk)
                n_tokens = sum(len(c) for c in chunks)
                token, trace = await self._wait(fut, TIMEOUTS.step(n_tokens))
            except asyncio.CancelledError:
                self._cancel_remote(s)
                raise
        finally:
            self._tokens.pop(key, None)
        wall = time.perf_counter() - started
        if (rec := hop_timing.RECORDER) is not None and decode:
            rec.mark(s.wire_id, last_position, hop_timing.END, hop_timing.Mark.END)
        self.last_step = StepTiming(wall, [us / 1e6 for us in trace])
        self.totals.add(self.last_step)
        if decode:
            # Decode: one hop per remote stage, and one back to the head.
            self.hop_samples.append(self.last_step.network_s / (len(self._remote) + 1))
            self._report_step(last_position)
        return int(token)

    def _report_step(self, position: int) -> None:
        if self.on_decode_step is not None and self._plan is not None:
            self.on_decode_step(self._plan, position, self.last_step)

    def _local_only(self, local_id: str, position: int, chunks: list[list[int]]) -> tuple[int, int]:
        """(Worker thread.) The whole model runs here: the same calls a remote chain would get."""
        assert self._local is not None
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            out = self._local.forward(local_id, position, chunk, sample=i == len(chunks) - 1)
            position += len(chunk)
        assert out.token is not None
        return out.token, int((time.perf_counter() - started) * 1e6)

    async def _send_step(
        self, s: _Session, position: int, chunk: list[int], want: bool, traced: bool = False
    ) -> None:
        """Run `chunk` on the head's stage (if any) and send it down the chain; `traced`: mark
        this decode step's path (hop_timing)."""
        rec = hop_timing.RECORDER if traced else None
        if self._local is None:
            if rec is not None:  # no compute here: mark it empty, for the split
                rec.mark(s.wire_id, position, 0, hop_timing.Mark.COMPUTE)
                rec.mark(s.wire_id, position, 0, hop_timing.Mark.COMPUTED)
            msg = wire.Activations(s.wire_id, position, s.seq, tuple(chunk), want_token=want)
        else:
            hidden, micros = await self._compute(
                len(chunk), self._compute_local, s.local_id, position, chunk
            )
            if rec is not None:
                computed = time.perf_counter()
                rec.mark(s.wire_id, position, 0, hop_timing.Mark.COMPUTE, computed - micros / 1e6)
                rec.mark(s.wire_id, position, 0, hop_timing.Mark.COMPUTED, computed)
            msg = wire.Activations(
                s.wire_id, position, s.seq, tuple(chunk), self.dtype, hidden.shape[1],
                _raw(hidden), want, (micros,),
            )  # fmt: skip
            self.wire_bytes += (
                wire.HEADER_SIZE + wire.ACT_HEAD.size + 4 * (len(chunk) + 1) + len(msg.data)
            )
            self.wire_tokens += len(chunk)
        await self._send(self._remote[0], msg)
        if rec is not None:
            rec.sent(self.node, self._remote[0], s.wire_id, position, 0)

    def _compute_local(self, local_id: str, position: int, chunk: list[int]) -> tuple[Any, int]:
        assert self._local is not None
        started = time.perf_counter()
        out = self._local.forward(local_id, position, chunk, sample=False)
        micros = int((time.perf_counter() - started) * 1e6)
        hidden = out.hidden
        assert hidden is not None
        if self.dtype is wire.DType.F16:
            hidden = hidden.astype(np.float16)
        return hidden, micros

    def _cancel_remote(self, s: _Session) -> None:
        """Tell every stage to drop this session's queued work (the head stopped waiting)."""
        for node in self._remote:
            self._tasks.spawn(self._quiet_send(node, wire.Cancel(s.wire_id, "cancelled", s.seq)))

    async def _quiet_send(self, node: NodeId, msg: wire.Message) -> None:
        with contextlib.suppress(MeshchatError):
            await self.node.send(node, msg)

    async def _quiet_request(self, node: NodeId, msg: wire.Message) -> None:
        with contextlib.suppress(MeshchatError):
            await self.node.request(node, msg, timeout=10.0)

    async def _send(self, node: NodeId, msg: wire.Message) -> None:
        try:
            await self.node.send(node, msg)
        except ConnectionLost as exc:
            raise StageLost(node, f"node {node.short} is unreachable: {exc}") from None

    async def _wait(self, fut: asyncio.Future[T], timeout: float) -> T:
        lost = self._lost_stage()
        if lost is not None:
            raise StageLost(lost, f"node {label(lost)} left the mesh")
        # A plain timer, not asyncio.wait_for: this runs once per token and wait_for costs an
        # extra task wake-up.
        timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def _lost_stage(self) -> NodeId | None:
        for node in self._remote:
            peer = self.node.peer(node)
            if peer is None or peer.state is not PeerState.CONNECTED:
                return node
        return None

    # -- messages from the stages --------------------------------------------------------------

    def _on_token(self, peer: NodeId, msg: wire.Token) -> None:
        if not self._remote or peer != self._remote[-1]:
            return  # only the plan's last stage samples for us
        fut = self._tokens.get((msg.session, msg.position))
        if (rec := hop_timing.RECORDER) is not None and fut is not None:
            rec.arrived(self.node, peer, msg.session, msg.position, hop_timing.END)
        if fut is not None and not fut.done():
            fut.set_result((msg.token, msg.trace))

    def _on_done(self, peer: NodeId, msg: wire.SessionDone) -> None:
        if not self._remote or peer != self._remote[-1]:
            return
        fut = self._dones.get((msg.session, msg.seq))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_fault(self, peer: NodeId, msg: wire.StageFault) -> None:
        if peer not in self._remote:
            return
        if msg.code is wire.FaultCode.OVERFLOW:
            exc: Exception = ContextOverflowError(msg.reason)
        else:
            # Bad input: leave out who sent it; a lost next stage: leave it out; otherwise the
            # faulting stage's state is suspect: replan (and replay) without it.
            blame: NodeId | None = msg.culprit if msg.culprit and msg.culprit != self._me else peer
            if msg.code in (wire.FaultCode.UNKNOWN_SESSION, wire.FaultCode.STALE_PLAN):
                blame = None  # state went out of step (e.g. a restart): a replay fixes it
            exc = StageLost(blame, f"node {peer.short}: {msg.reason}")
        self._fail_waiting(msg.session, exc)

    def _on_event(self, event: NodeEvent) -> None:
        if event.kind == "joined":
            # A node left out after a failure that comes back (a restart) may plan again.
            self._excluded.discard(event.node_id)
        if event.kind == "reconnected" and event.node_id in self._remote:
            # A restart (or a redial) took the connection our work was on: replay, keeping it.
            gone = StageLost(None, f"node {event.node_id.short} reconnected; work in flight lost")
            self._fail_waiting(None, gone)
        if event.kind == "left" and event.node_id in self._remote:
            lost = StageLost(event.node_id, f"node {event.node_id.short} left the mesh")
            self._fail_waiting(None, lost)

    def _fail_waiting(self, session: int | None, exc: Exception) -> None:
        futures: list[asyncio.Future[Any]] = [*self._tokens.values(), *self._dones.values()]
        keys = itertools.chain(self._tokens, self._dones)
        for (sid, _), fut in zip(keys, futures, strict=True):
            if (session is None or sid == session) and not fut.done():
                fut.set_exception(exc)

    # -- failover ------------------------------------------------------------------------------

    async def _failover(self, lost: StageLost) -> None:
        """Re-plan over the survivors and rebuild every session's KV caches there. Requests
        that lose the same stage at once fail over once: the later ones find a new plan."""
        failed_plan = self._plan
        async with self._failing_over:
            if self._plan is not failed_plan and self._broken is None:
                return  # another request re-planned and replayed every session meanwhile
            await self._failover_now(lost)

    async def _failover_now(self, lost: StageLost) -> None:
        if self.replanner is None:
            raise MeshchatError(f"a stage failed and this pipeline cannot re-plan: {lost}")
        self.failovers += 1
        for _attempt in range(MAX_FAILOVERS):
            if lost.node is not None:
                self._excluded.add(lost.node)
            self._tell(FailoverNote(lost.node, str(lost)))
            self.notify(f"{lost}; re-planning over the remaining nodes")
            try:
                plan = await self.replanner(set(self._excluded))
            except MeshchatError as exc:
                self._broken = f"no plan fits the remaining nodes: {exc}"
                raise MeshchatError(f"{self._broken} (the conversation is kept)") from None
            self.notify(f"new plan: {plan.describe(self._me)}")
            try:
                await self._install(plan)
                await self._replay_all()
            except StageLost as again:
                lost = again
                continue
            self._broken = None
            self._tell(FailoverNote(lost.node, str(lost), plan.describe(self._me)))
            return
        self._broken = f"failover gave up: {lost}"
        raise MeshchatError(self._broken)

    def _tell(self, note: FailoverNote) -> None:
        if self.on_failover is not None:
            try:
                self.on_failover(note)
            except Exception:  # a UI bug must not break the failover
                log.exception("failover listener failed")

    async def _replay_all(self) -> None:
        """Open every session on the current plan and feed it its history again, call by call
        as it was first fed (see History), then restore its sampler."""
        for s in list(self._sessions.values()):
            if self._local is not None:
                await self._run(self._local.close_session, s.local_id)
                await self._run(self._local.open_session, s.local_id)
            if self._remote:
                assert self._plan is not None
                s.seq += 1
                op = wire.SessionOp(
                    s.wire_id, s.seq, wire.SessionOpKind.OPEN, 0, plan_id=self._plan.plan_id
                )
                await self._send(self._remote[0], op)
            position = 0
            for fed, keep in s.history.segments:
                if self._remote:
                    await self._send_step(s, position, fed, want=False)
                elif self._local is not None:
                    await self._compute(
                        len(fed), self._local.forward, s.local_id, position, fed, None, False
                    )
                if keep < len(fed):
                    await self._rollback_quietly(s, position + keep)
                position += keep
            if s.params is not None:
                if self._local is not None:
                    await self._run(self._local.configure_sampling, s.local_id, s.params)
                sampling = sampling_to_wire(s.params)
                await self._op(
                    s, wire.SessionOpKind.SAMPLE, sampling=sampling, timeout=TIMEOUTS.load_s
                )
            else:
                await self._op(s, wire.SessionOpKind.SYNC, timeout=TIMEOUTS.load_s)

    async def _rollback_quietly(self, s: _Session, position: int) -> None:
        """A rollback inside a replay: in order with the replayed calls, no waiting."""
        if self._local is not None:
            await self._run(self._local.rollback, s.local_id, position)
        if self._remote:
            s.seq += 1
            await self._send(
                self._remote[0],
                wire.SessionOp(s.wire_id, s.seq, wire.SessionOpKind.ROLLBACK, position),
            )

    # -- teardown ------------------------------------------------------------------------------

    async def close(self) -> None:
        for session_id in list(self._sessions):
            with contextlib.suppress(MeshchatError):
                await self.close_session(session_id)
        self.node.remove_listener(self._on_event)
        self._fail_waiting(None, MeshchatError("pipeline closed"))
        await self._run(self._set_local, None, short=False)


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(StageLost(None, f"no answer from the stages within {timeout:.0f} s"))


def _raw(array: Any) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    contiguous: Any = np.ascontiguousarray(array)
    return memoryview(contiguous).cast("B")


def _chunks(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[i : i + size] for i in range(0, len(tokens), size)] or [[]]
