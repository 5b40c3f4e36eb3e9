"""Run the installed `meshchat` command as a user would, in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def meshchat_command() -> list[str]:
    installed = shutil.which("meshchat")
    return [installed] if installed else [sys.executable, "-m", "meshchat.cli"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> bool:
    """SIGTERM `proc` and wait; SIGKILL it if it has not exited within `timeout`.
    True if it stopped on SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return False
    return True


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
