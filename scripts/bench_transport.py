#!/usr/bin/env python3
"""Loopback benchmark of the mesh transport: bulk tensor MB/s, request RTT and hop p50/p99.

Two real nodes, each in its own process (as on two machines), paired by invite over 127.0.0.1.
Each transport setting is measured `--repeats` times, settings interleaved; medians are printed.

    python scripts/bench_transport.py [--mb 16] [--repeats 3] [--rtt 300]

Settings: "untuned" = aioquic defaults (reno, 1200-byte datagrams, unbounded writes);
"lan" = cubic, 1472-byte datagrams (Ethernet MTU), 256 KiB writes, bounded send buffer;
"loopback" = "lan" plus 16 KiB datagrams, which the node uses for loopback peers by default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshchat.mesh import wire
from meshchat.mesh.node import Node
from meshchat.mesh.transport import DEFAULT_TUNING, UNTUNED, Tuning
from meshchat.paths import DataDir

SETTINGS: dict[str, Tuning] = {
    "untuned": UNTUNED,
    "lan": dataclasses.replace(DEFAULT_TUNING, loopback_datagram_size=1472),
    "loopback": DEFAULT_TUNING,
}
ROWS, WIDTH = 256, 576  # one prefill chunk of a 576-wide model, float32: 590 KB


async def serve(setting: str, root: str) -> None:
    """The receiving node: echo a Token after the tensors before it, answer requests."""
    node = Node(DataDir(Path(root)), "127.0.0.1:0", tuning=SETTINGS[setting])
    await node.start()
    received = 0

    def on_tensor(peer: object, msg: wire.Tensor) -> None:
        nonlocal received
        received += len(msg.data)

    async def on_token(peer: object, msg: wire.Token) -> None:
        await node.send(peer, wire.Token(msg.session, received, 0))  # type: ignore[arg-type]

    node.on(wire.Tensor, on_tensor)
    node.on(wire.Token, on_token)
    node.on(wire.Ack, lambda peer, msg: wire.Ack(True, msg.body))  # an echo
    # Activations → Token, as a last stage does: queued on arrival, answered by a worker task.
    steps: asyncio.Queue[tuple[object, wire.Activations]] = asyncio.Queue()
    node.on_arrival(wire.Activations, lambda peer, msg: steps.put_nowait((peer, msg)))

    async def stage() -> None:
        while True:
            peer, msg = await steps.get()
            await node.send(peer, wire.Token(msg.session, msg.position, 0, [0]))  # type: ignore[arg-type]

    worker = asyncio.ensure_future(stage())
    print(node.create_invite(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent ends
    worker.cancel()
    await node.stop()


async def measure(setting: str, mb: int, rtt_n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", setting, "--root", f"{tmp}/server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        try:
            code = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
            node = Node(DataDir(Path(tmp) / "client"), "127.0.0.1:0", tuning=SETTINGS[setting])
            await node.start()
            try:
                return await _run(node, code.strip(), mb, rtt_n)
            finally:
                await node.stop()
        finally:
            child.stdin.close()
            child.wait(timeout=10)


async def _run(node: Node, code: str, mb: int, rtt_n: int) -> dict[str, float]:
    server = await node.join(code)
    echoes: asyncio.Queue[wire.Token] = asyncio.Queue()
    node.on(wire.Token, lambda peer, msg: echoes.put_nowait(msg))
    payload = os.urandom(ROWS * WIDTH * 4)
    count = max(1, mb * 1_000_000 // len(payload))
    # Warm up (congestion window, code paths), then time a bulk run.
    await node.send(server, wire.Tensor(wire.DType.F32, (ROWS, WIDTH), 0, 0, payload))
    await node.send(server, wire.Token(0, 0, 0))
    await echoes.get()
    start = time.perf_counter()
    for i in range(count):
        await node.send(server, wire.Tensor(wire.DType.F32, (ROWS, WIDTH), 1, i, payload))
    await node.send(server, wire.Token(1, 0, 0))
    await echoes.get()
    elapsed = time.perf_counter() - start
    # Request/response round trips with a 1.1 KB body (about one token's activations).
    body = {"pad": "x" * 1100}
    samples = []
    for _ in range(rtt_n):
        t0 = time.perf_counter()
        await node.request(server, wire.Ack(True, body))
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    hops = sorted(await _activation_hops(node, server, rtt_n))
    return {
        "mb_per_s": count * len(payload) / elapsed / 1e6,
        "rtt_p50_ms": statistics.median(samples),
        "rtt_p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "hop_p50_ms": statistics.median(hops),
        "hop_p99_ms": hops[min(len(hops) - 1, int(len(hops) * 0.99))],
    }


async def _activation_hops(node: Node, server: object, n: int) -> list[float]:
    """One decode step's activations out (576 f32), a Token back, no compute: half the round
    trip is one hop's overhead on the path `MeshPipeline` and `StageService` use."""
    tokens: asyncio.Queue[wire.Token] = asyncio.Queue()
    node.on_arrival(wire.Token, lambda peer, msg: tokens.put_nowait(msg))
    data = os.urandom(WIDTH * 4)
    samples = []
    for i in range(n + 10):
        msg = wire.Activations(1, i, 0, (i,), wire.DType.F32, WIDTH, data, True, (0,))
        t0 = time.perf_counter()
        await node.send(server, msg)  # type: ignore[arg-type]
        await tokens.get()
        if i >= 10:  # warm-up
            samples.append((time.perf_counter() - t0) * 1000 / 2)
        await asyncio.sleep(0.005)  # a stage computing between steps: the loop goes idle
    return samples


async def main(args: argparse.Namespace) -> None:
    chosen = args.settings.split(",") if args.settings else list(SETTINGS)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in chosen}
    for _ in range(args.repeats):
        for setting in chosen:  # interleaved: machine noise hits every setting alike
            runs[setting].append(await measure(setting, args.mb, args.rtt))
    result = {
        s: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        for s, rs in runs.items()
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"loopback, {args.mb} MB of {ROWS}x{WIDTH} f32 tensors, medians of {args.repeats} runs")
    print(f"{'setting':<10} {'MB/s':>8} {'RTT p50 ms':>11} {'RTT p99 ms':>11}"
          f" {'hop p50 ms':>11} {'hop p99 ms':>11}")  # fmt: skip
    for s, r in result.items():
        print(f"{s:<10} {r['mb_per_s']:>8.1f} {r['rtt_p50_ms']:>11.3f} {r['rtt_p99_ms']:>11.3f}"
              f" {r['hop_p50_ms']:>11.3f} {r['hop_p99_ms']:>11.3f}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=16, help="bulk bytes per run (MB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rtt", type=int, default=300, help="round trips per run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--settings", help=f"comma-separated, of {','.join(SETTINGS)}")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        asyncio.run(serve(ns.serve, ns.root))
    else:
        asyncio.run(main(ns))
