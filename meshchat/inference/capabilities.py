"""What a node can run: free memory, its model's fingerprint, and how fast it runs layers.

Speed comes from a short calibration on the node's own hardware: prefill a few dozen tokens
and decode a few more through the model (or, if the model would crowd memory, through a slice
of its first layers), then express the cost per byte of layer weights, which is what a decode
step reads. The result is cached per model fingerprint and machine, so it runs once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshchat.engine.stage import Stage, StageOptions
from meshchat.errors import MeshchatError, UsageError
from meshchat.fsutil import atomic_write_text
from meshchat.inference.local_model import LocalModel, fingerprint_from_json, fingerprint_to_json
from meshchat.model.fingerprint import Fingerprint
from meshchat.model.slices import LayerRange
from meshchat.paths import DataDir

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "MESHCHAT_MEMORY_LIMIT"  # e.g. "300M": cap what this node offers the mesh
_CALIBRATION_FORMAT = 3
_PREFILL_TOKENS = 128  # decode is then timed at a realistic context length
_DECODE_TOKENS = 24


@dataclass(frozen=True)
class Calibration:
    decode_s_per_byte: float  # seconds per byte of layer weights, per decoded token
    prefill_s_per_byte: float  # the same per prompt token, in a batch
    threads: int
    measured_layers: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "measured_layers": list(self.measured_layers)}


@dataclass(frozen=True)
class NodeCaps:
    """One node's offer to the planner (sent as JSON in the reply to CapsQuery)."""

    node_id: str
    free_memory: int  # bytes this node can give to a stage
    fingerprint: Fingerprint | None  # its model file, None if it has none
    decode_s_per_byte: float
    prefill_s_per_byte: float
    threads: int = 1
    rtt_ms: dict[str, float] = field(default_factory=dict)  # to the peers it is connected to
    model_path: str = ""
    peers: tuple[str, ...] = ()  # the nodes it is connected to right now

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "free_memory": self.free_memory,
            "fingerprint": fingerprint_to_json(self.fingerprint) if self.fingerprint else None,
            "decode_s_per_byte": self.decode_s_per_byte,
            "prefill_s_per_byte": self.prefill_s_per_byte,
            "threads": self.threads,
            "rtt_ms": self.rtt_ms,
            "model_path": self.model_path,
            "peers": list(self.peers),
        }

    @classmethod
    def from_json(cls, node_id: str, data: Any) -> NodeCaps:
        """Parse a peer's capabilities; MeshchatError if malformed. `node_id` is authenticated."""
        try:
            free = data["free_memory"]
            decode = float(data["decode_s_per_byte"])
            prefill = float(data["prefill_s_per_byte"])
            threads = int(data.get("threads", 1))
            rtts = {
                str(k): float(v)
                for k, v in dict(data.get("rtt_ms") or {}).items()
                if isinstance(v, int | float)
            }
            if not isinstance(free, int) or free < 0 or decode < 0 or prefill < 0:
                raise ValueError("negative or non-integer figures")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MeshchatError(f"malformed capabilities from {node_id[:12]}: {exc}") from None
        raw_fp = data.get("fingerprint")
        fingerprint = fingerprint_from_json(raw_fp) if raw_fp is not None else None
        return cls(
            node_id=node_id,
            free_memory=free,
            fingerprint=fingerprint,
            decode_s_per_byte=decode,
            prefill_s_per_byte=prefill,
            threads=threads,
            rtt_ms=rtts,
            model_path=str(data.get("model_path", ""))[:4096],
            peers=tuple(str(p) for p in list(data.get("peers") or [])[:1024]),
        )


def parse_size(text: str) -> int:
    """'300M', '2G', '1500000' → bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if clean and clean[-1] in units:
            return int(float(clean[:-1]) * units[clean[-1]])
        return int(clean)
    except ValueError:
        raise UsageError(f"{MEMORY_LIMIT_ENV} wants a size like 300M or 2G, got {text!r}") from None


def free_memory() -> int:
    """Memory a stage may use here: available RAM less a margin, capped by MESHCHAT_MEMORY_LIMIT."""
    available = 0
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 1 << 30
    usable = int(available * 0.9)  # leave the rest to the OS and the other programs
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    return min(usable, parse_size(limit)) if limit else usable


def machine_key(threads: int) -> str:
    """Identifies this machine and thread count for the calibration cache."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln for ln in handle if ln.startswith("model name")), "")
    except OSError:
        pass
    text = f"{platform.node()}|{platform.machine()}|{cpu.strip()}|{os.cpu_count()}|{threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _calibration_range(model: LocalModel, memory: int) -> tuple[int, int]:
    """The whole model if it fits comfortably, else a prefix of layers that does."""
    spec = model.spec
    if spec.file_size <= memory // 2:
        return (0, spec.n_layers)
    budget, end = memory // 4, 0
    while end < spec.n_layers and sum(spec.layer_bytes[: end + 1]) <= budget:
        end += 1
    return (0, max(end, 1))


def run_calibration(model: LocalModel, data: DataDir, threads: int) -> Calibration:
    first, end = _calibration_range(model, free_memory())
    path = model.stage_file(data, first, end)
    options = StageOptions(n_ctx=256, max_sessions=1, n_batch=_PREFILL_TOKENS, n_threads=threads)
    # The range starts at layer 0, so the stage takes token ids (no hidden input to fake).
    with Stage(path, LayerRange(first, end), model.n_layers, options) as stage:
        vocab = max(stage.n_vocab, 2)
        prompt = [(17 + 31 * i) % vocab for i in range(_PREFILL_TOKENS)]
        session = uuid.uuid4().hex
        stage.open_session(session)
        stage.forward(session, 0, prompt[:8], sample=False)  # warm-up: page in, build graphs
        prefills = []
        for _ in range(2):
            stage.rollback(session, 0)
            started = time.perf_counter()
            stage.forward(session, 0, prompt, sample=False)
            prefills.append((time.perf_counter() - started) / len(prompt))
        steps = []
        position = len(prompt)
        for i in range(_DECODE_TOKENS):
            started = time.perf_counter()
            stage.forward(session, position, [prompt[i]], sample=False)
            steps.append(time.perf_counter() - started)
            position += 1
    # Other programs only ever slow a run down: the faster runs are the machine's own speed.
    prefill_s = min(prefills)
    decode_s = sorted(steps)[len(steps) * 2 // 5]
    weights = sum(model.spec.layer_bytes[first:end])
    if end == model.n_layers:
        weights += model.output_bytes
    return Calibration(decode_s / weights, prefill_s / weights, threads, (first, end))


def calibration_file(model: LocalModel, data: DataDir, threads: int) -> Path:
    key = f"{model.fingerprint.short}-{machine_key(threads)}"
    return data.root / "cache" / "calibration" / f"{key}.json"


def calibration(model: LocalModel, data: DataDir, threads: int) -> Calibration:
    """The cached calibration for this model, machine and thread count (measured if absent)."""
    path = calibration_file(model, data, threads)
    try:
        cached = json.loads(path.read_text())
        if cached.get("format") == _CALIBRATION_FORMAT:
            c = cached["calibration"]
            return Calibration(
                float(c["decode_s_per_byte"]),
                float(c["prefill_s_per_byte"]),
                int(c["threads"]),
                (int(c["measured_layers"][0]), int(c["measured_layers"][1])),
            )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    result = run_calibration(model, data, threads)
    log.info("calibrated %s: %s", model.path.name, result)
    try:
        record = {"format": _CALIBRATION_FORMAT, "calibration": result.to_json()}
        atomic_write_text(path, json.dumps(record))
    except OSError:
        pass  # a read-only disk costs a re-calibration next time, nothing more
    return result


def local_caps(
    node_id: str,
    model: LocalModel | None,
    calib: Calibration | None,
    rtt_ms: dict[str, float] | None = None,
    peers: list[str] | None = None,
) -> NodeCaps:
    """This node's capabilities (a node without a model offers no layers)."""
    return NodeCaps(
        node_id=node_id,
        free_memory=free_memory(),
        fingerprint=model.fingerprint if model else None,
        decode_s_per_byte=calib.decode_s_per_byte if calib else 0.0,
        prefill_s_per_byte=calib.prefill_s_per_byte if calib else 0.0,
        threads=calib.threads if calib else 1,
        rtt_ms=dict(rtt_ms or {}),
        model_path=str(model.path) if model else "",
        peers=tuple(peers or ()),
    )
