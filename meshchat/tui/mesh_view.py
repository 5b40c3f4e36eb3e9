"""The mesh as the app sees it: rows for the peers table and the few actions it offers.

`MeshView` is what the UI needs; `NodeMesh` provides it over a real `meshchat.mesh.node.Node`.
Tests (and snapshots, which must not show random ports or live RTTs) can pass their own.
No textual here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshchat.errors import MeshchatError
from meshchat.headless import DEFAULT_PORT
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import SeedingReport, seeding_cell
from meshchat.mesh.node import Node, PeerState
from meshchat.paths import DataDir
from meshchat.tui.split import Owner

MDNS_ENV = "MESHCHAT_MDNS"  # "0" turns multicast discovery off, as for headless


@dataclass(frozen=True)
class PeerRow:
    """One row of the peers table."""

    key: Owner
    name: str  # how the app shows the node: its NodeID's first 10 characters
    address: str
    via: str  # "this node" | "mdns" | "invite" | "peer"
    rtt_ms: float | None
    layers: tuple[int, int] | None
    state: str  # idle | loading | serving | connecting | lost | left | nearby
    member: bool
    model: str = ""  # the model file the node runs (name), if it said
    memory: str = ""  # "used/offer MiB": its stage's measured use and what it offers the mesh
    seeding: str = ""  # its layer transfer, if one runs: "getting [0,15) 45% 21 MB/s 0:12 left"


@dataclass
class MeshWatch:
    """What the app remembers about the mesh between peer refreshes, to say each change once."""

    peer_states: dict[NodeId, str] = field(default_factory=dict)  # member → its last state
    told: set[str] = field(default_factory=set)  # planner notes already shown
    # Nodes a failover already reported (inline note): no second "peer lost" toast.
    failed_over: set[NodeId] = field(default_factory=set)
    failover_active: bool = False  # between a failover's start and its new plan
    advised_for: frozenset[NodeId] = frozenset()  # usable nodes the planner's advice was for
    replan_due: str = ""  # a member joined or returned (who): re-plan between turns


class MeshView(Protocol):
    @property
    def name(self) -> str:
        """How the app shows this node (snapshots need stable text, not a random NodeID)."""
        ...

    @property
    def addresses(self) -> list[str]: ...

    def peers(self) -> list[PeerRow]: ...

    def usable_nodes(self, fingerprint: str | None) -> list[NodeId]:
        """Connected members that run the same model file (may take layers)."""
        ...

    def create_invite(self, uses: int = 1, ttl: float = 3600.0) -> str: ...

    async def join(self, code: str) -> str:
        """Redeem an invite; returns the inviter's short name."""
        ...

    async def remove(self, node: NodeId) -> None: ...

    def new_refusals(self) -> list[str]:
        """Connections this node refused since the last call, one line each (e.g. a join
        with a used invite): the app says so instead of leaving the joiner guessing."""
        ...

    def set_status(self, layers: tuple[int, int] | None, model: dict[str, Any] | None) -> None: ...

    async def stop(self) -> None: ...

    def planning_node(self) -> Node | None:
        """The real mesh node, for the planner (None: this mesh cannot run stages)."""
        ...


def own_seeding(mesh: MeshView | None) -> str:
    """This node's own layer transfer, for its row ("" when none, or no real node)."""
    node = mesh.planning_node() if mesh is not None else None
    return seeding_cell(node) if node is not None else ""


def _seeding_cell(report: object) -> str:
    seeding = SeedingReport.from_json(report)  # a peer's word: junk shows nothing
    return seeding.cell() if seeding else ""


def memory_cell(offer: int, used: int) -> str:
    """The peers table's memory cell: what the stage uses of what the node offers."""
    return f"{used >> 20}/{offer >> 20} MiB"


def _state(state: PeerState, layers: tuple[int, int] | None) -> str:
    if state is PeerState.CONNECTED:
        return "serving" if layers else "idle"
    return state.value


class NodeMesh:
    """A MeshView over a running Node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._refusals_shown = node.refusals_seen

    @classmethod
    async def start(cls, data: DataDir, listen: str, mdns: bool) -> NodeMesh:
        """Start the node on `listen`; empty: the usual port as headless, else any free one."""
        mdns = mdns and os.environ.get(MDNS_ENV, "1") != "0"
        if listen:
            node = Node(data, listen, discovery=mdns)
            await node.start()
            return cls(node)
        node = Node(data, f"0.0.0.0:{DEFAULT_PORT}", discovery=mdns)
        try:
            await node.start()
        except MeshchatError:  # taken (say, by a headless worker on this machine)
            node = Node(data, "0.0.0.0:0", discovery=mdns)
            await node.start()
        return cls(node)

    @property
    def name(self) -> str:
        return self.node.node_id.short

    @property
    def addresses(self) -> list[str]:
        return self.node.addresses

    def peers(self) -> list[PeerRow]:
        rows = []
        for peer in self.node.peers():
            model = peer.model or {}
            connected = peer.state is PeerState.CONNECTED
            rows.append(
                PeerRow(
                    key=peer.node_id,
                    name=peer.node_id.short,
                    address=peer.address or "",
                    via=peer.via,
                    rtt_ms=peer.rtt_ms,
                    # A lost node runs nothing for us: no stale layer range on its row.
                    layers=peer.layers if connected else None,
                    state=_state(peer.state, peer.layers),
                    member=peer.state is not PeerState.NEARBY,
                    model=str(model.get("name") or model.get("path") or ""),
                    memory=memory_cell(peer.memory.offer, peer.memory.used) if peer.memory else "",
                    seeding=_seeding_cell(model.get("seeding")),
                )
            )
        return rows

    def usable_nodes(self, fingerprint: str | None) -> list[NodeId]:
        usable = []
        for peer in self.node.peers(include_nearby=False):
            if peer.state is not PeerState.CONNECTED:
                continue
            theirs = (peer.model or {}).get("fingerprint")
            if fingerprint is None or theirs == fingerprint:
                usable.append(peer.node_id)
        return usable

    def create_invite(self, uses: int = 1, ttl: float = 3600.0) -> str:
        return self.node.create_invite(uses=uses, ttl=ttl)

    async def join(self, code: str) -> str:
        inviter = await self.node.join(code.strip())
        return inviter.short

    async def remove(self, node: NodeId) -> None:
        if node == self.node.node_id:
            raise MeshchatError("this node cannot remove itself")
        await self.node.remove_member(node)

    def set_status(self, layers: tuple[int, int] | None, model: dict[str, Any] | None) -> None:
        self.node.set_status(layers, model)

    def new_refusals(self) -> list[str]:
        node = self.node
        fresh = min(node.refusals_seen - self._refusals_shown, len(node.refusals))
        self._refusals_shown = node.refusals_seen
        recent = list(node.refusals)[len(node.refusals) - fresh :] if fresh else []
        return [f"refused a connection from {r.address}: {r.reason}" for r in recent]

    async def stop(self) -> None:
        await self.node.stop()

    def planning_node(self) -> Node | None:
        return self.node
