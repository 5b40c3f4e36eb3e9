"""Layers from the LAN: a member fetches exactly its planned layer range from peers, once.

Sender (`LayerServer`): answers LayerFetch requests with LayerData chunks (at most
wire.MAX_LAYER_CHUNK) read from a model file it offers. It refuses a model it does not offer, a
range that is not a planned stage of the asker (`SeedPermits`), a part outside that range, and
bytes outside the part. Each chunk rides its own request stream, never the ordered control
stream the activations use, and the fetcher keeps few in flight (`WINDOW` x `CHUNK`), so a
transfer queues at most 1 MiB ahead of a decode step.

Fetcher (`LayerFetcher`): the transfer is split into units: the GGUF header, the global tensors,
and one unit per layer. The header comes first (from one source) and is checked against the
fingerprint's `config` digest; it gives the layout of a sparse mirror of the sender's file,
into which each unit's tensors are written at their own offsets. Tensors are asked for by
name, so sources whose files lay them out differently all work. Units are spread over every
source at once; each finished unit is hashed against its fingerprint digest before it counts.
A source that sends wrong bytes is named in one line, not asked again for this file, and its
unit is fetched again from another. A source that disconnects hands its unit back, and the
bytes already written stay. Progress is saved (after fdatasync) in a resume record, so a
restarted fetch continues where it stopped. When every unit checks out, the slice is written
from the mirror (atomically) and the mirror is removed. A full disk removes the partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node, Refused
from meshchat.mesh.transport import ConnectionLost
from meshchat.model.fingerprint import Fingerprint, config_digest, part_digest
from meshchat.model.gguf_file import GGUFHeader, ModelFileError, TensorEntry, read_header
from meshchat.model.seeded import SeedStore, remove_quietly
from meshchat.model.slices import LayerRange, write_slice
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

# 256 KiB x 4 in flight: 16-22 MB/s with decode hop p99 18-22 ms during a transfer, against
# 14-15 MB/s and 20-39 ms for 1 MiB x 4 (scripts/bench_seed.py, a loaded 2-core VM; idle p99 6-12).
# Later, on the current transport (load 2-3): 47-69 MB/s, hop p99 3-8 ms during a transfer, and
# 8 in flight no better within the noise (44-69 MB/s); the fetcher waits in epoll most of a run.
CHUNK = 256 << 10  # bytes per request (at most wire.MAX_LAYER_CHUNK)
WINDOW = 4  # requests in flight per source: 1 MiB at most queued ahead of activations
MAX_PERMITS = 256  # planned (node, model, range) grants a sender remembers
MAX_SOURCE_FILE = 1 << 44  # 16 TiB: a mirror's (sparse) size is bounded by this
SAVE_EVERY = 1.0  # seconds between resume records ...
SAVE_BYTES = 8 << 20  # ... or bytes: a restart fetches again at most this much per source
CORRUPT_ENV = "MESHCHAT_TEST_SEED_CORRUPT"  # test hook: a sender spoils parts named thus (prefix)

HEADER_PART = ""


class SeedError(MeshchatError):
    """A transfer that cannot finish (no source left, full disk, over budget)."""


# -- sender ----------------------------------------------------------------------------------


class SeedPermits:
    """Who may fetch which layer range: the stages of the plans this node knows of."""

    def __init__(self) -> None:
        self._grants: dict[tuple[NodeId, str, int, int], None] = {}

    def allow(self, node: NodeId, model: str, first: int, end: int) -> None:
        key = (node, model, first, end)
        self._grants.pop(key, None)
        self._grants[key] = None
        while len(self._grants) > MAX_PERMITS:
            del self._grants[next(iter(self._grants))]

    def allow_plan(self, plan: wire.Plan) -> None:
        for stage in plan.stages:
            self.allow(stage.node, plan.model.model, stage.first, stage.end)

    def allows(self, node: NodeId, model: str, first: int, end: int) -> bool:
        return (node, model, first, end) in self._grants


@dataclass(frozen=True)
class _Offered:
    fingerprint: Fingerprint
    header: GGUFHeader
    by_name: dict[str, TensorEntry]


class LayerServer:
    """Serves layer ranges of the model files this node offers. `start()` installs the handler."""

    def __init__(self, node: Node, permits: SeedPermits) -> None:
        self.node = node
        self.permits = permits
        self._files: dict[str, _Offered] = {}
        self.corrupt = os.environ.get(CORRUPT_ENV, "")

    def start(self) -> None:
        self.node.on(wire.LayerFetch, self._on_fetch)

    def offer(self, fingerprint: Fingerprint, header: GGUFHeader) -> None:
        """Serve `header`'s file (the whole model, `fingerprint`) to planned members."""
        by_name = {t.name: t for t in header.tensors}
        self._files[fingerprint.model] = _Offered(fingerprint, header, by_name)

    def offers(self) -> list[dict[str, Any]]:
        """For the capabilities: [{"model": digest, "first": 0, "end": n}] per file offered."""
        return [
            {"model": model, "first": 0, "end": len(f.fingerprint.layers)}
            for model, f in self._files.items()
        ]

    async def _on_fetch(self, peer: NodeId, msg: wire.LayerFetch) -> wire.Message:
        offered = self._files.get(msg.model)
        if offered is None:
            return wire.Error(
                wire.FaultCode.REFUSED, f"node {self.node.node_id.short} does not offer that model"
            )
        if not self.permits.allows(peer, msg.model, msg.first, msg.end):
            return wire.Error(
                wire.FaultCode.REFUSED, f"layers [{msg.first},{msg.end}) are not planned for you"
            )
        header = offered.header
        if msg.part == HEADER_PART:
            start, size = 0, header.data_offset
        else:
            tensor = offered.by_name.get(msg.part)
            layer = None if tensor is None else tensor.layer
            if tensor is None or (layer is not None and not msg.first <= layer < msg.end):
                return wire.Error(
                    wire.FaultCode.REFUSED, f"part {msg.part[:64]!r} is not in the range"
                )
            start, size = tensor.offset, tensor.n_bytes
        if msg.offset >= size:
            return wire.Error(wire.FaultCode.REFUSED, "chunk beyond the end of its part")
        length = min(msg.length, size - msg.offset)  # the asker learns the size from the reply
        try:
            # Off the event loop: a cold read may wait on the disk while activations pass.
            data = await asyncio.to_thread(_read_at, header.path, start + msg.offset, length)
        except OSError as exc:
            return wire.Error(wire.FaultCode.FAILED, f"cannot read the model file: {exc.strerror}")
        if len(data) != length:
            return wire.Error(wire.FaultCode.FAILED, "the model file shrank")
        if self.corrupt and msg.part.startswith(self.corrupt):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return wire.LayerData(msg.offset, size, header.file_size, data)


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        return os.pread(handle.fileno(), length, offset)


# -- fetcher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A piece verified on its own: the global tensors (layer None) or one layer."""

    layer: int | None
    tensors: tuple[TensorEntry, ...]  # in the mirror's layout

    @property
    def key(self) -> str:
        return "globals" if self.layer is None else f"layer:{self.layer}"

    @property
    def label(self) -> str:
        return "the global tensors" if self.layer is None else f"layer {self.layer}"

    @property
    def size(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


@dataclass
class Progress:
    """What a transfer has done so far (for the status file and headless output)."""

    model: str
    layers: LayerRange
    total: int = 0
    done: int = 0
    fetched: int = 0  # bytes received in this run (resumed bytes are in `done`, not here)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the run stopped (its rate stays what it was)
    sources: int = 0

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Bytes per second received in this run."""
        return self.fetched / max(self.elapsed_s, 1e-6)

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 and self.total else None

    def to_json(self) -> dict[str, Any]:
        eta = self.eta_s
        return {
            "model": self.model,
            "layers": [self.layers.first, self.layers.end],
            "bytes": self.done,
            "total": self.total,
            "rate_mb_s": round(self.rate / 1e6, 2),
            "eta_s": None if eta is None else round(eta, 1),
            "sources": self.sources,
            "elapsed_s": round(self.elapsed_s, 1),
        }


MAX_SHOWN_LAYER = 1 << 20  # a peer's report naming layers past this is junk, not shown


@dataclass(frozen=True)
class SeedingReport:
    """A member's transfer as its status says (Progress.to_json), for its row in the peers
    table. Built from peer input: `from_json` gives None for anything malformed."""

    first: int
    end: int
    done: int
    total: int
    rate_mb_s: float
    eta_s: float | None

    @classmethod
    def from_json(cls, body: object) -> SeedingReport | None:
        if not isinstance(body, dict):
            return None
        layers, done, total = body.get("layers"), body.get("bytes"), body.get("total")
        rate, eta = body.get("rate_mb_s"), body.get("eta_s")
        ints = (done, total, *(layers if isinstance(layers, list) else ()))
        if not (
            isinstance(layers, list)
            and len(layers) == 2
            and all(type(v) is int for v in ints)
            and isinstance(rate, int | float)
            and (eta is None or isinstance(eta, int | float))
        ):
            return None
        first, end = layers
        assert isinstance(done, int) and isinstance(total, int)
        if not (0 <= first < end <= MAX_SHOWN_LAYER and 0 <= done <= total):
            return None
        if not (0 <= rate < 1e9 and (eta is None or 0 <= eta < 1e9)):  # also rejects NaN
            return None
        return cls(first, end, done, total, float(rate), None if eta is None else float(eta))

    def cell(self) -> str:
        """ "getting [0,15) 45% 21 MB/s 0:12 left" while it runs, "got [0,15)" once done."""
        layers = f"[{self.first},{self.end})"
        if self.total and self.done >= self.total:
            return f"got {layers}"
        pct = 100 * self.done // self.total if self.total else 0
        left = ""
        if self.eta_s is not None:
            minutes, seconds = divmod(round(self.eta_s), 60)
            left = f" {minutes}:{seconds:02d} left"
        return f"getting {layers} {pct}% {self.rate_mb_s:.0f} MB/s{left}"


class _BadSource(Exception):
    """A source sent bytes that do not fit what was asked or what the fingerprint says."""


class LayerFetcher:
    """Fetches one layer range of one model into the seed store (see the module doc)."""

    def __init__(
        self,
        node: Node,
        fingerprint: Fingerprint,
        layers: LayerRange,
        store: SeedStore,
        sources: list[NodeId],
        on_progress: Callable[[Progress], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if layers.end > len(fingerprint.layers):
            raise SeedError(f"layers {layers} are beyond the model's {len(fingerprint.layers)}")
        self.node = node
        self.fp = fingerprint
        self.layers = layers
        self.store = store
        self.sources = list(dict.fromkeys(sources))
        self.banned: set[NodeId] = set()
        self.progress = Progress(fingerprint.model, layers)
        self._on_progress = on_progress or (lambda _p: None)
        self._warn = warn or (lambda line: log.warning("%s", line))
        self.mirror = store.partial_for(fingerprint.model, layers)
        self._state_path = self.mirror.with_suffix(".state.json")
        self._state: dict[str, Any] = {}
        self._fd = -1
        self._last_save = 0.0
        self._unsaved = 0
        self._saving = False
        self._unit_source: dict[str, NodeId] = {}  # unit → the member that sent it

    # -- entry point

    async def run(self) -> Path:
        """The seeded slice's path once it is complete and verified. SeedError otherwise."""
        found = self.store.find(self.fp.model, self.layers)
        if found is not None:
            return found.path
        try:
            return await self._run()
        except OSError as exc:
            self._discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SeedError(
                    f"no space left on the disk at {self.store.directory} for layers "
                    f"{self.layers}: transfer stopped, partial file removed"
                ) from None
            raise SeedError(f"cannot write seeded layers: {exc.strerror or exc}") from None
        except SeedError:
            if not self._state.get("header"):
                self._discard()  # nothing worth resuming
            raise
        except MeshchatError as exc:  # over budget, a bad mirror, or writing the slice failed
            self._discard()
            raise SeedError(f"{exc}; partial file removed") from None
        finally:
            self._close()
            self.progress.ended = time.monotonic()

    async def _run(self) -> Path:
        self.mirror.parent.mkdir(parents=True, exist_ok=True)
        self._load_state()
        header = await self._header()
        units = self._units(header)
        pending = [u for u in units if u.key not in self._state["verified"]]
        self.progress.total = sum(u.size for u in units)
        self.progress.done = sum(self._state["bytes"].get(u.key, 0) for u in units)
        if pending and not any(self._state["bytes"].values()):
            # Mirror data plus the slice written from it: the room needed from here on.
            self.store.check_room(2 * self.progress.total)
        self._on_progress(self.progress)
        while pending:
            live = [s for s in self.sources if s not in self.banned]
            if not live:
                raise SeedError(
                    f"no member can send layers {self.layers} of model {self.fp.short} "
                    f"({len(self.banned)} sent wrong bytes or left)"
                )
            self.progress.sources = len(live)
            queue = list(pending)
            await asyncio.gather(*(self._worker(s, queue, header) for s in live))
            pending = [u for u in units if u.key not in self._state["verified"]]
        self._save(force=True)
        return self._finish(header)

    # -- header

    async def _header(self) -> GGUFHeader:
        if self._state.get("header"):
            with contextlib.suppress(ModelFileError):
                return self._check_header()
            self._discard()
            self._load_state()
        for source in self.sources:
            if source in self.banned:
                continue
            try:
                await self._fetch_header(source)
                header = self._check_header()
            except (ConnectionLost, Refused, TimeoutError) as exc:
                log.info("seeding: %s cannot send the header: %s", source.short, exc)
                continue
            except (_BadSource, ModelFileError) as exc:
                self._blame(source, f"a header that does not match the model ({exc})")
                self._discard()
                self._load_state()
                continue
            self._state["header"] = str(source)
            self._save(force=True)
            return header
        raise SeedError(f"no member sent the header of model {self.fp.short}")

    async def _fetch_header(self, source: NodeId) -> None:
        first = await self._request(source, HEADER_PART, 0, None)
        if not 0 < first.total <= first.file_size <= MAX_SOURCE_FILE:
            raise _BadSource("an absurd header or file size")
        self._open()
        os.ftruncate(self._fd, first.file_size)  # sparse: only written bytes take disk
        os.pwrite(self._fd, first.data, 0)
        offset = len(first.data)
        while offset < first.total:
            reply = await self._request(source, HEADER_PART, offset, first.total)
            os.pwrite(self._fd, reply.data, offset)
            offset += len(reply.data)

    def _check_header(self) -> GGUFHeader:
        header = read_header(self.mirror)
        n_layers = int(header.get(f"{header.arch}.block_count", 0))
        if n_layers != len(self.fp.layers):
            raise ModelFileError(f"{n_layers} layers, the fingerprint has {len(self.fp.layers)}")
        if config_digest(header) != self.fp.config:
            raise ModelFileError("its configuration digest differs from the fingerprint")
        return header

    def _units(self, header: GGUFHeader) -> list[Unit]:
        by_layer: dict[int | None, list[TensorEntry]] = {}
        for tensor in header.tensors:
            by_layer.setdefault(tensor.layer, []).append(tensor)
        keys: list[int | None] = [None, *range(self.layers.first, self.layers.end)]
        return [Unit(k, tuple(by_layer.get(k, []))) for k in keys]

    # -- units

    async def _worker(self, source: NodeId, queue: list[Unit], header: GGUFHeader) -> None:
        while queue and source not in self.banned:
            unit = queue.pop(0)
            try:
                await self._fetch_unit(source, unit)
                await self._verify(header, unit)
            except Refused as exc:  # it does not offer the file (or not to us): ask others
                log.info("seeding: %s", exc)
                self.banned.add(source)
                return
            except (ConnectionLost, TimeoutError) as exc:
                self._warn(f"seeding: member {source.short} stopped sending ({exc}); trying others")
                self.banned.add(source)  # gone for this run; a restart may ask it again
                return
            except _BadSource as exc:
                self._blame(source, str(exc))
                return

    async def _fetch_unit(self, source: NodeId, unit: Unit) -> None:
        """Fetch `unit` from where it stopped, WINDOW requests in flight at a time."""
        self._unit_source[unit.key] = source
        done = self._state["bytes"].get(unit.key, 0)
        chunks: list[tuple[TensorEntry, int, int]] = []  # (tensor, offset in it, length)
        skipped = 0
        for tensor in unit.tensors:
            for offset in range(0, tensor.n_bytes, CHUNK):
                length = min(CHUNK, tensor.n_bytes - offset)
                if skipped + length <= done:
                    skipped += length
                    continue
                chunks.append((tensor, offset, length))
        # A sliding window: WINDOW requests in flight; bytes count for the resume record only
        # once every chunk before them has arrived (a restart continues from that prefix).
        arrived = [False] * len(chunks)
        prefix, start = 0, done
        todo = iter(range(len(chunks)))

        async def lane() -> None:
            nonlocal prefix, done
            for i in todo:
                tensor, offset, length = chunks[i]
                reply = await self._request(source, tensor.name, offset, tensor.n_bytes, length)
                os.pwrite(self._fd, reply.data, tensor.offset + offset)
                arrived[i] = True
                self.progress.done += length
                self.progress.fetched += length
                self._unsaved += length
                while prefix < len(chunks) and arrived[prefix]:
                    done += chunks[prefix][2]
                    prefix += 1
                self._state["bytes"][unit.key] = done
                await self._save_soon()
                self._on_progress(self.progress)

        lanes = [asyncio.ensure_future(lane()) for _ in range(min(WINDOW, len(chunks)))]
        try:
            for finished in asyncio.as_completed(lanes):
                await finished  # the first failure stops the others (finally)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            # Bytes past the prefix are on disk but not in the record: count what it says.
            got = sum(c[2] for c, ok in zip(chunks, arrived, strict=True) if ok)
            self.progress.done -= got - (done - start)

    async def _verify(self, header: GGUFHeader, unit: Unit) -> None:
        want = self.fp.globals if unit.layer is None else self.fp.layers[unit.layer]
        # Off the event loop: hashing a 250 MB layer takes ~0.5 s.
        if await asyncio.to_thread(part_digest, header, unit.layer) != want:
            self.progress.done -= self._state["bytes"].pop(unit.key, 0)
            self._save(force=True)
            raise _BadSource(f"bytes for {unit.label} that do not match the fingerprint")
        self._state["verified"].append(unit.key)
        self._save(force=True)

    async def _request(
        self, source: NodeId, part: str, offset: int, total: int | None, length: int = CHUNK
    ) -> wire.LayerData:
        if total is not None:
            length = min(length, total - offset)
        msg = wire.LayerFetch(
            self.fp.model, self.layers.first, self.layers.end, part, offset, length
        )
        reply = await self.node.request(source, msg, timeout=TIMEOUTS.request_s)
        if not isinstance(reply, wire.LayerData):
            raise _BadSource(f"a {reply.TYPE.name} reply to a layer request")
        if reply.offset != offset or (total is not None and reply.total != total):
            raise _BadSource("a chunk from the wrong place")
        if (total is not None and len(reply.data) != length) or not reply.data:
            raise _BadSource("a chunk of the wrong length")
        return reply

    def _blame(self, source: NodeId, what: str) -> None:
        self.banned.add(source)
        self._warn(
            f"seeding: member {source} sent {what}; it is not used again for model "
            f"{self.fp.short}, fetching from another member"
        )

    # -- finishing

    def _finish(self, header: GGUFHeader) -> Path:
        dest = self.store.path_for(self.fp.model, self.layers)
        write_slice(header, self.layers, self.fp.model, dest)
        origin = set(self._unit_source.values())
        with contextlib.suppress(MeshchatError, TypeError):  # a state file edited by hand
            origin.add(NodeId.parse(self._state.get("header", "")))
        self.store.record(dest, self.fp, self.layers, list(origin))
        self._close()
        self._discard()
        return dest

    # -- files

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.mirror, os.O_RDWR | os.O_CREAT, 0o644)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _discard(self) -> None:
        self._close()
        remove_quietly(self.mirror, self._state_path)

    def _load_state(self) -> None:
        fresh = {"model": self.fp.model, "header": "", "bytes": {}, "verified": []}
        try:
            state = json.loads(self._state_path.read_text())
            ok = (
                state.get("model") == self.fp.model
                and isinstance(state.get("bytes"), dict)
                and isinstance(state.get("verified"), list)
                and self.mirror.exists()
            )
        except (OSError, ValueError):
            ok = False
        self._state = state if ok else fresh
        if not ok:
            remove_quietly(self.mirror)
        self._open()

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < SAVE_EVERY and self._unsaved < SAVE_BYTES:
            return
        self._last_save, self._unsaved = now, 0
        self._write_record(self._fd, json.dumps(self._state))

    async def _save_soon(self) -> None:
        """`_save` off the event loop: an fdatasync of 8 MiB can take tens of ms on a busy
        disk, and activations for a running plan may be passing through this loop."""
        now = time.monotonic()
        if self._saving or (now - self._last_save < SAVE_EVERY and self._unsaved < SAVE_BYTES):
            return
        self._saving = True
        self._last_save, self._unsaved = now, 0
        # Its own fd: a cancelled fetch closes ours while the thread may still sync.
        fd = os.dup(self._fd)
        try:
            await asyncio.to_thread(self._write_record, fd, json.dumps(self._state), True)
        finally:
            self._saving = False

    def _write_record(self, fd: int, record: str, close: bool = False) -> None:
        try:
            os.fdatasync(fd)  # the record never claims bytes the disk does not hold
            atomic_write_text(self._state_path, record)
        finally:
            if close:
                os.close(fd)


# -- one node's seeding state ----------------------------------------------------------------


class Seeding:
    """A node's side of seeding: the files it serves, who may fetch, the transfer running."""

    def __init__(self, node: Node) -> None:
        self.permits = SeedPermits()
        self.server = LayerServer(node, self.permits)
        self.server.start()
        self.progress: Progress | None = None  # the transfer running (or last run) here


_SEEDING: weakref.WeakKeyDictionary[Node, Seeding] = weakref.WeakKeyDictionary()


def seeding_for(node: Node) -> Seeding:
    """The node's seeding state, made (and its LayerFetch handler installed) on first use."""
    seeding = _SEEDING.get(node)
    if seeding is None:
        seeding = _SEEDING[node] = Seeding(node)
    return seeding


def seeding_cell(node: Node) -> str:
    """This node's own transfer as the peers table shows it ("" when there is none)."""
    report = SeedingReport.from_json(seeding_progress(node))
    return report.cell() if report else ""


def seeding_progress(node: Node) -> dict[str, Any] | None:
    """The node's transfer in progress or last done, for the status file (None: none yet)."""
    seeding = _SEEDING.get(node)
    return None if seeding is None or seeding.progress is None else seeding.progress.to_json()
