#!/usr/bin/env python3
"""Loopback benchmark of layer seeding (issue 14): MB/s of a layer-range transfer, and the
activation hop's round trip (p50/p99) while a transfer runs, against the same without one.

Two real nodes, each in its own process (as on two machines), paired by invite over 127.0.0.1.
The sender offers a model file and plans the range for the fetcher. The "hop" is one decode
step's traffic on the control stream: an Activations message of one 576-wide f32 hidden
state out, a Token back, as between two stages.

    python scripts/bench_seed.py [--model PATH] [--layers 0,30] [--repeats 3] [--hops 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.layer_transfer import LayerFetcher, seeding_for
from meshchat.mesh.node import Node
from meshchat.model.fingerprint import fingerprint_of
from meshchat.model.gguf_file import read_header
from meshchat.model.seeded import SeedStore
from meshchat.model.slices import LayerRange
from meshchat.model.store import ModelStore
from meshchat.paths import DataDir, default_data_dir

WIDTH = 576  # SmolLM2's hidden width: 2.3 KB per token per hop


async def serve(root: str, model: str, allow: str, first: int, end: int) -> None:
    """The sender: offers `model`, plans [first, end) for `allow`, echoes activations."""
    node = Node(DataDir(Path(root)), "127.0.0.1:0")
    await node.start()
    path = Path(model)
    fp = fingerprint_of(path, Path(root) / "fp")
    seeding = seeding_for(node)
    seeding.server.offer(fp, read_header(path))
    seeding.permits.allow(NodeId.parse(allow), fp.model, first, end)

    replies: set[asyncio.Future[None]] = set()

    def on_step(peer: NodeId, msg: wire.Activations) -> None:
        reply = asyncio.ensure_future(node.send(peer, wire.Token(msg.session, msg.position, 0)))
        replies.add(reply)
        reply.add_done_callback(replies.discard)

    node.on_arrival(wire.Activations, on_step)
    print(json.dumps({"invite": node.create_invite(), "fingerprint": fp.model}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent ends
    await node.stop()


async def hops(node: Node, peer: NodeId, n: int, stop: asyncio.Event | None) -> list[float]:
    """Round trips (ms) of one decode step's traffic; until `stop` is set if given."""
    tokens: asyncio.Queue[wire.Token] = asyncio.Queue()
    node.on_arrival(wire.Token, lambda _p, msg: tokens.put_nowait(msg))
    hidden = bytes(WIDTH * 4)
    samples: list[float] = []
    i = 0
    while (stop is None and i < n) or (stop is not None and not stop.is_set()):
        t0 = time.perf_counter()
        step = wire.Activations(9, i, 0, (1,), wire.DType.F32, WIDTH, hidden, True)
        await node.send(peer, step)
        await tokens.get()
        samples.append((time.perf_counter() - t0) * 1000)
        i += 1
        await asyncio.sleep(0.005)  # a decode step's compute on the other stages
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def measure(model: Path, layers: LayerRange, n_hops: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(DataDir(Path(tmp) / "fetcher"), "127.0.0.1:0")
        await node.start()
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", f"{tmp}/sender", "--model", str(model),
             "--allow", str(node.node_id), "--layers", f"{layers.first},{layers.end}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
            hello = json.loads(line)
            sender = await node.join(hello["invite"])
            fp = fingerprint_of(model, Path(tmp) / "fp")
            idle = await hops(node, sender, n_hops, None)
            store = SeedStore(Path(tmp) / "seeded")
            done = asyncio.Event()
            during_task = asyncio.ensure_future(hops(node, sender, 0, done))
            job = LayerFetcher(node, fp, layers, store, [sender])
            start = time.perf_counter()
            await job.run()
            elapsed = time.perf_counter() - start
            done.set()
            during = await during_task
            return {
                "mb": job.progress.fetched / 1e6,
                "mb_per_s": job.progress.fetched / elapsed / 1e6,
                "hop_p50_idle_ms": statistics.median(idle),
                "hop_p99_idle_ms": _pct(idle, 0.99),
                "hop_p50_transfer_ms": statistics.median(during) if during else float("nan"),
                "hop_p99_transfer_ms": _pct(during, 0.99),
                "hops_during": len(during),
            }
        finally:
            child.stdin.close()
            child.wait(timeout=10)
            await node.stop()


async def main(args: argparse.Namespace) -> None:
    model = (
        Path(args.model) if args.model else ModelStore(default_data_dir() / "models").resolve(None)
    )
    first, end = (int(x) for x in args.layers.split(","))
    runs = [await measure(model, LayerRange(first, end), args.hops) for _ in range(args.repeats)]
    result = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"loopback, layers [{first},{end}) of {model.name}, medians of {args.repeats} runs")
    for key, value in result.items():
        print(f"{key:<22} {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF to seed (default: the store's default model)")
    parser.add_argument("--layers", default="0,30", help="first,end of the range (0,30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hops", type=int, default=300, help="idle round trips per run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--allow", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        a, b = (int(x) for x in ns.layers.split(","))
        asyncio.run(serve(ns.serve, ns.model, ns.allow, a, b))
    else:
        asyncio.run(main(ns))
