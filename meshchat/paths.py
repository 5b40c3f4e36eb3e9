"""Where a node keeps its files.

Everything a node owns lives under one data dir (`--data-dir`, default: the platformdirs user data
dir, which honours XDG_DATA_HOME), so several nodes on one machine can each have their own. What
the machine measured about itself is shared by all of them (`machine_cache_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "meshchat"
CACHE_ENV = "MESHCHAT_CACHE_DIR"


def machine_cache_dir() -> Path:
    """What this machine measured about itself (engine profiles), shared by every data dir.

    Facts about the CPU and the llama.cpp build hold for every node on the machine, so nodes
    with their own data dirs measure them once, not once each. `MESHCHAT_CACHE_DIR` moves it
    (the tests give each run its own); the default is the platform's user cache dir.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


@dataclass(frozen=True)
class DataDir:
    """The layout of one node's data dir."""

    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None) -> DataDir:
        return cls(Path(path).expanduser() if path else default_data_dir())

    @property
    def models(self) -> Path:
        """The model store: pulled GGUF files."""
        return self.root / "models"

    @property
    def slices(self) -> Path:
        """Cached slice files, one per (fingerprint, first layer, end layer)."""
        return self.root / "cache" / "slices"

    @property
    def fingerprints(self) -> Path:
        """Cached model fingerprints, keyed by (path, size, mtime)."""
        return self.root / "cache" / "fingerprints"

    @property
    def identity(self) -> Path:
        """This node's private key (mode 0600)."""
        return self.root / "identity.key"

    @property
    def mesh(self) -> Path:
        """Mesh membership: mesh id, roster, issued invites."""
        return self.root / "mesh"

    def ensure(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path
