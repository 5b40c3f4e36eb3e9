"""The user's settings: `config.toml` in the user config dir (tomllib reads, tomli-w writes).

Everything has a default, so a missing file is a normal first run. A file that exists but does
not parse, or holds values of the wrong type, is reported (`Config.problems`) and the defaults are
used for what could not be read; such a file is never overwritten, so the user can fix it.

Each setting is declared once, in `CONFIG_SCHEMA` and `SAMPLING_SCHEMA` (key, type, default,
label, bounds, one line of docs); the dataclasses' defaults, parsing and validation, the TOML
writer, the chat-settings dialog and the documented file (`documented_toml()`, shown in the
README) all derive from them.

No textual import here: the headless worker may read the same file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from meshchat.fsutil import atomic_write_text
from meshchat.paths import default_config_dir

CONFIG_ENV = "MESHCHAT_CONFIG_DIR"  # overrides the platformdirs location (tests, portable use)
CONFIG_FILE = "config.toml"
DEFAULT_THEME = "meshchat-dusk"
CONFIG_MODE = 0o600  # owner only: the file may hold the API key


@dataclass(frozen=True)
class Setting:
    """One setting of config.toml: what it is, its default, how it reads, what it may be."""

    key: str
    kind: type  # str | int | float | bool
    default: Any
    doc: str  # one line for the documented file
    label: str = ""  # how the settings dialog names it
    name: str = ""  # how error messages name it (default: the key)
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    above: float | None = None  # exclusive lower bound
    optional: bool = False  # may be absent (None)

    def problem(self, value: Any) -> str | None:
        """What is wrong with this (well-typed) value, or None."""
        if value is None:
            return None if self.optional else f"{self.name or self.key} must be set"
        if self.kind not in (int, float):
            return None
        name = self.name or self.key
        if self.low is not None and self.high is not None:
            if not self.low <= value <= self.high:
                return f"{name} must lie in {self.low:g}..{self.high:g} (got {value:g})"
        elif self.low is not None and value < self.low:
            return f"{name} must be >= {self.low:g} (got {value:g})"
        if self.above is not None and value <= self.above:
            return f"{name} must be > {self.above:g} (got {value:g})"
        return None

    def accepts(self, value: Any) -> bool:
        """Of the right TOML type (an int is a float; a bool is neither an int nor a float)."""
        if isinstance(value, bool):
            return self.kind is bool
        if self.kind is float:
            return isinstance(value, int | float)
        return isinstance(value, self.kind)


# The top-level settings. (A new key: one row here and one field in Config.)
CONFIG_SCHEMA: tuple[Setting, ...] = (
    Setting("theme", str, DEFAULT_THEME, "colour theme (Ctrl+P, theme)"),
    Setting("model", str, "", "used when --model is not given"),
    Setting("context_size", int, 4096, "tokens of context", low=256),
    Setting("threads", int, 0, "0 = pick from the CPU count", low=0),
    Setting("listen", str, "", 'where the in-app node listens; "" = port 47470, else any'),
    Setting("mdns", bool, True, "find peers on the LAN by multicast DNS"),
    Setting("system_prompt", str, "", "for new chats"),
    Setting("api_key", str, "", 'bearer key the HTTP API requires (--api-key wins); "" = none'),
    Setting("max_memory", str, "", 'what this node offers the mesh, e.g. "2G" (--max-memory wins)'),
    Setting(
        "accept_layers", str, "", 'disk budget for layers fetched from peers, e.g. "4G"; "" = none'
    ),
)

# [sampling]: defaults for new chats; each chat keeps its own copy. The one place the
# sampling defaults live (ChatSettings, the engine's SamplingParams and `generate` take them).
SAMPLING_SCHEMA: tuple[Setting, ...] = (
    Setting("temperature", float, 0.7, "0 = greedy", "Temperature (0 = greedy)", low=0),
    Setting("top_k", int, 40, "0 = off", "Top-k (0 = off)", name="top-k", low=0),
    Setting("top_p", float, 0.95, "nucleus sampling", "Top-p", name="top-p", low=0, high=1),
    Setting("min_p", float, 0.05, "0 = off", "Min-p", name="min-p", low=0, high=1),
    Setting("repeat_penalty", float, 1.0, "1 = off", "Repeat penalty", "repeat penalty", above=0),
    Setting("max_tokens", int, 512, "per answer", "Max tokens", name="max tokens", low=1),
    Setting(
        "seed",
        int,
        None,
        "absent = a random seed per answer",
        "Seed (empty = random)",
        low=0,
        optional=True,
    ),
)
_SAMPLING = {s.key: s for s in SAMPLING_SCHEMA}
_CONFIG = {s.key: s for s in CONFIG_SCHEMA}


@dataclass(frozen=True)
class ChatSettings:
    """How answers are sampled; stored per chat, defaults from the config."""

    temperature: float = _SAMPLING["temperature"].default
    top_k: int = _SAMPLING["top_k"].default
    top_p: float = _SAMPLING["top_p"].default
    min_p: float = _SAMPLING["min_p"].default
    repeat_penalty: float = _SAMPLING["repeat_penalty"].default
    max_tokens: int = _SAMPLING["max_tokens"].default
    seed: int | None = _SAMPLING["seed"].default

    def problems(self) -> list[str]:
        """What is wrong with these values, one message each (empty when valid)."""
        found = (s.problem(getattr(self, s.key)) for s in SAMPLING_SCHEMA)
        return [p for p in found if p]

    def to_dict(self) -> dict[str, Any]:
        """TOML/JSON form: a None seed is left out (TOML has no null)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple[ChatSettings, list[str]]:
        """Settings from a table; unknown keys and mistyped values are reported, not fatal."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in data.items():
            setting = _SAMPLING.get(key)
            if setting is None:
                problems.append(f"unknown sampling setting {key!r}")
            elif setting.accepts(value):
                values[key] = setting.kind(value)
            else:
                problems.append(f"sampling setting {key!r} has the wrong type ({value!r})")
        settings = cls(**values)
        bad = settings.problems()
        if bad:
            return cls(), problems + bad
        return settings, problems


@dataclass(frozen=True)
class Config:
    theme: str = _CONFIG["theme"].default
    model: str = _CONFIG["model"].default
    context_size: int = _CONFIG["context_size"].default
    threads: int = _CONFIG["threads"].default
    listen: str = _CONFIG["listen"].default  # "" = 0.0.0.0:47470, or any free port
    mdns: bool = _CONFIG["mdns"].default
    system_prompt: str = _CONFIG["system_prompt"].default
    api_key: str = _CONFIG["api_key"].default
    max_memory: str = _CONFIG["max_memory"].default  # a size like "2G"; "" = 90% of available RAM
    accept_layers: str = _CONFIG["accept_layers"].default  # headless: like --accept-layers
    sampling: ChatSettings = field(default_factory=ChatSettings)
    keys: dict[str, str] = field(default_factory=dict)
    # Not saved: where the file lives and what was wrong with it.
    path: Path | None = field(default=None, compare=False)
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def writable(self) -> bool:
        """False when the file on disk has problems: saving would drop what the user wrote."""
        return self.path is not None and not self.problems

    def to_toml(self) -> str:
        data: dict[str, Any] = {s.key: getattr(self, s.key) for s in CONFIG_SCHEMA}
        data["sampling"] = self.sampling.to_dict()
        data["keys"] = dict(self.keys)
        return tomli_w.dumps(data)


def documented_toml() -> str:
    """config.toml with every setting at its default and one comment each (for the docs)."""
    lines = []

    def line(setting: Setting) -> str:
        if setting.default is None:
            text = f"# {setting.key} = 42"
        else:
            text = tomli_w.dumps({setting.key: setting.default}).strip()
        return f"{text:<31} # {setting.doc}" if setting.doc else text

    lines += [line(s) for s in CONFIG_SCHEMA]
    lines += ["", f"{'[sampling]':<31} # defaults for new chats; each chat keeps its own copy"]
    lines += [line(s) for s in SAMPLING_SCHEMA]
    lines += ["", f'{"[keys]":<31} # binding id = "key[,key...]"; F1 lists the ids']
    lines += ['regenerate = "ctrl+r"']
    return "\n".join(lines) + "\n"


def config_dir() -> Path:
    override = os.environ.get(CONFIG_ENV)
    return Path(override).expanduser() if override else default_config_dir()


def config_path() -> Path:
    return config_dir() / CONFIG_FILE


def user_themes_dir() -> Path:
    return config_dir() / "themes"


def parse_config(text: str, path: Path | None = None) -> Config:
    """A Config from TOML text; what cannot be used is listed in `problems`."""
    where = f" in {path}" if path else ""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Config(path=path, problems=(f"cannot parse config{where}: {exc}",))
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _CONFIG:
            setting = _CONFIG[key]
            # bool is an int in Python; kept apart so `threads = true` is caught.
            if not setting.accepts(value):
                problems.append(f"config{where}: {key!r} should be a {setting.kind.__name__}")
            elif out_of_range := setting.problem(value):
                problems.append(f"config{where}: {out_of_range}")
            else:
                values[key] = value
        elif key == "sampling" and isinstance(value, dict):
            settings, bad = ChatSettings.from_dict(value)
            values["sampling"] = settings
            problems += [f"config{where}: {p}" for p in bad]
        elif key == "keys" and isinstance(value, dict):
            keys = {k: v for k, v in value.items() if isinstance(v, str)}
            problems += [
                f"config{where}: key binding {k!r} should be a string like 'ctrl+r'"
                for k in value
                if k not in keys
            ]
            values["keys"] = keys
        else:
            problems.append(f"config{where}: unknown setting {key!r}")
    return Config(**values, path=path, problems=tuple(problems))


def load_config(path: Path | None = None) -> Config:
    """Read the config; a missing file gives the defaults, an unreadable one says why."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config(path=path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return Config(path=path, problems=(f"cannot read config {path}: {reason}",))
    return parse_config(text, path)


def save_config(config: Config) -> None:
    """Write the config atomically; refused (silently) when the file on disk is broken.

    Mode 0600 whatever the file had before: it may hold `api_key`, and a save must never undo
    a user's `chmod 600`.
    """
    if not config.writable or config.path is None:
        return
    atomic_write_text(config.path, config.to_toml(), mode=CONFIG_MODE)


def with_theme(config: Config, theme: str) -> Config:
    return replace(config, theme=theme)
