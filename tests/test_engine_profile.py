"""Engine profiles: chosen per machine by probes in child processes, never a crash.

Most machines have no backend bug to hit, so the test switch `MESHCHAT_TEST_PROBE_FAULT` makes
a chosen setting's probe child kill itself with SIGSEGV (or hang): the real fallback path then
runs, on real llama.cpp, with the default model.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from meshchat.engine.probe import FAULT_ENV
from meshchat.engine.profile import EngineProfile, llama_defaults
from meshchat.errors import MeshchatError
from meshchat.inference import profiling
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import Planner
from meshchat.inference.profiling import Speed, Trial, TrialOutcome
from meshchat.paths import DataDir
from tests.cli_helpers import run_meshchat
from tests.conftest import DEFAULT_THREADS
from tests.node_names import HEAD
from tests.test_planner import NEEDS

PROMPT = "The three primary colours are"
MEMORY = 8 << 30
UNSAFE = "crash:flash_attn=on,crash:extra_bufts=on"  # every profile but the safe one dies


def _calibrate(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str = ""
) -> profiling.Calibration:
    monkeypatch.setenv(FAULT_ENV, fault)
    data = DataDir(tmp_path / "data")
    local = LocalModel.open(model, data)
    return profiling.calibration(local, data, 2, MEMORY, cache_dir=tmp_path / "cache")


def _seed_store(model: Path, data_dir: Path) -> None:
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / model.name).symlink_to(model)


def test_crashing_settings_fall_back_to_the_safe_profile_with_reasons(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calib = _calibrate(tiny_models["llama"], tmp_path, monkeypatch, UNSAFE)
    assert calib.profile == EngineProfile.safe(2)
    outcomes = {t.profile.label: (t.outcome, t.detail) for t in calib.trials}
    assert len(outcomes) == 4
    for label, (outcome, detail) in outcomes.items():
        if label == EngineProfile.safe(2).label:
            assert outcome is TrialOutcome.OK
        else:
            assert (outcome, detail) == (TrialOutcome.CRASHED, "killed by SIGSEGV")
    # The plan side: a node whose flash attention crashes offers only flash attention off.
    assert calib.profile_for(True) is None
    assert calib.profile_for(False) == EngineProfile.safe(2)


def test_a_hung_probe_is_killed_and_recorded(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    target = profiling.probe_target(LocalModel.open(tiny_models["llama"], data), data, MEMORY)
    quick = replace(target, timeout_s=8.0)
    os.environ[FAULT_ENV] = "hang:flash_attn=on"
    try:
        trials = profiling.run_trials(quick, profiling.candidates(2)[::2], rounds=1)
    finally:
        del os.environ[FAULT_ENV]
    assert [t.outcome for t in trials] == [TrialOutcome.OK, TrialOutcome.HUNG]
    assert "no answer within 8 s" in trials[1].detail


def test_generate_under_a_crashing_backend_answers_correctly(smollm2: Path, tmp_path: Path) -> None:
    """A user's first question on a machine where every fast setting crashes: the answer is
    exactly plain llama.cpp's with the safe settings, and `meshchat doctor` says why."""
    _seed_store(smollm2, tmp_path)
    env = {FAULT_ENV: UNSAFE}
    result = run_meshchat(
        "generate", "--raw", "--temperature", "0", "--max-tokens", "32", PROMPT,
        data_dir=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The first run on this "machine" says, in one line, why it takes a moment.
    assert result.stderr.splitlines() == [
        f"meshchat: measuring which llama.cpp settings run {smollm2.name} best on this "
        "machine (once; `meshchat doctor` shows them)"
    ]

    from llama_cpp import Llama

    safe = EngineProfile.safe(DEFAULT_THREADS)
    with llama_defaults(safe):
        llm = Llama(model_path=str(smollm2), n_ctx=4096, n_threads=safe.threads, verbose=False)
    reference = llm.create_completion(PROMPT, max_tokens=32, temperature=0.0, top_k=1)
    llm.close()
    assert result.stdout == reference["choices"][0]["text"] + "\n"  # type: ignore[index]

    doctor = run_meshchat("doctor", "--json", data_dir=tmp_path, env=env)
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["profile"] == safe.to_json()
    crashed = [t for t in report["trials"] if t["outcome"] == "crashed"]
    assert len(crashed) == 3 and all(t["detail"] == "killed by SIGSEGV" for t in crashed)
    assert "AVX" in report["system_info"] or "NEON" in report["system_info"]


def test_no_setting_runs_gives_one_line_and_is_not_retried(smollm2: Path, tmp_path: Path) -> None:
    _seed_store(smollm2, tmp_path)
    env = {FAULT_ENV: "crash:threads=2,crash:threads=1"}
    args = ("generate", "--raw", "--max-tokens", "4", "--threads", "2", PROMPT)
    first = run_meshchat(*args, data_dir=tmp_path, env=env)
    assert first.returncode == 1
    notice, error = first.stderr.strip().splitlines()  # "measuring ...", then the error
    assert notice.startswith("meshchat: measuring which llama.cpp settings")
    assert error.startswith(f"meshchat: llama.cpp cannot run {smollm2.name} here")
    assert error.count("crashed killed by SIGSEGV") == 4
    # The failure is cached: the second start says only the error, without probing again.
    cache = Path(os.environ["MESHCHAT_CACHE_DIR"]) / "engine"
    probes_before = {p: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    second = run_meshchat(*args, data_dir=tmp_path, env=env)
    assert (second.returncode, second.stderr.strip().splitlines()) == (1, [error])
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.json")} == probes_before


def test_corrupt_or_stale_cache_is_measured_again(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_models["llama"]
    calib = _calibrate(model, tmp_path, monkeypatch)
    data = DataDir(tmp_path / "data")
    path = profiling.cache_file(LocalModel.open(model, data), 2, tmp_path / "cache")
    assert profiling.read_cached(path, 2) == calib
    record = json.loads(path.read_text())

    path.write_text("{ not json")
    assert profiling.read_cached(path, 2) is None
    path.write_text(json.dumps({**record, "key": "another machine"}))
    assert profiling.read_cached(path, 2) is None
    # A record whose chosen profile is not the best of its own trials was tampered with.
    record["calibration"]["profile"]["threads"] = 7
    path.write_text(json.dumps(record))
    assert profiling.read_cached(path, 2) is None
    again = _calibrate(model, tmp_path, monkeypatch)
    assert again.profile.threads == 2 and profiling.read_cached(path, 2) == again


def _trial(flash: bool, bufts: bool, decode: float, prefill: float) -> Trial:
    profile = EngineProfile(flash, bufts, 2)
    return Trial(profile, TrialOutcome.OK, Speed(decode, prefill))


def test_decode_decides_then_prefill_then_safety() -> None:
    best = profiling._best
    # Clearly faster decode wins even with a slower prefill.
    assert best([_trial(False, False, 1.0, 1.0), _trial(True, False, 0.9, 2.0)]).profile.flash_attn
    # Within 3% on decode, prefill decides.
    chosen = best([_trial(False, False, 1.0, 1.0), _trial(False, True, 0.99, 0.5)])
    assert chosen is not None and chosen.profile.extra_bufts
    # A full tie keeps the safer setting: extra buffers stay off unless they prove faster.
    chosen = best([_trial(True, True, 1.0, 1.0), _trial(False, False, 1.0, 1.0)])
    assert chosen is not None and chosen.profile == EngineProfile.safe(2)
    assert best([]) is None


def test_settings_are_ranked_where_the_planner_prices_decode() -> None:
    """This machine's SmolLM2 calibration (CI, AMD EPYC Zen 5): flash attention decodes 4%
    faster near the start but reads its context 26% slower. Ranked near the start it was chosen,
    while plans, priced at half the context, ran it off, and `generate` alone and on a mesh gave
    different text. Both now price decode at the same position."""
    ok = TrialOutcome.OK
    on = Trial(EngineProfile(True, True, 2), ok, Speed(5.53e-11, 2.04e-11, 3.37e-14))
    off = Trial(EngineProfile(False, False, 2), ok, Speed(5.74e-11, 2.12e-11, 2.67e-14))
    chosen = profiling._best([on, off])
    assert chosen is not None and not chosen.profile.flash_attn
    assert Planner(NEEDS, [], HEAD, 2 * profiling.RANKED_AT).extra_context == (
        profiling.extra_context(profiling.RANKED_AT)
    )


def test_profile_json_is_validated() -> None:
    profile = EngineProfile(True, False, 4)
    assert EngineProfile.from_json(profile.to_json()) == profile
    for bad in (
        None,
        [],
        {"flash_attn": 1, "extra_bufts": False, "threads": 2},
        {"flash_attn": True, "extra_bufts": False, "threads": 0},
        {"flash_attn": True, "extra_bufts": False, "threads": True},
        {"flash_attn": True, "extra_bufts": False, "threads": 10**9},
    ):
        with pytest.raises(MeshchatError):
            EngineProfile.from_json(bad)
    assert profile.matches("flash_attn=on threads=4")
    assert not profile.matches("flash_attn=on threads=2")
    assert not profile.matches("")
