"""`meshchat --headless`: a worker node without a screen.

Starts the mesh node, redeems `--join CODE` if given, prints the NodeID, addresses and a fresh
invite, keeps `--status-file` current (rewritten atomically every second), and stops cleanly on
SIGINT/SIGTERM (exit 0). Never imports textual.

Listening: `--listen HOST:PORT`; by default 0.0.0.0:47470, or a random port if that one is taken
(the invite carries the port either way). mDNS discovery is on unless MESHCHAT_MDNS=0.

Serving layers: the node runs the stage service with `--model PATH`, or with the default model
if the model store has it (a worker never downloads by surprise: `meshchat model pull` first).
Heads assign it a layer range; the status file shows it. MESHCHAT_THREADS sets its threads.
`--max-memory SIZE` caps what it offers (meshchat.inference.memory_budget); the status file
shows the offer, what its stage uses as llama.cpp reported it, and what is left.

Serving the API: with `--api HOST:PORT` the node is also a head. Once joined, it plans over the
mesh and answers OpenAI-style requests there (bearer key: `--api-key`, else `api_key` in
config.toml). Bound to an address other machines can reach, it needs a key, or
`--api-allow-no-key` to say that serving everyone is meant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshchat import stops
from meshchat.engine import compute
from meshchat.errors import MeshchatError, UsageError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh.node import Node
from meshchat.paths import DataDir

DEFAULT_PORT = 47470
STATUS_INTERVAL = 1.0

LayersFn = Callable[[], tuple[int, int] | None]
ModelFn = Callable[[], dict[str, Any] | None]


def run_headless(
    args: argparse.Namespace,
    *,
    layers: LayersFn | None = None,
    model: ModelFn | None = None,
    on_ready: Callable[[Node], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGINT/SIGTERM. `layers`/`model` feed the status (the inference layer's)."""
    if args.invite_uses < 1:
        raise UsageError("--invite-uses must be at least 1")
    from meshchat.config import load_config
    from meshchat.inference import memory_budget

    memory_budget.apply(getattr(args, "max_memory", None), load_config().max_memory)
    if args.api:
        from meshchat.api.mesh_host import refuse_open_bind

        # Usage errors (a bad address, an open bind without a key) before anything starts.
        refuse_open_bind(args.api, _api_key(args), getattr(args, "api_allow_no_key", False))
    return asyncio.run(serve(args, layers=layers, model=model, on_ready=on_ready))


async def _start_node(
    args: argparse.Namespace, data_dir: DataDir, attach: Callable[[Node], None]
) -> Node:
    """Start the node; `attach` registers its handlers first, so that no peer that connects
    at once (the app redialling a returning worker) is refused "no handler for CAPS_QUERY"."""
    mdns = os.environ.get("MESHCHAT_MDNS", "1") != "0"
    listens = [args.listen] if args.listen else [f"0.0.0.0:{DEFAULT_PORT}", "0.0.0.0:0"]
    for i, listen in enumerate(listens):
        node = Node(data_dir, listen, discovery=mdns)
        attach(node)
        try:
            await node.start()
        except MeshchatError:
            if i == len(listens) - 1:
                raise
            continue  # the usual port is taken (say, by the app on this machine)
        return node
    raise AssertionError("unreachable")


async def serve(
    args: argparse.Namespace,
    *,
    layers: LayersFn | None = None,
    model: ModelFn | None = None,
    on_ready: Callable[[Node], Awaitable[None]] | None = None,
) -> int:
    compute.adopt_loop()  # stage work runs on this loop's thread (meshchat.engine.compute)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    data_dir = DataDir.resolve(args.data_dir)
    model_file, note = await _open_model(args, data_dir)
    services: dict[Node, Any] = {}
    node = await _start_node(
        args,
        data_dir,
        lambda n: services.setdefault(n, _stage_service(args, n, model_file, data_dir)),
    )
    service = services[node]
    api = None
    try:
        await service.start()
        if args.api and service.model is None:
            raise MeshchatError(f"--api needs a model: {note}")
        inviter = None
        if args.join:
            inviter = await node.join(args.join)
            print(f"joined mesh {node.mesh_id} via {inviter.short}", file=sys.stderr)
        if note:
            print(f"meshchat: {note}", file=sys.stderr)
        invite = node.create_invite(uses=args.invite_uses)
        if args.invite_file:
            atomic_write_text(_path(args.invite_file), invite + "\n", mode=0o600)
        print(f"node_id: {node.node_id}")
        print(f"addresses: {' '.join(node.addresses)}")
        print(f"mesh_id: {node.mesh_id}")
        print(f"invite: {invite}", flush=True)
        if args.api:
            api = await _start_api(args, node, data_dir, service, inviter)
        if on_ready is not None:
            await on_ready(node)
        shown: dict[str, Any] | None = None
        while not stop.is_set():
            if layers is not None or model is not None:
                node.set_status(
                    layers() if layers else node.layers, model() if model else node.model
                )
            shown = _show_seeding(node, shown)
            if args.status_file:
                write_status(node, args.status_file, _serving_status(service, api))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_INTERVAL)
    finally:
        if api is not None:
            await api.close()
        if service is not None:
            await service.stop()
        await node.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stops.exit_on_signal(0)  # a second signal while stopping: exit now, still with 0
    return 0


async def _open_model(args: argparse.Namespace, data: DataDir) -> tuple[Any, str]:
    """This node's model (None when the store has none; the note says so)."""
    from meshchat.inference import memory_budget
    from meshchat.inference.local_model import LocalModel
    from meshchat.model.store import ModelStore, StoreError

    try:
        path = ModelStore(data.models).resolve(getattr(args, "model", None), pull_if_missing=False)
    except StoreError:
        budget = accept_layers_budget(args)
        if budget:
            return (
                None,
                f"no model file: this node takes layers from peers (up to {budget >> 20} MiB)",
            )
        return None, (
            "no model in the store: this node serves no layers "
            "(pass --model PATH or run `meshchat model pull`)"
        )
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(None, LocalModel.open, path, data)
    memory_budget.check_fits(model)  # a worker takes any context: the smallest a head plans
    return model, ""


def _stage_service(args: argparse.Namespace, node: Node, model: Any, data: DataDir) -> Any:
    """Serve layers of `model` on `node`: its handlers are registered now, before it listens."""
    from meshchat.commands.common import thread_count
    from meshchat.inference.stage_service import StageService

    threads_env = os.environ.get("MESHCHAT_THREADS", "")
    threads = thread_count(int(threads_env) if threads_env.isdigit() else None)
    service = StageService(node, model, data, threads, accept_layers=accept_layers_budget(args))
    service.register()
    return service


def accept_layers_budget(args: argparse.Namespace) -> int:
    """`--accept-layers SIZE`, else `accept_layers` in config.toml, in bytes; 0: none."""
    from meshchat.config import load_config
    from meshchat.inference.capabilities import parse_size

    text = getattr(args, "accept_layers", None) or load_config().accept_layers
    if not text:
        return 0
    try:
        return max(parse_size(text), 0)
    except UsageError:
        raise UsageError(f"--accept-layers wants a size like 500M or 4G, got {text!r}") from None


async def _start_api(
    args: argparse.Namespace, node: Node, data: DataDir, service: Any, inviter: Any
) -> Any:
    from meshchat.api.mesh_host import start_mesh_api

    key = _api_key(args)
    return await start_mesh_api(
        node, service.model, data, args.api, key, service.threads, _say, settle_via=inviter
    )


def _api_key(args: argparse.Namespace) -> str | None:
    """`--api-key`, else `api_key` in config.toml, else none."""
    from meshchat.config import load_config

    return args.api_key or load_config().api_key or None


def _say(message: str) -> None:
    print(f"meshchat: {message}", file=sys.stderr, flush=True)


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _serving_status(service: Any, api: Any) -> dict[str, Any]:
    """What this node holds for requests (counts back to zero when idle) and, for an API head,
    its plan and recent re-plans."""
    extra: dict[str, Any] = api.status() if api is not None else {"sessions": {}}
    if service is not None:
        extra["sessions"]["stage_sessions"] = service.session_count
        extra["sessions"]["stage_queued"] = service.queued_jobs
    return extra


def write_status(node: Node, path: str, extra: dict[str, Any] | None = None) -> None:
    from meshchat.mesh.layer_transfer import seeding_progress

    status = {**node.status(), **(extra or {})}
    seeding = seeding_progress(node)
    if seeding is not None:
        status["seeding"] = seeding  # a layer transfer: bytes, total, rate, time left
    atomic_write_text(_path(path), json.dumps(status, indent=1) + "\n")


def _show_seeding(node: Node, shown: dict[str, Any] | None) -> dict[str, Any] | None:
    """One stderr line per status tick while layers arrive from peers (rate, time left)."""
    from meshchat.mesh.layer_transfer import seeding_progress

    now = seeding_progress(node)
    if now is None or now == shown or (shown is not None and shown["bytes"] == now["bytes"]):
        return shown
    eta = "" if now["eta_s"] is None else f", {now['eta_s']:.0f} s left"
    first, end = now["layers"]
    _say(
        f"seeding layers [{first},{end}): {now['bytes'] >> 20}/{now['total'] >> 20} MiB "
        f"at {now['rate_mb_s']:.1f} MB/s from {now['sources']} member(s){eta}"
    )
    return now
