"""The installed `meshchat` command in a real terminal (tmux): start it, ask, see the answer,
quit with Ctrl+Q; and with a headless worker joined on loopback, see the worker in the table.

Each test runs its own tmux server (`-L` socket) and stops only that server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from tests.cli_helpers import stop_process

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
    pytest.mark.skipif(shutil.which("meshchat") is None, reason="needs the installed command"),
]

QUESTION = "What is the capital of France? Answer in one word."


class Tmux:
    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"meshchat-test-{uuid.uuid4().hex[:8]}"
        self.env = env

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-s", "t", "-x", "140", "-y", "34", command)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def text(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", "-l", *keys)

    def screen(self) -> str:
        try:
            return self.run("capture-pane", "-p", "-t", "t")
        except subprocess.CalledProcessError:
            return ""

    def wait(self, condition: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.screen()
            if condition(shown):
                return shown
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def stop(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=20)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = {
        "listen": "127.0.0.1:0",
        "mdns": False,
        "threads": 1,
        "sampling": {"temperature": 0.0, "max_tokens": 24, "seed": 1},
    }
    (config_dir / "config.toml").write_text(tomli_w.dumps(config))
    return {
        **os.environ,
        "MESHCHAT_CONFIG_DIR": str(config_dir),
        "MESHCHAT_MDNS": "0",
        "TERM": "xterm-256color",
    }


@pytest.fixture
def tmux(env: dict[str, str]) -> Iterator[Tmux]:
    session = Tmux(env)
    yield session
    session.stop()


def _command(tmp_path: Path, model: Path, *extra: str) -> str:
    exit_file = tmp_path / "exit"
    args = " ".join(
        ["meshchat", "--data-dir", str(tmp_path / "data"), "--model", str(model), *extra]
    )
    # Keep the pane open after exit and record the exit code. (Textual draws on stderr, so
    # stderr stays on the terminal: anything printed after exit shows in the pane.)
    return f"{args}; echo $? > {exit_file}; sleep 30"


def _wait_exit(tmp_path: Path, timeout: float = 20.0) -> int:
    exit_file = tmp_path / "exit"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exit_file.exists() and exit_file.read_text().strip():
            return int(exit_file.read_text())
        time.sleep(0.2)
    raise AssertionError("meshchat did not exit")


def test_ask_and_quit(tmp_path: Path, smollm2: Path, tmux: Tmux) -> None:
    tmux.start(_command(tmp_path, smollm2))
    tmux.wait(lambda s: "ready" in s and "Message" in s, 60, "the app with its model loaded")
    tmux.text(QUESTION)
    tmux.keys("Enter")
    shown = tmux.wait(lambda s: "Paris" in s and "ready" in s, 90, "the answer")
    assert "Assistant" in shown and "tok/s" in shown
    assert "[0,30)" in shown  # the split bar / peers table show this node's range
    tmux.keys("C-q")
    assert _wait_exit(tmp_path) == 0
    after = tmux.screen()
    assert "Traceback" not in after and "meshchat:" not in after  # a clean exit, no message
    # The chat was saved.
    assert (tmp_path / "data" / "chats.sqlite3").stat().st_size > 0


def test_headless_worker_appears_in_the_peers_table(
    tmp_path: Path, smollm2: Path, tmux: Tmux, env: dict[str, str]
) -> None:
    invite = tmp_path / "invite"
    worker = subprocess.Popen(
        [sys.executable, "-m", "meshchat.cli", "--headless", "--data-dir", str(tmp_path / "w"),
         "--listen", "127.0.0.1:0", "--invite-file", str(invite), "--model", str(smollm2)],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "worker.err").open("w"), text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        first = worker.stdout.readline()
        assert first.startswith("node_id: "), first + (tmp_path / "worker.err").read_text()
        worker_id = first.split()[1]
        deadline = time.monotonic() + 30
        while not (invite.exists() and invite.read_text().strip()):
            assert time.monotonic() < deadline, "no invite file"
            time.sleep(0.1)
        code = invite.read_text().strip()
        tmux.start(_command(tmp_path, smollm2, "--join", code))
        short = worker_id[:10]

        def row_with_rtt(screen: str) -> bool:
            return any(
                line.lstrip().startswith(short) and (" ms " in line or " µs " in line)
                for line in screen.split("\n")
            )

        shown = tmux.wait(row_with_rtt, 60, "the worker's row with an RTT")
        row = next(line for line in shown.splitlines() if line.lstrip().startswith(short))
        assert "invite" in row and "127.0.0.1:" in row
        tmux.keys("C-q")
        assert _wait_exit(tmp_path) == 0
    finally:
        if not stop_process(worker, timeout=20):
            raise AssertionError("the headless worker did not stop on SIGTERM")


def test_sigterm_mid_answer_exits_143_and_restores_the_terminal(
    tmp_path: Path, smollm2: Path, tmux: Tmux, env: dict[str, str]
) -> None:
    """Before: killed by the signal, the terminal left in raw mode (-icanon -echo -isig). (The
    shell shows 143 for a death by SIGTERM as well: the terminal modes tell the two apart.)"""
    config = Path(env["MESHCHAT_CONFIG_DIR"]) / "config.toml"
    config.write_text(
        tomli_w.dumps({"mdns": False, "threads": 1, "sampling": {"max_tokens": 2000, "seed": 1}})
    )
    terminal = tmp_path / "stty"
    tmux.start(
        _command(tmp_path, smollm2).replace("; sleep 30", f"; stty -a > {terminal}; sleep 30")
    )
    tmux.wait(lambda s: "● ready" in s and "Message" in s, 60, "the app with its model loaded")
    tmux.text("Write a very long story about the sea.")
    tmux.keys("Enter")
    tmux.wait(lambda s: "generating" in s, 30, "the answer streaming")
    shell = int(tmux.run("list-panes", "-t", "t", "-F", "#{pane_pid}").strip())
    app = int(Path(f"/proc/{shell}/task/{shell}/children").read_text().split()[0])
    os.kill(app, signal.SIGTERM)
    assert _wait_exit(tmp_path) == 143
    deadline = time.monotonic() + 10
    while not (terminal.exists() and terminal.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    modes = terminal.read_text().split()
    assert "icanon" in modes and "echo" in modes and "isig" in modes  # not left in raw mode
    assert "Traceback" not in tmux.screen()


def _invite_on(screen: str) -> str:
    """The invite code in the F5 dialog, joined back if the box wrapped it."""
    lines = screen.split("\n")
    for i, line in enumerate(lines):
        found = re.search(r"mc1[a-z0-9]{16,}", line)
        if found is None:
            continue
        code, column = found.group(0), found.start()
        for more in lines[i + 1 :]:
            rest = re.match(r"[a-z0-9]+", more[column:])  # the wrapped part, same column
            if rest is None:
                break
            code += rest.group(0)
        return code
    raise AssertionError(f"no invite code on the screen:\n{screen}")


@pytest.mark.timeout(480)
def test_loopback_worker_joins_by_invite_and_a_kill_mid_answer_is_noted(
    tmp_path: Path, smollm2: Path, tmux: Tmux, env: dict[str, str]
) -> None:
    """Issue 15: the app listens on all addresses (as by default) and shows an invite (F5); a
    worker on the same machine listening on 127.0.0.1 joins with it (before: "192.0.2.2:…
    did not answer", the app logging "refused connection from 127.0.0.1"). The worker takes
    layers; killed mid-answer, the answer says so where it happened and goes on, and its
    footer counts the re-plan."""
    config = Path(env["MESHCHAT_CONFIG_DIR"]) / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "listen": "0.0.0.0:0",
                "mdns": False,
                "threads": 1,
                "sampling": {"temperature": 0.0, "max_tokens": 400, "seed": 1},
            }
        )
    )
    tmux.run("new-session", "-d", "-s", "t", "-x", "200", "-y", "44", _command(tmp_path, smollm2))
    tmux.wait(lambda s: "● ready" in s and "Message" in s, 120, "the app with its model loaded")
    tmux.keys("F5")
    shown = tmux.wait(lambda s: "Invite another machine" in s, 20, "the invite")
    code = _invite_on(shown)
    tmux.keys("Escape")
    worker = subprocess.Popen(
        [sys.executable, "-m", "meshchat.cli", "--headless", "--data-dir", str(tmp_path / "w"),
         "--listen", "127.0.0.1:0", "--join", code, "--model", str(smollm2)],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "worker.err").open("w"), text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        first = worker.stdout.readline()
        problem = first + (tmp_path / "worker.err").read_text()
        assert first.startswith("node_id: "), f"{problem}\ncode {code!r} from:\n{shown}"
        short = first.split()[1][:10]

        def row(screen: str, *words: str) -> bool:
            return any(
                line.lstrip().startswith(short) and all(w in line for w in words)
                for line in screen.split("\n")
            )

        tmux.wait(lambda s: row(s, "invite", "idle"), 60, "the worker's row, joined")
        # Give the worker the second half of the layers: Ctrl+L, split, next stage, node, apply.
        # The planner's advice says the worker may take layers ("…a shows that plan…").
        tmux.wait(lambda s: "shows that plan" in s, 180, "the planner's advice")
        tmux.keys("C-l")  # focus moves after the keys already queued: wait for it
        tmux.wait(lambda s: "Split stage" in s, 20, "the split editor focused")
        tmux.keys("+", "]", "n", "Enter")
        tmux.wait(lambda s: row(s, "[15,30)"), 240, "the worker serving [15,30)")
        tmux.wait(lambda s: "● ready" in s and "mesh [0,15)" in s, 120, "the plan applied")
        tmux.keys("Escape")  # back to the message box (focus moves after queued keys)
        tmux.wait(lambda s: "Split stage" not in s, 20, "the message box focused")
        tmux.text("Write a very long story about the sea.")
        tmux.keys("Enter")
        tmux.wait(lambda s: "generating" in s and "tok/s" in s, 120, "the answer streaming")
        worker.kill()  # a crash: no goodbye
        worker.wait(timeout=10)
        shown = tmux.wait(lambda s: "continuing on" in s, 120, "the failover note")
        assert f"worker {short} lost" in shown
        shown = tmux.wait(lambda s: "re-planned once" in s, 180, "the footer")
        assert "Traceback" not in shown
        tmux.keys("C-q")
        assert _wait_exit(tmp_path) == 0
    finally:
        stop_process(worker, timeout=20)
