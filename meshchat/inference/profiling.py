"""Which engine profile this machine runs a model with, and how fast: measured, never assumed.

Every candidate profile (flash attention on/off × llama.cpp's extra buffer types on/off, at the
node's thread count) is first run in a child process (meshchat.engine.probe). A child that dies
by a signal, hangs past its bound, fails, or gives output far from the safe profile's marks that
setting unsafe here, with the reason recorded. Of the rest, decode speed decides (a chat is
mostly decode), prefill breaks near-ties, and the safer setting breaks the rest.

The result (the chosen profile, every trial, and the speeds the planner needs per flash
attention value) is this node's calibration. It is cached in the machine cache dir, keyed by
machine, thread count, llama.cpp build and model fingerprint, so a crash is probed once per
build and machine, never at every start. A corrupt or stale cache entry is measured again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from meshchat.engine import compute
from meshchat.engine.probe import FAULT_ENV
from meshchat.engine.profile import EngineProfile, build_id, system_info
from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.inference.host import host_cpus
from meshchat.inference.local_model import LocalModel
from meshchat.paths import DataDir, machine_cache_dir
from meshchat.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

PROFILE_FORMAT = 4  # 4: ranked at RANKED_AT; 3: the context term in turns (older: measured again)
PREFILL_TOKENS = 128  # decode is then timed at a realistic context length
DECODE_TOKENS = 24
# Decode is timed again from here: the context term from two points (the KV cache's bytes alone
# said 1% slower at 512 than at 140 on the 1B synthetic model; its decode took 5% longer).
FAR_POSITION = 512
MAX_CONTEXT_SLOWDOWN = 2.0  # decode at FAR_POSITION at most 3 times as long as near the start
STOP_POLL_S = 0.1  # how often a running probe checks that this process is not stopping
# Within this fraction of the fastest decode, prefill decides; then the safer setting.
DECODE_TIE = 0.03
# Settings are ranked by decode at this position: half of the usual 4096-token context, where
# the planner prices a plan's decode (Planner: n_ctx // 2). Ranked near the start instead,
# SmolLM2 chose flash attention on here while plans, priced at 2048, ran it off (its context
# term is 26% larger with flash attention): a mesh and `meshchat generate` alone then gave
# different text.
RANKED_AT = 2048
# Output further than this (times the safe profile's largest value) from the safe profile's
# is nonsense. Flash attention moves SmolLM2's logits by 1.3% of their largest value.
NONSENSE_DISTANCE = 0.1
# A calibration taken while the machine ran more than LOADED runnable threads per CPU (the
# 1-minute load average) measured other programs as much as llama.cpp: once the machine is
# down to QUIET, it is measured again. A calibration taken under load stays in use while the
# load lasts (measuring again then would measure the same load).
LOADED = 0.75
QUIET = 0.4


Notify = Callable[[str], None]


class TrialOutcome(StrEnum):
    OK = "ok"
    CRASHED = "crashed"  # the child died by a signal
    HUNG = "hung"  # past the bound, killed
    FAILED = "failed"  # exited with an error
    NONSENSE = "nonsense"  # ran, but its output is not the model's


@dataclass(frozen=True)
class Speed:
    decode_s_per_byte: float  # seconds per byte of layer weights, per decoded token
    prefill_s_per_byte: float  # the same per prompt token, in a batch
    # What each token of context beyond the calibration's adds to a decoded token, per byte of
    # weights (0: not measured; the planner then counts the KV cache's bytes).
    context_s_per_byte: float = 0.0

    def decode_at(self, position: int) -> float:
        """Seconds per byte of weights for a token decoded at `position`."""
        return self.decode_s_per_byte + self.context_s_per_byte * extra_context(position)


def extra_context(position: int) -> int:
    """Tokens of context at `position` beyond those the calibration decoded with."""
    return max(0, position - (PREFILL_TOKENS + DECODE_TOKENS // 2))


@dataclass(frozen=True)
class Trial:
    profile: EngineProfile
    outcome: TrialOutcome
    speed: Speed | None = None  # for OK trials
    detail: str = ""  # why it is not OK, in a few words

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_json(),
            "outcome": self.outcome.value,
            "decode_s_per_byte": self.speed.decode_s_per_byte if self.speed else None,
            "prefill_s_per_byte": self.speed.prefill_s_per_byte if self.speed else None,
            "context_s_per_byte": self.speed.context_s_per_byte if self.speed else None,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Any) -> Trial:
        outcome = TrialOutcome(data["outcome"])
        speed = None
        if outcome is TrialOutcome.OK:
            speed = Speed(
                _positive(data["decode_s_per_byte"]),
                _positive(data["prefill_s_per_byte"]),
                _non_negative(data.get("context_s_per_byte") or 0.0),
            )
        return cls(EngineProfile.from_json(data["profile"]), outcome, speed, str(data["detail"]))


def _positive(value: Any) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise ValueError(f"not a positive time: {value!r}")
    return number


@dataclass(frozen=True)
class Calibration:
    """This machine's engine profile for one model, with every trial behind the choice."""

    profile: EngineProfile  # the best safe settings here
    trials: tuple[Trial, ...]
    measured_layers: tuple[int, int]  # the model, or a prefix of it that fits memory
    system_info: str  # llama.cpp's line for this build and CPU
    load_per_cpu: float | None = None  # the machine's load when measured (None: not recorded)

    @property
    def threads(self) -> int:
        return self.profile.threads

    @property
    def decode_s_per_byte(self) -> float:
        return self.speed().decode_s_per_byte

    @property
    def prefill_s_per_byte(self) -> float:
        return self.speed().prefill_s_per_byte

    @property
    def context_s_per_byte(self) -> float:
        return self.speed().context_s_per_byte

    def best_trial(self, flash_attn: bool | None = None) -> Trial | None:
        """The best safe trial, or the best one with this flash attention setting."""
        ok = [
            t
            for t in self.trials
            if t.outcome is TrialOutcome.OK
            and (flash_attn is None or t.profile.flash_attn == flash_attn)
        ]
        return _best(ok)

    def profile_for(self, flash_attn: bool) -> EngineProfile | None:
        """The profile to load with when a plan fixes flash attention (None: unsafe here)."""
        trial = self.best_trial(flash_attn)
        return trial.profile if trial else None

    def speed(self, flash_attn: bool | None = None) -> Speed:
        trial = self.best_trial(self.profile.flash_attn if flash_attn is None else flash_attn)
        if trial is None or trial.speed is None:
            raise MeshchatError(f"no safe engine profile with flash_attn={flash_attn} here")
        return trial.speed

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_json(),
            "trials": [t.to_json() for t in self.trials],
            "measured_layers": list(self.measured_layers),
            "system_info": self.system_info,
            "load_per_cpu": self.load_per_cpu,
        }

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        trials = tuple(Trial.from_json(t) for t in data["trials"])
        first, end = (int(x) for x in data["measured_layers"])
        load = data.get("load_per_cpu")
        calibration = cls(
            EngineProfile.from_json(data["profile"]),
            trials,
            (first, end),
            str(data["system_info"]),
            None if load is None else _non_negative(load),
        )
        best = calibration.best_trial()
        if best is None or best.profile != calibration.profile:
            raise ValueError("the recorded profile is not the best of its trials")
        return calibration


def _non_negative(value: Any) -> float:
    """A non-negative finite figure (a load, a context rate)."""
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError(f"not a non-negative figure: {value!r}")
    return number


def load_per_cpu() -> float | None:
    """Runnable threads per CPU over the last minute (None where the OS does not tell)."""
    try:
        return os.getloadavg()[0] / host_cpus()
    except OSError:
        return None


def measured_under_load(calibration: Calibration, load_now: float | None) -> bool:
    """Whether `calibration` was taken while the machine was busy and it is quiet now."""
    then = calibration.load_per_cpu
    if then is None or load_now is None:
        return False
    return then > LOADED and load_now < QUIET


def _best(trials: list[Trial]) -> Trial | None:
    """Fastest decode at RANKED_AT; within DECODE_TIE of it, fastest prefill; then the safer
    setting."""
    if not trials:
        return None
    fastest = min(t.speed.decode_at(RANKED_AT) for t in trials if t.speed)
    near = [
        t for t in trials if t.speed and t.speed.decode_at(RANKED_AT) <= fastest * (1 + DECODE_TIE)
    ]
    return min(near, key=lambda t: (t.speed.prefill_s_per_byte if t.speed else 0.0, _risk(t)))


def _risk(trial: Trial) -> int:
    return int(trial.profile.extra_bufts) + int(trial.profile.flash_attn)


def candidates(threads: int) -> list[EngineProfile]:
    """Every profile worth a probe, the safe one first (the others are checked against it)."""
    return [
        EngineProfile(flash_attn=flash, extra_bufts=bufts, threads=threads)
        for flash, bufts in ((False, False), (False, True), (True, False), (True, True))
    ]


# --- the probes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTarget:
    """What each probe loads: the model file or a slice of its first layers."""

    path: Path
    first: int
    end: int
    total_layers: int
    weight_bytes: int  # layer weights (and the output matrix, if the range holds it)
    timeout_s: float  # a probe that takes longer has hung


def run_trials(target: ProbeTarget, profiles: list[EngineProfile], rounds: int = 2) -> list[Trial]:
    """Probe each profile in a child; output is checked against the first profile that runs.

    Profiles that ran are probed again in reverse order, and each keeps its best figures: a
    single pass favours whichever probe ran in a quiet moment (here one probe's prefill came out
    three times slower than the same setting's a second later, with other programs running).
    """
    trials: dict[EngineProfile, Trial] = {}
    reference: np.ndarray[Any, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="meshchat-probe-") as tmp:
        for round_ in range(rounds):
            order = profiles if round_ % 2 == 0 else profiles[::-1]
            for index, profile in enumerate(order):
                earlier = trials.get(profile)
                if earlier is not None and earlier.outcome is not TrialOutcome.OK:
                    continue  # unsafe once is unsafe: never run it twice
                output = Path(tmp) / f"row-{round_}-{index}.npy"
                trial = _probe(target, profile, output)
                if trial.outcome is TrialOutcome.OK:
                    row = np.load(output)
                    if reference is None:
                        reference = row
                    elif not _close(row, reference):
                        trial = Trial(
                            profile, TrialOutcome.NONSENSE, None, "output far from others"
                        )
                log.info("engine probe %s: %s %s", profile.label, trial.outcome.value, trial.detail)
                trials[profile] = _faster(earlier, trial)
    return [trials[p] for p in profiles]


def _faster(earlier: Trial | None, latest: Trial) -> Trial:
    """Keep the best figures of a profile's probes; any failure makes it unsafe."""
    if earlier is None or latest.outcome is not TrialOutcome.OK:
        return latest
    assert earlier.speed is not None and latest.speed is not None
    best = Speed(
        min(earlier.speed.decode_s_per_byte, latest.speed.decode_s_per_byte),
        min(earlier.speed.prefill_s_per_byte, latest.speed.prefill_s_per_byte),
        # A difference of two timings: the least of two would favour the noisier one.
        (earlier.speed.context_s_per_byte + latest.speed.context_s_per_byte) / 2,
    )
    return Trial(latest.profile, TrialOutcome.OK, best)


def _close(row: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> bool:
    if row.shape != reference.shape:
        return False
    scale = float(np.abs(reference).max())
    return float(np.abs(row - reference).max()) <= NONSENSE_DISTANCE * scale + 1e-6


def _probe(target: ProbeTarget, profile: EngineProfile, output: Path) -> Trial:
    request = {
        "model": str(target.path),
        "first": target.first,
        "end": target.end,
        "total_layers": target.total_layers,
        "profile": profile.to_json(),
        "prefill_tokens": PREFILL_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "output": str(output),
        "far_position": FAR_POSITION,
    }
    command = [sys.executable, "-m", "meshchat.engine.probe", json.dumps(request)]
    done = _run_child(command, target.timeout_s)
    if done is None:
        return Trial(profile, TrialOutcome.HUNG, None, f"no answer within {target.timeout_s:.0f} s")
    if done.returncode < 0:
        return Trial(
            profile, TrialOutcome.CRASHED, None, f"killed by {_signal_name(done.returncode)}"
        )
    if done.returncode != 0:
        return Trial(profile, TrialOutcome.FAILED, None, _last_line(done.stderr))
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        decode_s, prefill_s = _positive(result["decode_s"]), _positive(result["prefill_s"])
        context_s = _non_negative(result.get("context_s") or 0.0)
        finite = result["finite"] is True
    except (ValueError, KeyError, IndexError, TypeError):
        return Trial(profile, TrialOutcome.NONSENSE, None, "unreadable answer")
    if not finite or not output.exists():
        return Trial(profile, TrialOutcome.NONSENSE, None, "non-finite output")
    bytes_ = max(target.weight_bytes, 1)
    # At most MAX_CONTEXT_SLOWDOWN slower at FAR_POSITION: a figure beyond is the load's.
    context = min(context_s, MAX_CONTEXT_SLOWDOWN * decode_s / (FAR_POSITION - PREFILL_TOKENS))
    speed = Speed(decode_s / bytes_, prefill_s / bytes_, context / bytes_)
    return Trial(profile, TrialOutcome.OK, speed)


def _run_child(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    """Run a probe child to its end (None: it hung and was killed).

    The child gets a session of its own, so a Ctrl+C at the terminal does not reach it: a probe
    interrupted by the user must not pass for a crash of that setting. If this process is
    stopping, the child is killed and ComputeStopped raised, so nothing is recorded.
    """
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as child:
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                compute.check_stop()
                try:
                    stdout, stderr = child.communicate(timeout=STOP_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        return None
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    compute.check_stop()  # a child that ended because we stop proves nothing
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "exited with an error"


# --- the choice, cached -----------------------------------------------------------------------


def calibration_range(model: LocalModel, memory: int) -> tuple[int, int]:
    """The whole model if it fits comfortably, else a prefix of layers that does."""
    spec = model.spec
    if spec.file_size <= memory // 2:
        return (0, spec.n_layers)
    budget, end = memory // 4, 0
    while end < spec.n_layers and sum(spec.layer_bytes[: end + 1]) <= budget:
        end += 1
    return (0, max(end, 1))


def probe_target(model: LocalModel, data: DataDir, memory: int) -> ProbeTarget:
    first, end = calibration_range(model, memory)
    weights = sum(model.spec.layer_bytes[first:end])
    if end == model.n_layers:
        weights += model.output_bytes
    timeout = TIMEOUTS.probe(weights)
    path = model.stage_file(data, first, end)
    return ProbeTarget(path, first, end, model.n_layers, weights, timeout)


@dataclass(frozen=True)
class CpuInfo:
    name: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+", ...
    flags: tuple[str, ...]  # as /proc/cpuinfo lists them (x86 "flags", ARM64 "Features")


def cpu_info() -> CpuInfo:
    """This CPU's model name and feature flags (Linux's /proc/cpuinfo; elsewhere what
    `platform` tells, and no flags)."""
    name, flags = "", ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith(("model name", "Processor")) and not name:
                name = line.split(":", 1)[-1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[-1].strip()
    return CpuInfo(name or platform.processor() or platform.machine(), tuple(flags.split()))


def machine_key(threads: int) -> str:
    """What the measurement depends on besides the model: machine, threads, llama.cpp build."""
    cpu = cpu_info()
    return "|".join(
        [
            platform.node(),
            platform.system(),
            platform.machine(),
            cpu.name,
            hashlib.sha256(" ".join(cpu.flags).encode()).hexdigest()[:16],
            str(os.cpu_count()),
            f"threads={threads}",
            build_id(),
            # A test's simulated backend faults must not pass for this machine's real results.
            os.environ.get(FAULT_ENV, ""),
        ]
    )


def cache_file(model: LocalModel, threads: int, cache_dir: Path | None = None) -> Path:
    key = hashlib.sha256(machine_key(threads).encode()).hexdigest()[:16]
    root = cache_dir or machine_cache_dir()
    return root / "engine" / f"{model.fingerprint.short}-{key}.json"


def read_cached(path: Path, threads: int) -> Calibration | None:
    """The cached calibration, or None if absent, corrupt or measured under other conditions.

    MeshchatError if the cache records that no profile ran here: that is not retried until
    the machine or the llama.cpp build changes (`meshchat doctor --remeasure` forces it).
    """
    try:
        record = json.loads(path.read_text())
        if record.get("format") != PROFILE_FORMAT or record.get("key") != machine_key(threads):
            return None
        if record["calibration"] is None:
            failure = str(record["failure"])
        else:
            return Calibration.from_json(record["calibration"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MeshchatError) as exc:
        if path.exists():
            log.info("engine profile cache %s is unusable (%s): measuring again", path, exc)
        return None
    raise MeshchatError(failure)


def calibration(
    model: LocalModel,
    data: DataDir,
    threads: int,
    memory: int,
    *,
    remeasure: bool = False,
    cache_dir: Path | None = None,
    notify: Notify | None = None,
) -> Calibration:
    """This machine's calibration for `model` at `threads`, measured once and cached (again
    if it was taken under load and the machine is quiet now: `measured_under_load`).

    Nodes that start together on one machine take turns (a file lock), so the second reads the
    first's result instead of measuring while the first does. MeshchatError if no profile runs.
    """
    path = cache_file(model, threads, cache_dir)
    with _locked(path):
        cached = None if remeasure else read_cached(path, threads)
        load = load_per_cpu()
        if cached is not None and not measured_under_load(cached, load):
            return cached
        if cached is not None:
            log.info("engine profile measured under load %.2f a CPU: measuring again", load)
        if notify is not None:
            notify(
                f"measuring which llama.cpp settings run {model.path.name} best on this machine "
                "(once; `meshchat doctor` shows them)"
            )
        target = probe_target(model, data, memory)
        trials = run_trials(target, candidates(threads))
        best = _best([t for t in trials if t.outcome is TrialOutcome.OK])
        if best is None:
            reasons = "; ".join(f"{t.profile.label}: {t.outcome.value} {t.detail}" for t in trials)
            failure = f"llama.cpp cannot run {model.path.name} here with any setting ({reasons})"
            _write(path, threads, None, failure)
            raise MeshchatError(failure)
        result = Calibration(
            best.profile, tuple(trials), (target.first, target.end), system_info(), load
        )
        log.info("engine profile for %s: %s", model.path.name, best.profile.label)
        _write(path, threads, result, "")
        return result


def _write(path: Path, threads: int, result: Calibration | None, failure: str) -> None:
    record = {
        "format": PROFILE_FORMAT,
        "key": machine_key(threads),
        "calibration": result.to_json() if result else None,
        "failure": failure,
    }
    try:
        atomic_write_text(path, json.dumps(record, indent=1))
    except OSError as exc:
        log.info("cannot cache the engine profile in %s: %s", path, exc)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held for the block)
    except OSError:
        yield  # a read-only cache: measure without a lock, as often as needed
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
