"""The side path: a decode step's messages as AES-GCM datagrams beside aioquic.

Why (scripts/bench_transport.py --hop-variants, one 2048-f32 activation out and a Token back on
loopback, p50 of half the round trip): aioquic's control stream 0.26 ms, QUIC DATAGRAM frames
0.16 ms, one AES-GCM datagram 0.06 ms. aioquic's Python packetising and decryption is the cost.

What goes on it: once a connection is authenticated, `Activations` of one token and `Token`s
(the messages of a decode step); everything else stays on the control stream. The datagrams use
the node's QUIC socket and are told apart from QUIC by a first byte with both high bits clear
(every QUIC v1 packet sets the long-header or the fixed bit, RFC 9000 §17).

Keys: one AES-128-GCM key per direction, HKDF-Expand of the connection's TLS session binding
(`transport.session_binding`), which the dialer signed in the member handshake: only the two
authenticated ends of this QUIC session hold them.

Packet: HEAD (kind, tag, seq, ack, msg, index, count, offset) in the clear but authenticated (it
is the AEAD's associated data), then the encrypted fragment and GCM's 16-byte tag.
- tag: the receiver's id of this connection (from the binding): how the endpoint finds it.
- seq: per packet and direction, the GCM nonce; a seq seen before or older than the last
  REPLAY_WINDOW is dropped before anything else happens (replay).
- ack: how many of the peer's messages we have received in order (cumulative); every packet
  carries it, a lone ACK goes after ACK_DELAY if nothing else does (as the stream's ACK policy).
- msg, index, count: message number (delivered in order, once) and its fragments, each fitting
  one datagram: 16384 bytes on loopback, else 1200 (QUIC's minimum path MTU; a probe of that
  size must be answered before the side path is used).
- offset: bytes the sender had written to the control stream before this message. The receiver
  delivers it only once its control stream has delivered as much, and the sender writes nothing
  more to the stream until the message is acknowledged (asking with FLUSH): the order of all
  messages is as if every one had gone on the stream.
Loss: unacknowledged messages are resent after RTO (doubling, capped); with none acknowledged
for TIMEOUTS.side_path_give_up_s the connection is closed and the node's failover takes over.
A peer that never answers our PROBE (an older node, or a path that drops these datagrams) gets
every message on the stream.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from meshchat.mesh import wire
from meshchat.timeouts import TIMEOUTS

HEAD = struct.Struct("!B8sQIIHHQ")
GCM_TAG = 16
ACK_DELAY = 0.02  # s: a lone ACK waits this long for a packet of ours to ride on
RTO = 0.06  # s: first resend (3 x ACK_DELAY: a delayed ACK is not a loss)
MAX_RTO = 0.5
PROBE_EVERY = 0.5  # s between probes while the peer has not answered
WINDOW = 32  # messages in flight (sender) and held for reassembly or order (receiver)
MAX_MESSAGE = 256 * 1024  # bytes of one message's frame (larger ones take the stream)
MAX_FRAGMENTS = 1024  # of one message (fragments are 256 bytes or more)
REPLAY_WINDOW = 1024  # packet numbers remembered below the highest seen


class Kind(enum.IntEnum):
    DATA = 0x11
    ACK = 0x12
    PROBE = 0x13
    PROBE_ACK = 0x14
    FLUSH = 0x15  # "acknowledge now": the sender waits to write to the control stream


def is_side_packet(data: bytes) -> bool:
    """Not QUIC: the long-header and fixed bits are both clear."""
    return len(data) > 0 and data[0] & 0xC0 == 0


def packet_tag(data: bytes) -> bytes | None:
    return data[1:9] if len(data) >= HEAD.size + GCM_TAG else None


def carries(msg: wire.Message) -> bool:
    """The messages of a decode step."""
    if isinstance(msg, wire.Token):
        return True
    return isinstance(msg, wire.Activations) and len(msg.tokens) == 1


class SideError(Exception):
    """A packet that is not an authentic, fresh side-path packet of this connection."""


def _derive(binding: bytes, label: bytes, size: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), size, b"meshchat side " + label).derive(binding)


@dataclass
class _Outgoing:
    frame: bytes
    offset: int
    first_sent: float
    rto: float = RTO
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Incoming:
    count: int
    offset: int
    parts: list[bytes | None]
    size: int = 0
    have: int = 0
    done: bool = field(default=False)


class SidePath:
    """One connection's side path: sealing, fragments, order, acknowledgements, resends."""

    def __init__(
        self,
        binding: bytes,
        is_dialer: bool,
        datagram_size: int,
        send_packet: Callable[[bytes], None],
        deliver: Callable[[wire.Message], None],
        fail: Callable[[str], None],
    ) -> None:
        ours, theirs = (b"dialer", b"listener") if is_dialer else (b"listener", b"dialer")
        self._seal = AESGCM(_derive(binding, b"key " + ours, 16))
        self._open = AESGCM(_derive(binding, b"key " + theirs, 16))
        self.tag = _derive(binding, b"tag " + ours, 8)  # how the peer's packets name us
        self._peer_tag = _derive(binding, b"tag " + theirs, 8)
        self._fragment = max(256, datagram_size - HEAD.size - GCM_TAG)
        self._send_packet = send_packet
        self._deliver = deliver
        self._fail = fail
        self._loop = asyncio.get_running_loop()
        self.ready = False  # the peer answered: it speaks the side path
        self._probed_at = -PROBE_EVERY
        self._seq = 0
        self._next_msg = 0
        self._unacked: dict[int, _Outgoing] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._top = 0  # highest packet number received, and below it a bitmap of seen ones
        self._seen = 0
        self._expect = 0  # the peer's next message to deliver (our cumulative ack)
        self._incoming: dict[int, _Incoming] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        self._stream_done = 0  # control stream bytes delivered
        self._ack_asked = False  # a FLUSH came while messages were held: ack as they go
        self.closed = False

    # --- sending

    def can_send(self, msg: wire.Message) -> bool:
        if self.closed or not carries(msg):
            return False
        if not self.ready:
            self.probe()
            return False
        return len(self._unacked) < WINDOW

    def probe(self) -> None:
        """Ask the peer to answer; the probe is a full-size datagram, so an answer also
        shows that the path carries our fragments."""
        now = self._loop.time()
        if now - self._probed_at >= PROBE_EVERY:
            self._probed_at = now
            self._packet(Kind.PROBE, payload=bytes(self._fragment))

    def send(self, frame: bytes, offset: int) -> None:
        """Send one message's frame (of at most MAX_MESSAGE bytes), written after `offset`
        bytes of the control stream."""
        msg = self._next_msg
        self._next_msg += 1
        out = _Outgoing(frame, offset, self._loop.time())
        self._unacked[msg] = out
        self._idle.clear()
        self._transmit(msg, out)

    def _transmit(self, msg: int, out: _Outgoing) -> None:
        size = self._fragment
        count = max(1, -(-len(out.frame) // size))
        view = memoryview(out.frame)
        for i in range(count):
            self._packet(Kind.DATA, msg, i, count, out.offset, view[i * size : (i + 1) * size])
        out.timer = self._loop.call_later(out.rto, self._resend, msg)

    def _resend(self, msg: int) -> None:
        out = self._unacked.get(msg)
        if out is None or self.closed:
            return
        if self._loop.time() - out.first_sent > TIMEOUTS.side_path_give_up_s:
            self.close()
            self._fail("side path: no acknowledgement")
            return
        out.rto = min(out.rto * 2, MAX_RTO)
        self._transmit(msg, out)

    async def idle(self) -> None:
        """Until every message sent is acknowledged (the control stream may be written)."""
        if not self._idle.is_set():
            self._packet(Kind.FLUSH)
            await self._idle.wait()

    def _packet(
        self,
        kind: Kind,
        msg: int = 0,
        index: int = 0,
        count: int = 0,
        offset: int = 0,
        payload: bytes | memoryview = b"",
    ) -> None:
        self._seq += 1
        head = HEAD.pack(kind, self._peer_tag, self._seq, self._expect, msg, index, count, offset)
        sealed = self._seal.encrypt(self._seq.to_bytes(12, "big"), bytes(payload), head)
        if self._ack_timer is not None:  # this packet carries our ack
            self._ack_timer.cancel()
            self._ack_timer = None
        self._send_packet(head + sealed)

    # --- receiving

    def receive(self, data: bytes) -> None:
        """One packet from the endpoint (its tag is ours). Raises SideError if it is not good."""
        if len(data) < HEAD.size + GCM_TAG:
            raise SideError("truncated")
        kind, _tag, seq, ack, msg, index, count, offset = HEAD.unpack_from(data)
        if not self._fresh(seq):
            raise SideError("replayed or too old")
        head = data[: HEAD.size]
        try:
            plain = self._open.decrypt(seq.to_bytes(12, "big"), data[HEAD.size :], head)
        except InvalidTag:
            raise SideError("not authentic") from None
        self._mark(seq)
        self._acked(ack)
        if kind == Kind.PROBE:
            self.ready = True
            self._packet(Kind.PROBE_ACK)
        elif kind == Kind.PROBE_ACK:
            self.ready = True
        elif kind == Kind.FLUSH:
            self._ack_asked = bool(self._incoming)
            self._packet(Kind.ACK)
        elif kind == Kind.DATA:
            self._data(msg, index, count, offset, plain)
        elif kind != Kind.ACK:
            raise SideError(f"unknown kind {kind}")

    def _fresh(self, seq: int) -> bool:
        if seq > self._top:
            return True
        age = self._top - seq
        return seq > 0 and age < REPLAY_WINDOW and not self._seen >> age & 1

    def _mark(self, seq: int) -> None:
        if seq > self._top:
            # A key holder may jump the packet number by 2**63: shift only within the window.
            gap = seq - self._top
            kept = self._seen << gap if gap < REPLAY_WINDOW else 0
            self._seen = (kept | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._top = seq
        else:
            self._seen |= 1 << (self._top - seq)

    def _acked(self, ack: int) -> None:
        if ack > self._next_msg:
            raise SideError("acknowledges a message never sent")
        if not self._unacked:
            return
        for msg in [m for m in self._unacked if m < ack]:
            out = self._unacked.pop(msg)
            if out.timer is not None:
                out.timer.cancel()
        if not self._unacked:
            self._idle.set()

    def _data(self, msg: int, index: int, count: int, offset: int, plain: bytes) -> None:
        if msg < self._expect:  # a resend: our ACK was lost or late; send it now
            self._packet(Kind.ACK)
            return
        if msg >= self._expect + WINDOW:
            raise SideError("message beyond the window")
        if not 0 <= index < count <= MAX_FRAGMENTS:
            raise SideError("bad fragment numbers")
        # The usual decode step: one datagram, next in order, nothing held.
        if (
            count == 1
            and msg == self._expect
            and offset <= self._stream_done
            and not self._incoming
        ):
            self._expect += 1
            self._ack_later()
            self._deliver(decode_frame(plain))
            return
        entry = self._incoming.get(msg)
        if entry is None:
            entry = self._incoming[msg] = _Incoming(count, offset, [None] * count)
        if entry.count != count or entry.offset != offset:
            raise SideError("fragment disagrees with its message")
        if entry.parts[index] is None:
            if entry.size + len(plain) > MAX_MESSAGE:
                raise SideError("message too large")
            entry.parts[index] = plain
            entry.size += len(plain)
            entry.have += 1
            entry.done = entry.have == count
        self._flush()

    def stream_delivered(self, offset: int) -> None:
        """The control stream delivered its frames up to `offset` bytes."""
        self._stream_done = offset
        if self._incoming:
            self._flush()

    def _flush(self) -> None:
        """Deliver, in order, the complete messages the control stream has caught up with."""
        while (entry := self._incoming.get(self._expect)) is not None and entry.done:
            if entry.offset > self._stream_done:
                return
            del self._incoming[self._expect]
            self._expect += 1
            self._ack_later()
            frame = b"".join(p for p in entry.parts if p is not None)
            self._deliver(decode_frame(frame))
        if self._ack_asked and not self._incoming:
            self._ack_asked = False
            self._packet(Kind.ACK)

    def _ack_later(self) -> None:
        if self._ack_timer is None:
            self._ack_timer = self._loop.call_later(ACK_DELAY, self._lone_ack)

    def _lone_ack(self) -> None:
        self._ack_timer = None
        if not self.closed:
            self._packet(Kind.ACK)

    def close(self) -> None:
        self.closed = True
        for out in self._unacked.values():
            if out.timer is not None:
                out.timer.cancel()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._idle.set()  # a waiting writer finds the connection closed


def decode_frame(frame: bytes) -> wire.Message:
    """A side message: exactly one frame, of a type the side path carries."""
    if len(frame) < wire.HEADER_SIZE:
        raise wire.ProtocolError("side path: truncated frame")
    kind, length = wire.check_header(frame)
    if kind not in (wire.MsgType.ACTIVATIONS, wire.MsgType.TOKEN):
        raise wire.ProtocolError(f"side path: {kind.name} frame")
    if length != len(frame) - wire.HEADER_SIZE:
        raise wire.ProtocolError("side path: frame length mismatch")
    msg = wire.decode_body(kind, memoryview(frame)[wire.HEADER_SIZE :])
    if not carries(msg):
        raise wire.ProtocolError("side path: not a decode step")
    return msg
