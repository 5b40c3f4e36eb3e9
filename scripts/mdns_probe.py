#!/usr/bin/env python3
"""Run one MdnsDiscovery and keep a JSON file of what it sees (for the netns tests).

    python scripts/mdns_probe.py --node-id ID --port P [--secret HEX] --out FILE [--ttl S]

The file is replaced atomically on every change:
    {"node_id", "advertised": [ip], "peers": {node_id: {"addresses", "port", "is_member",
     "has_mesh"}}, "lost": [node_id],
     "events": [[t, "peer", node_id, addresses, port, is_member] | [t, "lost", node_id, []]]}
SIGTERM/SIGINT stop it cleanly (goodbye packets); SIGKILL simulates a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshchat.mesh.discovery import DiscoveredPeer, MdnsDiscovery
from meshchat.mesh.identity import NodeId


async def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    state: dict[str, Any] = {
        "node_id": args.node_id,
        "advertised": [],
        "peers": {},
        "lost": [],
        "events": [],
    }
    t0 = time.monotonic()

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, out)

    def on_peer(peer: DiscoveredPeer) -> None:
        state["peers"][str(peer.node_id)] = {
            "addresses": peer.addresses,
            "port": peer.port,
            "is_member": peer.is_member,
            "has_mesh": peer.has_mesh,
        }
        state["events"].append(
            [
                round(time.monotonic() - t0, 2),
                "peer",
                str(peer.node_id),
                peer.addresses,
                peer.port,
                peer.is_member,
            ]
        )
        write()

    def on_lost(node: NodeId) -> None:
        node_id = str(node)
        state["peers"].pop(node_id, None)
        state["lost"].append(node_id)
        state["events"].append([round(time.monotonic() - t0, 2), "lost", node_id, []])
        write()

    secret = bytes.fromhex(args.secret) if args.secret else None
    disc = MdnsDiscovery(
        NodeId.parse(args.node_id), args.port, secret, on_peer, on_lost, ttl=args.ttl
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await disc.start()
    state["advertised"] = disc.advertised_addresses
    write()
    try:
        await stop.wait()
    finally:
        await disc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", default="", help="mesh secret as hex; none if empty")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ttl", type=int, default=120)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
