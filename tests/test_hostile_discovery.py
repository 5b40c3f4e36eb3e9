"""Hostile mDNS (issue 12, item 6): replayed, stale and forged announcements, floods of names.

The verdict on an announcement is tested without the network; the attacks are then made for
real on loopback (zeroconf bound to 127.0.0.1) by a second zeroconf instance that registers or
broadcasts what an attacker on the LAN would send. Each attack test has a positive control
showing that the hostile records did arrive and were handled, then shows their effect is nil.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshchat.mesh import discovery as discovery_module
from meshchat.mesh.discovery import (
    MAX_AGE_S,
    MAX_CLOCK_SKEW_S,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Announcement,
    MdnsDiscovery,
    Verdict,
    judge_announcement,
    membership_tag,
)
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.node import Node, PeerState, _with_hints
from meshchat.paths import DataDir
from tests.netns_helpers import SCRIPTS, netns, require_netns, wait_for
from tests.node_names import named
from tests.test_discovery import LOOPBACK, Factory, Seen, make, new_id
from tests.test_netns_discovery import Probes

__all__ = ["make"]  # the loopback discovery fixture, shared with tests/test_discovery.py

pytestmark = pytest.mark.timeout(60)

SECRET = b"s" * 32
NOW_MS = 1_700_000_000_000
TTL = 4
DISCOVERY_LOG = "meshchat.mesh.discovery"


NODE, OTHER = named("node"), named("other")


def said(
    node_id: NodeId = NODE,
    ts: int = NOW_MS,
    port: int = 7000,
    addresses: tuple[str, ...] = ("10.0.0.1",),
) -> Announcement:
    return Announcement(node_id, bytes(16), ts, port, addresses)


def judge(claims: Announcement, tag: bytes | None, newest: int | None = None) -> Verdict:
    return judge_announcement(SECRET, PROTOCOL_VERSION, claims, tag, NOW_MS, newest)


# ---- the verdict, without the network ---------------------------------------------------


def test_a_fresh_announcement_of_our_mesh_is_a_member() -> None:
    claims = said()
    assert judge(claims, membership_tag(SECRET, claims)) is Verdict.MEMBER


def test_replay_with_another_address_or_port_is_no_member() -> None:
    tag = membership_tag(SECRET, said())
    assert judge(said(port=9999), tag) is Verdict.NOT_MEMBER
    assert judge(said(addresses=("10.0.0.66",)), tag) is Verdict.NOT_MEMBER
    assert judge(said(addresses=("10.0.0.1", "10.0.0.66")), tag) is Verdict.NOT_MEMBER
    assert judge(said(node_id=OTHER), tag) is Verdict.NOT_MEMBER
    assert judge(said(ts=NOW_MS + 1), tag) is Verdict.NOT_MEMBER


def test_stale_and_future_timestamps_are_refused() -> None:
    for ts, verdict in (
        (NOW_MS - int(MAX_AGE_S * 1000) - 1, Verdict.REFUSED),  # a capture from long ago
        (NOW_MS - int(MAX_AGE_S * 1000), Verdict.MEMBER),
        (NOW_MS + int(MAX_CLOCK_SKEW_S * 1000), Verdict.MEMBER),
        (NOW_MS + int(MAX_CLOCK_SKEW_S * 1000) + 1, Verdict.REFUSED),
        (0, Verdict.REFUSED),
    ):
        claims = said(ts=ts)
        assert judge(claims, membership_tag(SECRET, claims)) is verdict, ts


def test_an_announcement_older_than_the_newest_accepted_is_refused() -> None:
    old, new = said(ts=NOW_MS - 5000), said(ts=NOW_MS - 10, addresses=("10.0.0.2",))
    assert judge(new, membership_tag(SECRET, new), newest=new.timestamp_ms) is Verdict.MEMBER
    assert judge(old, membership_tag(SECRET, old), newest=new.timestamp_ms) is Verdict.REFUSED


def test_forged_tags_and_other_versions_are_no_member() -> None:
    claims = said()
    assert judge(claims, secrets.token_bytes(16)) is Verdict.NOT_MEMBER
    assert judge(claims, membership_tag(b"another mesh", claims)) is Verdict.NOT_MEMBER
    assert judge(claims, None) is Verdict.NOT_MEMBER
    tag = membership_tag(SECRET, claims)
    assert judge_announcement(SECRET, 1, claims, tag, NOW_MS, None) is Verdict.NOT_MEMBER
    assert judge_announcement(None, PROTOCOL_VERSION, claims, tag, NOW_MS, None) is (
        Verdict.NOT_MEMBER
    )


_addr = st.builds("10.{}.{}.{}".format, *(st.integers(0, 255) for _ in range(3)))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 65535),
    st.lists(_addr, min_size=1, max_size=8, unique=True),
    st.integers(1, 65535),
    st.lists(_addr, min_size=1, max_size=8, unique=True),
)
def test_the_tag_binds_port_and_addresses(
    port: int, addrs: list[str], other_port: int, other_addrs: list[str]
) -> None:
    claims = said(port=port, addresses=tuple(addrs))
    tag = membership_tag(SECRET, claims)
    moved = said(port=other_port, addresses=tuple(other_addrs))
    expect = Verdict.MEMBER if moved == claims else Verdict.NOT_MEMBER
    assert judge(moved, tag) is expect


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 40).map("10.0.0.{}:1".format), max_size=8, unique=True),
    st.lists(st.integers(1, 40).map("10.0.0.{}:1".format), max_size=8, unique=True),
)
def test_discovered_addresses_are_added_never_swapped_in(
    known: list[str], found: list[str]
) -> None:
    merged = _with_hints(known, found)
    assert len(merged) <= 8 and len(set(merged)) == len(merged)
    kept = min(len(known), 4)
    assert merged[:kept] == known[:kept], "the first known addresses always survive"
    assert set(merged) <= set(known) | set(found)
    fresh = [x for x in found if x not in known][:4]
    assert merged[len(merged) - len(fresh) :] == fresh, "new addresses are added at the end"


# ---- attacks on loopback ----------------------------------------------------------------


class Attacker:
    """A second zeroconf on loopback that registers whatever announcement it likes."""

    def __init__(self) -> None:
        self.zc = AsyncZeroconf(interfaces=LOOPBACK)

    async def capture(self, name: str) -> dict[str, str]:
        """An honest node's TXT, as anyone on the LAN can read it."""
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(self.zc.zeroconf, 3000), f"{name} did not answer"
        return {k.decode(): (v or b"").decode() for k, v in info.properties.items()}

    async def register(
        self, props: dict[str, str], port: int = 9999, address: str = "127.0.0.1"
    ) -> str:
        name = f"evil-{secrets.token_hex(4)}.{SERVICE_TYPE}"
        info = ServiceInfo(
            SERVICE_TYPE,
            name,
            port=port,
            properties=props,
            server=f"{name.split('.')[0]}.local.",
            addresses=[socket.inet_aton(address)],
            host_ttl=TTL,
            other_ttl=TTL,
        )
        await (await self.zc.async_register_service(info))
        return name

    def broadcast(self, name: str, props: dict[str, str], ttl: int = 60) -> None:
        """Send one announcement packet for `name` (no probing: a flood is this cheap)."""
        info = ServiceInfo(
            SERVICE_TYPE,
            name,
            port=9,
            properties=props,
            server=f"{name.split('.')[0]}.local.",
            addresses=[socket.inet_aton("127.0.0.1")],
            host_ttl=ttl,
            other_ttl=ttl,
        )
        self.zc.zeroconf.async_send(self.zc.zeroconf.generate_service_broadcast(info, ttl))

    async def close(self) -> None:
        await self.zc.async_close()


@pytest.fixture
async def attacker() -> AsyncIterator[Attacker]:
    evil = Attacker()
    yield evil
    await evil.close()


def txt(node_id: NodeId, ts_ms: int, port: int, address: str, tag: bytes | None) -> dict[str, str]:
    nonce = secrets.token_bytes(16)
    props = {"v": str(PROTOCOL_VERSION), "id": str(node_id), "n": nonce.hex(), "t": str(ts_ms)}
    props |= {"p": str(port), "a": address}
    if tag is not None:
        claims = Announcement(node_id, nonce, ts_ms, port, (address,))
        props["m"] = membership_tag(tag, claims).hex()  # `tag` here is the secret to sign with
    return props


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def refused(caplog: pytest.LogCaptureFixture, name: str) -> bool:
    return any("replays" in r.getMessage() and name in r.getMessage() for r in caplog.records)


async def test_replayed_stale_and_forged_announcements_move_nothing(
    make: Factory, attacker: Attacker, caplog: pytest.LogCaptureFixture
) -> None:
    """Five attacks on a member's announcement; the victim's view of it never changes."""
    caplog.set_level(logging.DEBUG, logger=DISCOVERY_LOG)
    node_id = new_id()
    a, seen = make(SECRET)
    b1, _ = make(SECRET, node_id=node_id, port=7100, addresses=["127.0.0.2"])
    await asyncio.gather(a.start(), b1.start())
    await seen.wait(lambda: node_id in seen.peers)
    assert b1.service_name is not None
    before_move = await attacker.capture(b1.service_name)
    # The member moves: stops (goodbye) and comes back at another address and port.
    await b1.stop()
    await seen.wait(lambda: node_id in seen.lost)
    b2, _ = make(SECRET, node_id=node_id, port=7101, addresses=["127.0.0.3"])
    await b2.start()
    await seen.wait(lambda: node_id in seen.peers and seen.peers[node_id].port == 7101)
    assert b2.service_name is not None
    current = await attacker.capture(b2.service_name)
    now_ms = discovery_module._now_ms()
    stale_ms = now_ms - int((MAX_AGE_S + 60) * 1000)

    older = await attacker.register(before_move)  # 1. replay of what it said before moving
    edited = await attacker.register(before_move | {"p": "9999", "a": "127.0.0.9"})  # 2.
    exact = await attacker.register(current, port=9999, address="127.0.0.9")  # 3. other SRV/A
    stale = await attacker.register(txt(node_id, stale_ms, 9999, "127.0.0.9", SECRET))  # 4.
    forged = await attacker.register(  # 5. a tag made up by someone without the secret
        txt(node_id, now_ms, 9999, "127.0.0.9", None) | {"m": secrets.token_hex(16)}
    )

    def reports(name: str) -> list[Any]:
        return [p for p in seen.history if p.service_name == name]

    await seen.wait(lambda: bool(reports(edited) and reports(exact) and reports(forged)))
    await until(lambda: refused(caplog, older) and refused(caplog, stale))
    # Effect: the member is only ever believed at its own, signed, current address and port.
    assert reports(older) == [] and reports(stale) == []
    assert [p.is_member for p in reports(edited) + reports(forged)] == [False, False]
    assert [(p.addresses, p.port, p.is_member) for p in reports(exact)] == [
        (["127.0.0.3"], 7101, True)
    ]
    for peer in seen.history:
        if peer.is_member:
            assert "127.0.0.9" not in peer.addresses and peer.port != 9999
    assert b2.service_name is not None
    member_view = [p for p in a.peers() if p.service_name == b2.service_name]
    assert [(p.addresses, p.port, p.is_member) for p in member_view] == [
        (["127.0.0.3"], 7101, True)
    ]


def loopback_discovery(node: Node) -> MdnsDiscovery:
    return MdnsDiscovery(
        node.node_id,
        node.port,
        node.membership.mesh_secret,
        node._on_discovered,
        node._on_discovery_lost,
        interfaces=LOOPBACK,
        ttl=TTL,
    )


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[Node]:
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_a_replay_does_not_redirect_a_members_redial(
    tmp_path: Path, attacker: Attacker, caplog: pytest.LogCaptureFixture
) -> None:
    """A member goes away; replays of its announcement must not send our redials elsewhere."""
    caplog.set_level(logging.DEBUG, logger="meshchat.mesh")
    a = Node(DataDir(tmp_path / "a"), "127.0.0.1:0", discovery=loopback_discovery)
    b = Node(DataDir(tmp_path / "b"), "127.0.0.1:0", discovery=loopback_discovery)
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the attacker's QUIC "listener"
    trap.bind(("127.0.0.1", 0))
    trap.setblocking(False)
    trap_port = trap.getsockname()[1]
    try:
        async with running(a):
            async with running(b):
                await b.join(a.create_invite())
                await until(
                    lambda: any(p.node_id == b.node_id and p.is_member for p in a.discovery.peers())
                )
                assert b.discovery is not None and b.discovery.service_name is not None
                honest = await attacker.capture(b.discovery.service_name)
            peer = a._peers[b.node_id]
            await until(lambda: peer.state is not PeerState.CONNECTED)
            known = list(peer.addresses)
            assert known
            edited = await attacker.register(honest | {"p": str(trap_port)}, port=trap_port)
            exact = await attacker.register(honest, port=trap_port)
            # Positive control: both replays were heard and handled by a's discovery.
            await until(lambda: {edited, exact} <= {p.service_name for p in a.discovery.peers()})
            caplog.clear()
            # Two redial rounds of b after that.
            await until(
                lambda: sum("redial" in r.getMessage() for r in caplog.records) >= 2, timeout=40
            )
            assert peer.addresses == known
            with pytest.raises(BlockingIOError):
                trap.recv(2048)  # not one datagram reached the attacker
    finally:
        trap.close()


async def test_a_flood_of_names_keeps_every_table_bounded(
    tmp_path: Path, attacker: Attacker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of fake names, one name changing its node id, then goodbyes for all."""
    tracked = 40  # a small cap, so the test reaches it in seconds; the real one is 1024
    monkeypatch.setattr(discovery_module, "_MAX_TRACKED", tracked)
    node = Node(DataDir(tmp_path / "victim"), "127.0.0.1:0", discovery=loopback_discovery)
    honest, seen_honest = None, Seen()
    async with running(node):
        disc = node.discovery
        assert isinstance(disc, MdnsDiscovery)
        honest = MdnsDiscovery(
            new_id(), 7200, node.membership.mesh_secret, seen_honest.on_peer, interfaces=LOOPBACK
        )
        await honest.start()
        try:
            await until(lambda: any(p.is_member for p in disc.peers()))
            now_ms = discovery_module._now_ms()
            fakes = {f"flood-{i}.{SERVICE_TYPE}": Identity.generate().node_id for i in range(150)}
            for name, fake_id in fakes.items():
                attacker.broadcast(name, txt(fake_id, now_ms, 9, "127.0.0.1", None))
            shifty = f"shifty.{SERVICE_TYPE}"
            shifty_ids = [Identity.generate().node_id for _ in range(60)]
            for fake_id in shifty_ids:
                attacker.broadcast(shifty, txt(fake_id, now_ms, 9, "127.0.0.1", None))
                await asyncio.sleep(0.02)

            def bounded() -> None:
                assert len(disc._parsed) <= tracked and len(disc._reported) <= tracked
                assert len(disc._resolving) <= discovery_module._MAX_RESOLVING
                assert len(disc._waiting) <= discovery_module._MAX_WAITING
                assert len(node._nearby) <= 64
                assert len(disc._newest) <= discovery_module._MAX_NEWEST
                assert sum(n in shifty_ids for n in node._nearby) <= 1

            # Positive control: the flood fills the tables up to their caps.
            for _ in range(400):
                bounded()
                if len(disc._parsed) >= tracked:
                    break
                await asyncio.sleep(0.05)
            assert len(disc._parsed) == tracked and len(node._nearby) > tracked // 2
            bounded()
            # Goodbyes for every fake name: what they left behind goes with them.
            for name, fake_id in fakes.items():
                attacker.broadcast(name, txt(fake_id, now_ms, 9, "127.0.0.1", None), ttl=0)
            attacker.broadcast(shifty, txt(shifty_ids[-1], now_ms, 9, "127.0.0.1", None), ttl=0)
            await until(
                lambda: len(disc._parsed) <= 1 and not disc._resolving and not disc._in_flight
            )
            bounded()
            # Only the honest announcer is left nearby (a NodeID that is not in the roster).
            assert disc._removals == {} and set(node._nearby) <= {honest.node_id}
            # Service still works: the honest member is known, and a newcomer is found.
            assert [p.is_member for p in disc.peers()] == [True]
            newcomer_id = Identity.generate().node_id
            newcomer = MdnsDiscovery(newcomer_id, 7201, None, lambda p: None, interfaces=LOOPBACK)
            await newcomer.start()
            try:
                await until(lambda: any(n == newcomer.node_id for n in node._nearby))
            finally:
                await newcomer.stop()
        finally:
            await honest.stop()


# ---- across a real bridge ---------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_replay_from_another_host_moves_nothing(tmp_path: Path) -> None:
    """n3 replays n2's announcement from its own address (as is, and with p/a edited)."""
    require_netns()
    with netns.NetnsLab(3) as lab:
        probes = Probes(lab, tmp_path)
        mesh = secrets.token_bytes(32)
        probes.start("n1", mesh)
        probes.start("n2", mesh)
        n2 = probes.ids["n2"]

        def events() -> list[list[Any]]:
            return [e for e in probes.view("n1").get("events", []) if e[1] == "peer" and e[2] == n2]

        wait_for("n1 to see n2", lambda: any(e[5] for e in events()), 20, dump=probes.dump)
        out = tmp_path / "replay.json"
        log = (tmp_path / "n3.log").open("ab")
        argv = [sys.executable, str(SCRIPTS / "mdns_replay.py"), "--node-id", n2]
        argv += ["--port", "9999", "--out", str(out)]
        attacker = lab.popen("n3", argv, stdout=log, stderr=log)
        try:
            wait_for("n3 to replay n2's announcement", out.exists, 30, dump=probes.dump)
            # Positive control: n1 hears both copies (each under its own service name).
            wait_for(
                "n1 to hear both replays",
                lambda: sum(e[5] for e in events()) >= 2 and any(not e[5] for e in events()),
                20,
                dump=probes.dump,
            )
        finally:
            attacker.terminate()
            attacker.wait(timeout=10)
        for event in events():
            if event[5]:  # believed a member: only ever at n2's own, signed, address and port
                assert (event[3], event[4]) == ([lab.address("n2")], 7000), event
            else:
                assert (event[3], event[4]) == ([lab.address("n3")], 9999), event
