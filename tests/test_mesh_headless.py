"""`meshchat --headless` as users run it: real processes on 127.0.0.1 (the issue's "done when")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ENV = {**os.environ, "MESHCHAT_MDNS": "0", "PYTHONUNBUFFERED": "1"}
CMD = [sys.executable, "-m", "meshchat.cli", "--headless", "--listen", "127.0.0.1:0"]


def _wait(check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _status(path: Path) -> dict | None:  # type: ignore[type-arg]
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _peer_with_rtt(path: Path, node_id: str) -> bool:
    status = _status(path)
    return bool(status) and any(
        p["node_id"] == node_id and p["state"] == "connected" and p["rtt_ms"] is not None
        for p in status["peers"]  # type: ignore[index]
    )


def test_two_headless_nodes_pair_and_a_reused_code_is_refused(tmp_path: Path) -> None:
    invite, sa, sb = tmp_path / "invite", tmp_path / "a.json", tmp_path / "b.json"
    a = subprocess.Popen(
        [*CMD, "--data-dir", str(tmp_path / "a"), "--invite-file", str(invite),
         "--status-file", str(sa)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = [a]
    try:
        _wait(lambda: invite.exists() and _status(sa))
        code = invite.read_text().strip()
        assert code.startswith("mc1") and len(code) <= 100
        b = subprocess.Popen(
            [*CMD, "--data-dir", str(tmp_path / "b"), "--join", code, "--status-file", str(sb)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(b)
        _wait(lambda: _status(sb))
        id_a, id_b = _status(sa)["node_id"], _status(sb)["node_id"]  # type: ignore[index]
        _wait(lambda: _peer_with_rtt(sa, id_b) and _peer_with_rtt(sb, id_a))
        status = _status(sa)
        assert status is not None
        assert set(status) >= {"node_id", "addresses", "mesh_id", "model", "layers", "peers"}
        assert status["mesh_id"] == _status(sb)["mesh_id"]  # type: ignore[index]
        assert status["peers"][0]["via"] == "invite"

        c = subprocess.run(
            [*CMD, "--data-dir", str(tmp_path / "c"), "--join", code],
            env=ENV, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert c.returncode == 1
        lines = c.stderr.strip().splitlines()
        assert len(lines) == 1 and "already used" in lines[0], c.stderr
        for proc in procs:
            proc.send_signal(signal.SIGTERM if proc is a else signal.SIGINT)
        for proc in procs:
            assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
        out = a.stdout.read() if a.stdout else ""
        assert "node_id:" in out and "invite: mc1" in out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_mistyped_code_exits_1_with_one_line(tmp_path: Path) -> None:
    c = subprocess.run(
        [*CMD, "--data-dir", str(tmp_path / "c"), "--join", "mc1notarealcode"],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert c.returncode == 1
    assert len(c.stderr.strip().splitlines()) == 1 and "invite" in c.stderr


def test_headless_and_mesh_never_import_textual() -> None:
    code = (
        "import sys, meshchat.headless, meshchat.mesh.node, meshchat.mesh.transport;"
        "assert 'textual' not in sys.modules, 'textual imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
