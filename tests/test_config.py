"""config.toml: defaults, bad values reported (never fatal), a broken file never overwritten."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from meshchat.config import (
    CONFIG_ENV,
    ChatSettings,
    Config,
    config_path,
    load_config,
    parse_config,
    save_config,
    user_themes_dir,
    with_theme,
)
from tests.cli_helpers import meshchat_command, stop_process


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.toml")
    assert config == Config() and config.problems == () and config.writable


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    config = Config(
        theme="meshchat-paper",
        model="/models/x.gguf",
        context_size=2048,
        threads=2,
        mdns=False,
        system_prompt="Be brief.",
        sampling=ChatSettings(temperature=0.2, max_tokens=64, seed=7),
        keys={"regenerate": "ctrl+g"},
        path=path,
    )
    save_config(config)
    again = load_config(path)
    assert again == config and again.problems == ()
    # A None seed is left out of the file (TOML has no null) and reads back as None.
    save_config(replace_seed(again, None))
    assert "seed" not in path.read_text() and load_config(path).sampling.seed is None


def replace_seed(config: Config, seed: int | None) -> Config:
    from dataclasses import replace

    return replace(config, sampling=replace(config.sampling, seed=seed))


def test_bad_values_are_reported_and_defaulted() -> None:
    config = parse_config(
        "theme = 3\nthreads = true\ncontext_size = 10\nwhat = 1\n[sampling]\ntop_p = 2.0\n"
        "[keys]\nquit = 5\n",
        Path("config.toml"),
    )
    text = "\n".join(config.problems)
    for needle in ("'theme' should be a str", "'threads' should be a int", "context_size",
                   "unknown setting 'what'", "top-p must lie in 0..1", "'quit'"):  # fmt: skip
        assert needle in text
    assert config.theme == Config().theme and config.sampling == ChatSettings()
    assert not config.writable  # saving would drop what the user wrote


def test_broken_file_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("theme = [unclosed\n")
    config = load_config(path)
    assert config.problems and config.problems[0].startswith("cannot parse config")
    assert not config.writable
    save_config(with_theme(config, "meshchat-phosphor"))
    assert path.read_text() == "theme = [unclosed\n"


def test_settings_validation() -> None:
    assert ChatSettings().problems() == []
    bad = ChatSettings(temperature=-1, top_k=-1, min_p=2, repeat_penalty=0, max_tokens=0, seed=-3)
    assert len(bad.problems()) == 6
    settings, problems = ChatSettings.from_dict({"temperature": 1, "max_tokens": 1.5})
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float)
    assert problems == ["sampling setting 'max_tokens' has the wrong type (1.5)"]


def test_config_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    assert config_path() == tmp_path / "config.toml"
    assert user_themes_dir() == tmp_path / "themes"
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path() == tmp_path / "xdg" / "meshchat" / "config.toml"


# ---- files holding secrets are owner-only (issue 12, item 8) -------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_config_is_written_owner_only_and_a_chmod_600_survives(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    old_umask = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        save_config(Config(api_key="secret-key", path=path))
        assert _mode(path) == 0o600
        path.chmod(0o600)  # what a careful user does
        save_config(with_theme(load_config(path), "meshchat-paper"))
        assert _mode(path) == 0o600 and "secret-key" in path.read_text()
        path.chmod(0o644)  # a file from before this fix, or copied in loosely, is tightened
        save_config(with_theme(load_config(path), "meshchat-dusk"))
        assert _mode(path) == 0o600
    finally:
        os.umask(old_umask)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_headless_writes_every_secret_file_owner_only(tmp_path: Path) -> None:
    """Identity key, mesh secret, invites and the --invite-file: 0600 even under umask 0."""
    data, invite, status = tmp_path / "data", tmp_path / "invite.txt", tmp_path / "status.json"
    invite.write_text("an old invite\n")
    invite.chmod(0o644)  # a loose file from before is replaced by an owner-only one
    env = {**os.environ, "MESHCHAT_MDNS": "0", "MESHCHAT_CONFIG_DIR": str(tmp_path / "cfg")}
    cmd = [*meshchat_command(), "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    cmd += ["--invite-file", str(invite), "--status-file", str(status)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=0
    )
    try:
        deadline = time.monotonic() + 30
        while not (status.exists() and invite.read_text().startswith("mc1")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.1)
        secrets = [data / "identity.key", data / "mesh" / "mesh.json", invite]
        secrets += [data / "mesh" / "invites.json"]
        assert {p.name: _mode(p) for p in secrets} == {p.name: 0o600 for p in secrets}
        # The status file is readable by design: it must then hold no secret.
        mesh = json.loads((data / "mesh" / "mesh.json").read_text())
        shown = status.read_text()
        assert mesh["mesh_secret"] not in shown and invite.read_text().strip() not in shown
    finally:
        stop_process(proc)
