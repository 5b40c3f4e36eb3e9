"""Planning and serving with seeded layers (issue 14).

A member without the model file (or with a different one) can still take a stage when it
accepts layers over the network (`--accept-layers SIZE`, or `accept_layers` in config.toml)
and some member offers the file: the head counts it in as if it had the file (with the head's
own speeds as its estimate, since it cannot measure a model it does not have), and says how
much each such node must fetch and about how long that takes, separately from tokens/s. The
stage fetches exactly its range when the plan arrives (meshchat.mesh.layer_transfer), keeps it
in its store and loads it from there like any other slice.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from meshchat.engine.profile import EngineProfile
from meshchat.errors import MeshchatError
from meshchat.inference import profiling
from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import ModelNeeds, Plan, label
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import (
    LayerFetcher,
    Progress,
    SeedError,
    SeedingReport,
    seeding_for,
)
from meshchat.mesh.node import Node, NodeEvent
from meshchat.model.gguf_file import read_header
from meshchat.model.seeded import SeededSlice, SeedStore
from meshchat.model.slices import LayerRange
from meshchat.model.spec import spec_from_header
from meshchat.paths import DataDir
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

ASSUMED_LINK_BYTES_PER_S = 30e6  # what a transfer estimate assumes (loopback measured ~30 MB/s)
# The head waits for a stage's fetch as if it ran at this rate (a slow, busy LAN), plus the slack,
# before its load timeout starts counting; a stalled source is caught sooner, by the fetcher's
# per-request timeout (TIMEOUTS.request_s).
SLOWEST_LINK_BYTES_PER_S = 2e6
STATUS_EVERY_S = 1.0  # a transfer's progress goes to the members at most this often
WATCH_EVERY_S = 5.0  # the head tells its user how a member's fetch goes at most this often


# -- the stage's side --------------------------------------------------------------------------


@dataclass(frozen=True)
class SeededModel(LocalModel):
    """A seeded slice seen as the model: the whole model's fingerprint and layer count, and the
    one layer range it holds (the only stage file it can give)."""

    held: LayerRange

    def stage_file(self, data: DataDir, first: int, end: int) -> Path:
        if (first, end) != (self.held.first, self.held.end):
            raise MeshchatError(f"this node holds only layers {self.held} of the model")
        return self.path


def open_seeded(entry: SeededSlice) -> SeededModel:
    header = read_header(entry.path)
    spec = spec_from_header(header)
    n = len(entry.fingerprint.layers)
    held = entry.layers
    # Layer sizes in the whole model's numbering, so memory checks index them as usual.
    layer_bytes = (0,) * held.first + spec.layer_bytes + (0,) * (n - held.end)
    spec = replace(spec, n_layers=n, layer_bytes=layer_bytes)
    return SeededModel(entry.path, header, spec, entry.fingerprint, held)


def seed_store(data: DataDir, budget: int) -> SeedStore:
    return SeedStore.in_store(data.models, budget or None)


def seeded_profile(model: SeededModel, threads: int, flash_attn: bool) -> EngineProfile:
    """The engine profile for a seeded slice: this machine's measured one for the model if it
    has one cached (same settings as its peers on like machines), else the safe settings."""
    cached = None
    with contextlib.suppress(MeshchatError):
        cached = profiling.read_cached(profiling.cache_file(model, threads), threads)
    profile = cached.profile_for(flash_attn) if cached is not None else None
    return profile or replace(EngineProfile.safe(threads), flash_attn=flash_attn)


async def seed_for_plan(
    node: Node, data: DataDir, budget: int, head: NodeId, msg: wire.Plan
) -> SeededModel:
    """Fetch this node's range of `msg` from the members (the head first), or reuse it if it
    was fetched before. MeshchatError (one line) if it cannot be had."""
    index = msg.stage_of(node.node_id)
    assert index is not None
    stage = msg.stages[index]
    layers = LayerRange(stage.first, stage.end)
    store = seed_store(data, budget)
    sources = [head, *(s.node for s in msg.stages), *node.connected()]
    sources = [s for s in dict.fromkeys(sources) if s != node.node_id]
    seeding = seeding_for(node)
    shown = [0.0]  # when the members were last told
    before = node.model

    def on_progress(progress: Progress) -> None:
        seeding.progress = progress
        now = time.monotonic()
        if now - shown[0] >= STATUS_EVERY_S or progress.done >= progress.total:
            shown[0] = now  # the members' peers tables show it (meshchat.tui.mesh_view)
            node.set_status(node.layers, {**(before or {}), "seeding": progress.to_json()})

    fetcher = LayerFetcher(node, msg.model, layers, store, sources, on_progress=on_progress)
    try:
        await fetcher.run()
    except SeedError as exc:
        raise MeshchatError(str(exc)) from None
    finally:
        node.set_status(node.layers, before)  # the transfer is over: rows show state again
    entry = store.find(msg.model.model, layers)
    if entry is None:
        raise MeshchatError(f"seeded layers {layers} vanished from {store.directory}")
    log.info(
        "layers %s of %s are here (%.1f MB at %.1f MB/s)",
        layers, msg.model.short, fetcher.progress.fetched / 1e6, fetcher.progress.rate / 1e6,
    )  # fmt: skip
    return open_seeded(entry)


# -- the head's side ---------------------------------------------------------------------------


def with_seedable(caps: list[NodeCaps], head: NodeCaps) -> list[NodeCaps]:
    """`caps` where a node that accepts layers, and whose missing layers some member offers,
    counts as holding the head's model (with the head's speeds when it has none of its own)."""
    fp = head.fingerprint
    if fp is None:
        return caps
    n = len(fp.layers)
    offered = any(c.offers(fp.model, 0, n) for c in caps) or head.offers(fp.model, 0, n)
    if not offered:
        return caps
    out = []
    for c in caps:
        if c.accept_layers > 0 and c.fingerprint != fp:
            speeds = c.flash_speeds or head.flash_speeds
            decode = c.decode_s_per_byte or head.decode_s_per_byte
            prefill = c.prefill_s_per_byte or head.prefill_s_per_byte
            # A transfer needs twice its bytes on disk for a while (the mirror, then the
            # slice): a range the budget cannot take is not offered to the planner.
            memory = min(c.free_memory, c.accept_layers // 2)
            c = replace(
                c, fingerprint=fp, flash_speeds=speeds, decode_s_per_byte=decode,
                prefill_s_per_byte=prefill, free_memory=memory,
            )  # fmt: skip
        out.append(c)
    return out


@dataclass(frozen=True)
class Transfer:
    """A stage of a plan whose node must fetch its layers first."""

    node: NodeId
    first: int
    end: int
    bytes: int

    @property
    def estimate_s(self) -> float:
        return self.bytes / ASSUMED_LINK_BYTES_PER_S

    @property
    def allowance_s(self) -> float:
        """How long the head lets the fetch take, before (not within) the stage's load."""
        return TIMEOUTS.fetch_slack_s + self.bytes / SLOWEST_LINK_BYTES_PER_S

    def note(self) -> str:
        return (
            f"node {label(self.node)} gets layers [{self.first},{self.end}) from the LAN first: "
            f"{self.bytes / 1e6:.0f} MB, about {self.estimate_s:.0f} s at "
            f"{ASSUMED_LINK_BYTES_PER_S / 1e6:.0f} MB/s (once; tokens/s do not include it)"
        )


def transfers(plan: Plan, caps: list[NodeCaps], needs: ModelNeeds) -> list[Transfer]:
    """The stages of `plan` whose node holds no file of the model (caps as the nodes sent
    them, not `with_seedable`'s): what each must fetch, globals included."""
    by_node = {c.node_id: c for c in caps}
    fp = needs.fingerprint
    found = []
    for s in plan.stages:
        c = by_node.get(s.node)
        if c is None or (
            c.fingerprint is not None and c.fingerprint.layers_match(fp, s.first, s.end)
        ):
            continue
        # Every slice carries the global tensors (the fetch checks them all against the
        # fingerprint): counted as the output matrix, which is the embeddings when tied.
        found.append(Transfer(s.node, s.first, s.end, needs.weights(s.first, s.end, True)))
    return found


class TransferWatch:
    """While a plan applies, the head tells its user how each member's fetch goes (from the
    member's status), at most every WATCH_EVERY_S per node, and once when it is done."""

    def __init__(self, node: Node, fetching: set[NodeId], notify: Callable[[str], None]) -> None:
        self.node = node
        self.fetching = fetching
        self.notify = notify
        self._told: dict[NodeId, float] = {}
        self._done: set[NodeId] = set()

    def __enter__(self) -> TransferWatch:
        if self.fetching:
            self.node.add_listener(self._on_event)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.node.remove_listener(self._on_event)

    def _on_event(self, event: NodeEvent) -> None:
        key = event.node_id
        if event.kind != "status" or key not in self.fetching or key in self._done:
            return
        peer = self.node.peer(event.node_id)
        model = peer.model if peer is not None else None
        report = SeedingReport.from_json(model.get("seeding") if isinstance(model, dict) else None)
        if report is None or report.total == 0:
            return
        now = time.monotonic()
        if report.done >= report.total:
            self._done.add(key)
        elif now - self._told.get(key, -WATCH_EVERY_S) < WATCH_EVERY_S:
            return
        self._told[key] = now
        self.notify(f"node {label(key)}: {report.cell()}")
