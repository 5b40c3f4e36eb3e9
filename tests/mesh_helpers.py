"""Helpers for the mesh tests: nodes on 127.0.0.1 in temp data dirs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from meshchat.mesh.node import Node
from meshchat.mesh.transport import DEFAULT_TUNING, Tuning
from meshchat.paths import DataDir

# Short timers so liveness tests take about a second.
FAST_PING = 0.2


class MeshNodes:
    """Creates started nodes and stops all of them at the end of a test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []

    async def new(
        self, name: str | None = None, tuning: Tuning = DEFAULT_TUNING, **kw: Any
    ) -> Node:
        name = name or f"n{len(self.nodes)}"
        kw.setdefault("ping_interval", FAST_PING)
        node = Node(DataDir(self.root / name), "127.0.0.1:0", tuning=tuning, **kw)
        await node.start()
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop()


@contextlib.asynccontextmanager
async def mesh_nodes(root: Path) -> AsyncIterator[MeshNodes]:
    nodes = MeshNodes(root)
    try:
        yield nodes
    finally:
        await nodes.close()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `check` until it is true or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
