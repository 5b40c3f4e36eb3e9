"""Serve the API from a mesh node: this node is the head, the mesh runs the model.

At start the node asks every connected peer what it can run, plans, and starts one mesh
pipeline with a session slot per concurrent request on every stage. That pipeline lives as
long as the API: a stage lost in a request is replaced by the pipeline's own failover, and
`MeshServing` plans again when nothing fits, when members join or return, and when a joining
node makes a clearly faster plan (meshchat.inference.serving). A head that cannot run the
model yet serves anyway: completions get 503 with Retry-After until a plan fits.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshchat.api.server import ApiModel, api_model, start_api
from meshchat.engine.tokenizer import Tokenizer
from meshchat.errors import UsageError
from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.serving import MeshServing, PlanGate, ReplanReason
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.paths import DataDir

API_SESSIONS = 4  # concurrent requests, each with its own KV cache on every stage
API_QUEUE = 16  # requests that may wait for a session before the API answers 429
API_CONTEXT = 4096


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--api wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback_host(host: str) -> bool:
    """Only this machine can reach `host`: a loopback address or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to an address others reach


def refuse_open_bind(address: str, api_key: str | None, allow_no_key: bool) -> None:
    """A UsageError for an API reachable from other machines without a key, unless allowed."""
    host, _port = parse_host_port(address)
    if api_key or allow_no_key or is_loopback_host(host):
        return
    raise UsageError(
        f"--api {address} would let anyone who reaches this host use the model without a key: "
        "pass --api-key KEY (or set api_key in config.toml), bind 127.0.0.1, "
        "or pass --api-allow-no-key"
    )


@dataclass
class MeshApi:
    runner: web.AppRunner
    pipeline: MeshPipeline
    model: ApiModel
    serving: MeshServing

    def status(self) -> dict[str, Any]:
        """The status file's view of the API: what requests hold, and the re-plans."""
        sessions: dict[str, int] = {
            **self.model.counts(),
            "pipeline_sessions": self.pipeline.open_sessions,
            "waiting_replies": self.pipeline.waiting_replies,
        }
        return {"sessions": sessions, **self.serving.status()}

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.serving.close()
        with contextlib.suppress(Exception):
            await self.model.pool.close()
        await self.pipeline.close()


async def start_mesh_api(
    node: Node,
    model: LocalModel,
    data: DataDir,
    address: str,
    api_key: str | None,
    threads: int,
    notify: Callable[[str], None],
    settle_via: NodeId | None = None,
) -> MeshApi:
    """Serve the API now; completions run once a plan fits (503 with Retry-After until then)."""
    host, port = parse_host_port(address)
    n_ctx = min(model.spec.context_length, API_CONTEXT)
    coordinator = MeshCoordinator(
        node, model, data, threads=threads, n_ctx=n_ctx, sessions=API_SESSIONS, notify=notify
    )
    if settle_via is not None:
        await coordinator.settle(settle_via)  # plan over every node the mesh has
    await coordinator.gather()  # fixes flash attention for every plan of this head
    pipeline = coordinator.make_pipeline()
    gate = PlanGate(max_waiting=API_QUEUE)
    tokenizer = Tokenizer(model.path)
    served = api_model(
        model.path.name.removesuffix(".gguf"),
        model.fingerprint.model,
        model.header,
        tokenizer,
        pipeline,
        max_sessions=API_SESSIONS,
        max_waiting=API_QUEUE,
        gate=gate,
    )
    serving = MeshServing(coordinator, pipeline, gate, served.pool.drop_idle, notify)
    try:
        await serving.plan_now(ReplanReason.START)
        runner = await start_api(served, host, port, api_key)
    except BaseException:
        await serving.close()
        await pipeline.close()
        raise
    serving.start()
    notify(f"API on http://{host}:{port}/v1")
    return MeshApi(runner, pipeline, served, serving)
