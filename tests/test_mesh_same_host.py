"""A worker on the same machine as the app: joining by invite from loopback, "left" vs "lost",
and the refusals the app shows (issue 15, point 2 and 3)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshchat.headless import _stage_service, _start_node
from meshchat.mesh import wire
from meshchat.mesh.discovery import local_ipv4_addresses
from meshchat.mesh.invites import InviteError
from meshchat.mesh.node import Node, PeerState, same_host_first
from meshchat.paths import DataDir
from tests.mesh_helpers import MeshNodes, eventually, mesh_nodes

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshNodes]:
    async with mesh_nodes(tmp_path) as nodes:
        yield nodes


async def _wildcard_node(mesh: MeshNodes, name: str) -> Node:
    """A node listening on 0.0.0.0, as the app does by default."""
    node = Node(DataDir(mesh.root / name), "0.0.0.0:0", ping_interval=0.2)
    await node.start()
    mesh.nodes.append(node)
    return node


def test_same_host_first_puts_loopback_before_own_lan_addresses() -> None:
    own = {"192.0.2.2"}
    addrs = [("192.0.2.2", 7000), ("198.51.100.9", 7000)]
    assert same_host_first(addrs, own) == [
        ("127.0.0.1", 7000),
        ("192.0.2.2", 7000),
        ("198.51.100.9", 7000),
    ]
    assert same_host_first([("127.0.0.1", 5)], own) == [("127.0.0.1", 5)]


@pytest.mark.skipif(not local_ipv4_addresses(), reason="needs a non-loopback IPv4 address")
async def test_loopback_worker_joins_an_app_listening_on_all_addresses(mesh: MeshNodes) -> None:
    app = await _wildcard_node(mesh, "app")
    assert all(host != "127.0.0.1" for host, _ in app.invite_addresses())  # LAN addresses only
    worker = await mesh.new("worker")  # listens on 127.0.0.1, like --listen 127.0.0.1:17901
    # Before: InviteError "192.0.2.2:… did not answer" (the answer came from 127.0.0.1).
    assert await worker.join(app.create_invite(), timeout=3.0) == app.node_id
    await app.wait_for_peer(worker.node_id)
    assert app.refusals_seen == 0


async def test_clean_stop_shows_as_left_and_a_drop_as_lost(mesh: MeshNodes) -> None:
    a, b, c = await mesh.new(), await mesh.new(), await mesh.new()
    await b.join(a.create_invite())
    await c.join(a.create_invite())
    await a.wait_for_peer(b.node_id)
    await a.wait_for_peer(c.node_id)
    await b.stop()  # SIGTERM path: closes with the goodbye code
    await eventually(lambda: a.peer(b.node_id).state is PeerState.LEFT)  # type: ignore[union-attr]
    conn = a.peer(c.node_id).conn  # type: ignore[union-attr]
    assert conn is not None
    conn.abort("link dropped")  # any close without the goodbye code
    await eventually(lambda: a.peer(c.node_id).state is PeerState.LOST)  # type: ignore[union-attr]


async def test_a_refused_join_is_recorded_for_the_ui(mesh: MeshNodes) -> None:
    a, b, c = await mesh.new(), await mesh.new(), await mesh.new()
    code = a.create_invite(uses=1)
    await b.join(code)
    with pytest.raises(InviteError):
        await c.join(code)  # used up
    await eventually(lambda: a.refusals_seen == 1)
    refusal = a.refusals[-1]
    assert refusal.address.startswith("127.0.0.1:")
    assert "invite" in refusal.reason


async def test_a_returning_worker_answers_caps_queries_from_its_first_connection(
    mesh: MeshNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app redials a remembered worker the moment it listens again; before, the worker's
    stage service registered its handlers after that (after opening its model), so the app's
    CAPS_QUERY came back "no handler for CAPS_QUERY" and showed as a toast."""
    monkeypatch.setenv("MESHCHAT_MDNS", "0")
    app = await mesh.new("app")
    data = DataDir(mesh.root / "worker")
    first = Node(data, "127.0.0.1:0")
    await first.start()
    await first.join(app.create_invite())
    port = first.port
    await first.stop()
    registered_before_listening: list[bool] = []

    def attach(node: Node) -> None:
        registered_before_listening.append(not node.endpoint.address[1])
        _stage_service(args, node, None, data)

    args = argparse.Namespace(listen=f"127.0.0.1:{port}")
    worker = await _start_node(args, data, attach)
    mesh.nodes.append(worker)
    await app.wait_for_peer(worker.node_id)
    reply = await app.request(worker.node_id, wire.CapsQuery(""), timeout=5.0)
    assert isinstance(reply, wire.Ack)
    assert registered_before_listening == [True]
