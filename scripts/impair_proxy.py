#!/usr/bin/env python3
"""Userspace UDP impairment proxy: delay, jitter, loss and a rate limit, since netem is absent.

Clients send to the proxy's listen address; the proxy relays each datagram to the upstream
server from a socket of its own per client (so the server sees one distinct peer per client and
its replies find their way back), applying an `Impairment` per direction:

    up   client -> server        down   server -> client

Delay and jitter are per packet (jitter is uniform in ±jitter, so packets can reorder, as with
netem). Loss is a seeded Bernoulli draw per packet. The rate limit serialises packets like a link
of that bandwidth, with a bounded queue (tail drop) so memory stays bounded under a flood.
Impairments can be changed while running (e.g. `loss=1.0` for a one-way partition).

Library:

    proxy = ImpairProxy(("127.0.0.1", 4433), up=Impairment(delay_ms=20, loss=0.01, seed=1))
    host, port = await proxy.start()      # listen on 127.0.0.1, ephemeral port
    ...
    await proxy.stop(); print(proxy.stats)

CLI:

    python scripts/impair_proxy.py --upstream 127.0.0.1:4433 --listen 127.0.0.1:9000 \\
        --delay 20 --jitter 5 --loss 1 --rate 8000 --seed 1

(`--loss` in percent, `--rate` in kbit/s; both directions unless `--up-only`/`--down-only`.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

__all__ = ["DirectionStats", "ImpairProxy", "Impairment"]

Addr = tuple[str, int]

_MAX_SESSIONS = 256
_IDLE_TIMEOUT_S = 120.0
_MAX_QUEUE_DELAY_S = 2.0  # rate-limited backlog beyond this is dropped (a bounded queue)


@dataclass
class Impairment:
    """What happens to packets going one way. All zero means a plain relay."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability 0..1
    rate_bps: float | None = None  # bits per second; None for unlimited
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss is a probability in [0, 1]")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError("rate must be > 0")


@dataclass
class DirectionStats:
    """Packet counts of one direction."""

    received: int = 0
    forwarded: int = 0
    lost: int = 0  # dropped by the loss draw
    overflow: int = 0  # dropped because the rate-limited queue was full


class _Direction:
    """Decides the fate and departure time of each packet going one way."""

    def __init__(self, imp: Impairment) -> None:
        self.stats = DirectionStats()
        self.set(imp)
        self._link_free_at = 0.0

    def set(self, imp: Impairment) -> None:
        self.imp = imp
        self._rng = random.Random(imp.seed)

    def schedule(self, size: int, now: float) -> float | None:
        """Seconds from now until the packet leaves, or None to drop it."""
        self.stats.received += 1
        imp = self.imp
        if imp.loss and self._rng.random() < imp.loss:
            self.stats.lost += 1
            return None
        wait = 0.0
        if imp.rate_bps is not None:
            start = max(now, self._link_free_at)
            if start - now > _MAX_QUEUE_DELAY_S:
                self.stats.overflow += 1
                return None
            self._link_free_at = start + size * 8 / imp.rate_bps
            wait = self._link_free_at - now
        delay = imp.delay_ms
        if imp.jitter_ms:
            delay += self._rng.uniform(-imp.jitter_ms, imp.jitter_ms)
        return wait + max(0.0, delay) / 1000.0


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Addr], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors (port unreachable) are normal for UDP; the packet is just gone


@dataclass
class _Session:
    relay: _Relay
    last_seen: float
    # Packets that arrived while the upstream socket was being opened.
    backlog: list[bytes] | None = field(default_factory=list)


class ImpairProxy:
    """Relay UDP between clients and one upstream server, impairing both directions."""

    def __init__(
        self,
        upstream: Addr,
        listen: Addr = ("127.0.0.1", 0),
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self._up = _Direction(up or Impairment())
        self._down = _Direction(down or Impairment())
        self._front: _Relay | None = None
        self._sessions: dict[Addr, _Session] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_tasks: set[asyncio.Task[None]] = set()

    @property
    def stats(self) -> dict[str, DirectionStats]:
        return {"up": self._up.stats, "down": self._down.stats}

    @property
    def address(self) -> Addr:
        """Where clients should send (valid after `start`)."""
        if self._front is None or self._front.transport is None:
            raise RuntimeError("proxy not started")
        host, port = self._front.transport.get_extra_info("sockname")[:2]
        return host, port

    def set_impairment(self, up: Impairment | None = None, down: Impairment | None = None) -> None:
        """Change one or both directions from now on (queued packets keep their times)."""
        if up is not None:
            self._up.set(up)
        if down is not None:
            self._down.set(down)

    async def start(self) -> Addr:
        self._loop = asyncio.get_running_loop()
        self._front = _Relay(self._from_client)
        front = self._front
        await self._loop.create_datagram_endpoint(lambda: front, local_addr=self.listen)
        self._reaper = self._loop.call_later(_IDLE_TIMEOUT_S / 4, self._reap)
        return self.address

    async def stop(self) -> None:
        for task in self._open_tasks:
            task.cancel()
        for task in self._open_tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        self._open_tasks.clear()
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        for session in self._sessions.values():
            if session.relay.transport is not None:
                session.relay.transport.close()
        self._sessions.clear()
        if self._front is not None and self._front.transport is not None:
            self._front.transport.close()
        self._front = None

    # ---- relaying -------------------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if delay <= 0:
            fn(*args)
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = self._loop.call_later(delay, fire)
        self._timers.add(handle)

    def _from_client(self, data: bytes, client: Addr) -> None:
        assert self._loop is not None
        now = self._loop.time()
        session = self._sessions.get(client)
        if session is None:
            if len(self._sessions) >= _MAX_SESSIONS:
                return
            session = _Session(_Relay(functools.partial(self._from_upstream, client)), now)
            self._sessions[client] = session
            task = self._loop.create_task(self._open(session))
            self._open_tasks.add(task)
            task.add_done_callback(self._open_tasks.discard)
        session.last_seen = now
        if session.backlog is not None:
            # Opening the upstream socket is quick but async; park packets behind it.
            session.backlog.append(data)
            return
        self._forward_up(session, data, now)

    async def _open(self, session: _Session) -> None:
        assert self._loop is not None
        try:
            await self._loop.create_datagram_endpoint(
                lambda: session.relay, remote_addr=self.upstream
            )
        finally:
            backlog, session.backlog = session.backlog or [], None
        for data in backlog:
            self._forward_up(session, data, self._loop.time())

    def _forward_up(self, session: _Session, data: bytes, now: float) -> None:
        when = self._up.schedule(len(data), now)
        if when is None:
            return

        def send() -> None:
            if session.relay.transport is not None and not session.relay.transport.is_closing():
                session.relay.transport.sendto(data)
                self._up.stats.forwarded += 1

        self._later(when, send)

    def _from_upstream(self, client: Addr, data: bytes, _source: Addr) -> None:
        assert self._loop is not None
        when = self._down.schedule(len(data), self._loop.time())
        if when is None:
            return

        def send() -> None:
            front = self._front
            if front is not None and front.transport is not None:
                front.transport.sendto(data, client)
                self._down.stats.forwarded += 1

        self._later(when, send)

    def _reap(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for client, session in list(self._sessions.items()):
            if now - session.last_seen > _IDLE_TIMEOUT_S:
                if session.relay.transport is not None:
                    session.relay.transport.close()
                del self._sessions[client]
        self._reaper = self._loop.call_later(_IDLE_TIMEOUT_S / 4, self._reap)


# ---- CLI --------------------------------------------------------------------------------


def _addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace) -> None:
    imp = Impairment(
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        loss=args.loss / 100.0,
        rate_bps=args.rate * 1000.0 if args.rate else None,
        seed=args.seed,
    )
    up = Impairment() if args.down_only else imp
    down = Impairment() if args.up_only else imp
    proxy = ImpairProxy(args.upstream, args.listen, up=up, down=down)
    host, port = await proxy.start()
    print(
        f"impair_proxy: {host}:{port} -> {args.upstream[0]}:{args.upstream[1]} ({imp})", flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()
        print(f"impair_proxy: {proxy.stats}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=_addr, required=True, help="server HOST:PORT")
    parser.add_argument("--listen", type=_addr, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="ms, each direction")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms, uniform")
    parser.add_argument("--loss", type=float, default=0.0, help="percent")
    parser.add_argument("--rate", type=float, default=0.0, help="kbit/s; 0 = unlimited")
    parser.add_argument("--seed", type=int, default=None)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--up-only", action="store_true", help="impair client->server only")
    only.add_argument("--down-only", action="store_true", help="impair server->client only")
    args = parser.parse_args(argv)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args))
    except (ValueError, OSError) as exc:
        print(f"impair_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
