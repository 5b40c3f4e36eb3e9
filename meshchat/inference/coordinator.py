"""The head's view of the mesh: who is there, what each node offers, and which plan to run.

A `MeshCoordinator` asks every connected peer for its capabilities (CapsQuery), measures its
own, builds a `Planner`, and turns a plan into a running `MeshPipeline`. It is also the
pipeline's replanner: after a failure it plans again over the nodes still connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from meshchat.engine import compute
from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import (
    Calibration,
    LayerFile,
    NodeCaps,
    calibration,
    local_caps,
)
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline, StageLost, StepTiming
from meshchat.inference.observed_speed import ObservedSpeeds
from meshchat.inference.planner import (
    ModelNeeds,
    Plan,
    PlanChoice,
    PlanError,
    Planner,
    StageCost,
    label,
)
from meshchat.inference.profiling import DECODE_TIE, extra_context
from meshchat.inference.seeding import TransferWatch, transfers, with_seedable
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import seeding_for
from meshchat.mesh.node import Node
from meshchat.mesh.transport import ConnectionLost
from meshchat.paths import DataDir
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

MAX_MEMORY_REFUSALS = 8  # nodes left out for their memory before a start gives up
# Refusals after which a start plans again without the node (the others hold their layers).
LEAVE_OUT = (wire.FaultCode.MEMORY, wire.FaultCode.SEED)


class MeshCoordinator:
    def __init__(
        self,
        node: Node,
        model: LocalModel,
        data: DataDir,
        *,
        threads: int,
        n_ctx: int,
        sessions: int = 1,
        notify: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.node = node
        self.model = model
        self.data = data
        self.threads = threads
        self.n_ctx = n_ctx
        self.sessions = sessions
        self.notify = notify
        self.needs = ModelNeeds.of(model)
        self.caps: dict[NodeId, NodeCaps] = {}  # the last answer of every node asked
        self._calibration: Calibration | None = None
        # Flash attention for every stage of this head's plans (it changes numerics, so all
        # stages agree): chosen at the first gather, then kept, so a re-plan after a failure
        # gives the same text. None until then.
        self.flash_attn: bool | None = None
        # Members planned without the file may fetch their layers of this model from us.
        self.seeding = seeding_for(node)
        self.seeding.server.offer(model.fingerprint, model.header)
        self.pipeline: MeshPipeline | None = None  # the last one `make_pipeline()` made
        # Each node's decode speed as the running plans show it; plans use it (see planner()).
        self.observed = ObservedSpeeds()
        self._costs: tuple[str, list[StageCost]] | None = None  # by plan_id, for `observe`

    def _own_stage_memory(self) -> int:
        """Bytes the head's own stage of the running plan holds (freed by the next plan)."""
        plan = self.pipeline.plan if self.pipeline is not None else None
        stage = plan.stage_of(self.head) if plan is not None else None
        if stage is None:
            return 0
        last = stage.end == self.needs.n_layers
        return self.needs.memory(stage.first, stage.end, last, self.n_ctx, self.sessions)

    @property
    def head(self) -> NodeId:
        return self.node.node_id

    async def own_caps(self) -> NodeCaps:
        if self._calibration is None:
            self._calibration = await compute.run(
                calibration, self.model, self.data, self.threads, short=False
            )
        rtts = {p.node_id: p.rtt_ms for p in self.node.peers(False) if p.rtt_ms is not None}
        peers = list(self.node.connected())
        files = tuple(LayerFile(**f) for f in self.seeding.server.offers())
        return local_caps(
            self.head,
            self.model,
            self._calibration,
            rtts,
            peers,
            held=self._own_stage_memory(),
            layer_files=files,
        )

    async def query(self, node: NodeId, timeout: float | None = None) -> NodeCaps:
        msg = wire.CapsQuery(self.model.fingerprint.model)
        for attempt in range(3):
            try:
                reply = await self.node.request(node, msg, timeout or TIMEOUTS.caps_s)
                break
            except ConnectionLost:
                # Two nodes that dial each other at once keep one of the two connections; a
                # request on the other fails. Ask again on the survivor.
                if attempt == 2:
                    raise
                await asyncio.sleep(0.3)
        if not isinstance(reply, wire.Ack):
            raise MeshchatError(f"node {node.short} sent no capabilities")
        return NodeCaps.from_json(node, reply.body)

    async def settle(self, via: NodeId, timeout: float = 5.0) -> None:
        """Wait until we are connected to every node `via` is connected to (bounded).

        The node's own redial may first try addresses remembered from an earlier run; dialing
        the addresses `via` just gossiped is quicker, so do that too.
        """
        try:
            caps = await self.query(via)
        except MeshchatError as exc:
            log.info("cannot ask %s for its peers: %s", via.short, exc)
            return
        wanted = set(caps.peers) - {self.head}
        deadline = time.monotonic() + timeout
        dialing: set[asyncio.Task[None]] = set()
        tried: set[NodeId] = set()
        try:
            while time.monotonic() < deadline:
                missing = wanted - set(self.node.connected())
                if not missing:
                    return
                await asyncio.sleep(0.1)
                for node in missing - tried:
                    peer = self.node.peer(node)
                    if peer is not None and peer.addresses:
                        tried.add(node)
                        dialing.add(asyncio.ensure_future(self._dial(peer.node_id, peer.addresses)))
            log.info("not all peers connected within %.0f s", timeout)
        finally:
            for task in dialing:
                task.cancel()

    async def _dial(self, node: NodeId, addresses: list[str]) -> None:
        with contextlib.suppress(MeshchatError):
            await self.node.connect(node, list(addresses))

    async def gather(self, exclude: Iterable[NodeId] = ()) -> list[NodeCaps]:
        """Capabilities of this node and every connected peer not excluded (in parallel)."""
        skip = set(exclude)
        peers = [n for n in self.node.connected() if n not in skip]
        results = await asyncio.gather(
            self.own_caps(), *(self.query(n) for n in peers), return_exceptions=True
        )
        found: list[NodeCaps] = []
        for node, result in zip([self.node.node_id, *peers], results, strict=True):
            if isinstance(result, NodeCaps):
                found.append(result)
                self.caps[node] = result
            elif isinstance(result, BaseException):
                if node == self.node.node_id:
                    raise result
                self.notify(f"node {node.short} gave no capabilities: {result}")
        if found and found[0].node_id == self.head:
            found = with_seedable(found, found[0])  # members that can fetch the layers count
        if self.flash_attn is None:
            self.flash_attn = self._best_flash(found)
            log.info("plans run with flash attention %s", "on" if self.flash_attn else "off")
        return found

    def planner(self, caps: list[NodeCaps]) -> Planner:
        """The planner over `caps`, with each node's speeds for this head's flash setting."""
        flash = self.flash_attn if self.flash_attn is not None else self._best_flash(caps)
        return self._planner_for(caps, flash)

    def _planner_for(
        self, caps: list[NodeCaps], flash_attn: bool, observed: bool = True
    ) -> Planner:
        """`observed`: each node's decode speed corrected by what its stages showed."""
        offers = [offer for c in caps if (offer := c.for_flash(flash_attn)) is not None]
        if observed:
            offers = [self.observed.corrected(offer) for offer in offers]
        return Planner(self.needs, offers, self.head, self.n_ctx, self.sessions)

    def observe(self, plan: Plan, position: int, step: StepTiming) -> None:
        """Learn each stage's speed from one decode step of `plan` (MeshPipeline reports it)."""
        if self._costs is None or self._costs[0] != plan.plan_id:
            caps = [self.caps[n] for n in plan.nodes if n in self.caps]
            if len(caps) != len(plan.stages):
                return  # a node we have no capabilities of: nothing to compare with
            raw = self._planner_for(caps, bool(self.flash_attn), observed=False)
            if any(n not in raw.nodes for n in plan.nodes):
                return
            self._costs = (plan.plan_id, raw.stage_costs(plan))
        costs = self._costs[1]
        self.observed.observe(costs, extra_context(position), step.wall_s, step.stage_compute_s)

    def _best_flash(self, caps: list[NodeCaps]) -> bool:
        """The flash setting for this head's plans (see `choose_flash`)."""
        decode_s: dict[bool, float] = {}
        for flash in (False, True):
            with contextlib.suppress(PlanError):
                decode_s[flash] = self._planner_for(caps, flash).best().prediction.decode_s
        own = self._calibration.profile.flash_attn if self._calibration else False
        return choose_flash(decode_s, own)

    def mismatch_notes(self, planner: Planner) -> list[str]:
        """One line per connected node that cannot run this model, and why."""
        notes = []
        for node in planner.mismatched():
            caps = planner.nodes[node]
            if caps.fingerprint is None:
                why = "has no model file"
            else:
                why = (
                    f"has a different model (fingerprint {caps.fingerprint.short}, ours "
                    f"{self.model.fingerprint.short})"
                )
            notes.append(f"node {label(node)} {why}: it gets no layers")
        return notes

    async def choose(
        self, split: list[tuple[int, int]] | None = None, exclude: Iterable[NodeId] = ()
    ) -> tuple[Plan, PlanChoice | None, Planner]:
        """The automatic plan (with advice), or `split` mapped onto the nodes."""
        caps = await self.gather(exclude)
        planner = self.planner(caps)
        connected = [n for n in self.node.connected() if n not in set(exclude)]
        if split is not None:
            return planner.assign(split, connected), None, planner
        choice = planner.best()
        return choice.plan, choice, planner

    async def replan(self, exclude: set[NodeId]) -> Plan:
        """For failover: the best plan over the nodes still connected, leaving out `exclude`."""
        plan, choice, _ = await self.choose(exclude=exclude)
        if choice is not None:
            self.notify(choice.advice)
        return plan

    def make_pipeline(self, **options: Any) -> MeshPipeline:
        """A pipeline with no plan yet (`apply` one), re-planning through this coordinator."""
        self.pipeline = MeshPipeline(
            self.node,
            self.model,
            self.data,
            flash_attn=bool(self.flash_attn),
            threads=self.threads,
            n_ctx=self.n_ctx,
            max_sessions=max(self.sessions, 1),
            replanner=self.replan,
            notify=self.notify,
            fetch_allowance=self.fetch_allowance,
            **options,
        )
        self.pipeline.on_decode_step = self.observe
        return self.pipeline

    def fetch_allowance(self, plan: Plan) -> dict[NodeId, float]:
        """Seconds each node of `plan` that must fetch its layers may spend on that."""
        return {
            t.node: t.allowance_s for t in transfers(plan, list(self.caps.values()), self.needs)
        }

    async def start(self, plan: Plan, **options: Any) -> MeshPipeline:
        """A pipeline running `plan` (nodes load their ranges now)."""
        pipeline = self.make_pipeline(**options)
        fetching = transfers(plan, list(self.caps.values()), self.needs)
        for transfer in fetching:
            self.notify(transfer.note())  # before the plan applies: the user sees the cost
        try:
            with TransferWatch(self.node, {t.node for t in fetching}, self.notify):
                await self._apply_within_memory(pipeline, plan)
        except BaseException:
            with contextlib.suppress(Exception):
                await pipeline.close()
            raise
        return pipeline

    async def _apply_within_memory(self, pipeline: MeshPipeline, plan: Plan) -> None:
        """Install `plan`; a node whose stage measured over its budget after loading refuses
        it (wire.FaultCode.MEMORY), as does one that could not fetch its layers from the
        members (SEED: full disk, no source left, wrong bytes from every source); the plan is
        made again without that node, so it falls back to the nodes that hold the layers."""
        left_out: set[NodeId] = set()
        while True:
            try:
                await pipeline.apply(plan)
                return
            except StageLost as lost:
                if lost.code not in LEAVE_OUT or lost.node is None:
                    raise
                if lost.node in left_out or len(left_out) >= MAX_MEMORY_REFUSALS:
                    raise
                left_out.add(lost.node)
                why = lost.refusal or str(lost)
                self.notify(f"{why}; planning again without node {label(lost.node)}")
                plan = await self.replan(left_out)
                self.notify(f"new plan: {plan.describe(self.node.node_id)}")


def choose_flash(decode_s: dict[bool, float], own: bool) -> bool:
    """The head's own flash setting `own`, unless the other one's best plan predicts a decode
    faster by more than DECODE_TIE (`decode_s`: predicted seconds per token by setting, for the
    settings some plan can run with). Starting from the head's own choice keeps a mesh of like
    machines on the setting `meshchat generate` uses alone, so the two give the same text."""
    other = not own
    if own not in decode_s:
        return other if other in decode_s else own
    if other in decode_s and decode_s[other] < decode_s[own] * (1 - DECODE_TIE):
        return other
    return own
