"""What a node can run: free memory, its model's fingerprint, and how fast it runs layers.

Speed comes from the node's calibration (meshchat.inference.profiling): each candidate engine
profile prefills and decodes a few dozen tokens through the model (or a slice of its first
layers) in a child process, and the cost is expressed per byte of layer weights, which is what a
decode step reads. Peers get the speeds for each flash attention setting the node can run, since
the plan fixes that setting for every stage.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from meshchat.engine.profile import EngineProfile
from meshchat.engine.stage import StageOptions
from meshchat.errors import MeshchatError, UsageError
from meshchat.inference import profiling
from meshchat.inference.host import HOST_ID_CHARS, host_cpus, host_id
from meshchat.inference.local_model import LocalModel
from meshchat.inference.profiling import Calibration, Notify, Speed
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId
from meshchat.model.fingerprint import Fingerprint, fingerprint_from_json, fingerprint_to_json
from meshchat.paths import DataDir

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "MESHCHAT_MEMORY_LIMIT"  # e.g. "300M": cap what this node offers the mesh


@dataclass(frozen=True)
class NodeCaps:
    """One node's offer to the planner (sent as JSON in the reply to CapsQuery)."""

    node_id: NodeId
    free_memory: int  # bytes this node can give to a stage
    fingerprint: Fingerprint | None  # its model file, None if it has none
    decode_s_per_byte: float
    prefill_s_per_byte: float
    threads: int = 1
    rtt_ms: dict[NodeId, float] = field(default_factory=dict)  # to the peers it is connected to
    model_path: str = ""
    peers: tuple[NodeId, ...] = ()  # the nodes it is connected to right now
    # Its speeds with flash attention on and off (only the values it runs safely): a plan
    # fixes that setting for every stage, and the planner predicts each value from these.
    flash_speeds: dict[bool, Speed] = field(default_factory=dict)
    # Model files it serves to planned members (issue 14), and the disk budget (bytes) it
    # gives to layers fetched from peers; 0: it takes no layers over the network.
    layer_files: tuple[LayerFile, ...] = ()
    accept_layers: int = 0
    # The machine it runs on (meshchat.inference.host: a hash, "" unknown) and that machine's
    # CPUs (0 unknown): stages on one host share its cores (Planner.share_charges).
    host: str = ""
    cpus: int = 0
    context_s_per_byte: float = 0.0  # Speed.context_s_per_byte (0: the planner counts KV bytes)

    def offers(self, model: str, first: int, end: int) -> bool:
        """Whether this node can send layers [first, end) of `model` as a file."""
        return any(f.model == model and f.first <= first and end <= f.end for f in self.layer_files)

    def for_flash(self, flash_attn: bool) -> NodeCaps | None:
        """This node's offer to a plan with this flash attention setting (None: unsafe here)."""
        speed = self.flash_speeds.get(flash_attn)
        if speed is None:
            return None
        return replace(
            self,
            decode_s_per_byte=speed.decode_s_per_byte,
            prefill_s_per_byte=speed.prefill_s_per_byte,
            context_s_per_byte=speed.context_s_per_byte,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": str(self.node_id),
            "free_memory": self.free_memory,
            "fingerprint": fingerprint_to_json(self.fingerprint) if self.fingerprint else None,
            "decode_s_per_byte": self.decode_s_per_byte,
            "prefill_s_per_byte": self.prefill_s_per_byte,
            "threads": self.threads,
            "rtt_ms": {str(node): rtt for node, rtt in self.rtt_ms.items()},
            "model_path": self.model_path,
            "peers": [str(node) for node in self.peers],
            "flash_speeds": {
                _FLASH_KEYS[flash]: [
                    speed.decode_s_per_byte,
                    speed.prefill_s_per_byte,
                    speed.context_s_per_byte,
                ]
                for flash, speed in self.flash_speeds.items()
            },
            "layer_files": [[f.model, f.first, f.end] for f in self.layer_files],
            "accept_layers": self.accept_layers,
            "host": self.host,
            "cpus": self.cpus,
            "context_s_per_byte": self.context_s_per_byte,
        }

    @classmethod
    def from_json(cls, node_id: NodeId, data: Any) -> NodeCaps:
        """Parse a peer's capabilities; MeshchatError if malformed. `node_id` is authenticated."""
        try:
            free = data["free_memory"]
            decode = float(data["decode_s_per_byte"])
            prefill = float(data["prefill_s_per_byte"])
            context = float(data.get("context_s_per_byte", 0.0))
            if not 0 <= context < math.inf:
                raise ValueError("context_s_per_byte must be finite and not negative")
            threads = int(data.get("threads", 1))
            if not 1 <= threads <= MAX_THREADS:
                raise ValueError(f"threads must be 1..{MAX_THREADS}")
            raw_rtts = dict(data.get("rtt_ms") or {})
            if len(raw_rtts) > MAX_PEERS:
                raise ValueError(f"rtt_ms of more than {MAX_PEERS} nodes")
            rtts = {
                wire.parse_node_id(k, "rtt_ms"): float(v)
                for k, v in raw_rtts.items()
                if isinstance(v, int | float)
            }
            peers = tuple(
                wire.parse_node_id(p, "peers") for p in list(data.get("peers") or [])[:MAX_PEERS]
            )
            if not isinstance(free, int) or free < 0 or decode < 0 or prefill < 0:
                raise ValueError("negative or non-integer figures")
        except (KeyError, TypeError, ValueError, AttributeError, wire.ProtocolError) as exc:
            raise MeshchatError(f"malformed capabilities from {_who(node_id)}: {exc}") from None
        flash_speeds = _parse_flash_speeds(node_id, data.get("flash_speeds"))
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
            peers=peers,
            flash_speeds=flash_speeds,
            layer_files=_parse_layer_files(node_id, data.get("layer_files")),
            accept_layers=_parse_budget(node_id, data.get("accept_layers", 0)),
            host=_parse_host(node_id, data.get("host", "")),
            cpus=_parse_cpus(node_id, data.get("cpus", 0)),
            context_s_per_byte=context,
        )


@dataclass(frozen=True)
class LayerFile:
    """Layers [first, end) of the model with fingerprint digest `model`, servable as a file."""

    model: str
    first: int
    end: int


MAX_PEERS = 1024  # nodes one node reports it is connected to (peers, rtt_ms)


def _who(node_id: NodeId) -> str:
    """How a malformed-capabilities message names the node that sent them."""
    return str(node_id)[:12]


MAX_LAYER_FILES = 64  # files one node advertises
_MAX_DIGEST = 128
_MAX_LAYERS = 4096


def _parse_layer_files(node_id: NodeId, raw: Any) -> tuple[LayerFile, ...]:
    """[[digest, first, end], ...] → LayerFiles; anything malformed is refused whole."""
    if raw is None:
        return ()
    try:
        if not isinstance(raw, list) or len(raw) > MAX_LAYER_FILES:
            raise ValueError(f"layer_files must be a list of at most {MAX_LAYER_FILES}")
        files = []
        for model, first, end in raw:
            if not (isinstance(model, str) and 0 < len(model) <= _MAX_DIGEST):
                raise ValueError("bad model digest")
            if not (type(first) is int and type(end) is int and 0 <= first < end <= _MAX_LAYERS):
                raise ValueError("bad layer range")
            files.append(LayerFile(model, first, end))
        return tuple(files)
    except (TypeError, ValueError) as exc:
        raise MeshchatError(f"malformed capabilities from {_who(node_id)}: {exc}") from None


def _parse_budget(node_id: NodeId, raw: Any) -> int:
    if type(raw) is not int or not 0 <= raw < 1 << 60:
        raise MeshchatError(f"malformed capabilities from {_who(node_id)}: bad accept_layers")
    return raw


MAX_THREADS = 4096  # threads or CPUs one node may claim
_HEX = frozenset("0123456789abcdef")


def _parse_host(node_id: NodeId, raw: Any) -> str:
    if not (isinstance(raw, str) and len(raw) <= HOST_ID_CHARS and set(raw) <= _HEX):
        raise MeshchatError(f"malformed capabilities from {_who(node_id)}: bad host")
    return raw


def _parse_cpus(node_id: NodeId, raw: Any) -> int:
    if type(raw) is not int or not 0 <= raw <= MAX_THREADS:
        raise MeshchatError(f"malformed capabilities from {_who(node_id)}: bad cpus")
    return raw


_FLASH_KEYS = {True: "on", False: "off"}


def _parse_flash_speeds(node_id: NodeId, raw: Any) -> dict[bool, Speed]:
    """{"on": [decode, prefill(, context)], "off": [...]} → speeds by flash setting; bad
    figures refused."""
    if raw is None:
        return {}
    speeds: dict[bool, Speed] = {}
    try:
        for flash, key in _FLASH_KEYS.items():
            if key in raw:
                figures = [float(x) for x in raw[key]]
                if len(figures) == 2:  # from a node that does not measure the context term
                    figures.append(0.0)
                decode, prefill, context = figures
                if not (0 < decode < math.inf and 0 < prefill < math.inf):
                    raise ValueError("speeds must be positive and finite")
                if not 0 <= context < math.inf:
                    raise ValueError("the context term must be finite and not negative")
                speeds[flash] = Speed(decode, prefill, context)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MeshchatError(f"malformed capabilities from {_who(node_id)}: {exc}") from None
    return speeds


_limit: int | None = None  # --max-memory or config.toml, set once by the command (set_limit)


def parse_size(text: str, source: str = MEMORY_LIMIT_ENV) -> int:
    """'300M', '2G', '1.5GiB', '1500000' → bytes; UsageError naming `source` otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if clean and clean[-1] in units:
        clean, scale = clean[:-1], units[clean[-1]]
    try:
        value = float(clean)
    except ValueError:
        value = math.nan
    if not (0 < value < 1 << 60 and value * scale >= 1):
        raise UsageError(f"{source} wants a size like 300M or 2G, got {text!r}")
    return int(value * scale)


def set_limit(limit: int | None) -> None:
    """Cap what this process offers the mesh (None: the environment variable, if set)."""
    global _limit
    _limit = limit


def memory_limit() -> int | None:
    """The budget set by the command, else MESHCHAT_MEMORY_LIMIT, else none."""
    if _limit is not None:
        return _limit
    text = os.environ.get(MEMORY_LIMIT_ENV)
    return parse_size(text) if text else None


def free_memory(held: int = 0) -> int:
    """Memory a stage may use here: available RAM less a margin, capped by the budget.

    `held`: bytes a stage already loaded here would give back before the new one loads (a
    re-plan replaces a node's old stage, so that memory is free for its next one)."""
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
    usable = int(available * 0.9) + held  # leave the rest to the OS and other programs
    limit = memory_limit()
    return min(usable, limit) if limit is not None else usable


def calibration(
    model: LocalModel, data: DataDir, threads: int, notify: Notify | None = None
) -> Calibration:
    """This machine's engine profile and speeds for `model` (measured once, then cached;
    `notify` hears of a measurement before it starts)."""
    return profiling.calibration(model, data, threads, free_memory(), notify=notify)


def plan_profile(model: LocalModel, data: DataDir, threads: int, flash_attn: bool) -> EngineProfile:
    """The profile a stage of a plan loads with: the plan's flash attention setting and this
    machine's best other settings with it. MeshchatError if that setting is unsafe here."""
    profile = calibration(model, data, threads).profile_for(flash_attn)
    if profile is None:
        state = "on" if flash_attn else "off"
        raise MeshchatError(
            f"this machine cannot run {model.path.name} with flash attention {state}"
        )
    return profile


def tuned_options(
    model: LocalModel, data: DataDir, options: StageOptions, notify: Notify | None = None
) -> StageOptions:
    """`options` with the engine profile this machine runs `model` best with."""
    profile = calibration(model, data, options.n_threads, notify).profile
    log.debug("engine profile for %s: %s", model.path.name, profile.label)
    return options.with_profile(profile)


def local_caps(
    node_id: NodeId,
    model: LocalModel | None,
    calib: Calibration | None,
    rtt_ms: dict[NodeId, float] | None = None,
    peers: list[NodeId] | None = None,
    held: int = 0,
    layer_files: tuple[LayerFile, ...] = (),
    accept_layers: int = 0,
) -> NodeCaps:
    """This node's capabilities (a node without a model offers no layers); `held` as in
    `free_memory`."""
    return NodeCaps(
        node_id=node_id,
        free_memory=free_memory(held),
        fingerprint=model.fingerprint if model else None,
        decode_s_per_byte=calib.decode_s_per_byte if calib else 0.0,
        prefill_s_per_byte=calib.prefill_s_per_byte if calib else 0.0,
        context_s_per_byte=calib.context_s_per_byte if calib else 0.0,
        threads=calib.threads if calib else 1,
        rtt_ms=dict(rtt_ms or {}),
        model_path=str(model.path) if model else "",
        peers=tuple(peers or ()),
        flash_speeds=_flash_speeds(calib) if calib else {},
        layer_files=layer_files,
        accept_layers=accept_layers,
        host=host_id(),
        cpus=host_cpus(),
    )


def _flash_speeds(calib: Calibration) -> dict[bool, Speed]:
    speeds = {}
    for flash in (False, True):
        trial = calib.best_trial(flash)
        if trial is not None and trial.speed is not None:
            speeds[flash] = trial.speed
    return speeds
