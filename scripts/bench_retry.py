#!/usr/bin/env python3
"""What QUIC Retry (address validation, transport.Tuning.retry) costs a join.

Times `Node.join` (invite redeemed, authenticated, welcomed) against an inviter with Retry on
and off, on loopback, in one process; runs interleaved, median printed. Retry adds one round
trip (client Initial -> Retry -> Initial with the token) and an HMAC on each side.

    python scripts/bench_retry.py [--runs 9]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshchat.mesh.node import Node
from meshchat.mesh.transport import DEFAULT_TUNING
from meshchat.paths import DataDir


async def one_join(root: Path, inviter: Node, name: str) -> float:
    joiner = Node(DataDir(root / name), "127.0.0.1:0")
    await joiner.start()
    try:
        code = inviter.create_invite()
        start = time.perf_counter()
        await joiner.join(code)
        return time.perf_counter() - start
    finally:
        await joiner.stop()


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inviters = {}
        for retry in (True, False):
            tuning = dataclasses.replace(DEFAULT_TUNING, retry=retry)
            node = Node(DataDir(root / f"inviter-{retry}"), "127.0.0.1:0", tuning=tuning)
            await node.start()
            inviters[retry] = node
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(runs + 1):
            for retry, node in inviters.items():
                took = await one_join(root, node, f"j-{retry}-{i}")
                if i:  # the first round warms up imports and caches
                    times[retry].append(took)
        for node in inviters.values():
            await node.stop()
    for retry in (False, True):
        ms = sorted(t * 1000 for t in times[retry])
        print(
            f"retry={'on ' if retry else 'off'}  join median {statistics.median(ms):6.2f} ms"
            f"  (min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)})"
        )
    delta = statistics.median(times[True]) - statistics.median(times[False])
    print(f"Retry costs {delta * 1000:+.2f} ms per join (loopback; add one LAN round trip)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    asyncio.run(main(parser.parse_args().runs))
