"""The userspace UDP impairment proxy on loopback: delay, jitter, loss, rate limit, partition.

Bounds are loose on the slow side (a shared 2-core machine) and strict on the fast side: a
delayed packet may arrive late, never early.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from tests.netns_helpers import load_script

impair = load_script("impair_proxy")
Impairment = impair.Impairment
ImpairProxy = impair.ImpairProxy

pytestmark = pytest.mark.timeout(60)

Addr = tuple[str, int]


class Echo(asyncio.DatagramProtocol):
    """A UDP echo server that also counts what reached it."""

    def __init__(self) -> None:
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.queue.put_nowait((data, time.monotonic()))


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, Addr]]:
    loop = asyncio.get_running_loop()
    server = Echo()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    yield server, transport.get_extra_info("sockname")[:2]
    transport.close()


async def client_to(addr: Addr) -> tuple[asyncio.DatagramTransport, Client]:
    loop = asyncio.get_running_loop()
    client = Client()
    transport, _ = await loop.create_datagram_endpoint(lambda: client, remote_addr=addr)
    return transport, client


async def ping_rtts(addr: Addr, count: int) -> list[float]:
    transport, client = await client_to(addr)
    rtts = []
    try:
        for i in range(count):
            sent = time.monotonic()
            transport.sendto(f"ping {i}".encode())
            data, got = await asyncio.wait_for(client.queue.get(), 5)
            assert data == f"ping {i}".encode()
            rtts.append((got - sent) * 1000)
    finally:
        transport.close()
    return rtts


async def test_plain_relay_and_added_delay(echo: tuple[Echo, Addr]) -> None:
    _, server = echo
    proxy = ImpairProxy(server, up=Impairment(delay_ms=30), down=Impairment(delay_ms=20))
    addr = await proxy.start()
    try:
        rtts = await ping_rtts(addr, 15)
    finally:
        await proxy.stop()
    assert min(rtts) >= 50 - 1, rtts  # never early (1 ms for timer granularity)
    assert statistics.median(rtts) < 50 + 40, rtts  # not much later, even on a busy machine
    assert proxy.stats["up"].forwarded == 15 and proxy.stats["down"].forwarded == 15


async def test_jitter_stays_in_its_window(echo: tuple[Echo, Addr]) -> None:
    _, server = echo
    proxy = ImpairProxy(server, up=Impairment(delay_ms=30, jitter_ms=20, seed=7))
    addr = await proxy.start()
    try:
        rtts = await ping_rtts(addr, 20)
    finally:
        await proxy.stop()
    assert min(rtts) >= 10 - 1, rtts
    assert statistics.median(rtts) < 50 + 40, rtts
    assert max(rtts) - min(rtts) > 5, f"no jitter seen: {rtts}"


async def send_burst(addr: Addr, count: int, size: int = 64) -> tuple[Client, float]:
    transport, client = await client_to(addr)
    started = time.monotonic()
    for i in range(count):
        transport.sendto(i.to_bytes(4, "big") + bytes(size - 4))
        if i % 50 == 49:
            await asyncio.sleep(0.005)  # stay far below loopback socket buffer limits
    await asyncio.sleep(0)
    transport.close()
    return client, started


async def count_through(server_addr: Addr, echo_server: Echo, imp: Any, n: int) -> int:
    before = echo_server.received
    proxy = ImpairProxy(server_addr, up=imp)
    addr = await proxy.start()
    try:
        await send_burst(addr, n)
        deadline = time.monotonic() + 5
        while proxy.stats["up"].received < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the last forwarded packets land
    finally:
        await proxy.stop()
    stats = proxy.stats["up"]
    assert stats.received == n
    assert stats.forwarded + stats.lost == n
    assert echo_server.received - before == stats.forwarded
    return int(stats.lost)


async def test_loss_rate_is_roughly_right_and_seeded(echo: tuple[Echo, Addr]) -> None:
    server, addr = echo
    n = 600
    lost = await count_through(addr, server, Impairment(loss=0.3, seed=42), n)
    # Binomial(600, 0.3): mean 180, sd 11.2; ±5 sd.
    assert 124 <= lost <= 236, lost
    again = await count_through(addr, server, Impairment(loss=0.3, seed=42), n)
    assert again == lost, "the same seed must drop the same packets"
    assert await count_through(addr, server, Impairment(loss=0.0), 100) == 0


async def test_rate_limit_spreads_a_burst(echo: tuple[Echo, Addr]) -> None:
    _, server = echo
    # 50 x 1000 bytes at 400 kbit/s = 1.0 s on the wire.
    proxy = ImpairProxy(server, up=Impairment(rate_bps=400_000))
    addr = await proxy.start()
    try:
        _, started = await send_burst(addr, 50, size=1000)
        deadline = time.monotonic() + 5
        while proxy.stats["up"].forwarded < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
    finally:
        await proxy.stop()
    assert proxy.stats["up"].forwarded == 50
    assert elapsed >= 0.95, elapsed
    assert elapsed < 3.0, elapsed


async def test_full_loss_is_a_partition_and_can_heal(echo: tuple[Echo, Addr]) -> None:
    _, server = echo
    proxy = ImpairProxy(server)
    addr = await proxy.start()
    transport, client = await client_to(addr)
    try:
        transport.sendto(b"a")
        assert (await asyncio.wait_for(client.queue.get(), 5))[0] == b"a"
        proxy.set_impairment(up=Impairment(loss=1.0))
        transport.sendto(b"b")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.queue.get(), 0.3)
        proxy.set_impairment(up=Impairment())
        transport.sendto(b"c")
        assert (await asyncio.wait_for(client.queue.get(), 5))[0] == b"c"
    finally:
        transport.close()
        await proxy.stop()


def test_bad_impairments_are_refused() -> None:
    with pytest.raises(ValueError):
        Impairment(loss=1.5)
    with pytest.raises(ValueError):
        Impairment(delay_ms=-1)
    with pytest.raises(ValueError):
        Impairment(rate_bps=0)
