"""Run the installed `meshchat` command as a user would, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def meshchat_command() -> list[str]:
    installed = shutil.which("meshchat")
    return [installed] if installed else [sys.executable, "-m", "meshchat.cli"]


def run_meshchat(
    *args: str, data_dir: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MESHCHAT_MDNS": "0", **(env or {})}
    return subprocess.run(
        [*meshchat_command(), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
