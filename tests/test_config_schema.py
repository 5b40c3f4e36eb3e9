"""The settings schema (config.py) is the one source: dataclass defaults, validation, the TOML
writer, the settings dialog, the engine's and `generate`'s sampling defaults, the README."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

from meshchat.cli import build_parser
from meshchat.config import (
    CONFIG_SCHEMA,
    SAMPLING_SCHEMA,
    ChatSettings,
    Config,
    documented_toml,
    parse_config,
)
from meshchat.engine.sampling import SamplingParams
from meshchat.tui.screens.chat_settings import FIELDS, parse_settings

README = Path(__file__).parent.parent / "README.md"


def test_dataclasses_take_keys_and_defaults_from_the_schema() -> None:
    assert [(f.name, f.default) for f in fields(ChatSettings)] == [
        (s.key, s.default) for s in SAMPLING_SCHEMA
    ]
    config_fields = {f.name: f.default for f in fields(Config)}
    for setting in CONFIG_SCHEMA:
        assert config_fields[setting.key] == setting.default


def test_one_place_for_sampling_defaults() -> None:
    defaults = ChatSettings()
    engine = SamplingParams()
    args = build_parser().parse_args(["generate", "hi"])
    for key in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty"):
        assert getattr(engine, key) == getattr(defaults, key) == getattr(args, key), key


def test_writer_and_reader_agree_on_every_setting() -> None:
    text = Config(sampling=ChatSettings(seed=7)).to_toml()
    data = tomllib.loads(text)
    assert set(data) == {s.key for s in CONFIG_SCHEMA} | {"sampling", "keys"}
    assert set(data["sampling"]) == {s.key for s in SAMPLING_SCHEMA}
    assert parse_config(text) == Config(sampling=ChatSettings(seed=7))


def test_bounds_are_checked_from_the_schema_everywhere() -> None:
    for setting in SAMPLING_SCHEMA:
        if setting.low is None and setting.above is None:
            continue
        bad = (setting.low if setting.low is not None else setting.above or 0) - 1
        value = setting.kind(bad)
        assert setting.problem(value), setting.key
        # The same message from the config file and from the settings dialog.
        config = parse_config(f"[sampling]\n{setting.key} = {value}\n")
        assert any(setting.problem(value) in p for p in config.problems)
        form = {key: str(getattr(ChatSettings(), key) or "") for key, _, _ in FIELDS}
        form[setting.key] = str(value)
        assert parse_settings(form) == (None, [setting.problem(value)])
    assert [key for key, _, _ in FIELDS] == [s.key for s in SAMPLING_SCHEMA]


def test_documented_file_parses_to_the_defaults_and_is_in_the_readme() -> None:
    documented = documented_toml()
    assert parse_config(documented) == Config(keys={"regenerate": "ctrl+r"})
    found = re.search(r"<!-- config:start -->\n```toml\n(.*?)```\n", README.read_text(), re.S)
    assert found and found.group(1) == documented
