"""The user's settings: `config.toml` in the user config dir (tomllib reads, tomli-w writes).

Everything has a default, so a missing file is a normal first run. A file that exists but does
not parse, or holds values of the wrong type, is reported (`Config.problems`) and the defaults are
used for what could not be read; such a file is never overwritten, so the user can fix it.

```toml
theme = "meshchat-dusk"
model = "/path/to/model.gguf"   # used when --model is not given
context_size = 4096
threads = 0                     # 0 = pick from the CPU count
listen = ""                     # where the in-app node listens; "" = port 47470, else any
mdns = true                     # find peers on the LAN by multicast DNS
system_prompt = ""              # for new chats
api_key = ""                    # bearer key the HTTP API requires (--api-key wins); "" = none
accept_layers = ""              # disk budget for layers fetched from peers, e.g. "4G"; "" = none

[sampling]                      # defaults for new chats; each chat keeps its own copy
temperature = 0.7
top_k = 40
top_p = 0.95
min_p = 0.05
repeat_penalty = 1.0
max_tokens = 512
# seed = 42                     # absent = a random seed per answer

[keys]                          # binding id = "key[,key...]"; see the help screen (F1)
regenerate = "ctrl+r"
```

No textual import here: the headless worker may read the same file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
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
class ChatSettings:
    """How answers are sampled; stored per chat, defaults from the config."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def problems(self) -> list[str]:
        """What is wrong with these values, one message each (empty when valid)."""
        found = []
        if self.temperature < 0:
            found.append(f"temperature must be >= 0 (got {self.temperature:g})")
        if self.top_k < 0:
            found.append(f"top-k must be >= 0 (got {self.top_k})")
        if not 0.0 <= self.top_p <= 1.0:
            found.append(f"top-p must lie in 0..1 (got {self.top_p:g})")
        if not 0.0 <= self.min_p <= 1.0:
            found.append(f"min-p must lie in 0..1 (got {self.min_p:g})")
        if self.repeat_penalty <= 0:
            found.append(f"repeat penalty must be > 0 (got {self.repeat_penalty:g})")
        if self.max_tokens < 1:
            found.append(f"max tokens must be at least 1 (got {self.max_tokens})")
        if self.seed is not None and self.seed < 0:
            found.append(f"seed must be >= 0 (got {self.seed})")
        return found

    def to_dict(self) -> dict[str, Any]:
        """TOML/JSON form: a None seed is left out (TOML has no null)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple[ChatSettings, list[str]]:
        """Settings from a table; unknown keys and mistyped values are reported, not fatal."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        types = {f.name: f.type for f in fields(cls)}
        for key, value in data.items():
            want = types.get(key)
            if want is None:
                problems.append(f"unknown sampling setting {key!r}")
                continue
            if (
                "float" in str(want)
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                values[key] = float(value)
            elif "int" in str(want) and isinstance(value, int) and not isinstance(value, bool):
                values[key] = value
            else:
                problems.append(f"sampling setting {key!r} has the wrong type ({value!r})")
        settings = cls(**values)
        bad = settings.problems()
        if bad:
            return cls(), problems + bad
        return settings, problems


@dataclass(frozen=True)
class Config:
    theme: str = DEFAULT_THEME
    model: str = ""
    context_size: int = 4096
    threads: int = 0
    listen: str = ""  # "" = 0.0.0.0:47470, or any free port when that one is taken
    mdns: bool = True
    system_prompt: str = ""
    api_key: str = ""
    accept_layers: str = ""  # headless: like --accept-layers (a size); "" = takes no layers
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
        data: dict[str, Any] = {
            "theme": self.theme,
            "model": self.model,
            "context_size": self.context_size,
            "threads": self.threads,
            "listen": self.listen,
            "mdns": self.mdns,
            "system_prompt": self.system_prompt,
            "api_key": self.api_key,
            "accept_layers": self.accept_layers,
            "sampling": self.sampling.to_dict(),
            "keys": dict(self.keys),
        }
        return tomli_w.dumps(data)


_SCALARS: dict[str, type] = {
    "theme": str,
    "model": str,
    "context_size": int,
    "threads": int,
    "listen": str,
    "mdns": bool,
    "system_prompt": str,
    "api_key": str,
    "accept_layers": str,
}


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
        if key in _SCALARS:
            want = _SCALARS[key]
            # bool is an int in Python; keep them apart so `threads = true` is caught.
            if isinstance(value, want) and (want is bool or not isinstance(value, bool)):
                values[key] = value
            else:
                problems.append(f"config{where}: {key!r} should be a {want.__name__}")
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
    if values.get("context_size", 4096) < 256:
        problems.append(f"config{where}: context_size must be at least 256")
        values.pop("context_size")
    if values.get("threads", 0) < 0:
        problems.append(f"config{where}: threads must be >= 0")
        values.pop("threads")
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
