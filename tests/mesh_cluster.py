"""Real meshchat processes on 127.0.0.1 for the distributed-generation tests.

`Cluster` starts `meshchat --headless` workers (each with its own data dir and its own copy of
the model path), joins them into one mesh, and runs `meshchat generate --join` heads against
it. Engine profiles live in the machine cache (the run's MESHCHAT_CACHE_DIR, tests/conftest.py),
so each machine-and-model pair is calibrated once per test run, not once per node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.cli_helpers import stop_process

ENV = {**os.environ, "MESHCHAT_MDNS": "0", "PYTHONUNBUFFERED": "1"}
CMD = [sys.executable, "-m", "meshchat.cli"]


def wait_for(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout:g} s")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Worker:
    def __init__(
        self,
        root: Path,
        name: str,
        model: Path,
        join: str | None,
        env: dict[str, str],
        extra: tuple[str, ...] = (),
    ):
        self.name = name
        self.model = model
        self.env = env
        self.dir = root / name
        self.status = root / f"{name}.status.json"
        self.invite_file = root / f"{name}.invite"
        self.log = root / f"{name}.log"
        args = [
            *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(self.dir),
            "--model", str(model), "--status-file", str(self.status),
            "--invite-file", str(self.invite_file), "--invite-uses", "50",
        ]  # fmt: skip
        if join:
            args += ["--join", join]
        args += extra
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env={**ENV, **env}, stdout=log, stderr=log)

    def ready(self) -> dict[str, Any] | None:
        status = read_json(self.status)
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.log.read_text()}")
        return status if status and self.invite_file.exists() else None

    @property
    def node_id(self) -> str:
        return str(read_json(self.status)["node_id"])

    @property
    def layers(self) -> list[int] | None:
        status = read_json(self.status)
        return status["layers"] if status else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        stop_process(self.proc)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.workers: list[Worker] = []
        self.invite = ""

    def add(self, model: Path, env: dict[str, str] | None = None, *extra: str) -> Worker:
        name = f"w{len(self.workers)}"
        worker = Worker(self.root, name, model, self.invite or None, env or {}, extra)
        self.workers.append(worker)
        wait_for(worker.ready, what=f"{name} ready")
        if not self.invite:
            self.invite = worker.invite_file.read_text().strip()
        return worker

    def restart(self, worker: Worker, env: dict[str, str] | None = None) -> Worker:
        """Start `worker` again (same name, data dir and model) after it died; it finds the
        mesh again by itself (its roster remembers the members). Replaces it in `workers`."""
        worker.stop()
        worker.status.unlink(missing_ok=True)
        worker.invite_file.unlink(missing_ok=True)
        model = Path(worker.model)
        again = Worker(self.root, worker.name, model, None, env or worker.env)
        self.workers[self.workers.index(worker)] = again
        wait_for(again.ready, what=f"{worker.name} ready again")
        return again

    def wait_connected(self) -> None:
        """Every worker sees every other one."""
        ids = {w.node_id for w in self.workers}

        def all_connected() -> bool:
            for w in self.workers:
                status = read_json(w.status)
                seen = {p["node_id"] for p in status["peers"] if p["state"] == "connected"}
                if not ids - {w.node_id} <= seen:
                    return False
            return True

        wait_for(all_connected, what="workers connected")

    def head_args(self, prompt: str, model: Path, name: str, *extra: str) -> list[str]:
        head_dir = self.root / name
        return [
            *CMD, "generate", prompt, "--raw", "--temperature", "0", "--model", str(model),
            "--data-dir", str(head_dir), "--join", self.invite, *extra,
        ]  # fmt: skip

    def generate(
        self, prompt: str, model: Path, *extra: str, name: str = "head", env: Any = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.head_args(prompt, model, name, *extra),
            env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        return result

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


class StreamingHead:
    """A head whose stdout is read as it streams, so a test can strike mid-generation."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 64):
            self.out += chunk

    def wait_output(self, n_bytes: int, timeout: float = 60.0) -> None:
        wait_for(lambda: len(self.out) >= n_bytes or self.proc.poll() is not None, timeout)

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        return code, self.out.decode(), self.proc.stderr.read().decode()


class ApiHead:
    """A `meshchat --headless --api` node joined to a cluster: the head the API clients use."""

    def __init__(
        self,
        cluster: Cluster,
        model: Path,
        port: int,
        key: str,
        name: str = "api",
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = cluster.root / name
        self.log = cluster.root / f"{name}.log"
        self.status = cluster.root / f"{name}.status.json"
        self.base_url = f"http://127.0.0.1:{port}/v1"
        args = [
            *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(self.dir),
            "--model", str(model), "--join", cluster.invite, "--status-file", str(self.status),
            "--api", f"127.0.0.1:{port}", "--api-key", key,
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env={**ENV, **(env or {})}, stdout=log, stderr=log)
        wait_for(self._serving, timeout=120, what="API serving")

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"API head exited: {self.log.read_text()}")
        return "API on http" in self.log.read_text()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        stop_process(self.proc)


def solo_text(model: Path, root: Path, prompt: str, max_tokens: str) -> str:
    """`meshchat generate --raw` greedily on one machine: the text a mesh's must equal."""
    result = subprocess.run(
        [*CMD, "generate", prompt, "--raw", "--temperature", "0", "--max-tokens", max_tokens,
         "--model", str(model), "--data-dir", str(root / "solo")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout
