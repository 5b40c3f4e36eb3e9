"""What several commands share: finding the model and checking it can run here."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from meshchat.errors import MeshchatError, UsageError
from meshchat.model.architectures import SUPPORTED, is_supported
from meshchat.model.gguf_file import GGUFHeader, read_header
from meshchat.model.spec import ModelSpec, spec_from_header
from meshchat.model.store import ModelStore
from meshchat.paths import DataDir


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    header: GGUFHeader
    spec: ModelSpec


def choose_model(args: argparse.Namespace, data: DataDir) -> ModelChoice:
    """The model named by --model, or the default one (pulled on first use)."""
    path = ModelStore(data.models).resolve(getattr(args, "model", None))
    header = read_header(path)
    if not is_supported(header.arch):
        raise MeshchatError(
            f"unsupported architecture {header.arch!r} in {path} "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    return ModelChoice(path, header, spec_from_header(header))


def thread_count(requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be at least 1, got {requested}")
        return requested
    return max(1, min(os.cpu_count() or 1, 8))
