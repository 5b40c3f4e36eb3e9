"""mDNS discovery on loopback: membership tags, own announcement, updates and removal.

All traffic stays on 127.0.0.0/8 (zeroconf bound to 127.0.0.1). Node ids are random per test so
that other meshchat processes announcing on this host cannot confuse the assertions.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from meshchat.mesh.discovery import (
    SERVICE_TYPE,
    Announcement,
    DiscoveredPeer,
    DiscoveryError,
    MdnsDiscovery,
    membership_tag,
    verify_membership_tag,
)
from meshchat.mesh.identity import KEY_LEN, NodeId
from tests.node_names import named

pytestmark = pytest.mark.timeout(60)

LOOPBACK = ["127.0.0.1"]
NODE = named("node")
TTL = 4


class Seen:
    """Collects what one MdnsDiscovery reports and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.peers: dict[NodeId, DiscoveredPeer] = {}
        self.history: list[DiscoveredPeer] = []
        self.lost: list[NodeId] = []
        self._changed = asyncio.Event()

    def on_peer(self, peer: DiscoveredPeer) -> None:
        self.peers[peer.node_id] = peer
        self.history.append(peer)
        self._changed.set()

    def on_lost(self, node_id: NodeId) -> None:
        self.peers.pop(node_id, None)
        self.lost.append(node_id)
        self._changed.set()

    async def wait(self, cond: Callable[[], bool], timeout: float = 15.0) -> None:
        async def loop() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


def new_id() -> NodeId:
    return NodeId(secrets.token_bytes(KEY_LEN))


Factory = Callable[..., tuple[MdnsDiscovery, Seen]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[MdnsDiscovery] = []

    def factory(
        secret: bytes | None, node_id: NodeId | None = None, port: int = 7000, **kw: object
    ) -> tuple[MdnsDiscovery, Seen]:
        seen = Seen()
        kw.setdefault("interfaces", LOOPBACK)
        kw.setdefault("ttl", TTL)
        disc = MdnsDiscovery(
            node_id or new_id(),
            port,
            secret,
            seen.on_peer,
            seen.on_lost,
            **kw,  # type: ignore[arg-type]
        )
        made.append(disc)
        return disc, seen

    yield factory
    await asyncio.gather(*(d.stop() for d in made))


# ---- the tag, without the network -------------------------------------------------------


def claims(node_id: NodeId = NODE, nonce: bytes = bytes(16)) -> Announcement:
    return Announcement(node_id, nonce, 1_700_000_000_000, 7000, ("10.0.0.1",))


def test_tag_verifies_only_under_the_same_secret() -> None:
    said = claims()
    tag = membership_tag(b"secret", said)
    assert len(tag) == 16
    assert verify_membership_tag(b"secret", said, tag)
    assert not verify_membership_tag(b"other", said, tag)
    assert not verify_membership_tag(b"secret", claims(named("node2")), tag)
    assert not verify_membership_tag(b"secret", claims(nonce=b"\x01" * 16), tag)
    assert not verify_membership_tag(None, said, tag)
    assert not verify_membership_tag(b"secret", said, tag[:8])


@given(st.binary(min_size=1, max_size=64), st.binary(min_size=32, max_size=32), st.binary())
def test_tag_binds_node_id_and_nonce(secret: bytes, raw: bytes, nonce: bytes) -> None:
    node_id = NodeId(raw)
    tag = membership_tag(secret, claims(node_id, nonce))
    assert verify_membership_tag(secret, claims(node_id, nonce), tag)
    other = NodeId(raw[1:] + raw[:1]) if raw[1:] + raw[:1] != raw else NodeId(bytes(32))
    if other != node_id:
        assert not verify_membership_tag(secret, claims(other, nonce), tag)
    # Moving bytes from the nonce must not keep the tag valid.
    assert not verify_membership_tag(secret, claims(node_id, nonce + b"x"), tag)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(NODE, 0, None, lambda p: None)
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(NODE, 1, None, lambda p: None, ttl=1)


# ---- on loopback ------------------------------------------------------------------------


async def test_members_nearby_and_own_announcement(make: Factory) -> None:
    secret = secrets.token_bytes(32)
    a, seen_a = make(secret, port=7001)
    b, seen_b = make(secret, port=7002)
    c, seen_c = make(secrets.token_bytes(32), port=7003)  # another mesh
    d, seen_d = make(None, port=7004)  # no mesh yet
    await asyncio.gather(a.start(), b.start(), c.start(), d.start())
    ids = {x.node_id for x in (a, b, c, d)}

    for disc, seen in ((a, seen_a), (b, seen_b), (c, seen_c), (d, seen_d)):
        others = ids - {disc.node_id}
        await seen.wait(lambda seen=seen, others=others: others <= seen.peers.keys())
        assert disc.node_id not in seen.peers, "own announcement reported"

    assert seen_a.peers[b.node_id].is_member
    assert seen_a.peers[b.node_id].mesh_tag_valid
    assert seen_a.peers[b.node_id].port == 7002
    assert seen_a.peers[b.node_id].addresses == ["127.0.0.1"]
    assert seen_b.peers[a.node_id].is_member
    nearby = seen_a.peers[c.node_id]
    assert not nearby.is_member and nearby.has_mesh
    assert not seen_a.peers[d.node_id].is_member and not seen_a.peers[d.node_id].has_mesh
    assert not seen_c.peers[a.node_id].is_member
    assert not any(p.is_member for p in seen_d.peers.values())
    # Reported once per change, not once per mDNS packet.
    assert sum(p.node_id == b.node_id for p in seen_a.history) == 1


async def test_removal_is_reported(make: Factory) -> None:
    secret = b"s" * 32
    a, seen_a = make(secret)
    b, _ = make(secret)
    await asyncio.gather(a.start(), b.start())
    await seen_a.wait(lambda: b.node_id in seen_a.peers)
    await b.stop()  # sends goodbye packets
    await seen_a.wait(lambda: b.node_id in seen_a.lost, timeout=10)
    assert b.node_id not in seen_a.peers


async def test_joining_a_mesh_reannounces(make: Factory) -> None:
    secret = b"k" * 32
    a, seen_a = make(secret)
    b, seen_b = make(None)
    await asyncio.gather(a.start(), b.start())
    await seen_a.wait(lambda: b.node_id in seen_a.peers)
    await seen_b.wait(lambda: a.node_id in seen_b.peers)
    assert not seen_a.peers[b.node_id].is_member
    assert not seen_b.peers[a.node_id].is_member

    await b.async_set_mesh_secret(secret)
    # b re-checks what it already knows at once; a learns from the new announcement.
    assert seen_b.peers[a.node_id].is_member
    await seen_a.wait(lambda: seen_a.peers[b.node_id].is_member)


async def test_crash_then_restart_on_new_address(make: Factory) -> None:
    secret = b"r" * 32
    node_id = new_id()
    a, seen_a = make(secret, ttl=2)  # short records and sweeps: the crash shows sooner
    b1, _ = make(secret, node_id=node_id, port=7100, addresses=["127.0.0.2"], ttl=2)
    await asyncio.gather(a.start(), b1.start())
    await seen_a.wait(lambda: node_id in seen_a.peers)
    assert seen_a.peers[node_id].addresses == ["127.0.0.2"]

    # Simulate a crash: close the sockets without goodbye packets.
    aiozc = b1._aiozc
    assert aiozc is not None
    b1._aiozc = None
    aiozc.zeroconf.registry.async_remove(aiozc.zeroconf.registry.async_get_infos_type(SERVICE_TYPE))
    await aiozc.async_close()
    # No goodbye: the liveness sweep notices the silence within about 1.5 x TTL + 3 s.
    await seen_a.wait(lambda: node_id in seen_a.lost, timeout=2 * 1.5 + 8)

    b2, _ = make(secret, node_id=node_id, port=7101, addresses=["127.0.0.3"])
    await b2.start()
    await seen_a.wait(
        lambda: (
            node_id in seen_a.peers
            and seen_a.peers[node_id].addresses == ["127.0.0.3"]
            and seen_a.peers[node_id].port == 7101
        )
    )
    assert seen_a.peers[node_id].is_member


async def test_malformed_and_spoofed_announcements_are_ignored(make: Factory) -> None:
    secret = b"m" * 32
    a, seen_a = make(secret)
    await a.start()
    junk = AsyncZeroconf(interfaces=LOOPBACK)
    try:
        infos = [
            # no TXT fields at all
            {},
            # bad nonce length, bad hex tag
            {"v": "1", "id": str(new_id()), "n": "abcd", "m": "zz"},
            # claims our own node id
            {"v": "1", "id": str(a.node_id), "n": "00" * 16},
        ]
        regs = [
            ServiceInfo(
                SERVICE_TYPE,
                f"junk{i}-{secrets.token_hex(3)}.{SERVICE_TYPE}",
                port=9,
                properties=props,
                server=f"junk{i}.local.",
                addresses=[socket.inet_aton("127.0.0.1")],
            )
            for i, props in enumerate(infos)
        ]
        # Registering probes the name first (~1 s); probe all at once.
        announced = await asyncio.gather(*(junk.async_register_service(i) for i in regs))
        await asyncio.gather(*announced)
        # A well-formed outsider, registered last, proves the junk had its chance to arrive.
        ok_id = new_id()
        ok = ServiceInfo(
            SERVICE_TYPE,
            f"ok-{secrets.token_hex(3)}.{SERVICE_TYPE}",
            port=9,
            properties={
                "v": "2",
                "id": ok_id,
                "n": "11" * 16,
                "t": "1",
                "p": "9",
                "a": "127.0.0.1",
                "m": "22" * 16,
            },
            server="okjunk.local.",
            addresses=[socket.inet_aton("127.0.0.1")],
        )
        await (await junk.async_register_service(ok))
        await seen_a.wait(lambda: ok_id in seen_a.peers)
        await asyncio.sleep(0.5)
        assert not seen_a.peers[ok_id].is_member  # a forged tag does not verify
        reported = [p for p in seen_a.history if p.service_name.startswith("junk")]
        assert reported == []
    finally:
        await junk.async_close()
