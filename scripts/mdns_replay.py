#!/usr/bin/env python3
"""An attacker on the LAN (for the netns tests): replay a meshchat node's mDNS announcement.

    python scripts/mdns_replay.py --node-id ID --port P --out FILE

Waits until it hears the announcement of node ID, then announces two copies of it from this
host under new service names: its TXT record unchanged but with this host's address and port P
in SRV/A, and its TXT with the signed port and addresses edited to this host and P (the tag kept).
Writes {"replays": [service names], "captured": {TXT}} to FILE once both are announced, then
keeps them up until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import socket
import sys
from pathlib import Path

from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshchat.mesh.discovery import SERVICE_TYPE, local_ipv4_addresses


async def capture(aiozc: AsyncZeroconf, node_id: str) -> dict[str, str]:
    found: asyncio.Queue[str] = asyncio.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            found.put_nowait(name)

    browser = AsyncServiceBrowser(aiozc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        while True:
            name = await found.get()
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(aiozc.zeroconf, 3000):
                continue
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            if props.get("id") == node_id:
                return props
    finally:
        await browser.async_cancel()


async def run(args: argparse.Namespace) -> None:
    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    here = local_ipv4_addresses()[0]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        props = await capture(aiozc, args.node_id)
        copies = [props, props | {"p": str(args.port), "a": here}]
        names = []
        for txt in copies:
            name = f"replay-{secrets.token_hex(4)}.{SERVICE_TYPE}"
            info = ServiceInfo(
                SERVICE_TYPE,
                name,
                port=args.port,
                properties=txt,
                server=f"{name.split('.')[0]}.local.",
                addresses=[socket.inet_aton(here)],
            )
            await (await aiozc.async_register_service(info))
            names.append(name)
        Path(args.out).write_text(json.dumps({"replays": names, "captured": props}))
        await stop.wait()
    finally:
        await aiozc.async_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
