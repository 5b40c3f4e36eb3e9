"""The mesh node: the API the layers above use (no model, no UI imports here).

A `Node` owns the QUIC endpoint, this node's identity, its mesh membership and issued invites.
It keeps one authenticated connection per member peer, reconnects to members it has addresses
for, shares those addresses with other members (so peers are found via "peer" where multicast
does not reach), and measures RTT with keepalive pings.

Liveness bound: each side pings every `ping_interval` (1 s) on its own stream; a peer from which
nothing at all (not even a QUIC ack) arrived for `dead_after` (5 s) is dropped and reported
`left`, so a dead peer is noticed within dead_after + one maintenance tick (0.5 s): ≤ 5.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from meshchat.errors import MeshchatError
from meshchat.mesh import wire
from meshchat.mesh.auth import AuthRefused, accept_handshake, dial_handshake
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.invites import InviteBook, InviteCode, InviteError
from meshchat.mesh.membership import Membership, RosterError
from meshchat.mesh.transport import (
    APP_ERROR_DUPLICATE,
    APP_ERROR_PROTOCOL,
    DEFAULT_TUNING,
    Address,
    Connection,
    ConnectionLost,
    Endpoint,
    Tuning,
    fmt_addr,
    parse_addr,
)
from meshchat.paths import DataDir
from meshchat.tasks import BackgroundTasks
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

Via = Literal["mdns", "invite", "peer"]
# "reconnected": a connected peer's connection was replaced by a new one (it restarted, or
# both ends dialed at once); whatever was in flight on the old one is lost.
EventKind = Literal["joined", "left", "reconnected", "rtt", "status", "nearby"]
Handler = Callable[[NodeId, Any], Awaitable[wire.Message | None] | wire.Message | None]
DiscoveryFactory = Callable[["Node"], Any]

# What a peer's malformed input can raise past the wire decoder (e.g. a roster it sent).
PEER_INPUT_ERRORS = (wire.ProtocolError, ValueError, TypeError, KeyError, OverflowError)
_RTT_SAMPLES = 31
_INBOX_LIMIT = 4096  # decoded messages waiting for a handler, per peer


class PeerState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    LOST = "lost"
    LEFT = "left"  # closed cleanly (its goodbye came); redialled like a lost one
    NEARBY = "nearby"  # seen by mDNS, not a member of our mesh


@dataclass
class Peer:
    """What this node knows about another node."""

    node_id: NodeId
    via: Via
    state: PeerState = PeerState.CONNECTING
    addresses: list[str] = field(default_factory=list)  # where it says it listens (hints)
    layers: tuple[int, int] | None = None
    model: dict[str, Any] | None = None
    memory: wire.MemoryReport | None = None  # what it offers and uses, as it says
    rtt_samples: deque[float] = field(default_factory=lambda: deque(maxlen=_RTT_SAMPLES))
    conn: Connection | None = field(default=None, repr=False)
    next_dial: float = 0.0
    dial_backoff: float = 0.5

    @property
    def address(self) -> str | None:
        """The address of the live connection, else the first known one."""
        if self.conn is not None:
            return fmt_addr(self.conn.remote)
        return self.addresses[0] if self.addresses else None

    @property
    def rtt_ms(self) -> float | None:
        """Rolling median of the last pings, in milliseconds."""
        if not self.rtt_samples or self.state is not PeerState.CONNECTED:
            return None
        return round(statistics.median(self.rtt_samples) * 1000, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": str(self.node_id),
            "address": self.address,
            "rtt_ms": self.rtt_ms,
            "state": self.state.value,
            "via": self.via,
            "layers": list(self.layers) if self.layers else None,
            "memory": _memory_json(self.memory),
        }


def _memory_json(report: wire.MemoryReport | None) -> dict[str, int] | None:
    if report is None:
        return None
    return {"offer": report.offer, "used": report.used, "left": report.offer - report.used}


@dataclass(frozen=True)
class Refusal:
    """A connection this node refused (shown to the user: e.g. a join with a stale invite)."""

    address: str
    reason: str


# Refusals kept for the UI: the newest few are enough to say why a join failed.
_MAX_REFUSALS = 16


class Refused(MeshchatError):
    """A peer answered a request with an Error; `code` says why (a wire.FaultCode) and
    `reason` is the peer's own words (the message adds which peer refused what)."""

    def __init__(self, code: wire.FaultCode, reason: str, context: str = "") -> None:
        super().__init__(f"{context}: {reason}" if context else reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class NodeEvent:
    kind: EventKind
    node_id: NodeId
    rtt_ms: float | None = None


class Node:
    """A mesh node. Use `async with Node(...)` or `start()`/`stop()`."""

    def __init__(
        self,
        data_dir: DataDir,
        listen: str = "0.0.0.0:0",
        *,
        tuning: Tuning = DEFAULT_TUNING,
        discovery: DiscoveryFactory | bool = False,
        ping_interval: float = 1.0,
        dead_after: float = 5.0,
    ) -> None:
        self.data_dir = data_dir
        self._listen = parse_addr(listen)
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.identity = Identity.load_or_create(data_dir.identity)
        self.node_id = self.identity.node_id
        mesh_dir = data_dir.ensure(data_dir.mesh)
        self.membership = Membership.load_or_create(mesh_dir / "mesh.json", self.identity)
        self.invites = InviteBook(mesh_dir / "invites.json")
        self.endpoint = Endpoint(self.identity, self._on_incoming, tuning)
        self._peers: dict[NodeId, Peer] = {}
        self._nearby: dict[NodeId, Peer] = {}
        self._handlers: dict[type[wire.Message], Handler] = {}
        self._arrival: dict[type[wire.Message], Callable[[NodeId, Any], None]] = {}
        self._subscribers: list[asyncio.Queue[NodeEvent]] = []
        self._callbacks: list[Callable[[NodeEvent], None]] = []
        self._tasks = BackgroundTasks(log, "background task", expected=(MeshchatError,))
        self._dialing: set[NodeId] = set()
        self._pings: dict[NodeId, dict[int, float]] = {}
        self._ping_seq = 0
        self.refusals: deque[Refusal] = deque(maxlen=_MAX_REFUSALS)
        self.refusals_seen = 0  # how many were ever recorded: the UI shows only new ones
        self._layers: tuple[int, int] | None = None
        self._model: dict[str, Any] | None = None
        # The engine profile this node chose and the one its stage runs with (status file only).
        self.engine: dict[str, Any] | None = None
        self._memory: wire.MemoryReport | None = None
        # Where its stage's memory goes: weights, kv, compute, output (status file only).
        self.memory_detail: dict[str, int] | None = None
        self._discovery_factory = discovery
        self.discovery: Any = None
        self._started = False
        for node, addrs in self.membership.addresses.items():
            if node != self.node_id and self.membership.is_member(node):
                self._peers[node] = Peer(node, "peer", PeerState.LOST, list(addrs))

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.endpoint.start(*self._listen)
        self._started = True
        self._tasks.spawn(self._maintain())
        if self._discovery_factory:
            await self._start_discovery()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.stop()
        await self._tasks.aclose()
        self.endpoint.close()
        await asyncio.sleep(0)  # let the close datagrams go out

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self.endpoint.address[1]

    @property
    def mesh_id(self) -> str:
        return self.membership.mesh_id

    @property
    def addresses(self) -> list[str]:
        """Addresses other nodes can dial (for 0.0.0.0: every IPv4 address of this host)."""
        host, port = self.endpoint.address
        if host not in ("0.0.0.0", "::"):
            return [fmt_addr((host, port))]
        return [fmt_addr((ip, port)) for ip in _local_ipv4(include_loopback=True)]

    # --- peers and events -------------------------------------------------------------------

    def peers(self, include_nearby: bool = True) -> list[Peer]:
        found = sorted(self._peers.values(), key=lambda p: p.node_id)
        return found + (
            sorted(self._nearby.values(), key=lambda p: p.node_id) if include_nearby else []
        )

    def peer(self, node: NodeId) -> Peer | None:
        return self._peers.get(node)

    def connected(self) -> list[NodeId]:
        return [p.node_id for p in self.peers(False) if p.state is PeerState.CONNECTED]

    async def events(self) -> AsyncIterator[NodeEvent]:
        """Events from now on, for as long as the caller iterates (bounded; drops if slow)."""
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(maxsize=1000)
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    def add_listener(self, callback: Callable[[NodeEvent], None]) -> None:
        self._callbacks.append(callback)

    def remove_listener(self, callback: Callable[[NodeEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def _emit(self, kind: EventKind, node: NodeId, rtt_ms: float | None = None) -> None:
        event = NodeEvent(kind, node, rtt_ms)
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("event listener failed")

    async def wait_for_peer(self, node: NodeId, timeout: float = 10.0, rtt: bool = False) -> Peer:
        """Wait until `node` is connected (and, with rtt=True, has an RTT measurement)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            peer = self._peers.get(node)
            if peer and peer.state is PeerState.CONNECTED and (not rtt or peer.rtt_ms is not None):
                return peer
            await asyncio.sleep(0.02)
        raise MeshchatError(f"peer {node.short} did not connect within {timeout:g} s")

    # --- messages ---------------------------------------------------------------------------

    def on(self, message_type: type[wire.Message], handler: Handler) -> None:
        """Register the handler for one message type (sent with `send` or `request`).

        For `request`, the handler's return value is the reply (None → Ack). Handlers for
        `send` run one at a time per peer, in arrival order.
        """
        self._handlers[message_type] = handler

    def on_arrival(
        self, message_type: type[wire.Message], handler: Callable[[NodeId, Any], None]
    ) -> None:
        """Like `on` for `send` messages, but the handler runs as the message arrives, from the
        transport's callback: no task hop, so less latency. It must not block or await; use it
        for every message type whose order matters relative to the others it handles."""
        self._arrival[message_type] = handler

    def _conn(self, node: NodeId) -> Connection:
        peer = self._peers.get(node)
        if peer is None or peer.conn is None or peer.conn.is_closed:
            raise ConnectionLost(f"peer {node.short} is not connected")
        return peer.conn

    async def send(self, node: NodeId, msg: wire.Message) -> None:
        """Send one message, ordered with the other `send`s to that peer."""
        await self._conn(node).send(msg)

    async def send_tensor(self, node: NodeId, tensor: wire.Tensor) -> None:
        await self.send(node, tensor)

    async def request(
        self, node: NodeId, msg: wire.Message, timeout: float | None = None
    ) -> wire.Message:
        """Send `msg` on its own stream and return the peer's reply (an Error reply raises)."""
        reply = await self._conn(node).request(msg, timeout or TIMEOUTS.request_s)
        if isinstance(reply, wire.Error):
            raise Refused(reply.code, reply.reason, f"peer {node.short} refused {msg.TYPE.name}")
        return reply

    def set_status(
        self, layers: tuple[int, int] | None, model: dict[str, Any] | None = None
    ) -> None:
        """What this node runs; shared with every connected peer (when it changes)."""
        if (layers, model) == (self._layers, self._model):
            return
        self._layers, self._model = layers, model
        for node in self.connected():
            self._tasks.spawn(self._send_quiet(node, self._status_msg()))

    def set_memory(self, report: wire.MemoryReport, detail: dict[str, int] | None = None) -> None:
        """What this node offers and uses; shared with every connected peer (when it changes)."""
        self.memory_detail = detail
        if report == self._memory:
            return
        self._memory = report
        for node in self.connected():
            self._tasks.spawn(self._send_quiet(node, self._status_msg()))

    @property
    def layers(self) -> tuple[int, int] | None:
        return self._layers

    @property
    def model(self) -> dict[str, Any] | None:
        return self._model

    def _status_msg(self) -> wire.Status:
        return wire.Status(list(self._layers) if self._layers else None, self._model, self._memory)

    async def _send_quiet(self, node: NodeId, msg: wire.Message) -> None:
        with contextlib.suppress(ConnectionLost):
            await self.send(node, msg)

    # --- invites and membership -------------------------------------------------------------

    def invite_addresses(self) -> list[Address]:
        host, port = self.endpoint.address
        if host not in ("0.0.0.0", "::"):
            return [(host, port)]
        ips = _local_ipv4(include_loopback=False) or _local_ipv4(include_loopback=True)
        return [(ip, port) for ip in ips[:3]]

    def _dial_order(self, addresses: Sequence[Address]) -> list[Address]:
        """Where to dial an invite's addresses from here, best first (see `same_host_first`)."""
        host = self.endpoint.address[0]
        if not ipaddress.ip_address(host).is_loopback:
            return list(addresses)
        return same_host_first(addresses, set(_local_ipv4(include_loopback=False)))

    def create_invite(self, uses: int = 1, ttl: float = 3600.0) -> str:
        """Issue an invite code for this node (persisted, so it survives a restart)."""
        return self.invites.issue(self.node_id, self.invite_addresses(), uses, ttl).encode()

    async def join(self, code: str, timeout: float = 5.0) -> NodeId:
        """Redeem an invite: connect to the inviter, become a member of its mesh."""
        invite = InviteCode.parse(code)  # typos fail here, before any traffic
        known = [n for n in self.membership.members() if invite.matches(n) and n != self.node_id]
        if known:
            # Already in the inviter's mesh (e.g. a worker restarted with the same --join):
            # reconnect as a member and keep the invite's uses for others.
            addrs = [fmt_addr(a) for a in self._dial_order(invite.addresses)]
            peer = self._peers.setdefault(known[0], Peer(known[0], "invite", addresses=addrs))
            if peer.state is PeerState.CONNECTED:
                return known[0]
            try:
                await self.connect(known[0], addrs + peer.addresses, peer.via)
                return known[0]
            except MeshchatError as exc:  # e.g. we were removed meanwhile: redeem after all
                log.info("reconnect as member failed (%s); redeeming the invite", exc)
        invite.check_fresh()
        problems = []
        for addr in self._dial_order(invite.addresses):
            try:
                conn = await self.endpoint.dial(addr, invite.matches, timeout)
            except ConnectionLost as exc:
                if "does not match" in str(exc):
                    problems.append(f"{fmt_addr(addr)} is not the node that issued this invite")
                else:
                    problems.append(f"{fmt_addr(addr)} did not answer")
                continue
            hello = wire.Hello(self.node_id, self.mesh_id, self.addresses)
            try:
                welcome = await dial_handshake(conn, self.identity, hello, invite.secret)
            except AuthRefused as exc:
                raise InviteError(f"invite refused: {exc}") from None
            except ConnectionLost as exc:
                problems.append(f"{fmt_addr(addr)}: {exc}")
                continue
            if welcome.mesh_secret is None:
                conn.abort("welcome without mesh secret")
                raise InviteError("the inviter accepted us but sent no mesh secret")
            try:
                self.membership.adopt(welcome.mesh_id, welcome.mesh_secret, welcome.roster)
            except RosterError as exc:
                conn.abort("bad roster in welcome")
                self._reload_membership()
                raise InviteError(f"invite accepted, but {exc}") from None
            except PEER_INPUT_ERRORS as exc:
                conn.abort("malformed welcome", APP_ERROR_PROTOCOL)
                self._reload_membership()
                raise InviteError(f"the inviter sent a malformed welcome: {exc}") from None
            self.membership.save()
            self._adopt(conn, _ok_addrs(welcome.addresses), "invite")
            self._update_discovery_secret()
            assert conn.peer_id is not None
            return conn.peer_id
        raise InviteError("cannot use invite: " + "; ".join(problems))

    def _reload_membership(self) -> None:
        """Back to the membership as last saved: a failed adopt() may have changed part of it."""
        self.membership = Membership.load_or_create(self.membership.path, self.identity)

    async def remove_member(self, node: NodeId) -> None:
        """Take `node` off the mesh for good and tell members.

        Allowed for the mesh's founder, and for the member that invited `node`; anything else
        raises RosterError (a MeshchatError) saying why (rules in `membership`)."""
        self.membership.remove(node)
        self.membership.save()
        peer = self._peers.pop(node, None)
        if peer is not None and peer.conn is not None:
            # Tell it first: its own invites then stop working at once (honest code refuses).
            with contextlib.suppress(ConnectionLost, TimeoutError):
                await asyncio.wait_for(peer.conn.send(self._roster_msg()), 1.0)
            peer.conn.abort("removed from the mesh")
            self._emit("left", node)
        await self._broadcast(self._roster_msg())

    def _roster_msg(self) -> wire.Roster:
        return wire.Roster(self.mesh_id, self.membership.records())

    async def _broadcast(self, msg: wire.Message) -> None:
        await asyncio.gather(*(self._send_quiet(n, msg) for n in self.connected()))

    async def _decide(
        self, conn: Connection, dialer: NodeId, hello: wire.Hello, auth: wire.Auth, nonce: bytes
    ) -> wire.Welcome | wire.Error:
        """The listener's verdict on an authenticated dialer: member, invitee, or refused.

        An invitee's handshake signature (under the join domain) and `nonce` are its join
        proof, which goes into its signed add record."""
        m = self.membership
        secret = None
        if auth.invite_secret is not None:
            try:
                m.check_add(dialer)  # removed, roster full, or we were removed: keep the use
                self.invites.redeem(auth.invite_secret)
                m.add(dialer, nonce, auth.signature)
            except (InviteError, RosterError) as exc:
                return wire.Error(wire.FaultCode.INVITE, str(exc))
            m.addresses[dialer] = _ok_addrs(hello.addresses)
            m.save()
            secret = m.mesh_secret
            peer = self._peers.setdefault(dialer, Peer(dialer, "invite"))
            peer.via = "invite"
            self._tasks.spawn(self._broadcast(self._roster_msg()))
        elif hello.mesh_id != m.mesh_id or not m.is_member(dialer):
            return wire.Error(
                wire.FaultCode.NOT_MEMBER,
                f"node {dialer.short} is not a member of this mesh (not invited, or removed)",
            )
        return wire.Welcome(self.node_id, m.mesh_id, secret, m.records(), self.addresses)

    # --- connections ------------------------------------------------------------------------

    def _on_incoming(self, conn: Connection) -> None:
        self._tasks.spawn(self._accept(conn))

    async def _accept(self, conn: Connection) -> None:
        try:
            await conn.wait_handshake(5.0)
            dialer, hello, _ = await accept_handshake(conn, self.identity, self._decide)
        except (AuthRefused, ConnectionLost) as exc:
            log.info("refused connection from %s: %s", fmt_addr(conn.remote), exc)
            self.refusals.append(Refusal(fmt_addr(conn.remote), str(exc)))
            self.refusals_seen += 1
            return
        except PEER_INPUT_ERRORS as exc:
            conn.abort(f"protocol error: {exc}", APP_ERROR_PROTOCOL)
            log.info("bad handshake from %s: %s", fmt_addr(conn.remote), exc)
            return
        peer = self._peers.get(dialer)
        self._adopt(conn, _ok_addrs(hello.addresses), peer.via if peer else "peer")

    async def connect(self, node: NodeId, addresses: list[str], via: Via = "peer") -> None:
        """Dial a member at its known addresses (first that answers wins)."""
        problems = []
        for text in addresses:
            try:
                addr = parse_addr(text)
                conn = await self.endpoint.dial(addr, lambda n: n == node, 3.0)
                hello = wire.Hello(self.node_id, self.mesh_id, self.addresses)
                welcome = await dial_handshake(conn, self.identity, hello, None)
            except (ConnectionLost, MeshchatError) as exc:
                problems.append(f"{text}: {exc}")
                continue
            if welcome.mesh_id != self.mesh_id:
                conn.abort("different mesh")
                problems.append(f"{text}: in another mesh")
                continue
            try:
                self._merge_roster(welcome.roster)
            except RosterError as exc:
                conn.abort("bad roster")
                problems.append(f"{text}: {exc}")
                continue
            except PEER_INPUT_ERRORS as exc:  # the redial task must survive a bad peer
                conn.abort("malformed welcome", APP_ERROR_PROTOCOL)
                problems.append(f"{text}: malformed welcome ({exc})")
                continue
            self._adopt(conn, _ok_addrs(welcome.addresses), via)
            return
        raise ConnectionLost(f"cannot reach {node.short}: " + "; ".join(problems))

    def _adopt(self, conn: Connection, addresses: list[str], via: Via) -> None:
        """Make an authenticated connection the peer's connection (one per peer)."""
        node = conn.peer_id
        assert node is not None and conn.authenticated
        if not self._started or conn.is_closed:
            conn.abort("node stopping")
            return
        if not (self.membership.is_member(node) and self.membership.is_member(self.node_id)):
            # The roster changed while the handshake ran (its verdict came before a removal):
            # a connection adopted now would never be closed by that removal.
            conn.abort("removed from the mesh")
            return
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = Peer(node, via)
        self._nearby.pop(node, None)
        old = peer.conn
        if old is not None and not old.is_closed:
            # Both sides dialed: keep the connection dialed by the smaller NodeID, on both ends.
            keeper = min(self.node_id, node)
            old_dialer = self.node_id if old.is_dialer else node
            new_dialer = self.node_id if conn.is_dialer else node
            if old_dialer == keeper and new_dialer != keeper:
                conn.abort("duplicate connection", APP_ERROR_DUPLICATE)
                return
            old.abort("replaced by a newer connection", APP_ERROR_DUPLICATE)
        if addresses:
            peer.addresses = addresses
            if self.membership.addresses.get(node) != addresses:
                self.membership.addresses[node] = addresses
                self.membership.save()
        was_connected = peer.state is PeerState.CONNECTED
        peer.conn, peer.state, peer.dial_backoff = conn, PeerState.CONNECTED, 0.5
        peer.rtt_samples.clear()
        conn.on_message = self._make_inbox(node, conn)
        conn.on_request = self._on_request
        conn.on_ping = self._on_ping
        conn.deliver_early()
        conn.closed.add_done_callback(lambda _f: self._on_closed(node, conn))
        if not was_connected:
            self._emit("joined", node)
        elif old is not None:
            self._emit("reconnected", node)
        self._tasks.spawn(self._greet(node))

    async def _greet(self, node: NodeId) -> None:
        await self._send_quiet(node, self._status_msg())
        await self._send_quiet(node, self._roster_msg())
        await self._broadcast(self._peers_msg())

    def _peers_msg(self) -> wire.Peers:
        known = {
            p.node_id: p.addresses
            for p in self._peers.values()
            if p.addresses and self.membership.is_member(p.node_id)
        }
        known[self.node_id] = self.addresses
        return wire.Peers(known)

    def _on_closed(self, node: NodeId, conn: Connection) -> None:
        peer = self._peers.get(node)
        self._pings.pop(node, None)
        if peer is None or peer.conn is not conn:
            return
        peer.conn = None
        peer.state = PeerState.LEFT if conn.said_goodbye else PeerState.LOST
        peer.next_dial = time.monotonic() + 0.5
        log.info("peer %s %s: %s", node.short, peer.state.value, conn.close_reason)
        self._emit("left", node)

    def _make_inbox(
        self, node: NodeId, conn: Connection
    ) -> Callable[[Connection, wire.Message], None]:
        """Per-connection ordered dispatch: built-ins inline, user handlers in a worker."""
        queue: asyncio.Queue[wire.Message] = asyncio.Queue()

        async def worker() -> None:
            while True:
                msg = await queue.get()
                handler = self._handlers.get(type(msg))
                if handler is None:
                    log.debug("no handler for %s from %s", msg.TYPE.name, node.short)
                    continue
                try:
                    result = handler(node, msg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("handler for %s failed", msg.TYPE.name)

        task = self._tasks.spawn(worker())
        conn.closed.add_done_callback(lambda _f: task.cancel())

        def on_message(c: Connection, msg: wire.Message) -> None:
            if isinstance(msg, wire.Status):
                self._on_status(node, msg)
            elif isinstance(msg, wire.Peers):
                self._on_peers(msg)
            elif isinstance(msg, wire.Roster):
                self._on_roster(c, msg)
            elif (fast := self._arrival.get(type(msg))) is not None:
                try:
                    fast(node, msg)
                except Exception:
                    log.exception("arrival handler for %s failed", msg.TYPE.name)
            elif queue.qsize() >= _INBOX_LIMIT:
                c.abort("peer overran its inbox")
            else:
                queue.put_nowait(msg)

        return on_message

    async def _on_request(self, conn: Connection, msg: wire.Message) -> wire.Message:
        assert conn.peer_id is not None
        handler = self._handlers.get(type(msg))
        if handler is None:
            return wire.Error(wire.FaultCode.UNSUPPORTED, f"no handler for {msg.TYPE.name}")
        result = handler(conn.peer_id, msg)
        if inspect.isawaitable(result):
            result = await result
        return wire.Ack() if result is None else result

    def _on_status(self, node: NodeId, msg: wire.Status) -> None:
        peer = self._peers.get(node)
        if peer is None:
            return
        layers = msg.layers
        peer.layers = (layers[0], layers[1]) if layers and len(layers) == 2 else None
        peer.model = msg.model
        peer.memory = msg.memory
        self._emit("status", node)

    def _on_peers(self, msg: wire.Peers) -> None:
        for node, addrs in msg.peers.items():
            if node == self.node_id or not self.membership.is_member(node):
                continue
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = Peer(node, "peer", PeerState.CONNECTING)
            good = _ok_addrs(addrs)
            if good and peer.state is not PeerState.CONNECTED:
                peer.addresses = good

    def _on_roster(self, conn: Connection, msg: wire.Roster) -> None:
        if msg.mesh_id != self.mesh_id:
            return
        try:
            self._merge_roster(msg.records)
        except RosterError as exc:  # a forged record: no honest member sends one
            log.warning("peer %s sent a bad roster: %s", conn.peer_id, exc)
            conn.abort(f"bad roster: {exc}")

    def _merge_roster(self, records: list[wire.RosterRecord]) -> None:
        """Check and merge a peer's records; raises RosterError on a forged one."""
        changed = self.membership.merge(records)
        if not changed:
            return
        self.membership.save()
        if not self.membership.is_member(self.node_id):
            # This node was removed: it has no mesh left to be in, so every link goes.
            if self.node_id in changed:
                log.warning("this node was removed from the mesh: closing every connection")
            dropped = list(self._peers)
        else:
            dropped = [n for n in changed if n != self.node_id and not self.membership.is_member(n)]
        for node in dropped:
            peer = self._peers.pop(node, None)
            if peer is not None and peer.conn is not None:
                peer.conn.abort("removed from the mesh")
                self._emit("left", node)

    # --- keepalive, RTT, reconnects ---------------------------------------------------------

    def _on_ping(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.Ping):
            conn.send_ping(wire.Pong(msg.seq))
            return
        assert isinstance(msg, wire.Pong) and conn.peer_id is not None
        sent = self._pings.get(conn.peer_id, {}).pop(msg.seq, None)
        peer = self._peers.get(conn.peer_id)
        if sent is None or peer is None or peer.conn is not conn:
            return
        peer.rtt_samples.append(time.perf_counter() - sent)
        self._emit("rtt", peer.node_id, peer.rtt_ms)

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_ping = 0.0
        while True:
            now = loop.time()
            ping = now >= next_ping
            if ping:
                next_ping = now + self.ping_interval
                self._ping_seq += 1
            for peer in list(self._peers.values()):
                conn = peer.conn
                if conn is not None and not conn.is_closed:
                    if now - conn.last_heard > self.dead_after:
                        conn.abort(f"nothing heard for {self.dead_after:g} s")
                    elif ping:
                        pending = self._pings.setdefault(peer.node_id, {})
                        if len(pending) > 8:  # unanswered pings: keep the map bounded
                            pending.pop(next(iter(pending)))
                        pending[self._ping_seq] = time.perf_counter()
                        conn.send_ping(wire.Ping(self._ping_seq))
                elif self._should_dial(peer):
                    self._tasks.spawn(self._redial(peer))
            await asyncio.sleep(min(0.5, self.ping_interval))

    def _should_dial(self, peer: Peer) -> bool:
        return (
            bool(peer.addresses)
            and peer.node_id not in self._dialing
            and self.membership.is_member(peer.node_id)
            and self.membership.is_member(self.node_id)
            and time.monotonic() >= peer.next_dial
        )

    async def _redial(self, peer: Peer) -> None:
        self._dialing.add(peer.node_id)
        try:
            if self.node_id > peer.node_id and peer.state is PeerState.CONNECTING:
                await asyncio.sleep(1.0)  # let the smaller NodeID dial first: fewer duplicates
                if peer.conn is not None:
                    return
            await self.connect(peer.node_id, list(peer.addresses), peer.via)
        except (ConnectionLost, MeshchatError) as exc:
            log.debug("redial %s failed: %s", peer.node_id.short, exc)
            peer.next_dial = time.monotonic() + peer.dial_backoff
            peer.dial_backoff = min(peer.dial_backoff * 2, 10.0)
            if peer.state is PeerState.CONNECTING:
                peer.state = PeerState.LOST
        finally:
            self._dialing.discard(peer.node_id)

    # --- discovery --------------------------------------------------------------------------

    async def _start_discovery(self) -> None:
        factory = self._discovery_factory
        try:
            if callable(factory):
                self.discovery = factory(self)
            else:
                from meshchat.mesh.discovery import MdnsDiscovery

                self.discovery = MdnsDiscovery(
                    self.node_id,
                    self.port,
                    self.membership.mesh_secret,
                    self._on_discovered,
                    self._on_discovery_lost,
                )
            await self.discovery.start()
        except Exception as exc:
            log.warning("mDNS discovery unavailable: %s", exc)
            self.discovery = None

    def _update_discovery_secret(self) -> None:
        if self.discovery is not None and hasattr(self.discovery, "async_set_mesh_secret"):
            self._tasks.spawn(self.discovery.async_set_mesh_secret(self.membership.mesh_secret))

    def _on_discovered(self, found: Any) -> None:
        """mDNS saw a node: a hint only; the connection authenticates it."""
        node = found.node_id
        if node == self.node_id:
            return
        addrs = [fmt_addr((a, int(found.port))) for a in found.addresses]
        if found.is_member and self.membership.is_member(node):
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = Peer(node, "mdns", PeerState.CONNECTING)
            if peer.state is not PeerState.CONNECTED:
                peer.via = "mdns"
                peer.addresses = _with_hints(peer.addresses, addrs)
                peer.next_dial = 0.0
        elif node not in self._peers:
            if node not in self._nearby and len(self._nearby) >= _MAX_NEARBY:
                return  # a flood of fake announcements costs at most _MAX_NEARBY rows
            self._nearby[node] = Peer(node, "mdns", PeerState.NEARBY, addrs)
            self._emit("nearby", node)

    def _on_discovery_lost(self, node: NodeId) -> None:
        self._nearby.pop(node, None)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status-file snapshot (DESIGN.md, "Command line contract")."""
        return {
            "node_id": str(self.node_id),
            "addresses": self.addresses,
            "mesh_id": self.mesh_id,
            "model": self._model,
            "layers": list(self._layers) if self._layers else None,
            "engine": self.engine,
            "memory": self._memory_status(),
            "peers": [p.to_json() for p in self.peers()],
        }

    def _memory_status(self) -> dict[str, Any] | None:
        shared = _memory_json(self._memory)
        return None if shared is None else {**shared, "stage": self.memory_detail}


_MAX_PEER_ADDRESSES = 8  # addresses taken from a peer, and kept per peer


def _ok_addrs(addrs: list[str]) -> list[str]:
    """Keep well-formed HOST:PORT strings from a peer (hints; bounded)."""
    good = []
    for text in addrs[:_MAX_PEER_ADDRESSES]:
        with contextlib.suppress(MeshchatError):
            host, port = parse_addr(text)
            if port and host not in ("0.0.0.0", "::"):
                good.append(fmt_addr((host, port)))
    return good


# Non-members seen by mDNS, shown in the mesh view. A LAN has a handful of meshchat nodes;
# past this, new names are ignored until old ones go (mDNS reports them lost).
_MAX_NEARBY = 64


def _with_hints(known: list[str], found: list[str]) -> list[str]:
    """Add discovered addresses after the known ones, never swapping them in.

    A member (or a replay within the freshness window) may announce addresses for another
    node, so mDNS never removes the first addresses we knew (the peer's own, from its
    handshake); it fills at most half of the bounded list.
    """
    fresh = [a for a in found if a not in known][: _MAX_PEER_ADDRESSES // 2]
    return known[: _MAX_PEER_ADDRESSES - len(fresh)] + fresh


def same_host_first(addresses: Sequence[Address], own_ips: set[str]) -> list[Address]:
    """For a node listening on loopback: each of this host's own addresses as 127.0.0.1 first.

    A loopback socket can only reach this host, and an inviter listening on 0.0.0.0 answers a
    datagram from 127.0.0.1 from 127.0.0.1, not from the LAN address the invite names; QUIC
    clients drop packets from an address they did not dial (RFC 9000 §9), so dialling the LAN
    address timed out ("did not answer") while the inviter logged a refused connection."""
    order: list[Address] = []
    for host, port in addresses:
        if host in own_ips:
            order.append(("127.0.0.1", port))
        order.append((host, port))
    return list(dict.fromkeys(order))


def _local_ipv4(include_loopback: bool) -> list[str]:
    try:
        from meshchat.mesh.discovery import local_ipv4_addresses

        return local_ipv4_addresses(include_loopback=include_loopback)
    except ImportError:
        return ["127.0.0.1"] if include_loopback else []
