"""Helpers for the TUI tests: build the app on a temp data dir, a scripted mesh, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

from meshchat.config import ChatSettings, Config
from meshchat.errors import MeshchatError
from meshchat.mesh.identity import NodeId
from meshchat.paths import DataDir
from meshchat.tui.app import AppOptions, MeshchatApp
from meshchat.tui.mesh_view import PeerRow
from meshchat.tui.theming import BUILTIN_DIR
from tests.node_names import with_text

# Greedy and short: answers are deterministic and quick (~100 tok/s on this model). One llama.cpp
# thread: on a busy shared machine, spinning thread pools make two threads far slower than one.
GREEDY = ChatSettings(temperature=0.0, max_tokens=24, seed=1)
CAPITAL = "What is the capital of France? Answer in one word."  # greedy: "...is Paris."
CODE = "Write a Python function that adds two numbers."  # greedy: one ```python block

SELF_NAME = "selfnode00"  # how the fake mesh shows this node
PEER_A = with_text("peeraaaaaa")
PEER_B = with_text("peerbbbbbb")


@dataclass
class FakeMesh:
    """A MeshView with fixed NodeIDs, addresses and RTTs (snapshots need stable text)."""

    rows: list[PeerRow] = field(default_factory=list)
    usable: list[NodeId] = field(default_factory=list)
    invites: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    removed: list[NodeId] = field(default_factory=list)
    status: list[Any] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def name(self) -> str:
        return SELF_NAME

    @property
    def addresses(self) -> list[str]:
        return ["192.168.1.10:47470"]

    def peers(self) -> list[PeerRow]:
        return list(self.rows)

    def usable_nodes(self, fingerprint: str | None) -> list[NodeId]:
        return list(self.usable)

    def create_invite(self, uses: int = 1, ttl: float = 3600.0) -> str:
        code = f"mc1fakeinvite{len(self.invites)}"
        self.invites.append(code)
        return code

    async def join(self, code: str) -> str:
        if "bad" in code:
            raise MeshchatError("invite refused: unknown invite")
        self.joined.append(code)
        return PEER_A.short

    async def remove(self, node: NodeId) -> None:
        self.removed.append(node)
        self.rows = [r for r in self.rows if r.key != node]

    def set_status(self, layers: Any, model: Any) -> None:
        self.status.append((layers, model))

    def new_refusals(self) -> list[str]:
        fresh, self.refused = self.refused, []
        return fresh

    async def stop(self) -> None:
        self.stopped = True

    def planning_node(self) -> None:
        return None  # no real node: the planner stays off


def two_peers() -> FakeMesh:
    return FakeMesh(
        rows=[
            PeerRow(PEER_A, PEER_A.short, "192.168.1.11:47470", "invite", 0.8, None, "idle", True),
            PeerRow(
                PEER_B, PEER_B.short, "192.168.1.12:47470", "mdns", None, None, "nearby", False
            ),
        ],
        usable=[PEER_A],
    )


def make_app(
    tmp_path: Path,
    model: Path | None,
    *,
    mesh: FakeMesh | None = None,
    config: Config | None = None,
    sampling: ChatSettings = GREEDY,
    model_error: str = "",
    theme_dirs: tuple[Path, ...] = (BUILTIN_DIR,),
    history_path: Path | None = None,
    real_mesh: bool = False,
    join_code: str | None = None,
) -> MeshchatApp:
    config = config or Config(sampling=sampling, listen="127.0.0.1:0", mdns=False, threads=1)
    if config.path is None:
        config = replace(config, path=tmp_path / "config" / "config.toml")
    mesh = mesh if mesh is not None else FakeMesh()

    async def start_mesh() -> FakeMesh:
        return mesh

    options = AppOptions(
        data=DataDir(tmp_path / "data"),
        config=config,
        model_path=model,
        model_error=model_error,
        theme_dirs=theme_dirs,
        history_path=history_path,
        join_code=join_code,
    )
    return MeshchatApp(options, mesh_factory=None if real_mesh else start_mesh)


async def wait_for(
    pilot: Pilot[Any], condition: Callable[[], object], timeout: float = 30.0, what: str = ""
) -> None:
    """Let the app run until `condition()` is true (or fail after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)


async def ready(pilot: Pilot[Any]) -> MeshchatApp:
    app = pilot.app
    assert isinstance(app, MeshchatApp)
    await wait_for(pilot, lambda: app.engine is not None or app.model_error, what="model load")
    await wait_for(pilot, lambda: app.mesh is not None or app.mesh_error, what="mesh")
    return app


async def ask(pilot: Pilot[Any], text: str, timeout: float = 60.0) -> str:
    """Type a question, send it, wait for the whole answer; return the answer's text."""
    app = pilot.app
    assert isinstance(app, MeshchatApp)
    app.prompt.focus()
    app.prompt.text = text
    before = len(app.messages)
    await pilot.press("enter")
    await wait_for(
        pilot,
        lambda: len(app.messages) >= before + 2 and app.generation is None,
        timeout,
        what="answer",
    )
    assert app.messages[-2].content == text and app.messages[-1].role == "assistant"
    return app.messages[-1].content
