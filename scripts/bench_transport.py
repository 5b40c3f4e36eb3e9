#!/usr/bin/env python3
"""Loopback benchmark of the mesh transport: bulk tensor MB/s, request RTT and hop p50/p99.

Two real nodes, each in its own process (as on two machines), paired by invite over 127.0.0.1.
Each transport setting is measured `--repeats` times, settings interleaved; medians are printed.

    python scripts/bench_transport.py [--mb 16] [--repeats 3] [--rtt 300]

Settings: "untuned" = aioquic defaults (reno, 1200-byte datagrams, unbounded writes);
"lan" = cubic, 1472-byte datagrams (Ethernet MTU), 256 KiB writes, bounded send buffer;
"loopback" = "lan" plus 16 KiB datagrams, which the node uses for loopback peers by default.

    python scripts/bench_transport.py --hop-variants [--width 2048] [--rtt 300]

One decode hop (an activation of `--width` f32 out, a Token back, the loop idle 5 ms between
steps, as a stage computing), variants interleaved step by step in one run (issue 13, item 4):
"stream" = the control stream (the path before meshchat.mesh.sidepath); "side" = `Node.send`
today (the side path: AES-GCM datagrams on the QUIC socket); "dgram" = QUIC DATAGRAM frames
on the same connection; "udp" = a side UDP socket, AES-GCM with a key sent over the control
stream; "encode" = the frame-building cost alone, today's join against a zero-copy frame.
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

from aioquic.quic import events
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshchat.mesh import transport, wire
from meshchat.mesh.node import Node
from meshchat.mesh.transport import DEFAULT_TUNING, UNTUNED, Connection, Tuning
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


# --- one decode hop through each candidate path (--hop-variants)

DGRAM_HANDLERS: dict[Connection, object] = {}


def _enable_datagrams() -> None:
    """QUIC DATAGRAM frames on every connection of this process (bench only)."""
    config = transport.Endpoint._config
    received = Connection.quic_event_received

    def _config(self: transport.Endpoint, is_client: bool, host: str) -> object:
        c = config(self, is_client, host)
        c.max_datagram_frame_size = 65536
        return c

    def _event(self: Connection, event: events.QuicEvent) -> None:
        if isinstance(event, events.DatagramFrameReceived):
            handler = DGRAM_HANDLERS.get(self)
            if handler is not None:
                handler(self, event.data)  # type: ignore[operator]
            return
        received(self, event)

    transport.Endpoint._config = _config  # type: ignore[assignment,method-assign]
    Connection.quic_event_received = _event  # type: ignore[method-assign]


def _token_bytes(act: wire.Activations) -> bytes:
    return wire.encode(wire.Token(act.session, act.position, 0, [0]))


def _seal(aead: AESGCM, seq: int, payload: bytes) -> bytes:
    nonce = seq.to_bytes(12, "big")
    return nonce + aead.encrypt(nonce, payload, None)


def _open(aead: AESGCM, packet: bytes) -> bytes:
    return aead.decrypt(packet[:12], packet[12:], None)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_packet: object) -> None:
        self.on_packet = on_packet
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.transport = t  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.on_packet(data, addr)  # type: ignore[operator]


STREAM_ONLY = 1  # the session number of the "stream" variant: the side path is not used


async def _send(node: Node, peer: object, msg: wire.Activations | wire.Token) -> None:
    """`node.send`; for the "stream" variant with the side path (meshchat.mesh.sidepath) off."""
    side = node._conn(peer).side  # type: ignore[arg-type]
    if side is None or msg.session != STREAM_ONLY:
        await node.send(peer, msg)  # type: ignore[arg-type]
        return
    side.closed = True
    try:
        await node.send(peer, msg)  # type: ignore[arg-type]
    finally:
        side.closed = False


async def serve_hops(root: str) -> None:
    _enable_datagrams()
    node = Node(DataDir(Path(root)), "127.0.0.1:0")
    await node.start()
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[object, wire.Activations]] = asyncio.Queue()
    node.on_arrival(wire.Activations, lambda peer, msg: steps.put_nowait((peer, msg)))

    async def stage() -> None:
        while True:
            peer, msg = await steps.get()
            await _send(node, peer, wire.Token(msg.session, msg.position, 0, [0]))

    def on_dgram(conn: Connection, data: bytes) -> None:
        act = wire.decode_body(wire.MsgType.ACTIVATIONS, memoryview(data)[wire.HEADER_SIZE :])
        conn._quic.send_datagram_frame(_token_bytes(act))  # type: ignore[arg-type]
        conn.transmit()

    side: dict[str, object] = {}

    def on_side(packet: bytes, addr: object) -> None:
        aead = side["aead"]
        frame = _open(aead, packet)  # type: ignore[arg-type]
        act = wire.decode_body(wire.MsgType.ACTIVATIONS, memoryview(frame)[wire.HEADER_SIZE :])
        side["seq"] = seq = side.get("seq", 0) + 1  # type: ignore[operator]
        side["proto"].transport.sendto(_seal(aead, seq, _token_bytes(act)), addr)  # type: ignore[attr-defined, arg-type]

    async def on_ack(peer: object, msg: wire.Ack) -> wire.Ack:
        DGRAM_HANDLERS[node._conn(peer)] = on_dgram  # type: ignore[arg-type]
        side["aead"] = AESGCM(bytes.fromhex(msg.body["key"]))
        t, proto = await loop.create_datagram_endpoint(
            lambda: _Side(on_side), local_addr=("127.0.0.1", 0)
        )
        side["proto"] = proto
        return wire.Ack(True, {"port": t.get_extra_info("sockname")[1]})

    node.on(wire.Ack, on_ack)
    worker = asyncio.ensure_future(stage())
    print(node.create_invite(), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    worker.cancel()
    await node.stop()


async def eventually_ready(conn: Connection) -> None:
    """Until the peer answered the side path's probe (it does within a round trip)."""
    for _ in range(200):
        if conn.side is not None and conn.side.ready:
            return
        if conn.side is not None:
            conn.side.probe()
        await asyncio.sleep(0.01)
    raise RuntimeError("the side path did not come up")


def _encode_costs(width: int, n: int = 2000) -> dict[str, float]:
    """µs to build one activation frame: today's parts + join, against one preallocated
    bytearray filled from a memoryview of the (numpy-like) buffer."""
    import numpy as np

    hidden = np.random.default_rng(0).standard_normal(width, dtype=np.float32)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        msg = wire.Activations(1, i, 0, (i,), wire.DType.F32, width, hidden.tobytes(), True, (0,))
        parts = transport.frame_parts(msg)
        b"".join(parts)
    out["encode_join_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        view = memoryview(hidden).cast("B")
        msg = wire.Activations(1, i, 0, (i,), wire.DType.F32, width, view, True, (0,))
        head = wire.encode_activations_head(msg)
        frame = bytearray(wire.HEADER_SIZE + len(head) + len(view))
        frame[: wire.HEADER_SIZE] = wire.encode_header(msg.TYPE, len(head) + len(view))
        frame[wire.HEADER_SIZE : wire.HEADER_SIZE + len(head)] = head
        frame[wire.HEADER_SIZE + len(head) :] = view
    out["encode_view_us"] = (time.perf_counter() - t0) / n * 1e6
    return out


async def measure_hops(width: int, n: int) -> dict[str, dict[str, float]]:
    _enable_datagrams()
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-hops", "--root", f"{tmp}/server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        node = Node(DataDir(Path(tmp) / "client"), "127.0.0.1:0")
        try:
            code = await loop.run_in_executor(None, child.stdout.readline)
            await node.start()
            server = await node.join(code.strip())
            conn = node._conn(server)
            key = AESGCM.generate_key(bit_length=128)
            reply = await node.request(server, wire.Ack(True, {"key": key.hex()}))
            assert isinstance(reply, wire.Ack)
            side_addr = ("127.0.0.1", reply.body["port"])
            aead = AESGCM(key)
            waiter: list[asyncio.Future[None]] = []

            def wake(*_: object) -> None:
                if waiter and not waiter[0].done():
                    waiter[0].set_result(None)

            node.on_arrival(wire.Token, lambda peer, msg: wake())
            DGRAM_HANDLERS[conn] = lambda c, data: wake()
            side_t, _ = await loop.create_datagram_endpoint(
                lambda: _Side(lambda packet, addr: (_open(aead, packet), wake())),
                local_addr=("127.0.0.1", 0),
            )
            data = os.urandom(width * 4)
            samples: dict[str, list[float]] = {"stream": [], "side": [], "dgram": [], "udp": []}
            await eventually_ready(conn)
            seq = 0
            for i in range(n + 10):
                for s, variant in enumerate(samples, 1):  # interleaved: noise hits all alike
                    msg = wire.Activations(s, i, 0, (i,), wire.DType.F32, width, data, True, (0,))
                    waiter[:] = [loop.create_future()]
                    t0 = time.perf_counter()
                    if variant in ("stream", "side"):
                        await _send(node, server, msg)
                    elif variant == "dgram":
                        conn._quic.send_datagram_frame(b"".join(transport.frame_parts(msg)))
                        conn.transmit()
                    else:
                        seq += 1
                        frame = b"".join(transport.frame_parts(msg))
                        side_t.sendto(_seal(aead, seq, frame), side_addr)
                    await waiter[0]
                    if i >= 10:
                        samples[variant].append((time.perf_counter() - t0) * 1000 / 2)
                    await asyncio.sleep(0.005)
            side_t.close()
        finally:
            await node.stop()
            child.stdin.close()
            child.wait(timeout=10)
    result: dict[str, dict[str, float]] = {}
    for variant, xs in samples.items():
        xs.sort()
        result[variant] = {
            "hop_p50_ms": round(statistics.median(xs), 3),
            "hop_p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 3),
        }
    base = result["stream"]["hop_p50_ms"]
    for r in result.values():
        r["ratio_p50"] = round(r["hop_p50_ms"] / base, 3)
    result["encode"] = {k: round(v, 2) for k, v in _encode_costs(width).items()}
    return result


async def main(args: argparse.Namespace) -> None:
    if args.hop_variants:
        print(json.dumps(await measure_hops(args.width, args.rtt), indent=1))
        return
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
    parser.add_argument("--hop-variants", action="store_true", help="one hop, per data path")
    parser.add_argument("--width", type=int, default=2048, help="activation width (f32)")
    parser.add_argument("--serve-hops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve_hops:
        asyncio.run(serve_hops(ns.root))
    elif ns.serve:
        asyncio.run(serve(ns.serve, ns.root))
    else:
        asyncio.run(main(ns))
