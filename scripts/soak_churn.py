#!/usr/bin/env python3
"""Soak an API head through churn: back-to-back greedy chat requests while workers die.

Starts workers (the first invites, the rest join) and a `meshchat --headless --api` head that
joins them, every node under MESHCHAT_MEMORY_LIMIT (400M by default: the default model with the
API's four sessions needs two nodes, and any two hold it). Every `--kill-every` seconds one
worker, chosen at random among all of them, is SIGKILLed (then restarted with the same data
dir) or SIGSTOPped (then SIGCONTed), `--down` seconds later. One worker is down at a time, so
the survivors can always hold the model. Answers are checked against `meshchat generate` run
alone. At the end it prints requests, failures by cause, answers that differ, p50/p99
latency, the recovery time after each kill (kill → first answer to a request sent after it)
and the longest gap without an answer, then the head's session counts once idle.

    python scripts/soak_churn.py --model PATH [--duration 600] [--kill-every 40] [--seed 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CMD = [sys.executable, "-m", "meshchat.cli"]
ENV = {**os.environ, "MESHCHAT_MDNS": "0", "PYTHONUNBUFFERED": "1"}
KEY = "soak"
PROMPTS = [f"Name a colour and the number {i}." for i in range(4)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"soak: {what} not within {timeout:g} s")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Proc:
    """One `meshchat --headless` process (restartable with the same data dir)."""

    def __init__(self, root: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.root, self.name, self.args, self.env = root, name, args, env
        self.status = root / f"{name}.status.json"
        self.invite = root / f"{name}.invite"
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def start(self) -> None:
        self.status.unlink(missing_ok=True)
        self.invite.unlink(missing_ok=True)
        args = [
            *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(self.root / self.name),
            "--status-file", str(self.status), "--invite-file", str(self.invite),
            "--invite-uses", "50", *self.args,
        ]  # fmt: skip
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(args, env={**ENV, **self.env}, stdout=out, stderr=out)
        wait_until(self.ready, 600, f"{self.name} ready")

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            sys.exit(f"soak: {self.name} exited: {self.log.read_text()[-2000:]}")
        return self.status.exists() and self.invite.exists()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Outcome:
    started: float
    ended: float
    prompt: int
    status: int
    text: str  # the answer, or why it failed


def chat(base_url: str, prompt: str, max_tokens: int) -> tuple[int, str]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return 200, str(json.load(response)["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = "?"
        return error.code, str(message)
    except (OSError, ValueError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def cause(outcome: Outcome) -> str:
    """A failure's cause, with node ids and figures blanked so like failures group."""
    text = re.sub(r"\b[a-z2-7]{8,}\b", "N", outcome.text)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return f"{outcome.status} {text[:110]}"


class Traffic(threading.Thread):
    def __init__(self, base_url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.outcomes: list[Outcome] = []
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            started = time.monotonic()
            status, text = chat(self.base_url, PROMPTS[i % len(PROMPTS)], self.max_tokens)
            self.outcomes.append(Outcome(started, time.monotonic(), i % len(PROMPTS), status, text))
            i += 1


def solo(model: str, root: Path, max_tokens: int) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        result = subprocess.run(
            [*CMD, "generate", prompt, "--model", model, "--temperature", "0",
             "--max-tokens", str(max_tokens), "--data-dir", str(root / "solo")],
            env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            sys.exit(f"soak: generate failed: {result.stderr[-2000:]}")
        answers.append(result.stdout[:-1])
    return answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--kill-every", type=float, default=40.0)
    parser.add_argument("--down", type=float, default=10.0, help="seconds a worker stays down")
    parser.add_argument("--stop-share", type=float, default=0.3, help="share of SIGSTOPs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", default="400M", help="MESHCHAT_MEMORY_LIMIT of every node")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", help="keep logs here (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.dir or tempfile.mkdtemp(prefix="soak-churn-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {"MESHCHAT_MEMORY_LIMIT": args.limit}
    print(f"soak: logs in {root}; CPU {cpu_name()}, {os.cpu_count()} cores", flush=True)
    reference = solo(args.model, root, args.max_tokens)
    workers: list[Proc] = []
    head = None
    try:
        for i in range(args.workers):
            join = ["--join", workers[0].invite.read_text().strip()] if workers else []
            worker = Proc(root, f"w{i}", ["--model", args.model, *join], env)
            worker.start()
            workers.append(worker)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        head = Proc(
            root,
            "head",
            ["--model", args.model, "--join", workers[0].invite.read_text().strip(),
             "--api", f"127.0.0.1:{port}", "--api-key", KEY],
            env,
        )  # fmt: skip
        head.start()
        wait_until(lambda: "API on http" in head.log.read_text(), 600, "API serving")
        traffic = Traffic(base_url, args.max_tokens)
        began = time.monotonic()
        traffic.start()
        kills: list[tuple[float, str, str]] = []
        while time.monotonic() - began < args.duration - args.kill_every:
            time.sleep(args.kill_every - args.down)
            victim = rng.choice(workers)
            how = "SIGSTOP" if rng.random() < args.stop_share else "SIGKILL"
            at = time.monotonic()
            victim.signal(signal.SIGSTOP if how == "SIGSTOP" else signal.SIGKILL)
            kills.append((at, victim.name, how))
            print(f"soak: t={at - began:6.1f} s {how} {victim.name}", flush=True)
            time.sleep(args.down)
            if how == "SIGSTOP":
                victim.signal(signal.SIGCONT)
            else:
                victim.start()
        time.sleep(max(0.0, args.duration - (time.monotonic() - began)))
        traffic.done.set()
        traffic.join(timeout=600)
        idle = wait_until(
            lambda: (
                (s := read_json(head.status))
                and not s["sessions"]["api_slots_busy"]
                and not s["sessions"]["waiting_replies"]
                and s
            ),
            60,
            "head idle",
        )
        report(traffic.outcomes, reference, kills, began, idle)
    finally:
        for proc in [head, *workers]:
            if proc is not None:
                proc.stop()
    return 0


def report(
    outcomes: list[Outcome],
    reference: list[str],
    kills: list[tuple[float, str, str]],
    began: float,
    idle: dict[str, Any],
) -> None:
    ok = [o for o in outcomes if o.status == 200]
    failed = [o for o in outcomes if o.status != 200]
    differed = [o for o in ok if o.text != reference[o.prompt]]
    latencies = [o.ended - o.started for o in ok]
    print(f"requests: {len(outcomes)}  answered: {len(ok)}  failed: {len(failed)}")
    print(f"answers that differ from meshchat generate alone: {len(differed)}")
    for text, count in Counter(cause(o) for o in failed).most_common():
        print(f"  {count:4d} × {text}")
    print(
        f"latency of answers: p50 {percentile(latencies, 0.5):.2f} s, "
        f"p99 {percentile(latencies, 0.99):.2f} s, max {max(latencies, default=0):.2f} s"
    )
    for at, name, how in kills:
        after = [o.ended for o in ok if o.started >= at]
        recovery = f"{min(after) - at:.1f} s" if after else "never"
        print(f"  {how} {name} at t={at - began:6.1f} s: next answer after {recovery}")
    end = max((o.ended for o in outcomes), default=began)
    marks = [began, *sorted(o.ended for o in ok), end]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    print(f"longest gap without an answer: {max(gaps, default=0):.1f} s")
    print(f"head sessions once idle: {json.dumps(idle['sessions'])}")
    print(f"re-plans: {len(idle['replans'])} kept; last: {json.dumps(idle['replans'][-3:])}")


if __name__ == "__main__":
    sys.exit(main())
