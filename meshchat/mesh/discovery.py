"""mDNS discovery of meshchat nodes on the LAN (python-zeroconf, asyncio API).

Every node advertises `_meshchat._udp.local.` with its QUIC port and addresses, and browses for
the same type. The TXT record carries no secret:

    v  protocol version ("2")
    id node_id in its public text form
    n  a random nonce (hex), new for every announcement
    t  when the announcement was made (Unix time, milliseconds)
    p  the QUIC port
    a  the addresses, comma-separated IPv4 (at most 8)
    m  membership tag, hex of HMAC-SHA256(mesh_secret, domain || id, nonce, t, p, a)[:16]
       (each field length-prefixed, see `Announcement.signed_bytes`); absent without a mesh

A peer is reported as a member only when its tag verifies under *our* mesh secret, its
timestamp is within `MAX_AGE_S` in the past / `MAX_CLOCK_SKEW_S` in the future, and it is not
older than the newest announcement of that node_id already accepted. A member's port and
addresses are the signed ones from TXT, never the SRV/A records: those are unsigned, and a
replay of a member's TXT under other SRV/A records must not move the member anywhere. Outsiders
learn nothing from the tag except that the node belongs to some mesh, and a fresh nonce per
announcement keeps tags of different restarts unlinkable by value. A replayed tag claims only
what its node signed, at most `MAX_AGE_S` late, and the transport authenticates every
connection against the node_id's key: announcements are hints, never trust.

Nodes with a mesh re-announce every `REFRESH_S` so their timestamp stays fresh. A node whose
clock steps back is not believed (its announcements look older than what we accepted) until its
clock passes the old timestamp or `MAX_AGE_S` has gone by; its connections are unaffected.

Liveness. A clean stop sends goodbye packets and peers report it lost at once. A crash or a
partition sends nothing, and zeroconf clamps received PTR TTLs to at least 1125 s, so the browser
alone would notice only after ~19 minutes. We therefore announce SRV/TXT/A records with a short
TTL (`ttl`, default 60 s) and sweep every ttl/2: a known peer whose records have expired is asked
again (a few mDNS queries, at most 3 s), and one that does not answer is reported lost. Lost
peers keep being asked each sweep for 10 minutes, so a healed partition is noticed within a
sweep; each sweep also sends one PTR query carrying known answers, so nodes that booted while we
could not hear them answer too. Expect a lost report within about 1.5 × ttl + 3 s. The sweep
also notices when this host's addresses change and re-announces the new ones.
Only IPv4 is used: IPv6 link-local addresses would need scope ids that the layers above do not
carry.

Every table grown from what the LAN sends is bounded (`_MAX_TRACKED`, `_MAX_RESOLVING`,
`_MAX_WAITING`, `_MAX_NEWEST`): a flood of fake names costs a bounded amount of memory and
queries, and delays (never loses) the names that arrived during it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshchat.errors import MeshchatError
from meshchat.mesh.identity import NodeId
from meshchat.tasks import BackgroundTasks

__all__ = [
    "MAX_AGE_S",
    "MAX_CLOCK_SKEW_S",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Announcement",
    "DiscoveredPeer",
    "DiscoveryError",
    "MdnsDiscovery",
    "Verdict",
    "judge_announcement",
    "local_ipv4_addresses",
    "membership_tag",
    "verify_membership_tag",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshchat._udp.local."
PROTOCOL_VERSION = 2  # 2: the tag covers port, addresses and a timestamp

_TAG_DOMAIN = b"meshchat-mdns-membership-v2\x00"
_TAG_BYTES = 16
_NONCE_BYTES = 16
_MAX_NODE_ID_CHARS = 200  # longer "id" values are refused unparsed (a NodeID's text is 55)
_MAX_ADDRESSES = 8  # announced addresses: 8 x 16 chars fit one 255-byte TXT string
_MAX_TIMESTAMP_CHARS = 16  # ms since 1970 has 13 digits until the year 2286
_MAX_TRACKED = 1024  # service names remembered: bounds memory against a LAN of fake services
# Names being resolved at once from browse events. Each resolve may wait 3 s for an answer and
# a LAN has a handful of meshchat nodes, so a flood of fake names must not become a flood of
# our queries; names past this wait in line (`_MAX_WAITING`).
_MAX_RESOLVING = 32
_MAX_WAITING = 1024  # names in line for a resolve slot: as many as we would track
_MAX_NEWEST = 1024  # node ids whose newest accepted timestamp we keep (replay protection)
# Freshness of a member's announcement. A node re-announces every REFRESH_S and records live at
# most _MAX_TTL in a cache, so an honest announcement is at most REFRESH_S + _MAX_TTL = 180 s
# old when read; MAX_CLOCK_SKEW_S is what we allow between the two machines' clocks.
REFRESH_S = 60.0
_MAX_TTL = 120
MAX_CLOCK_SKEW_S = 120.0
MAX_AGE_S = REFRESH_S + _MAX_TTL + MAX_CLOCK_SKEW_S
_RESOLVE_TIMEOUT_MS = 3000
# After a peer restarts on a new address, the old A record lingers in the cache for ~1 s
# (RFC 6762 cache-flush); one delayed re-resolve reports the settled address set.
_SETTLE_DELAY_S = 1.5
_MIN_TTL = 2
_STALE_FORGET_S = 600.0  # stop asking after a lost peer this long
_CHECK_CONCURRENCY = 16

InterfacesArg = InterfaceChoice | Sequence[str]


class DiscoveryError(MeshchatError):
    """mDNS could not be started (no usable interface, bad arguments)."""


class Verdict(Enum):
    """What an announcement is worth to a node holding a given mesh secret."""

    MEMBER = "member"  # tag verifies, fresh, not older than what we accepted before
    NOT_MEMBER = "not-member"  # no tag, another mesh's tag, a forged tag or another version
    REFUSED = "refused"  # our mesh's tag, but stale, from the future, or older: a replay


@dataclass(frozen=True)
class Announcement:
    """What a node claims in its TXT record; the membership tag covers every field."""

    node_id: NodeId
    nonce: bytes
    timestamp_ms: int
    port: int
    addresses: tuple[str, ...]

    def signed_bytes(self) -> bytes:
        """The tagged message: each field length-prefixed, so no two claims encode alike."""
        node = str(self.node_id).encode()  # the TXT record's text
        return b"".join(
            (
                _TAG_DOMAIN,
                len(node).to_bytes(2, "big"),
                node,
                len(self.nonce).to_bytes(2, "big"),
                self.nonce,
                self.timestamp_ms.to_bytes(8, "big"),
                self.port.to_bytes(2, "big"),
                len(self.addresses).to_bytes(1, "big"),
                *(socket.inet_aton(a) for a in self.addresses),
            )
        )


@dataclass(frozen=True)
class DiscoveredPeer:
    """A meshchat node seen on the LAN. Everything here is an unverified hint."""

    node_id: NodeId
    addresses: list[str]
    port: int
    #: the membership tag verifies under our mesh secret
    is_member: bool
    #: the node announces a membership tag (it belongs to some mesh, maybe not ours)
    has_mesh: bool = False
    version: int = PROTOCOL_VERSION
    #: the mDNS service instance name the announcement came from
    service_name: str = field(default="", compare=False)

    @property
    def mesh_tag_valid(self) -> bool:
        """Alias of `is_member`: the tag verified under our secret."""
        return self.is_member


def membership_tag(mesh_secret: bytes, claims: Announcement) -> bytes:
    """The truncated HMAC that proves, to holders of `mesh_secret`, that a member said `claims`."""
    return hmac.new(mesh_secret, claims.signed_bytes(), hashlib.sha256).digest()[:_TAG_BYTES]


def verify_membership_tag(mesh_secret: bytes | None, claims: Announcement, tag: bytes) -> bool:
    """True only if `tag` was made with `mesh_secret` over exactly these claims."""
    if mesh_secret is None or len(tag) != _TAG_BYTES:
        return False
    return hmac.compare_digest(membership_tag(mesh_secret, claims), tag)


def judge_announcement(
    mesh_secret: bytes | None,
    version: int,
    claims: Announcement,
    tag: bytes | None,
    now_ms: int,
    newest_ms: int | None,
) -> Verdict:
    """Member, outsider, or a replay of our mesh's announcement to be ignored.

    `newest_ms` is the newest timestamp already accepted for this node_id (None: none yet).
    """
    if version != PROTOCOL_VERSION or tag is None:
        return Verdict.NOT_MEMBER
    if not verify_membership_tag(mesh_secret, claims, tag):
        return Verdict.NOT_MEMBER
    age_ms = now_ms - claims.timestamp_ms
    if age_ms > MAX_AGE_S * 1000 or -age_ms > MAX_CLOCK_SKEW_S * 1000:
        return Verdict.REFUSED
    if newest_ms is not None and claims.timestamp_ms < newest_ms:
        return Verdict.REFUSED
    return Verdict.MEMBER


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def local_ipv4_addresses(include_loopback: bool = False) -> list[str]:
    """IPv4 addresses of this host (or network namespace), loopback last if included."""
    found: list[str] = []
    loop: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 entries are tuples
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_loopback:
                loop.append(ip.ip)
            elif not addr.is_link_local and not addr.is_unspecified:
                found.append(ip.ip)
    return found + (loop if include_loopback else [])


def _instance_name(node_id: NodeId) -> str:
    # The instance label must fit 63 bytes and be stable across restarts, so that a restarted
    # node replaces its old records instead of appearing twice; the real id travels in TXT.
    digest = hashlib.sha256(str(node_id).encode()).hexdigest()[:20]
    return f"meshchat-{digest}"


def _parse_node_id(text: str) -> NodeId | None:
    """The NodeID of a TXT record's "id", None unless it is one in its canonical text (the
    text the tag covers, so no two texts name one node)."""
    if len(text) > _MAX_NODE_ID_CHARS:
        return None
    try:
        node = NodeId.parse(text)
    except MeshchatError:
        return None
    return node if str(node) == text else None


def _usable_address(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (addr.is_multicast or addr.is_unspecified or addr.is_reserved)


@dataclass(frozen=True)
class _Parsed:
    claims: Announcement
    version: int
    tag: bytes | None

    @property
    def node_id(self) -> NodeId:
        return self.claims.node_id


def _small_int(raw: bytes, max_chars: int) -> int:
    """A non-negative decimal of at most `max_chars` digits (ValueError otherwise)."""
    text = raw.decode("ascii")
    if not 0 < len(text) <= max_chars or not text.isdigit():
        raise ValueError(f"not a small decimal: {text[:20]!r}")
    return int(text)


def _parse_addresses(raw: bytes) -> tuple[str, ...]:
    parts = raw.decode("ascii").split(",")
    if not 0 < len(parts) <= _MAX_ADDRESSES:
        raise ValueError("no addresses, or too many")
    if not all(_is_ipv4(a) and _usable_address(a) for a in parts):
        raise ValueError("unusable address")
    return tuple(parts)


def _parse_info(info: ServiceInfo) -> _Parsed | None:
    """Check an announcement's shape; hostile or malformed ones give None.

    Port and addresses come from the TXT record, where the tag covers them; the SRV and A
    records only let zeroconf resolve the service.
    """
    props = info.properties or {}
    try:
        raw = {key: props.get(key.encode()) for key in ("v", "id", "n", "t", "p", "a")}
        if any(value is None for value in raw.values()):
            return None
        fields = {key: value for key, value in raw.items() if value is not None}
        version = _small_int(fields["v"], 4)
        node_id = _parse_node_id(fields["id"].decode("utf-8"))
        nonce = bytes.fromhex(fields["n"].decode("ascii"))
        timestamp_ms = _small_int(fields["t"], _MAX_TIMESTAMP_CHARS)
        port = _small_int(fields["p"], 5)
        addresses = _parse_addresses(fields["a"])
        raw_m = props.get(b"m")
        tag = bytes.fromhex(raw_m.decode("ascii")) if raw_m else None
    except (UnicodeDecodeError, ValueError):
        return None
    if node_id is None or len(nonce) != _NONCE_BYTES:
        return None
    if tag is not None and len(tag) != _TAG_BYTES:
        return None
    if not 0 < port < 65536:
        return None
    claims = Announcement(node_id, nonce, timestamp_ms, port, addresses)
    return _Parsed(claims, version, tag)


class MdnsDiscovery:
    """Announce this node and report the meshchat nodes seen on the LAN.

    `on_peer` is called (in the event loop) when a peer is first seen and whenever what we know
    about it changes (addresses, port, membership); `on_lost` when its announcement is withdrawn
    or expires. Callbacks must not block. Our own announcement is never reported.

    `interfaces` is zeroconf's choice: `InterfaceChoice.All` (default; inside a network namespace
    that means the namespace's interfaces) or a list of local IPv4 addresses to bind to.
    `addresses` overrides the addresses we advertise (default: those of `interfaces`, excluding
    loopback unless only loopback is available). `ttl` is the record lifetime in seconds.
    """

    def __init__(
        self,
        node_id: NodeId,
        port: int,
        mesh_secret: bytes | None,
        on_peer: Callable[[DiscoveredPeer], None],
        on_lost: Callable[[NodeId], None] | None = None,
        interfaces: InterfacesArg = InterfaceChoice.All,
        *,
        addresses: Sequence[str] | None = None,
        ttl: int = 60,
    ) -> None:
        if not 0 < port < 65536:
            raise DiscoveryError(f"port out of range: {port}")
        if not _MIN_TTL <= ttl <= _MAX_TTL:
            raise DiscoveryError(f"mDNS ttl must lie in {_MIN_TTL}..{_MAX_TTL} s")
        self.node_id = node_id
        self.port = port
        self._secret = mesh_secret
        self._on_peer = on_peer
        self._on_lost = on_lost
        self._interfaces: InterfacesArg = (
            interfaces if isinstance(interfaces, InterfaceChoice) else list(interfaces)
        )
        self._addresses_override = list(addresses) if addresses is not None else None
        self._ttl = ttl
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        # service name -> last parsed announcement / last reported peer
        self._parsed: dict[str, _Parsed] = {}
        self._reported: dict[str, DiscoveredPeer] = {}
        self._tasks = BackgroundTasks(log, "mDNS task", level=logging.WARNING)
        self._resolving: dict[str, bool] = {}  # name -> another resolve requested meanwhile
        self._waiting: dict[str, None] = {}  # names waiting for a resolve slot, in order
        self._in_flight: dict[str, int] = {}  # name -> resolves running (events and sweeps)
        # name -> removals seen while a resolve of it was running, to drop that resolve's answer
        self._removals: dict[str, int] = {}
        self._newest: dict[NodeId, int] = {}  # node_id -> newest accepted member timestamp (ms)
        self._announced_at = 0.0  # monotonic time of our last (re-)announcement
        self._last_ok: dict[str, float] = {}  # name -> monotonic time of last good resolve
        self._stale: dict[str, float] = {}  # name -> when it stopped answering (reported lost)
        self._closing = False

    # ---- public API -----------------------------------------------------------------------

    @property
    def advertised_addresses(self) -> list[str]:
        """The addresses in our announcement (empty before `start`)."""
        return list(self._info.parsed_addresses()) if self._info is not None else []

    @property
    def service_name(self) -> str | None:
        """Our registered service name (zeroconf may add a suffix on a name clash)."""
        return self._info.name if self._info is not None else None

    def peers(self) -> list[DiscoveredPeer]:
        """The peers currently known, one per announcement."""
        return list(self._reported.values())

    async def start(self) -> None:
        """Bind, announce ourselves and start browsing."""
        if self._aiozc is not None:
            return
        self._closing = False
        try:
            self._aiozc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise DiscoveryError(f"cannot start mDNS: {exc}") from exc
        try:
            self._info = self._build_info()
            task = await self._aiozc.async_register_service(self._info, allow_name_change=True)
            await task
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_state_change]
            )
            self._tasks.spawn(self._maintain())
            self._tasks.spawn(self._refresh())
        except BaseException:
            await self.stop()
            raise
        log.debug(
            "mDNS: announced %s at %s:%d", self._info.name, self.advertised_addresses, self.port
        )

    async def stop(self) -> None:
        """Withdraw our announcement (goodbye packets) and stop browsing. Idempotent."""
        self._closing = True
        await self._tasks.aclose()
        aiozc, browser = self._aiozc, self._browser
        self._aiozc = self._browser = None
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        if aiozc is not None:
            # async_close unregisters our service, which sends the goodbye packets.
            await aiozc.async_close()
        self._info = None
        self._parsed.clear()
        self._reported.clear()
        self._resolving.clear()
        self._waiting.clear()
        self._removals.clear()
        self._last_ok.clear()
        self._stale.clear()
        self._in_flight.clear()
        self._newest.clear()

    def set_mesh_secret(self, secret: bytes | None) -> None:
        """Change our mesh secret (e.g. after joining a mesh) and re-announce.

        Known peers are re-checked under the new secret at once; the re-announcement runs as a
        task on the running loop (use `async_set_mesh_secret` to wait for it).
        """
        self._secret = secret
        self._recheck_members()
        if self._aiozc is not None and self._info is not None:
            self._tasks.spawn(self._reannounce())

    async def async_set_mesh_secret(self, secret: bytes | None) -> None:
        """`set_mesh_secret`, returning once the new announcement is sent."""
        self._secret = secret
        self._recheck_members()
        await self._reannounce()

    def _recheck_members(self) -> None:
        for name in list(self._reported):
            parsed = self._parsed[name]
            verdict = self._judge(parsed)
            if verdict is not Verdict.REFUSED:
                self._report(name, parsed, verdict)

    # ---- announcing -----------------------------------------------------------------------

    def _txt(self, addresses: Sequence[str]) -> dict[str, str]:
        claims = Announcement(
            self.node_id,
            secrets.token_bytes(_NONCE_BYTES),
            _now_ms(),
            self.port,
            tuple(addresses),
        )
        props = {
            "v": str(PROTOCOL_VERSION),
            "id": str(self.node_id),
            "n": claims.nonce.hex(),
            "t": str(claims.timestamp_ms),
            "p": str(self.port),
            "a": ",".join(addresses),
        }
        if self._secret is not None:
            props["m"] = membership_tag(self._secret, claims).hex()
        return props

    def _choose_addresses(self) -> list[str]:
        if self._addresses_override is not None:
            chosen = self._addresses_override
        elif isinstance(self._interfaces, InterfaceChoice):
            chosen = local_ipv4_addresses() or ["127.0.0.1"]
        else:
            bound = [a for a in self._interfaces if _is_ipv4(a)]
            routable = [a for a in bound if not ipaddress.IPv4Address(a).is_loopback]
            chosen = routable or bound or ["127.0.0.1"]
        if not chosen or not all(_is_ipv4(a) for a in chosen):
            raise DiscoveryError(f"no usable IPv4 address to announce: {chosen}")
        return sorted(chosen)[:_MAX_ADDRESSES]

    def _build_info(self, name: str | None = None) -> ServiceInfo:
        instance = name or f"{_instance_name(self.node_id)}.{SERVICE_TYPE}"
        host = instance.split(".", 1)[0]
        addresses = self._choose_addresses()
        self._announced_at = time.monotonic()
        try:
            return ServiceInfo(
                SERVICE_TYPE,
                instance,
                port=self.port,
                properties=self._txt(addresses),
                server=f"{host}.local.",
                addresses=[socket.inet_aton(a) for a in addresses],
                host_ttl=self._ttl,
                other_ttl=self._ttl,
            )
        except BadTypeInNameException as exc:
            raise DiscoveryError(f"bad mDNS service name {instance!r}") from exc

    async def _reannounce(self) -> None:
        if self._aiozc is None or self._info is None:
            return
        # Keep the registered name (it may carry a clash suffix); only TXT changes.
        info = self._build_info(self._info.name)
        info.server = self._info.server
        self._info = info
        task = await self._aiozc.async_update_service(info)
        await task

    # ---- browsing -------------------------------------------------------------------------

    def _is_own(self, name: str) -> bool:
        return self._info is not None and name.lower() == self._info.name.lower()

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called by zeroconf inside the event loop; must not block.
        if self._closing or self._is_own(name):
            return
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        self._want_resolve(name)

    def _want_resolve(self, name: str) -> None:
        if name in self._resolving:
            self._resolving[name] = True  # the running resolve will go round once more
            return
        if len(self._resolving) >= _MAX_RESOLVING:
            # The browser reports a name once: keep it in line (bounded) rather than lose it.
            if name in self._waiting or len(self._waiting) < _MAX_WAITING:
                self._waiting[name] = None
            else:
                log.debug("mDNS: ignoring %s, too many names waiting", name)
            return
        if not self._has_room(name):
            return
        self._resolving[name] = False
        self._tasks.spawn(self._resolve_loop(name))

    def _resolve_waiting(self) -> None:
        while self._waiting and len(self._resolving) < _MAX_RESOLVING and not self._closing:
            name = next(iter(self._waiting))
            del self._waiting[name]
            self._want_resolve(name)

    def _has_room(self, name: str) -> bool:
        """May `name` be tracked? Checked before resolving and again before storing."""
        if name in self._parsed or len(self._parsed) < _MAX_TRACKED:
            return True
        if self._evict_oldest_stale():
            return True
        log.debug("mDNS: ignoring %s, too many services tracked", name)
        return False

    def _evict_oldest_stale(self) -> bool:
        """Make room by forgetting the name that has been silent longest (if any is)."""
        if not self._stale:
            return False
        name = min(self._stale, key=self._stale.__getitem__)
        self._stale.pop(name)
        self._parsed.pop(name, None)
        self._last_ok.pop(name, None)
        return True

    async def _resolve_loop(self, name: str) -> None:
        try:
            settle = True
            while True:
                await self._resolve(name)
                if self._resolving.get(name):
                    self._resolving[name] = False
                    settle = True
                    continue
                if not settle:
                    break
                # One more look once the cache has flushed superseded records.
                settle = False
                await asyncio.sleep(_SETTLE_DELAY_S)
        finally:
            self._resolving.pop(name, None)
            self._resolve_waiting()

    async def _resolve(self, name: str) -> bool:
        """Look the service up (cache first, then the network); False if it did not answer."""
        if self._aiozc is None:
            return False
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        try:
            return await self._resolve_once(self._aiozc, name)
        finally:
            left = self._in_flight.pop(name, 1) - 1
            if left:
                self._in_flight[name] = left
            else:
                self._removals.pop(name, None)

    async def _resolve_once(self, aiozc: AsyncZeroconf, name: str) -> bool:
        removals = self._removals.get(name, 0)
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, _RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: could not resolve %s", name)
            return False
        parsed = _parse_info(info)
        if parsed is None:
            log.debug("mDNS: malformed announcement %s", name)
            return True  # it answered; there is just nothing usable in it
        if self._closing or self._removals.get(name, 0) != removals:
            return True  # withdrawn while we were asking
        if parsed.node_id == self.node_id:
            return True  # our own id under another name: a stale record of ours, or a spoof
        if not self._has_room(name):
            return True
        verdict = self._judge(parsed)
        if verdict is Verdict.REFUSED:
            log.debug("mDNS: %s replays a stale or superseded announcement", name)
            return True  # it answered, with nothing we may use (and no proof of life)
        self._last_ok[name] = time.monotonic()
        self._stale.pop(name, None)
        self._parsed[name] = parsed
        self._report(name, parsed, verdict)
        return True

    # ---- liveness -------------------------------------------------------------------------

    async def _maintain(self) -> None:
        period = max(1.0, self._ttl / 2)
        limit = asyncio.Semaphore(_CHECK_CONCURRENCY)

        async def check(name: str) -> None:
            async with limit:
                started = time.monotonic()
                if await self._resolve(name) or self._closing:
                    return
                if self._last_ok.get(name, 0.0) < started:  # no event-driven success meanwhile
                    self._mark_lost(name)

        while not self._closing:
            # Jitter keeps nodes started together from querying in lockstep.
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            await self._follow_address_change()
            self._send_ptr_query()
            names = [n for n in self._parsed if n not in self._resolving]
            await asyncio.gather(*(check(n) for n in names))

    async def _refresh(self) -> None:
        """Re-announce with a fresh timestamp, so that peers keep accepting our tag.

        Its own task: a sweep slowed down by a flood of silent names must not delay it.
        """
        while not self._closing:
            await asyncio.sleep(REFRESH_S * random.uniform(0.9, 1.0))
            stale = time.monotonic() - self._announced_at >= REFRESH_S * 0.9
            if self._secret is not None and stale:
                await self._reannounce()

    async def _follow_address_change(self) -> None:
        """Renumbered (DHCP, Wi-Fi roaming)? Rebind and announce the new addresses."""
        if self._addresses_override is not None or not isinstance(
            self._interfaces, InterfaceChoice
        ):
            return  # the caller chose the addresses; they do not follow the interfaces
        if self._aiozc is None or self._info is None:
            return
        current = sorted(local_ipv4_addresses()) or ["127.0.0.1"]
        if current == sorted(self.advertised_addresses):
            return
        log.info("mDNS: addresses changed to %s; re-announcing", current)
        try:
            await self._aiozc.async_update_interfaces()
        except OSError as exc:
            log.warning("mDNS: rebinding after an address change failed: %s", exc)
        await self._reannounce()

    def _send_ptr_query(self) -> None:
        """One PTR query with our known answers: only services we do not know reply."""
        if self._browser is None:
            return
        try:
            scheduler = self._browser.query_scheduler
            scheduler.async_send_ready_queries(False, current_time_millis(), {SERVICE_TYPE})
        except (AttributeError, TypeError):  # zeroconf internals moved: lose only this nicety
            log.debug("mDNS: cannot send a browse query with this zeroconf", exc_info=True)

    def _mark_lost(self, name: str) -> None:
        if name not in self._parsed:
            return  # forgotten while we were asking
        now = time.monotonic()
        since = self._stale.setdefault(name, now)
        if now - since > _STALE_FORGET_S:
            self._stale.pop(name, None)
            self._parsed.pop(name, None)
            self._last_ok.pop(name, None)
        peer = self._reported.pop(name, None)
        if peer is not None:
            log.debug("mDNS: %s stopped answering", name)
            self._lost(peer)

    def _judge(self, parsed: _Parsed) -> Verdict:
        """The announcement's verdict; a member's timestamp becomes the newest we accept."""
        node, now_ms = parsed.node_id, _now_ms()
        newest = self._newest.get(node)
        if newest is not None and newest < now_ms - MAX_AGE_S * 1000:
            del self._newest[node]  # too old to matter: anything older is stale anyway
            newest = None
        verdict = judge_announcement(
            self._secret, parsed.version, parsed.claims, parsed.tag, now_ms, newest
        )
        if verdict is Verdict.MEMBER:
            self._newest.pop(node, None)  # re-insert: the dict's order is the age order
            self._newest[node] = parsed.claims.timestamp_ms
            self._prune_newest()
        return verdict

    def _prune_newest(self) -> None:
        """Drop entries too old to matter (older announcements are stale anyway), then cap."""
        oldest_fresh = _now_ms() - int(MAX_AGE_S * 1000)
        for node in [n for n, ts in self._newest.items() if ts < oldest_fresh]:
            del self._newest[node]
        while len(self._newest) > _MAX_NEWEST:
            del self._newest[next(iter(self._newest))]

    def _report(self, name: str, parsed: _Parsed, verdict: Verdict) -> None:
        claims = parsed.claims
        peer = DiscoveredPeer(
            node_id=claims.node_id,
            addresses=list(claims.addresses),
            port=claims.port,
            is_member=verdict is Verdict.MEMBER,
            has_mesh=parsed.tag is not None,
            version=parsed.version,
            service_name=name,
        )
        old = self._reported.get(name)
        if old == peer:
            return
        self._reported[name] = peer
        try:
            self._on_peer(peer)
        except Exception:
            log.exception("mDNS: on_peer callback failed")
        if old is not None and old.node_id != peer.node_id:
            self._lost(old)  # the name now announces another node: the old one is gone

    def _forget(self, name: str) -> None:
        self._waiting.pop(name, None)
        if name in self._in_flight:
            self._removals[name] = self._removals.get(name, 0) + 1
        self._parsed.pop(name, None)
        self._stale.pop(name, None)
        self._last_ok.pop(name, None)
        peer = self._reported.pop(name, None)
        if peer is not None:
            self._lost(peer)

    def _lost(self, peer: DiscoveredPeer) -> None:
        if self._on_lost is None:
            return
        if any(p.node_id == peer.node_id for p in self._reported.values()):
            return  # still announced under another name
        try:
            self._on_lost(peer.node_id)
        except Exception:
            log.exception("mDNS: on_lost callback failed")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
