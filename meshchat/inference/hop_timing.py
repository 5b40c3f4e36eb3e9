"""Where a mesh hop's time goes: timestamps on the real activation path of decode steps.

Off unless enabled (`enable(dir)`, or MESHCHAT_HOP_TRACE=DIR in a worker's environment): then
every process of the mesh appends one line per mark to DIR/hops-PID.txt, written right after
it sends a step on (while the next stage computes, off the token's path), and
`per_hop_summary(load(DIR))` joins them. All processes must share one clock: this is for
nodes on one machine (loopback), where CLOCK_MONOTONIC (`time.perf_counter`) is system-wide.

A decode token visits the head (order 0), then each remote stage (order = `stage_order` of its
first layer), then the head again (order END). Marks, in path order:
  START     head: `forward` of the step begins
  RECEIVED  the datagram that completed the frame reached Python (transport)
  ARRIVED   aioquic decrypted it and the frame decoded into a message (its arrival handler)
  DEQUEUED  the stage's worker took the step off its queue
  COMPUTE / COMPUTED   the stage's llama.cpp call (head: its own stage) starts / ends
  FRAMED    the next message's frame bytes are built (hidden → bytes, header, join)
  SENT      aioquic (or the side path, mesh/sidepath.py) sealed it: its last datagram goes
            to the kernel
  END       head: the step's future resolved and `forward` has the token

Per hop (a decode token makes one hop per remote stage plus the one back to the head):
  encode = COMPUTED → FRAMED, send = FRAMED → SENT, wire = SENT → next RECEIVED (kernel and
  the receiver's wake-up), receive = RECEIVED → ARRIVED, queue = ARRIVED → DEQUEUED,
  decode = DEQUEUED → COMPUTE, head = START → COMPUTE and ARRIVED → END at the head.
"Per-hop overhead" = (END - START - all compute) / hops (issue 13); the parts sum to it.
"""

from __future__ import annotations

import atexit
import enum
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.mesh.transport import Connection

ENV = "MESHCHAT_HOP_TRACE"
END = 1 << 30  # the order of the head's second visit (the returning token)
MAX_MARKS = 64  # marks one process holds for one token before it writes them
MAX_LINES = 1_000_000  # marks one process writes in all (about 40 MB): peers drive the count


class Mark(enum.IntEnum):
    START = 0
    RECEIVED = 1
    ARRIVED = 2
    DEQUEUED = 3
    COMPUTE = 4
    COMPUTED = 5
    FRAMED = 6
    SENT = 7
    END = 8


@dataclass(frozen=True)
class Event:
    session: int
    position: int
    order: int  # which visit of the token: 0 head, stage_order(first layer), END head again
    mark: Mark
    t: float  # seconds, time.perf_counter()


class Recorder:
    """One process's marks, appended to its own file (one write per token)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"hops-{os.getpid()}.txt"
        self._file: TextIO = self.path.open("a", encoding="ascii")
        # Formatted only when written, off the token's path (a float's repr costs there).
        self._marks: list[tuple[int, int, int, Mark, float]] = []
        self._written = 0

    def mark(self, session: int, position: int, order: int, mark: Mark, t: float = 0.0) -> None:
        if len(self._marks) < MAX_MARKS and self._written < MAX_LINES:
            self._marks.append((session, position, order, mark, t or time.perf_counter()))

    def arrived(self, node: Node, peer: NodeId, session: int, position: int, order: int) -> None:
        """RECEIVED and ARRIVED of a message from `peer` (in its arrival handler)."""
        conn = _conn(node, peer)
        if conn is not None:
            self.mark(session, position, order, Mark.RECEIVED, conn.last_heard)
        self.mark(session, position, order, Mark.ARRIVED)

    def sent(self, node: Node, to: NodeId, session: int, position: int, order: int) -> None:
        """FRAMED and SENT of the message just sent to `to`, then write this token's marks."""
        conn = _conn(node, to)
        if conn is not None:
            self.mark(session, position, order, Mark.FRAMED, conn.last_framed)
            self.mark(session, position, order, Mark.SENT, conn.last_sent)
        self.flush()

    def flush(self) -> None:
        """Write the marks taken so far (call it when the token has left this process)."""
        if self._marks:
            lines = (f"{s} {p} {o} {int(m)} {t!r}\n" for s, p, o, m, t in self._marks)
            self._file.write("".join(lines))
            self._file.flush()
            self._written += len(self._marks)
            self._marks.clear()

    def close(self) -> None:
        self.flush()
        self._file.close()


RECORDER: Recorder | None = None


def stage_order(first_layer: int) -> int:
    """A remote stage's visit order: after the head's (0) even when it starts at layer 0."""
    return first_layer + 1


def _conn(node: Node, peer: NodeId) -> Connection | None:
    state = node.peer(peer)
    return None if state is None else state.conn


def enable(directory: Path) -> Recorder:
    """Start recording this process's marks into `directory` (idempotent)."""
    global RECORDER
    if RECORDER is None:
        RECORDER = Recorder(directory)
        atexit.register(RECORDER.close)
    return RECORDER


def enable_from_env() -> None:
    if directory := os.environ.get(ENV):
        enable(Path(directory))


def load(directory: Path) -> list[Event]:
    """Every mark every process wrote into `directory`; torn or foreign lines are skipped."""
    if RECORDER is not None:
        RECORDER.flush()  # this process's own marks since its last send
    events = []
    for path in sorted(directory.glob("hops-*.txt")):
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            parts = line.split()
            try:
                session, position, order, mark = (int(p) for p in parts[:4])
                events.append(Event(session, position, order, Mark(mark), float(parts[4])))
            except (ValueError, IndexError):
                continue
    return events


@dataclass(frozen=True)
class TokenHops:
    """One decode token's time, split (seconds, summed over its hops)."""

    hops: int
    wall: float
    compute: float
    parts: dict[str, float]

    @property
    def overhead_per_hop(self) -> float:
        return (self.wall - self.compute) / self.hops


PARTS = ("encode", "send", "wire", "receive", "queue", "decode", "head")


def _span(visit: dict[Mark, float], a: Mark, b: Mark) -> float | None:
    if a in visit and b in visit:
        return visit[b] - visit[a]
    return None


def split_token(visits: dict[int, dict[Mark, float]]) -> TokenHops | None:
    """One token's marks by visit order → its split; None if any mark of its path is missing."""
    if 0 not in visits or END not in visits or len(visits) < 3:
        return None
    head, back = visits[0], visits[END]
    stages = [visits[o] for o in sorted(visits) if o not in (0, END)]
    need_stage = (Mark.RECEIVED, Mark.ARRIVED, Mark.DEQUEUED, Mark.COMPUTE, Mark.COMPUTED,
                  Mark.FRAMED, Mark.SENT)  # fmt: skip
    if not all(m in head for m in (Mark.START, Mark.COMPUTE, Mark.COMPUTED, Mark.FRAMED,
                                   Mark.SENT)):  # fmt: skip
        return None
    if not all(m in back for m in (Mark.RECEIVED, Mark.ARRIVED, Mark.END)):
        return None
    if not all(m in s for s in stages for m in need_stage):
        return None
    parts = dict.fromkeys(PARTS, 0.0)
    path = [head, *stages]
    compute = 0.0
    for i, sender in enumerate(path):
        receiver = stages[i] if i < len(stages) else back
        compute += sender[Mark.COMPUTED] - sender[Mark.COMPUTE]
        parts["encode"] += sender[Mark.FRAMED] - sender[Mark.COMPUTED]
        parts["send"] += sender[Mark.SENT] - sender[Mark.FRAMED]
        parts["wire"] += receiver[Mark.RECEIVED] - sender[Mark.SENT]
        parts["receive"] += receiver[Mark.ARRIVED] - receiver[Mark.RECEIVED]
        if receiver is not back:
            parts["queue"] += receiver[Mark.DEQUEUED] - receiver[Mark.ARRIVED]
            parts["decode"] += receiver[Mark.COMPUTE] - receiver[Mark.DEQUEUED]
    parts["head"] = (head[Mark.COMPUTE] - head[Mark.START]) + (back[Mark.END] - back[Mark.ARRIVED])
    return TokenHops(len(stages) + 1, back[Mark.END] - head[Mark.START], compute, parts)


def tokens(events: Iterable[Event]) -> list[TokenHops]:
    """Every complete decode token in `events` (a token is marked once per visit)."""
    by_token: dict[tuple[int, int], dict[int, dict[Mark, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for e in events:
        by_token[(e.session, e.position)][e.order][e.mark] = e.t
    done = (split_token(visits) for visits in by_token.values())
    return [t for t in done if t is not None]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def per_hop_summary(events: Iterable[Event]) -> dict[str, dict[str, float | int]]:
    """Per route length ("2 hops", "3 hops"...): per-hop overhead p50/p99 (ms) and the
    median of each part per hop (ms); the parts' medians add up to about the p50."""
    groups: dict[int, list[TokenHops]] = defaultdict(list)
    for token in tokens(events):
        groups[token.hops].append(token)
    summary: dict[str, dict[str, float | int]] = {}
    for hops, group in sorted(groups.items()):
        overhead = [t.overhead_per_hop * 1000 for t in group]
        row: dict[str, float | int] = {
            "tokens": len(group),
            "p50_ms": round(statistics.median(overhead), 3),
            "p99_ms": round(_p99(overhead), 3),
        }
        for part in PARTS:
            median = statistics.median(t.parts[part] / hops for t in group)
            row[f"{part}_ms"] = round(median * 1000, 3)
        summary[f"{hops} hops"] = row
    return summary
