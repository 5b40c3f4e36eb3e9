"""QUIC transport: one UDP endpoint per node that both accepts and dials, and framed streams.

The endpoint demultiplexes datagrams by connection ID to `Connection`s (aioquic's
`QuicConnectionProtocol`), so a node's outgoing connections leave from its listening port.

Stream roles on a connection (QUIC stream ids):
- stream 0 (the dialer's first bidirectional stream): the control stream. It carries the
  authentication handshake, then ordered one-way messages in both directions (`send`).
- any other bidirectional stream: one request frame, one reply frame (`request`).
- unidirectional streams: keepalive pings/pongs only, so bulk traffic does not delay them.

Before authentication only stream 0 is accepted. A frame error on a request or ping stream
closes that stream; on the control stream, or past the per-peer buffer limit, the connection.

Pinning: the dialer turns CA checks off (there is no CA) and, once the handshake is complete,
compares the key in the peer's certificate with the NodeID it expects. aioquic has no public
API for that certificate; we read `QuicConnection.tls._peer_certificate` (aioquic is pinned and
`test_mesh_transport` fails loudly if the attribute moves). aioquic still verifies the
CertificateVerify signature with CA checks off, so the peer holds the key.
Session binding (`session_binding`, private: the TLS key schedule): aioquic has no TLS
exporter, so both ends derive one the same way RFC 8446 exporters are built, an HKDF-Expand-Label
of the master secret over the transcript hash through the client's Finished. The dialer signs
it (auth.auth_payload), so its proof is good for this TLS session only.
Other private reads, guarded by the same test: a stream's unacked send buffer (bounded sends)
and the connection state (a peer's close is acted on at once, not after the draining period);
the protocol's pending-transmit handle (`_transmit_task`, for the deferred pass after a
datagram that completed a message: every transport test fails at once if it moves).

Before authentication (a stranger can reach the port): the listener answers every new
client Initial with a QUIC Retry (address validation: a token the client must echo from its
address, `RetryTokens`), so spoofed source addresses hold no connection; at most
`max_unauthenticated_per_host` not yet authenticated connections per source address, and
`max_connections` in all, where a newcomer evicts the oldest unauthenticated one; the control
stream reads only the handshake's frames, of a few KiB (wire.LISTENER_PRE_AUTH /
DIALER_PRE_AUTH); any other frame closes the connection at once.

Side path (sidepath.py): once authenticated, a decode step's messages (one-token Activations,
Token) leave as AES-GCM datagrams on this socket, keyed from `session_binding`, in the same
order with the control stream's frames (`_control_out` / `_control_in` count its bytes); a
hop's p50 0.31 -> 0.11 ms in `scripts/bench_transport.py --hop-variants`.

ACK policy (private: the 1-RTT packet space's `ack_at`): aioquic sends a lone ACK 1 ms after
a packet. In a request/response exchange (one activation out, one token back, milliseconds
apart) each lone ACK wakes the other process while a stage computes, and costs both of them CPU
the stage needs. So while less than ACK_MESSAGE bytes await our ACK, it may wait up to ACK_DELAY
for our next packet to carry it (well below the 25 ms max_ack_delay aioquic advertises); past
that it is a transfer and aioquic's 1 ms applies, so bulk throughput is as before. Any pending
ACK rides on the next packet we send.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)

from meshchat.errors import MeshchatError
from meshchat.mesh import polling, sidepath, wire
from meshchat.mesh.identity import Identity, NodeId, node_id_of_certificate
from meshchat.tasks import BackgroundTasks

log = logging.getLogger(__name__)

ALPN = "meshchat/1"  # the protocol's major version
CONTROL_STREAM = 0
APP_ERROR_PROTOCOL = 0x101  # QUIC application error codes we use when resetting
APP_ERROR_REFUSED = 0x102
APP_ERROR_DUPLICATE = 0x103
# A clean stop: peers show the node as "left", not "lost" (a crash closes with no code at all).
APP_ERROR_GOODBYE = 0x104
ACK_DELAY = 0.02  # seconds a lone small packet's ACK may wait to ride on ours (module doc)
ACK_MESSAGE = 16384  # bytes awaiting an ACK: below, a message exchange; above, a transfer

Address = tuple[str, int]


@dataclass(frozen=True)
class Tuning:
    """Transport knobs; defaults are the tuned values (see scripts/bench_transport.py)."""

    congestion_control: str = "cubic"
    # 1472 = a 1500-byte Ethernet MTU minus IPv4 and UDP headers: no IP fragmentation on a LAN.
    max_datagram_size: int = 1472
    # Loopback has a 64 KiB MTU; bigger datagrams cut aioquic's per-packet Python cost.
    loopback_datagram_size: int = 16384
    chunk: int = 256 * 1024  # bytes handed to aioquic per write
    send_buffer: int = 4 * 1024 * 1024  # unacked bytes per stream before `send` waits
    peer_buffer: int = 96 * 1024 * 1024  # received, not yet framed bytes per peer
    max_datagram_flow: int = 16 * 1024 * 1024  # QUIC flow-control windows
    idle_timeout: float = 15.0
    max_connections: int = 256
    # Handshakes in flight from one source address: a few nodes behind one address still join
    # together; one address cannot take the node's connection slots.
    max_unauthenticated_per_host: int = 8
    retry: bool = True  # QUIC Retry on every new connection (cost: scripts/bench_retry.py)
    max_stream_errors: int = 32  # a peer that keeps sending bad frames is cut off
    side_path: bool = True  # decode steps as AES-GCM datagrams beside aioquic (sidepath.py)
    # Off loopback the side path's datagrams stay within QUIC's minimum path MTU (RFC 9000
    # §14): no path MTU discovery; an 8 KB activation is then 8 datagrams instead of 6.
    side_datagram_size: int = 1200

    def datagram_size_for(self, host: str) -> int:
        return self.loopback_datagram_size if _is_loopback(host) else self.max_datagram_size

    def side_datagram_size_for(self, host: str) -> int:
        return self.loopback_datagram_size if _is_loopback(host) else self.side_datagram_size


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


DEFAULT_TUNING = Tuning()
# What aioquic does with its own defaults (for the benchmark's "before" column).
UNTUNED = Tuning(
    congestion_control="reno",
    max_datagram_size=1200,
    loopback_datagram_size=1200,
    chunk=1 << 30,
    send_buffer=1 << 40,
    max_datagram_flow=1048576,
)


MAX_EARLY_MESSAGES = 64  # a greeting's STATUS, PEERS and ROSTER, with room to spare


class ConnectionLost(MeshchatError):
    """The peer went away (or was cut off) while we were talking to it."""


def peer_certificate_node_id(quic: QuicConnection) -> NodeId | None:
    """The NodeID in the peer's TLS certificate (private aioquic attribute; see module doc)."""
    cert = quic.tls._peer_certificate
    return None if cert is None else node_id_of_certificate(cert)


BINDING_LABEL = b"meshchat auth"


def session_binding(quic: QuicConnection) -> bytes:
    """A secret both ends of this TLS session derive once the handshake is complete.

    Private aioquic state (see module doc); `test_preauth` fails loudly if it moves."""
    schedule = quic.tls.key_schedule
    if schedule is None or schedule.generation != 3:  # 3: the master secret is extracted
        raise RuntimeError("aioquic changed: no TLS master secret to bind the auth proof to")
    return tls.hkdf_expand_label(
        schedule.algorithm,
        schedule.secret,
        BINDING_LABEL,
        schedule.hash.copy().finalize(),
        32,
    )


class Connection(QuicConnectionProtocol):
    """One QUIC connection, framed. The node layer drives authentication and dispatch."""

    def __init__(
        self,
        quic: QuicConnection,
        endpoint: Endpoint,
        remote: Address,
        expect: Callable[[NodeId], bool] | None = None,
    ) -> None:
        super().__init__(quic)
        self.endpoint = endpoint
        self.remote = remote
        self.is_dialer = quic.configuration.is_client
        self.peer_id: NodeId | None = None  # pinned (dialer) or authenticated (listener)
        self._authenticated = False
        self.side: sidepath.SidePath | None = None  # once authenticated (tuning.side_path)
        self._control_out = 0  # bytes written to the control stream (the side path's order)
        self._control_in = 0  # and received on it
        self._control_done = 0  # received bytes whose frames were dispatched
        self.tls_binding = b""  # session_binding(), once the QUIC handshake is complete
        self.tuning = endpoint.tuning
        self._expect = expect
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._readers: dict[int, wire.FrameReader] = {}
        self._dead_streams: set[int] = set()  # failed streams: ignore what still arrives
        self._served: set[int] = set()  # request streams that delivered their one frame
        self._stream_errors = 0
        self._buffered = 0
        self._pre_auth: asyncio.Queue[wire.Message | None] = asyncio.Queue(maxsize=4)
        # What the listener sent right behind its WELCOME, often in the same packet, before
        # the node took the connection: kept for `deliver_early`, not lost.
        self._early: list[wire.Message] | None = None
        self._pending: dict[int, asyncio.Future[wire.Message]] = {}
        self._control_lock = asyncio.Lock()
        self._ping_stream: int | None = None
        self._drained = asyncio.Event()
        self._terminated = False
        self.close_reason = ""
        # loop.time() and time.perf_counter() are both CLOCK_MONOTONIC here (hop_timing).
        self.said_goodbye = False  # the peer closed with APP_ERROR_GOODBYE (a clean stop)
        self.opened_at = self.last_heard = self._loop.time()
        self.last_framed = 0.0  # when the last frame's bytes were built (hop_timing)
        self.last_sent = 0.0  # when the last datagram went to the kernel (hop_timing)
        self.closed = self._loop.create_future()
        self._arrivals = polling.arrivals(self._loop)  # polls where a decode step is due
        # Set by the node once authenticated.
        self.on_message: Callable[[Connection, wire.Message], None] = lambda c, m: None
        self.on_request: Callable[[Connection, wire.Message], Awaitable[wire.Message]] | None = None
        self.on_ping: Callable[[Connection, wire.Message], None] = lambda c, m: None
        self._ack_first = 0.0  # when the first packet awaiting our ACK arrived
        self._ack_bytes = 0  # and how many bytes came since
        self._delivered = False  # the datagram being processed completed a message

    # --- lifecycle

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @authenticated.setter
    def authenticated(self, value: bool) -> None:
        self._authenticated = value
        if value and self.side is None and self.tuning.side_path and self.tls_binding:
            self.side = sidepath.SidePath(
                self.tls_binding,
                self.is_dialer,
                self.tuning.side_datagram_size_for(self.remote[0]),
                self._send_side_packet,
                self._on_side_message,
                self.abort,  # nothing acknowledged for TIMEOUTS.side_path_give_up_s: dead
            )
            self.endpoint.route_side_tag(self.side.tag, self)
            self.side.stream_delivered(self._control_done)
            self.side.probe()

    def _send_side_packet(self, packet: bytes) -> None:
        self._transport.sendto(packet, self.remote)  # type: ignore[union-attr]

    def _on_side_message(self, msg: wire.Message) -> None:
        if self._arrivals is not None:
            self._arrivals.arrived()
        self._dispatch(CONTROL_STREAM, msg)

    def side_received(self, data: bytes) -> None:
        """A side-path packet for this connection (the endpoint routed it by its tag)."""
        if self.side is None or self._terminated:
            return
        self.last_heard = self._loop.time()
        try:
            self.side.receive(data)
        except sidepath.SideError as exc:
            log.debug("side packet from %s dropped: %s", fmt_addr(self.remote), exc)
        except wire.ProtocolError as exc:  # an authentic message that is not a good frame
            self._stream_error(CONTROL_STREAM, str(exc))

    async def wait_handshake(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), timeout)
        except TimeoutError:
            self.abort("handshake timed out")
            raise ConnectionLost(f"no QUIC handshake with {fmt_addr(self.remote)}") from None

    def abort(self, reason: str, code: int = APP_ERROR_REFUSED) -> None:
        """Close the connection now (idempotent)."""
        if self._terminated:
            return
        self.close_reason = self.close_reason or reason
        with contextlib.suppress(Exception):
            self._quic.close(error_code=code, reason_phrase=reason[:200])
            self.transmit()
        self._on_terminated(reason)

    def _on_terminated(self, reason: str) -> None:
        if self._terminated:
            return
        self._terminated = True
        self.close_reason = self.close_reason or reason
        exc = ConnectionLost(f"connection to {fmt_addr(self.remote)} closed: {self.close_reason}")
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()  # mark retrieved
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        with contextlib.suppress(asyncio.QueueFull):
            self._pre_auth.put_nowait(None)
        self._drained.set()
        if self.side is not None:
            self.side.close()
        self.endpoint.forget(self)
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def is_closed(self) -> bool:
        return self._terminated

    # --- aioquic hooks

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.last_heard = now = self._loop.time()
        # QuicConnectionProtocol.datagram_received, with our ACK policy before transmitting.
        was_pending = self._ack_pending()
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        self._ack_policy(now, len(data), was_pending)
        self._delivered = False
        self._process_events()
        if self._delivered:
            # Not at once: the work this message woke (a stage's step, the head's token) runs
            # first, and its own send carries any ACK due; what is left goes right after it.
            # A hop's critical path so loses one aioquic packet-building pass (with the Token
            # fast path in wire.py: a hop's critical-path CPU 0.22 → 0.17 ms, loaded 2 cores).
            self._transmit_soon()
        else:  # inside a transfer, or an ACK that may let us send more: as aioquic does
            self.transmit()
        self._drained.set()
        if not self._terminated and self._quic._state in END_STATES:
            # The peer closed: aioquic reports that only after its draining period (3 PTO);
            # tell the node now so it stops using the connection.
            event = self._quic._close_event
            self.said_goodbye = event is not None and event.error_code == APP_ERROR_GOODBYE
            self._on_terminated(event.reason_phrase if event else "closed by peer")

    def transmit(self) -> None:
        if self._transmit_task is not None:  # a deferred pass (datagram_received): this is it
            self._transmit_task.cancel()
        super().transmit()

    def _ack_space(self) -> Any:
        return self._quic._spaces.get(tls.Epoch.ONE_RTT)

    def _ack_pending(self) -> bool:
        space = self._ack_space()
        return space is not None and space.ack_at is not None

    def _ack_policy(self, now: float, size: int, was_pending: bool) -> None:
        space = self._ack_space()
        if space is None or space.ack_at is None:
            return
        if not was_pending:  # the first packet since our last ACK
            self._ack_first, self._ack_bytes = now, 0
        self._ack_bytes += size
        # A message (a few KB) waits for our reply to carry its ACK; a transfer gets 1 ms.
        delay = ACK_DELAY if self._ack_bytes < ACK_MESSAGE else 0.001
        space.ack_at = self._ack_first + delay

    def _ack_now(self) -> None:
        """Let the packet about to be sent carry any pending ACK."""
        space = self._ack_space()
        if space is not None and space.ack_at is not None:
            space.ack_at = self._loop.time()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._on_handshake(event)
        elif isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._drop_stream(event.stream_id)
            self._dead_streams.discard(event.stream_id)
            self._served.discard(event.stream_id)
            fut = self._pending.pop(event.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionLost("peer reset the request stream"))
        elif isinstance(event, events.ConnectionTerminated):
            self.said_goodbye = event.error_code == APP_ERROR_GOODBYE
            self._on_terminated(event.reason_phrase or f"QUIC error {event.error_code}")

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if event.session_resumed or event.early_data_accepted:
            self.abort("session resumption is not allowed")
            return
        if self.is_dialer:
            peer = peer_certificate_node_id(self._quic)
            if peer is None or self._expect is None or not self._expect(peer):
                self.abort("peer key does not match the expected NodeID")
                return
            self.peer_id = peer
        self.tls_binding = session_binding(self._quic)
        if not self._handshake.done():
            self._handshake.set_result(None)

    # --- receiving

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        if sid in self._dead_streams:
            return
        if not self.authenticated and sid != CONTROL_STREAM:
            self.abort("stream opened before authentication", APP_ERROR_PROTOCOL)
            return
        reader = self._readers.get(sid)
        if reader is None:
            reader = self._readers[sid] = wire.FrameReader(allowed=self._pre_auth_frames(sid))
        if self.authenticated:
            reader.allowed = None
        before = reader.buffered
        reader.push(data)
        if sid == CONTROL_STREAM:
            self._control_in += len(data)
        msgs: list[tuple[wire.Message, int]] = []
        try:
            for msg in reader.frames():
                msgs.append((msg, self._control_in - reader.buffered))
                if self.is_dialer and isinstance(msg, wire.Welcome):
                    reader.allowed = None  # the listener may speak freely right after WELCOME
        except wire.ProtocolError as exc:
            self._buffered += reader.buffered - before
            self._stream_error(sid, str(exc))
            return
        self._buffered += reader.buffered - before
        if self._buffered > self.tuning.peer_buffer:
            self.abort("peer exceeded its receive buffer limit", APP_ERROR_PROTOCOL)
            return
        for msg, offset in msgs:
            self._dispatch(sid, msg)
            if self._terminated or self._readers.get(sid) is not reader:
                return  # the stream failed (or the connection closed) on this frame
            if sid == CONTROL_STREAM:
                self._control_done = offset
                if self.side is not None:
                    self.side.stream_delivered(offset)  # side messages sent after this frame
        if end:
            self._buffered -= reader.buffered
            self._readers.pop(sid, None)
            self._served.discard(sid)  # the peer can send nothing more on it: forget it
            if not reader.at_boundary:
                self._stream_error(sid, "stream ended inside a frame")

    def _pre_auth_frames(self, sid: int) -> dict[wire.MsgType, int] | None:
        if self.authenticated or sid != CONTROL_STREAM:
            return None
        return wire.DIALER_PRE_AUTH if self.is_dialer else wire.LISTENER_PRE_AUTH

    def _dispatch(self, sid: int, msg: wire.Message) -> None:
        if self._terminated:
            return
        self._delivered = True
        if sid == CONTROL_STREAM:
            if self.authenticated:
                try:
                    self.on_message(self, msg)
                except wire.ProtocolError as exc:  # a handler found the peer's input bad
                    self._stream_error(sid, str(exc))
            elif self._early is not None:
                if len(self._early) >= MAX_EARLY_MESSAGES:
                    self.abort("too many messages before the node took the connection")
                else:
                    self._early.append(msg)
            else:
                if self.is_dialer and isinstance(msg, wire.Welcome):
                    self._early = []
                try:
                    self._pre_auth.put_nowait(msg)
                except asyncio.QueueFull:
                    self.abort("too many messages before authentication", APP_ERROR_PROTOCOL)
            return
        if sid & 2:  # unidirectional: keepalive only
            if isinstance(msg, wire.Ping | wire.Pong):
                self.on_ping(self, msg)
            else:
                self._stream_error(sid, "only pings on unidirectional streams")
            return
        ours = (sid & 1) == (0 if self.is_dialer else 1)
        if ours:  # a reply to our request
            fut = self._pending.pop(sid, None)
            if fut is None:
                self._stream_error(sid, "unexpected frame on a request stream")
            elif not fut.done():
                fut.set_result(msg)
            return
        if self.on_request is None:
            self._stream_error(sid, "requests are not accepted")
            return
        if sid in self._served:
            self._stream_error(sid, "more than one frame on a request stream")
            return
        self._served.add(sid)
        self.endpoint.spawn(self._serve_request(sid, msg))

    async def _serve_request(self, sid: int, msg: wire.Message) -> None:
        assert self.on_request is not None
        try:
            reply = await self.on_request(self, msg)
        except MeshchatError as exc:
            reply = wire.Error(wire.FaultCode.FAILED, str(exc))
        except Exception as exc:
            log.exception("request handler failed")
            reply = wire.Error(wire.FaultCode.INTERNAL, f"handler failed: {exc!r}")
        if sid in self._dead_streams:
            return  # the peer broke the stream meanwhile; it was told why
        # RuntimeError: aioquic refuses writes to a stream the peer reset meanwhile.
        with contextlib.suppress(ConnectionLost, RuntimeError):
            await self._write(sid, frame_parts(reply), end=True)

    def _stream_error(self, sid: int, reason: str) -> None:
        log.debug("stream %d from %s: %s", sid, fmt_addr(self.remote), reason)
        if sid == CONTROL_STREAM:
            self.abort(f"protocol error: {reason}", APP_ERROR_PROTOCOL)
            return
        self._stream_errors += 1
        if self._stream_errors > self.tuning.max_stream_errors:
            self.abort("too many protocol errors", APP_ERROR_PROTOCOL)
            return
        self._drop_stream(sid)
        self._dead_streams.add(sid)
        self._served.discard(sid)
        fut = self._pending.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionLost(f"bad reply: {reason}"))
        with contextlib.suppress(Exception):
            self._quic.stop_stream(sid, APP_ERROR_PROTOCOL)
            if not sid & 2 or (sid & 1) == (0 if self.is_dialer else 1):
                # Tell the peer why on the stream if we can still write to it.
                body = wire.encode(wire.Error(wire.FaultCode.PROTOCOL, reason[:200]))
                self._quic.send_stream_data(sid, body, end_stream=True)
            self.transmit()

    def _drop_stream(self, sid: int) -> None:
        reader = self._readers.pop(sid, None)
        if reader is not None:
            self._buffered -= reader.buffered

    def deliver_early(self) -> None:
        """Hand the messages that came behind WELCOME to `on_message` (set it first)."""
        early, self._early = self._early or [], None
        for msg in early:
            self._dispatch(CONTROL_STREAM, msg)

    async def recv_handshake(self, timeout: float) -> wire.Message:
        """Next control message before authentication (the node's handshake uses this)."""
        try:
            msg = await asyncio.wait_for(self._pre_auth.get(), timeout)
        except TimeoutError:
            self.abort("authentication timed out")
            raise ConnectionLost("authentication timed out") from None
        if msg is None:
            raise ConnectionLost(f"connection closed: {self.close_reason}")
        return msg

    # --- sending

    def _backlog(self, sid: int) -> int:
        stream = self._quic._streams.get(sid)
        return 0 if stream is None else len(stream.sender._buffer)

    async def _write(self, sid: int, parts: list[bytes | memoryview], end: bool) -> None:
        chunk = self.tuning.chunk
        # Join the parts first: a frame's header and data then leave in one packet, not two.
        data = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
        self.last_framed = time.perf_counter()
        if sid == CONTROL_STREAM:
            self._control_out += len(data)
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [memoryview(b"")]
        for i, piece in enumerate(pieces):
            if self._terminated:
                raise ConnectionLost(f"connection closed: {self.close_reason}")
            last = end and i == len(pieces) - 1
            self._quic.send_stream_data(sid, bytes(piece), end_stream=last)
            self._ack_now()
            self.transmit()
            # Bound what we hold for a slow peer: wait for acks before writing more.
            while self._backlog(sid) > self.tuning.send_buffer and not self._terminated:
                self._drained.clear()
                await self._drained.wait()

    async def send(self, msg: wire.Message) -> None:
        """Send on the ordered control stream."""
        async with self._control_lock:
            side = self.side
            parts: list[bytes | memoryview] | None = None
            if side is not None and side.can_send(msg):
                if self._terminated:
                    raise ConnectionLost(f"connection closed: {self.close_reason}")
                frame = b"".join(frame_parts(msg))
                self.last_framed = time.perf_counter()
                if len(frame) <= sidepath.MAX_MESSAGE:
                    side.send(frame, self._control_out)
                    if self._arrivals is not None:
                        self._arrivals.sent()
                    return
                parts = [frame]  # too large for the side path: the stream takes it as built
            if side is not None:
                await side.idle()  # the stream's next frame must not overtake a side message
            await self._write(CONTROL_STREAM, parts or frame_parts(msg), end=False)

    async def request(self, msg: wire.Message, timeout: float) -> wire.Message:
        """Send `msg` on a new stream and wait for the one reply frame."""
        if self._terminated:
            raise ConnectionLost(f"connection closed: {self.close_reason}")
        sid = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[wire.Message] = self._loop.create_future()
        self._pending[sid] = fut
        try:
            await self._write(sid, frame_parts(msg), end=True)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ConnectionLost("request timed out") from None
        finally:
            self._pending.pop(sid, None)

    def send_ping(self, msg: wire.Ping | wire.Pong) -> None:
        if self._terminated:
            return
        if self._ping_stream is None:
            self._ping_stream = self._quic.get_next_available_stream_id(is_unidirectional=True)
        self._quic.send_stream_data(self._ping_stream, wire.encode(msg))
        self.transmit()


def frame_parts(msg: wire.Message) -> list[bytes | memoryview]:
    """A frame as pieces, so a tensor's data is not copied into one big buffer first."""
    if isinstance(msg, wire.Tensor):
        head = wire.encode_tensor_header(msg)
        return [wire.encode_header(msg.TYPE, len(head) + len(msg.data)) + head, msg.data]
    if isinstance(msg, wire.Activations):
        head = wire.encode_activations_head(msg)
        return [wire.encode_header(msg.TYPE, len(head) + len(msg.data)) + head, msg.data]
    return [wire.encode(msg)]


def fmt_addr(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    # isascii: "²".isdigit() is true but int("²") raises; a peer sends these strings.
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise MeshchatError(f"not an address (HOST:PORT): {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Stamped:
    """The endpoint's socket as one connection sees it: notes when it last sent (hop_timing)."""

    __slots__ = ("_conn", "_endpoint")

    def __init__(self, endpoint: Endpoint, conn: Connection) -> None:
        self._endpoint = endpoint
        self._conn = conn

    def sendto(self, data: bytes, addr: Any = None) -> None:
        transport = self._endpoint._transport
        if transport is not None:
            self._conn.last_sent = time.perf_counter()
            transport.sendto(data, addr)


class RetryTokens:
    """QUIC Retry tokens (RFC 9000 §8.1.2): proof that a client receives at its address.

    token = issued (ms, u64) | HMAC-SHA256(key, issued, address, retry CID, original CID)[:16]
            | original destination CID.
    The key is random per endpoint, so tokens die with the process; clients echo them at
    once, so a short lifetime suffices.
    """

    LIFETIME = 10.0  # seconds
    _HEAD = struct.Struct("!Q16s")

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def _mac(self, issued: int, addr: Address, retry_cid: bytes, original_cid: bytes) -> bytes:
        host = ipaddress.ip_address(addr[0]).packed
        msg = struct.pack("!QH", issued, addr[1]) + host + bytes([len(retry_cid)]) + retry_cid
        return hmac.digest(self._key, msg + original_cid, hashlib.sha256)[:16]

    def issue(self, addr: Address, retry_cid: bytes, original_cid: bytes) -> bytes:
        issued = int(time.monotonic() * 1000)
        mac = self._mac(issued, addr, retry_cid, original_cid)
        return self._HEAD.pack(issued, mac) + original_cid

    def validate(self, addr: Address, retry_cid: bytes, token: bytes) -> bytes | None:
        """The original destination CID if `token` is ours, fresh, and for this address."""
        if not self._HEAD.size < len(token) <= self._HEAD.size + 20:
            return None
        issued, mac = self._HEAD.unpack_from(token)
        original_cid = token[self._HEAD.size :]
        age = time.monotonic() - issued / 1000
        if not 0 <= age <= self.LIFETIME:
            return None
        if not hmac.compare_digest(mac, self._mac(issued, addr, retry_cid, original_cid)):
            return None
        return original_cid


class Endpoint(asyncio.DatagramProtocol):
    """The node's UDP socket: routes datagrams to connections, accepts and dials."""

    def __init__(
        self,
        identity: Identity,
        on_incoming: Callable[[Connection], None],
        tuning: Tuning = DEFAULT_TUNING,
    ) -> None:
        self.identity = identity
        self.tuning = tuning
        self._on_incoming = on_incoming
        self._cert = identity.certificate()
        self._by_cid: dict[bytes, Connection] = {}
        self._conns: set[Connection] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks = BackgroundTasks(log, "request handler")
        self._retry_tokens = RetryTokens()
        self._side_tags: dict[bytes, Connection] = {}  # side-path tag -> its connection
        self.address: Address = ("0.0.0.0", 0)

    async def start(self, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(host, port)
            )
        except OSError as exc:
            raise MeshchatError(
                f"cannot listen on {fmt_addr((host, port))}: {exc.strerror}"
            ) from exc
        self._transport = transport
        sockname = self._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        return self.address

    def close(self) -> None:
        for conn in list(self._conns):
            conn.abort("node shutting down", APP_ERROR_GOODBYE)
        self._tasks.cancel()
        if self._transport is not None:
            self._transport.close()

    @property
    def connections(self) -> set[Connection]:
        return set(self._conns)

    def _config(self, is_client: bool, host: str) -> QuicConfiguration:
        t = self.tuning
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            certificate=self._cert,
            private_key=self.identity.private_key,
            verify_mode=ssl.CERT_NONE,  # no CA: the dialer pins the key (module doc)
            congestion_control_algorithm=t.congestion_control,
            max_datagram_size=t.datagram_size_for(host),
            idle_timeout=t.idle_timeout,
            max_data=t.max_datagram_flow,
            max_stream_data=t.max_datagram_flow,
        )

    def _register(self, conn: Connection, cid: bytes) -> None:
        self._by_cid[cid] = conn

    def _retire(self, conn: Connection, cid: bytes) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]

    def route_side_tag(self, tag: bytes, conn: Connection) -> None:
        """Side-path packets carrying `tag` go to `conn` (until `forget(conn)`)."""
        self._side_tags[tag] = conn

    def spawn(self, work: Awaitable[None]) -> None:
        """Run `work` (a connection's request handler) until it ends or `close` cancels it."""
        self._tasks.spawn(work)

    def forget(self, conn: Connection) -> None:
        """A terminated connection: no datagram (QUIC or side path) is routed to it again."""
        self._conns.discard(conn)
        if conn.side is not None and self._side_tags.get(conn.side.tag) is conn:
            del self._side_tags[conn.side.tag]
        for cid in [c for c, v in self._by_cid.items() if v is conn]:
            del self._by_cid[cid]

    def _attach(self, conn: Connection, *cids: bytes) -> None:
        conn._connection_id_issued_handler = lambda cid: self._register(conn, cid)
        conn._connection_id_retired_handler = lambda cid: self._retire(conn, cid)
        # ConnectionTerminated also reaches quic_event_received, with the reason.
        conn._connection_terminated_handler = lambda: None
        conn.connection_made(cast(asyncio.DatagramTransport, _Stamped(self, conn)))
        for cid in cids:
            self._by_cid[cid] = conn
        self._conns.add(conn)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if sidepath.is_side_packet(data):
            tag = sidepath.packet_tag(data)
            conn = self._side_tags.get(tag) if tag is not None else None
            if conn is not None:
                conn.side_received(data)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return  # not QUIC: drop silently
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            conn.datagram_received(data, addr)
            return
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < 1200  # RFC 9000: clients pad Initials; also limits amplification
            or header.version not in (1, 0x6B3343CF)
        ):
            return
        remote: Address = (addr[0], addr[1])
        original_cid, retry_cid = header.destination_cid, None
        if self.tuning.retry:
            if not header.token:
                self._send_retry(header, remote)
                return
            validated = self._retry_tokens.validate(remote, header.destination_cid, header.token)
            if validated is None:
                return  # forged, stale, or from another address: drop (RFC 9000 §8.1.3)
            original_cid, retry_cid = validated, header.destination_cid
        if not self._has_room_for(remote[0]):
            return
        config = self._config(is_client=False, host=remote[0])
        quic = QuicConnection(
            configuration=config,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
        )
        conn = Connection(quic, self, remote)
        self._attach(conn, header.destination_cid, quic.host_cid)
        conn.datagram_received(data, addr)
        self._on_incoming(conn)

    def _send_retry(self, header: QuicHeader, remote: Address) -> None:
        """Answer a client's first Initial with a Retry; no state is kept until it echoes."""
        assert self._transport is not None and header.version is not None
        retry_cid = os.urandom(8)
        token = self._retry_tokens.issue(remote, retry_cid, header.destination_cid)
        packet = encode_quic_retry(
            version=header.version,
            source_cid=retry_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )
        self._transport.sendto(packet, remote)

    def _has_room_for(self, host: str) -> bool:
        """The cap on handshakes in flight from one source address, then the global cap.

        When all slots are taken, the oldest connection still awaiting authentication makes
        room: a real handshake takes milliseconds, so holding slots against newcomers takes
        a sustained stream of fresh handshakes from many addresses, not a one-off flood."""
        pending = [c for c in self._conns if not c.is_dialer and not c.authenticated]
        if sum(c.remote[0] == host for c in pending) >= self.tuning.max_unauthenticated_per_host:
            return False
        if len(self._conns) >= self.tuning.max_connections:
            if not pending:
                return False
            oldest = min(pending, key=lambda c: c.opened_at)
            oldest.abort("evicted: too many connections awaiting authentication")
        return True

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)  # e.g. ICMP port unreachable; the dial times out

    async def dial(
        self, addr: Address, expect: Callable[[NodeId], bool], timeout: float = 5.0
    ) -> Connection:
        """Open a connection and complete the QUIC handshake with a pinned peer key."""
        if self._transport is None:
            raise MeshchatError("the node is not started")
        quic = QuicConnection(configuration=self._config(is_client=True, host=addr[0]))
        conn = Connection(quic, self, addr, expect=expect)
        self._attach(conn, quic.host_cid)
        conn.connect(addr)
        await conn.wait_handshake(timeout)
        return conn
