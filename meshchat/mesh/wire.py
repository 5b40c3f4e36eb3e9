"""The wire format: versioned, length-prefixed frames carrying typed messages.

A frame is an 8-byte header `!BBHI` (version, type, flags=0, body length) and a body. The header
is checked (version, known type, flags, length within that type's limit) before any of the body
is buffered, so a peer cannot make us hold more than one frame's limit per stream.

Control messages are JSON objects validated against a dataclass schema (no pickle, no eval).
Tensors are a binary header (dtype, session, position, shape) followed by the raw bytes.
Anything malformed raises `ProtocolError`, and only that: `decode_body` is the one exception
boundary for peer input (JSON is parsed with bounds on integers, floats, depth and text).

Before authentication a control stream accepts only the handshake's frame types, each of a few
KiB (`LISTENER_PRE_AUTH`, `DIALER_PRE_AUTH`): a stranger cannot make us hold a 64 MiB body.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import math
import re
import struct
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

from meshchat.errors import MeshchatError
from meshchat.mesh.identity import NodeId
from meshchat.model.fingerprint import Fingerprint

T = TypeVar("T")
WIRE_VERSION = 1
HEADER = struct.Struct("!BBHI")
HEADER_SIZE = HEADER.size
MAX_CONTROL_BODY = 1 << 20  # 1 MiB: control messages are small
MAX_TENSOR_BODY = 64 << 20  # 64 MiB: a long prefill chunk of a wide model
MAX_TENSOR_DIMS = 4
MAX_NODE_ID_TEXT = 80  # a NodeID's text is 55 characters; longer is refused unread
# JSON bounds (control bodies): u64 fits in 20 digits; nothing we send nests deeper than ~4.
MAX_JSON_INT = 1 << 64  # |value| below this
MAX_JSON_NUMBER_TEXT = 32  # characters of one number literal
MAX_JSON_DEPTH = 32
MAX_JSON_TEXT = 64 * 1024  # characters of one string (or object key)


class ProtocolError(Exception):
    """A peer sent something that breaks the protocol; close its stream (or connection)."""


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    ERROR = 5
    PING = 6
    PONG = 7
    STATUS = 8
    PEERS = 9
    ROSTER = 10
    ACK = 11
    PLAN = 16
    LOAD = 17
    TENSOR = 18
    TOKEN = 19
    CANCEL = 20
    ACTIVATIONS = 21
    SESSION_OP = 22
    SESSION_DONE = 23
    STAGE_FAULT = 24
    CAPS_QUERY = 25
    LAYER_FETCH = 26
    LAYER_DATA = 27


class Message:
    """Base of all messages; `TYPE` is the frame type."""

    TYPE: ClassVar[MsgType]


# --- control messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """Dialer → listener, first frame: who I am and which mesh I think I belong to."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    node_id: NodeId
    mesh_id: str | None = None
    addresses: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Challenge(Message):
    """Listener → dialer: sign this nonce together with my NodeID."""

    TYPE: ClassVar[MsgType] = MsgType.CHALLENGE
    nonce: bytes


@dataclass(frozen=True)
class Auth(Message):
    """Dialer → listener: signature over the challenge, and an invite secret if redeeming."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH
    signature: bytes
    invite_secret: bytes | None = None


@dataclass(frozen=True)
class Welcome(Message):
    """Listener → dialer: accepted. Carries the mesh's identity when an invite was redeemed."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    node_id: NodeId
    mesh_id: str
    mesh_secret: bytes | None = None
    roster: list[RosterRecord] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.roster) > MAX_ROSTER_RECORDS:
            raise ProtocolError(f"roster of more than {MAX_ROSTER_RECORDS} records")


@dataclass(frozen=True)
class Error(Message):
    """A refusal or failure, with a stable code and a reason fit for a user."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: FaultCode
    reason: str


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[MsgType] = MsgType.PING
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[MsgType] = MsgType.PONG
    seq: int


MAX_MEMORY_BYTES = 1 << 56  # 64 PiB, beyond any machine: a larger figure is refused


@dataclass(frozen=True)
class MemoryReport:
    """What a node offers the mesh and what its stage uses (llama.cpp's buffers, measured
    after load), in bytes: for the peers table (the planner asks CapsQuery for offers)."""

    offer: int
    used: int = 0

    def __post_init__(self) -> None:
        _require(0 <= self.offer <= MAX_MEMORY_BYTES, "memory offer out of range")
        _require(0 <= self.used <= MAX_MEMORY_BYTES, "memory use out of range")


@dataclass(frozen=True)
class Status(Message):
    """What a node runs: its layer range and model, set by the layer above, and its memory."""

    TYPE: ClassVar[MsgType] = MsgType.STATUS
    layers: list[int] | None = None
    model: dict[str, Any] | None = None
    memory: MemoryReport | None = None


@dataclass(frozen=True)
class Peers(Message):
    """Members this node is connected to, with the addresses they listen on (gossip)."""

    TYPE: ClassVar[MsgType] = MsgType.PEERS
    peers: dict[NodeId, list[str]] = field(default_factory=dict)  # at most MAX_NODE_KEYS


class RosterAction(enum.StrEnum):
    ADD = "add"
    REMOVE = "remove"


MAX_ROSTER_RECORDS = 1024  # one add and at most one removal per NodeID (membership.MAX_SUBJECTS)
# Entries of an object keyed by NodeID (Peers): one per member at most. Checked before the
# keys are parsed (each costs a base32 decode and a hash).
MAX_NODE_KEYS = MAX_ROSTER_RECORDS
MIN_ROSTER_TS = 1_577_836_800.0  # 2020-01-01: no honest record is older than this code
MAX_ROSTER_TS = float(1 << 33)  # year 2242: finite, and exact as a double to the microsecond
_MAX_MESH_ID = 64
_SIG_LEN = 64
_NONCE_LEN = 32


@dataclass(frozen=True)
class RosterRecord:
    """One signed roster change: `author` says `subject` is added to / removed from `mesh_id`.

    An add by a member other than the subject carries the subject's join proof: its handshake
    signature over `membership.join_payload(author, subject, join_nonce)`, made only when it
    redeems an invite of `author`. Meaning and checks live in `membership`; this is the format.
    """

    mesh_id: str
    subject: NodeId
    action: RosterAction
    ts: float
    author: NodeId
    signature: bytes
    join_nonce: bytes | None = None
    join_signature: bytes | None = None

    def signed_payload(self) -> bytes:
        """What `author` signs: every field but the signatures, in a fixed binary layout."""
        mesh = self.mesh_id.encode()
        return (
            b"meshchat/1 roster\x00"
            + struct.pack("!B", len(mesh))
            + mesh
            + self.subject.raw
            + self.author.raw
            + (b"\x01" if self.action is RosterAction.ADD else b"\x02")
            + struct.pack("!d", self.ts)
            + (self.join_nonce or b"")
        )

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "mesh_id": self.mesh_id,
            "subject": str(self.subject),
            "action": self.action.value,
            "ts": self.ts,
            "author": str(self.author),
            "sig": base64.b64encode(self.signature).decode(),
        }
        if self.join_nonce is not None and self.join_signature is not None:
            obj["join_nonce"] = base64.b64encode(self.join_nonce).decode()
            obj["join_sig"] = base64.b64encode(self.join_signature).decode()
        return obj

    @classmethod
    def from_json(cls, value: Any, name: str = "record") -> RosterRecord:
        """Parse and check the format of one record; anything malformed is a ProtocolError."""
        if not isinstance(value, dict):
            raise ProtocolError(f"{name}: expected an object")
        known = {"mesh_id", "subject", "action", "ts", "author", "sig", "join_nonce", "join_sig"}
        if not known.issuperset(value):
            raise ProtocolError(f"{name}: unknown fields")
        mesh_id = value.get("mesh_id")
        if not isinstance(mesh_id, str) or not (
            0 < len(mesh_id) <= _MAX_MESH_ID and mesh_id.isascii()
        ):
            raise ProtocolError(f"{name}.mesh_id: expected a mesh id")
        try:
            action = RosterAction(str(value.get("action")))
        except ValueError:
            raise ProtocolError(f"{name}.action: expected 'add' or 'remove'") from None
        subject, author = _node_id(value, "subject", name), _node_id(value, "author", name)
        signature = _fixed_b64(value, "sig", _SIG_LEN, name)
        nonce, join_sig = value.get("join_nonce"), value.get("join_sig")
        needs_proof = action is RosterAction.ADD and subject != author
        if needs_proof != (nonce is not None) or needs_proof != (join_sig is not None):
            raise ProtocolError(f"{name}: a join proof belongs to an add of another node, only")
        return cls(
            mesh_id, subject, action, roster_ts(value.get("ts"), f"{name}.ts"), author, signature,
            None if nonce is None else _fixed_b64(value, "join_nonce", _NONCE_LEN, name),
            None if join_sig is None else _fixed_b64(value, "join_sig", _SIG_LEN, name),
        )  # fmt: skip


def roster_ts(value: Any, name: str) -> float:
    """A roster timestamp: a finite number of seconds within [MIN_ROSTER_TS, MAX_ROSTER_TS].

    Integers are range-checked before conversion (a 400-digit one would overflow float())."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{name}: expected a number")
    if not MIN_ROSTER_TS <= value <= MAX_ROSTER_TS:  # False for NaN and ±inf too
        raise ProtocolError(f"{name}: timestamp out of range")
    return float(value)


def _node_id(obj: dict[str, Any], key: str, name: str) -> NodeId:
    return parse_node_id(obj.get(key), f"{name}.{key}")


def parse_node_id(value: Any, where: str) -> NodeId:
    """A NodeID from a peer's JSON; `where` names the field in the ProtocolError."""
    # The bound comes before parsing: a NodeID's text is 55 characters.
    if not isinstance(value, str) or len(value) > MAX_NODE_ID_TEXT:
        raise ProtocolError(f"{where}: expected a NodeID")
    try:
        return NodeId.parse(value)
    except MeshchatError:
        raise ProtocolError(f"{where}: not a NodeID") from None


def _fixed_b64(obj: dict[str, Any], key: str, size: int, name: str) -> bytes:
    text = obj.get(key)
    if not isinstance(text, str) or len(text) > 4 * size:
        raise ProtocolError(f"{name}.{key}: expected base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError(f"{name}.{key}: bad base64") from None
    if len(raw) != size:
        raise ProtocolError(f"{name}.{key}: expected {size} bytes")
    return raw


@dataclass(frozen=True)
class Roster(Message):
    """The sender's whole roster: every record it accepted, for the receiver to check and merge."""

    TYPE: ClassVar[MsgType] = MsgType.ROSTER
    mesh_id: str
    records: list[RosterRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.records) > MAX_ROSTER_RECORDS:
            raise ProtocolError(f"roster of more than {MAX_ROSTER_RECORDS} records")


@dataclass(frozen=True)
class Ack(Message):
    """A generic reply to a request."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    ok: bool = True
    body: dict[str, Any] = field(default_factory=dict)


# --- distributed generation: typed, bounded bodies -------------------------------------------

MAX_PLAN_STAGES = 64
MAX_MODEL_LAYERS = 4096  # above any real block count; a stage checks against its own model
MAX_PLAN_CONTEXT = 1 << 20  # tokens; a stage checks against its model's trained context
MAX_PLAN_SESSIONS = 16  # KV caches a plan may ask of each stage
MAX_PLAN_ID = 64
MAX_DIGEST_TEXT = 128
MAX_TOP_K = 1 << 24
MAX_TEMPERATURE = 1000.0
MAX_REPEAT_PENALTY = 1000.0
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


class SessionOpKind(enum.StrEnum):
    OPEN = "open"
    CLOSE = "close"
    ROLLBACK = "rollback"
    SAMPLE = "sample"
    SYNC = "sync"


class FaultCode(enum.StrEnum):
    """Why a peer refused or failed: the code of every Error reply (a handshake, a request, a
    plan) and of a StageFault (a step or op). One enum for both, since a stage's plan refusals
    and its faults share codes (MEMORY, INTERNAL). The values are the wire text: keep them.

    A code this version does not know (a newer peer's) decodes as UNKNOWN, not as a protocol
    error: the peer still refused, and its reason still reaches the user."""

    UNKNOWN = "unknown"
    # handshake (mesh.auth, Node._decide)
    PROTOCOL = "protocol"  # a frame that breaks the protocol (also on a request stream)
    BAD_HELLO = "bad-hello"
    SELF = "self"
    BAD_SIGNATURE = "bad-signature"
    INVITE = "invite"  # an invite that is unknown, used up, expired, or a roster that is full
    NOT_MEMBER = "not-member"
    # requests (transport, Node, layer_transfer)
    UNSUPPORTED = "unsupported"  # no handler for that request
    FAILED = "failed"  # the handler failed in a way it could tell (a MeshchatError, a read)
    REFUSED = "refused"  # layer seeding: not offered, not planned for the asker
    # plans, steps and session ops (inference.stage_service)
    BAD_PLAN = "plan"
    BUSY = "busy"  # installed for another head that has not let go
    NO_MODEL = "no-model"
    FINGERPRINT = "fingerprint"
    MEMORY = "memory"  # the plan's KV caches and weights exceed this node's free memory
    LOAD = "load"
    SEED = "seed"  # the node could not fetch its layers from the members (disk, sources)
    OVERLOAD = "overload"
    UNKNOWN_SESSION = "unknown-session"
    BAD_INPUT = "bad-input"
    STALE_PLAN = "stale-plan"
    NO_SLOT = "no-slot"
    OVERFLOW = "overflow"
    STAGE = "stage"
    LOST = "lost"
    INTERNAL = "internal"  # a bug on the peer: a handler or a stage raised unexpectedly


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(what)


def _finite_in(value: float, low: float, high: float, name: str) -> None:
    _require(
        math.isfinite(value) and low <= value <= high, f"{name} {value} not in [{low}, {high}]"
    )


@dataclass(frozen=True)
class PlanStage:
    """One stage of a plan: `node` runs layers [first, end)."""

    node: NodeId
    first: int
    end: int


@dataclass(frozen=True)
class Plan(Message):
    """Head → stage, request: run your layers of this plan (Ack), or refuse (Error, FaultCode).

    Bounds that need no model are checked here, at decode; the stage checks the rest against
    its own model (layer count, trained context, memory).
    """

    TYPE: ClassVar[MsgType] = MsgType.PLAN
    plan_id: str
    stages: tuple[PlanStage, ...]
    model: Fingerprint
    n_ctx: int
    max_sessions: int
    dtype: DType  # hidden states between stages
    flash_attn: bool  # changes numerics: every stage of a plan uses the same value

    def __post_init__(self) -> None:
        _require(0 < len(self.plan_id) <= MAX_PLAN_ID, "plan id length out of range")
        _require(0 < len(self.stages) <= MAX_PLAN_STAGES, "a plan needs 1 to 64 stages")
        _require(self.stages[0].first == 0, "a plan starts at layer 0")
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            _require(a.end == b.first, "plan stages are not contiguous")
        for s in self.stages:
            _require(
                0 <= s.first < s.end <= MAX_MODEL_LAYERS, f"bad layer range [{s.first},{s.end})"
            )
        _require(len({s.node for s in self.stages}) == len(self.stages), "a node twice in a plan")
        _require(1 <= self.n_ctx <= MAX_PLAN_CONTEXT, f"n_ctx {self.n_ctx} out of range")
        _require(1 <= self.max_sessions <= MAX_PLAN_SESSIONS, "max_sessions out of range")
        fp = self.model
        _require(len(fp.layers) == self.stages[-1].end, "fingerprint and plan disagree on layers")
        _require(
            all(len(d) <= MAX_DIGEST_TEXT for d in (fp.model, fp.config, fp.globals, *fp.layers)),
            "fingerprint digest too long",
        )

    def stage_of(self, node: NodeId) -> int | None:
        """The index of `node`'s stage, None if it has no part."""
        return next((i for i, s in enumerate(self.stages) if s.node == node), None)


@dataclass(frozen=True)
class Sampling:
    """A session's sampler settings (SAMPLE op); the last stage builds llama.cpp's chain."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int  # llama.cpp keeps this many tokens: a stage bounds it by its n_ctx
    seed: int | None = None

    def __post_init__(self) -> None:
        _finite_in(self.temperature, 0.0, MAX_TEMPERATURE, "temperature")
        _finite_in(self.top_p, 0.0, 1.0, "top_p")
        _finite_in(self.min_p, 0.0, 1.0, "min_p")
        _finite_in(self.repeat_penalty, 1e-6, MAX_REPEAT_PENALTY, "repeat_penalty")
        _require(0 <= self.top_k <= MAX_TOP_K, f"top_k {self.top_k} out of range")
        _require(0 <= self.repeat_last_n <= MAX_PLAN_CONTEXT, "repeat_last_n out of range")
        _require(self.seed is None or 0 <= self.seed <= U32, "seed out of range")


# The codec's typed values beyond plain JSON (the bodies above): NodeIDs as their text,
# enums as their value, records as objects, tuples as lists.
_SCHEMAS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}


def _as_float(value: int | float, name: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float (a 400-digit one)
        raise ProtocolError(f"field {name}: number out of range") from None


def _typed_to_json(value: Any) -> Any:
    if isinstance(value, NodeId):
        return str(value)
    if isinstance(value, list | tuple):
        return [_typed_to_json(v) for v in value]
    if isinstance(value, dict):
        return {_typed_to_json(k): _typed_to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _typed_to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _check_typed(value: Any, hint: Any, name: str) -> Any:
    """`_check` for NodeId, enums, tuple[X, ...] and nested frozen dataclasses (records)."""
    if hint is NodeId:
        return parse_node_id(value, f"field {name}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        base = str if issubclass(hint, str) else int
        if not isinstance(value, base) or isinstance(value, bool):
            raise ProtocolError(f"field {name}: expected a {hint.__name__}")
        try:
            return hint(value)
        except ValueError:
            if hint is FaultCode:  # a newer peer's code: see FaultCode
                return FaultCode.UNKNOWN
            raise ProtocolError(f"field {name}: unknown {hint.__name__} {value!r}") from None
    if typing.get_origin(hint) is tuple:
        item, ellipsis = typing.get_args(hint)
        assert ellipsis is Ellipsis, hint
        if not isinstance(value, list):
            raise ProtocolError(f"field {name}: expected a list")
        return tuple(_check(v, item, name) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _record(hint, value, name)
    raise TypeError(f"unsupported schema type {hint!r}")  # a bug in this module, not the peer


def _record(cls: type[T], value: Any, name: str) -> T:
    """A dataclass (a message body or a record inside one) built from checked JSON fields."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{name}: expected an object")
    values: dict[str, Any] = {}
    for key, inner, required in _schema(cls):
        if key in value:
            values[key] = _check(value[key], inner, f"{name}.{key}")
        elif required:
            raise ProtocolError(f"{name}: missing field {key}")
    return cls(**values)


def _schema(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, required) per field; cached: get_type_hints costs ~0.2 ms a call."""
    cached = _SCHEMAS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = _SCHEMAS[cls] = tuple(
            (f.name, hints[f.name], f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        )  # fmt: skip
    return cached


@dataclass(frozen=True)
class Load(Message):
    """Ask a node to load a layer range of a model (contents owned by the inference layer)."""

    TYPE: ClassVar[MsgType] = MsgType.LOAD
    plan_id: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Token(Message):
    """A sampled token id, last stage → head. `trace`: each stage's compute time (µs)."""

    TYPE: ClassVar[MsgType] = MsgType.TOKEN
    session: int
    position: int
    token: int
    trace: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Cancel(Message):
    """Head → stages: drop queued work of `session` sent before its op number `epoch`+1."""

    TYPE: ClassVar[MsgType] = MsgType.CANCEL
    session: int
    reason: str = ""
    epoch: int = 0


@dataclass(frozen=True)
class SessionOp(Message):
    """A session operation (open, close, rollback, sample...) travelling down the stage chain.

    It rides the same ordered streams as the activations, so every stage applies it in order
    with the session's work; the last stage answers the head with SessionDone.
    """

    TYPE: ClassVar[MsgType] = MsgType.SESSION_OP
    session: int
    seq: int
    op: SessionOpKind
    position: int = 0
    plan_id: str | None = None  # OPEN: the plan the session runs on
    sampling: Sampling | None = None  # SAMPLE: the sampler settings

    def __post_init__(self) -> None:
        _require(0 <= self.session <= U64 and 0 <= self.seq <= U64, "session op id out of range")
        _require(0 <= self.position <= U32, "session op position out of range")
        _require(
            (self.plan_id is not None) == (self.op is SessionOpKind.OPEN)
            and (self.sampling is not None) == (self.op is SessionOpKind.SAMPLE),
            f"session op {self.op} with the wrong body",
        )
        _require(self.plan_id is None or len(self.plan_id) <= MAX_PLAN_ID, "plan id too long")


@dataclass(frozen=True)
class SessionDone(Message):
    """Last stage → head: every stage applied SessionOp `seq`."""

    TYPE: ClassVar[MsgType] = MsgType.SESSION_DONE
    session: int
    seq: int


@dataclass(frozen=True)
class StageFault(Message):
    """Stage → head (and → a bad sender): a step or op of `session` failed on this stage."""

    TYPE: ClassVar[MsgType] = MsgType.STAGE_FAULT
    session: int
    code: FaultCode
    reason: str
    culprit: NodeId | None = None  # the peer that sent bad input, if that was it


@dataclass(frozen=True)
class CapsQuery(Message):
    """Request: what can you run? Reply: Ack whose body is the node's capabilities."""

    TYPE: ClassVar[MsgType] = MsgType.CAPS_QUERY
    model: str = ""  # fingerprint the asker runs ("" = any)


# --- layer seeding (meshchat.mesh.layer_transfer) ---------------------------------------------

MAX_LAYER_CHUNK = 1 << 20  # bytes of one LayerData reply
MAX_PART_NAME = 256  # a tensor name; GGUF names are at most 64 bytes


@dataclass(frozen=True)
class LayerFetch(Message):
    """Request: `length` bytes at `offset` of one part of model `model`'s file, for the planned
    layer range [first, end). `part` is "" for the GGUF header, else a tensor name of that range
    or a global tensor. Reply: LayerData, or Error (refused)."""

    TYPE: ClassVar[MsgType] = MsgType.LAYER_FETCH
    model: str
    first: int
    end: int
    part: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        _require(0 < len(self.model) <= MAX_DIGEST_TEXT, "model digest length out of range")
        _require(0 <= self.first < self.end <= MAX_MODEL_LAYERS, "bad layer range")
        _require(len(self.part) <= MAX_PART_NAME, "part name too long")
        _require(0 <= self.offset <= U64, "offset out of range")
        _require(1 <= self.length <= MAX_LAYER_CHUNK, "chunk length out of range")


LAYER_DATA_HEAD = struct.Struct("!QQQ")  # offset, size of the part, size of the source file


@dataclass(frozen=True)
class LayerData(Message):
    """Reply to LayerFetch: bytes at `offset` of a part that is `total` bytes long."""

    TYPE: ClassVar[MsgType] = MsgType.LAYER_DATA
    offset: int
    total: int
    file_size: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _require(len(self.data) <= MAX_LAYER_CHUNK, "layer chunk too long")
        _require(self.offset + len(self.data) <= self.total <= self.file_size <= U64,
                 "layer chunk outside its part")  # fmt: skip


def decode_layer_data(body: bytes | memoryview) -> LayerData:
    view = memoryview(body)
    if len(view) < LAYER_DATA_HEAD.size:
        raise ProtocolError("layer data header truncated")
    offset, total, file_size = LAYER_DATA_HEAD.unpack_from(view)
    return LayerData(offset, total, file_size, view[LAYER_DATA_HEAD.size :])


# --- tensors ----------------------------------------------------------------------------------


class DType(enum.IntEnum):
    F32 = 1
    F16 = 2

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.F32 else 2


TENSOR_HEAD = struct.Struct("!BBHQI")  # dtype, ndim, flags=0, session, position


@dataclass(frozen=True)
class Tensor(Message):
    """Activations for one session at one position; `data` is raw little-endian values."""

    TYPE: ClassVar[MsgType] = MsgType.TENSOR
    dtype: DType
    shape: tuple[int, ...]
    session: int
    position: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        check_tensor_shape(self.dtype, self.shape, len(self.data))


# session, position, epoch, n_tokens, width, dtype (0 = none), flags, n_trace
ACT_HEAD = struct.Struct("!QIIIIBBH")
ACT_WANT_TOKEN = 1
MAX_TRACE = 64


@dataclass(frozen=True)
class Activations(Message):
    """One step of a session down the stage chain: token ids and, past the first stage, their
    hidden states ([n_tokens, width] of `dtype`; `dtype` None for token ids alone).

    Binary: ACT_HEAD, then `trace` (u32 µs of compute per stage so far), the token ids (u32),
    then the raw little-endian values. `want_token`: the last stage samples and answers.
    """

    TYPE: ClassVar[MsgType] = MsgType.ACTIVATIONS
    session: int
    position: int
    epoch: int
    tokens: tuple[int, ...]
    dtype: DType | None = None
    width: int = 0
    data: bytes | memoryview = b""
    want_token: bool = False
    trace: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 1:
            raise ProtocolError("activations without tokens")
        if len(self.trace) > MAX_TRACE:
            raise ProtocolError("activation trace too long")
        if self.dtype is None:
            if self.width or len(self.data):
                raise ProtocolError("hidden data without a dtype")
        elif self.width < 1 or n * self.width * self.dtype.itemsize != len(self.data):
            raise ProtocolError(
                f"activations of {n} tokens x {self.width} do not match {len(self.data)} bytes"
            )


def encode_activations_head(a: Activations) -> bytes:
    """Everything of an Activations body but its hidden data."""
    flags = ACT_WANT_TOKEN if a.want_token else 0
    try:
        return (
            ACT_HEAD.pack(
                a.session, a.position, a.epoch, len(a.tokens), a.width,
                0 if a.dtype is None else int(a.dtype), flags, len(a.trace),
            )
            + struct.pack(f"!{len(a.trace)}I{len(a.tokens)}I", *a.trace, *a.tokens)
        )  # fmt: skip
    except struct.error as exc:
        raise ProtocolError(f"activations field out of range: {exc}") from None


def decode_activations(body: bytes | memoryview) -> Activations:
    view = memoryview(body)
    if len(view) < ACT_HEAD.size:
        raise ProtocolError("activations header truncated")
    session, position, epoch, n, width, dtype_raw, flags, n_trace = ACT_HEAD.unpack_from(view)
    if flags & ~ACT_WANT_TOKEN or n_trace > MAX_TRACE:
        raise ProtocolError("bad activations header")
    try:
        dtype = None if dtype_raw == 0 else DType(dtype_raw)
    except ValueError:
        raise ProtocolError(f"unknown activations dtype {dtype_raw}") from None
    end = ACT_HEAD.size + 4 * (n_trace + n)
    if len(view) < end:
        raise ProtocolError("activations token ids truncated")
    ints = struct.unpack_from(f"!{n_trace + n}I", view, ACT_HEAD.size)
    return Activations(
        session, position, epoch, ints[n_trace:], dtype, width, view[end:],
        bool(flags & ACT_WANT_TOKEN), ints[:n_trace],
    )  # fmt: skip


def check_tensor_shape(dtype: DType, shape: tuple[int, ...], nbytes: int) -> None:
    if not 1 <= len(shape) <= MAX_TENSOR_DIMS:
        raise ProtocolError(f"tensor must have 1..{MAX_TENSOR_DIMS} dims, got {len(shape)}")
    if any(d < 0 or d > 0xFFFFFFFF for d in shape):
        raise ProtocolError("tensor dimension out of range")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise ProtocolError(f"tensor shape {shape} does not match {nbytes} data bytes")


def encode_tensor_header(t: Tensor) -> bytes:
    return TENSOR_HEAD.pack(t.dtype, len(t.shape), 0, t.session, t.position) + struct.pack(
        f"!{len(t.shape)}I", *t.shape
    )


def decode_tensor(body: bytes | memoryview) -> Tensor:
    view = memoryview(body)
    if len(view) < TENSOR_HEAD.size:
        raise ProtocolError("tensor header truncated")
    dtype_raw, ndim, flags, session, position = TENSOR_HEAD.unpack_from(view)
    try:
        dtype = DType(dtype_raw)
    except ValueError:
        raise ProtocolError(f"unknown tensor dtype {dtype_raw}") from None
    if flags or not 1 <= ndim <= MAX_TENSOR_DIMS:
        raise ProtocolError("bad tensor header")
    end = TENSOR_HEAD.size + 4 * ndim
    if len(view) < end:
        raise ProtocolError("tensor shape truncated")
    shape = struct.unpack_from(f"!{ndim}I", view, TENSOR_HEAD.size)
    return Tensor(dtype, tuple(shape), session, position, view[end:])


# --- control message codec --------------------------------------------------------------------

_CONTROL: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Challenge, Auth, Welcome, Error, Ping, Pong, Status, Peers, Roster, Ack,
        Plan, Load, Token, Cancel, SessionOp, SessionDone, StageFault, CapsQuery, LayerFetch,
    )
}  # fmt: skip
_BULK = (MsgType.TENSOR, MsgType.ACTIVATIONS, MsgType.LAYER_DATA)
_MAX_BODY = {t: (MAX_TENSOR_BODY if t in _BULK else MAX_CONTROL_BODY) for t in MsgType}
_MAX_BODY[MsgType.LAYER_DATA] = LAYER_DATA_HEAD.size + MAX_LAYER_CHUNK  # refused unread beyond


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list) and value and isinstance(value[0], RosterRecord):
        return [r.to_json() for r in value]
    return _typed_to_json(value)


def _check(value: Any, hint: Any, name: str) -> Any:
    """Validate one decoded JSON value against a (simple) type hint; return the typed value."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], name)
    if hint is Any:
        return value
    if hint is bytes:
        if not isinstance(value, str):
            raise ProtocolError(f"field {name}: expected base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ProtocolError(f"field {name}: bad base64") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"field {name}: expected a boolean")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"field {name}: expected an integer")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"field {name}: expected a number")
        return _as_float(value, name)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"field {name}: expected text")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"field {name}: expected a list")
        (item,) = typing.get_args(hint)
        return [_check(v, item, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"field {name}: expected an object")
        key, item = typing.get_args(hint)
        if key is NodeId:
            if len(value) > MAX_NODE_KEYS:
                raise ProtocolError(f"field {name}: more than {MAX_NODE_KEYS} NodeIDs")
            return {
                parse_node_id(k, f"field {name}"): _check(v, item, name) for k, v in value.items()
            }
        return {k: _check(v, item, name) for k, v in value.items()}
    if hint is RosterRecord:
        return RosterRecord.from_json(value, name)
    return _check_typed(value, hint, name)


# A decode step's Token, as encode_body writes it: read without the generic JSON path (which
# costs ~35 µs, on every token's last hop). Anything else takes the generic path, which reads
# these bytes the same way (non-negative ints, < MAX_JSON_INT, no leading zeros).
_INT = rb"(?:0|[1-9][0-9]{0,19})"
_TOKEN_JSON = re.compile(
    rb'{"session":(%s),"position":(%s),"token":(%s),"trace":\[((?:%s,){0,%d}%s)?\]}'
    % (_INT, _INT, _INT, _INT, MAX_TRACE - 1, _INT)
)


def _encode_token(msg: Token) -> bytes | None:
    """encode_body's bytes for a Token of plain ints (about 15 µs less), else None."""
    ints = (msg.session, msg.position, msg.token, *msg.trace)
    if not all(type(v) is int for v in ints):
        return None
    trace = ",".join(map(str, msg.trace))
    return (
        f'{{"session":{msg.session},"position":{msg.position},"token":{msg.token},'
        f'"trace":[{trace}]}}'
    ).encode()


def _decode_token(body: bytes | memoryview) -> Token | None:
    match = _TOKEN_JSON.fullmatch(bytes(body))
    if match is None:
        return None
    session, position, token = (int(g) for g in match.group(1, 2, 3))
    trace = [int(v) for v in match.group(4).split(b",")] if match.group(4) else []
    if max(session, position, token, *trace) >= MAX_JSON_INT:
        return None  # the generic path says why
    return Token(session, position, token, trace)


def encode_body(msg: Message) -> bytes:
    if isinstance(msg, Tensor):
        return encode_tensor_header(msg) + bytes(msg.data)
    if isinstance(msg, Activations):
        return encode_activations_head(msg) + bytes(msg.data)
    if type(msg) is Token and (fast := _encode_token(msg)) is not None:
        return fast
    if isinstance(msg, LayerData):
        return LAYER_DATA_HEAD.pack(msg.offset, msg.total, msg.file_size) + bytes(msg.data)
    obj = {f.name: _to_json(getattr(msg, f.name)) for f in dataclasses.fields(msg)}  # type: ignore[arg-type]
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_body(mtype: int, body: bytes | memoryview) -> Message:
    """Decode one frame body; the one exception boundary: only ProtocolError escapes."""
    try:
        return _decode_body(mtype, body)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        # e.g. a message's own validation, or a bound we did not foresee: the peer's fault.
        raise ProtocolError(f"malformed {_type_name(mtype)} body: {exc}"[:300]) from None


def _type_name(mtype: int) -> str:
    try:
        return MsgType(mtype).name
    except ValueError:
        return str(mtype)


def _decode_body(mtype: int, body: bytes | memoryview) -> Message:
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}") from None
    if kind is MsgType.TENSOR:
        return decode_tensor(body)
    if kind is MsgType.ACTIVATIONS:
        return decode_activations(body)
    if kind is MsgType.TOKEN and (token := _decode_token(body)) is not None:
        return token
    if kind is MsgType.LAYER_DATA:
        return decode_layer_data(body)
    return _record(_CONTROL[kind], parse_json(bytes(body), kind.name), kind.name)


def _json_int(text: str) -> int:
    # Checked before int(): Python refuses > 4300 digits with a plain ValueError, and big
    # integers overflow float() later (a roster timestamp).
    if len(text) > MAX_JSON_NUMBER_TEXT:
        raise ProtocolError("integer literal too long")
    value = int(text)
    if not -MAX_JSON_INT < value < MAX_JSON_INT:
        raise ProtocolError("integer out of range")
    return value


def _json_float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_TEXT:
        raise ProtocolError("number literal too long")
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ProtocolError("number out of range")
    return value


def _json_constant(text: str) -> Any:
    raise ProtocolError(f"{text} is not allowed")


def parse_json(data: bytes, what: str) -> Any:
    """JSON from a peer: no NaN/Infinity, bounded numbers, depth and text lengths."""
    try:
        obj = json.loads(
            data, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError(f"{what}: body is not JSON") from None
    _check_json_shape(obj, what)
    return obj


def _check_json_shape(obj: Any, what: str) -> None:
    """Depth and text bounds, iteratively (a deep value must not recurse here either)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_JSON_TEXT:
                raise ProtocolError(f"{what}: text longer than {MAX_JSON_TEXT} characters")
        elif isinstance(value, list | dict):
            if depth > MAX_JSON_DEPTH:
                raise ProtocolError(f"{what}: nested deeper than {MAX_JSON_DEPTH}")
            if isinstance(value, dict):
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)


def encode_header(mtype: MsgType, length: int) -> bytes:
    if length > _MAX_BODY[mtype]:
        raise ValueError(f"{mtype.name} body of {length} bytes exceeds the frame limit")
    return HEADER.pack(WIRE_VERSION, mtype, 0, length)


def encode(msg: Message) -> bytes:
    """One complete frame for `msg`."""
    body = encode_body(msg)
    return encode_header(msg.TYPE, len(body)) + body


HANDSHAKE_FRAME = 4096  # bytes: HELLO (a few addresses), CHALLENGE, AUTH, ERROR
# WELCOME carries the roster; the dialer already pinned the sender's key (TLS), so more room.
WELCOME_FRAME = 64 * 1024
# Frame types (and their body limits) a control stream accepts before authentication.
LISTENER_PRE_AUTH: dict[MsgType, int] = {
    MsgType.HELLO: HANDSHAKE_FRAME,
    MsgType.AUTH: HANDSHAKE_FRAME,
}
DIALER_PRE_AUTH: dict[MsgType, int] = {
    MsgType.CHALLENGE: HANDSHAKE_FRAME,
    MsgType.ERROR: HANDSHAKE_FRAME,
    MsgType.WELCOME: WELCOME_FRAME,
}


def check_header(
    data: bytes | bytearray | memoryview,
    limit: int | None = None,
    allowed: dict[MsgType, int] | None = None,
) -> tuple[MsgType, int]:
    """Parse and check a frame header; the body is not looked at.

    `allowed`: the only frame types accepted, each with its own body limit (before auth)."""
    version, mtype, flags, length = HEADER.unpack_from(data)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version}")
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}") from None
    if flags:
        raise ProtocolError("reserved header flags set")
    cap = _MAX_BODY[kind] if limit is None else min(limit, _MAX_BODY[kind])
    if allowed is not None:
        if kind not in allowed:
            raise ProtocolError(f"{kind.name} frame before authentication")
        cap = min(cap, allowed[kind])
    if length > cap:
        raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds limit {cap}")
    return kind, length


class FrameReader:
    """Incremental frame parser for one stream.

    It never holds more than one header plus one body; `limit` caps a body below the
    per-type maximum, and `allowed` (settable: it is lifted once a peer is authenticated)
    restricts the frame types. `buffered` tells the owner how much this stream holds right now.
    """

    def __init__(self, limit: int | None = None, allowed: dict[MsgType, int] | None = None) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.allowed = allowed
        self._want: tuple[MsgType, int] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        return list(self.frames())

    def push(self, data: bytes) -> None:
        """Buffer `data`; take the frames out with `frames()`."""
        self._buf += data

    def frames(self) -> Iterator[Message]:
        """The complete frames buffered so far. Each header is checked against `allowed` as it
        is reached, so the caller may change `allowed` between frames."""
        while True:
            if self._want is None:
                if len(self._buf) < HEADER_SIZE:
                    return
                self._want = check_header(self._buf, self._limit, self.allowed)
                del self._buf[:HEADER_SIZE]
            kind, length = self._want
            if len(self._buf) < length:
                return
            body = bytes(self._buf[:length])
            del self._buf[:length]
            self._want = None
            yield decode_body(kind, body)

    @property
    def at_boundary(self) -> bool:
        """True if the stream ended cleanly between frames."""
        return self._want is None and not self._buf
