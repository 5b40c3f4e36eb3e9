"""An API head serving through churn (real processes on loopback, budgets that force a split):
workers SIGKILLed and restarted during back-to-back requests, and a head that starts alone."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshchat.engine.profile import EngineProfile
from tests.api_helpers import MODEL_ID, solo_answers
from tests.cli_helpers import free_port, stop_process
from tests.mesh_cluster import CMD, ENV, ApiHead, Cluster, Worker, read_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

KEY = "churn-key"
# Three nodes of 400 MiB: the model with four 4096-token sessions (the planner's estimate: 513
# MiB alone, 330 MiB per node split in two) needs two of them, and any two hold it.
LIMIT = {"MESHCHAT_MEMORY_LIMIT": "400M"}
PROMPTS = [f"Name a colour and the number {i}." for i in range(4)]
MAX_TOKENS = 16


def solo_texts(model: Path, tmp: Path, flash: bool) -> list[str]:
    return solo_answers(model, tmp, flash, PROMPTS, MAX_TOKENS)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def call(url: str, payload: Any = None) -> Reply:
    """One HTTP request to the API (stdlib only); the JSON reply whatever its status."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data, {"Authorization": f"Bearer {KEY}"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            return Reply(response.status, dict(response.headers), json.load(response))
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers), json.load(error))


def chat(base_url: str, prompt: str) -> Reply:
    return call(
        f"{base_url}/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
        },
    )


def answer(reply: Reply) -> str:
    return str(reply.body["choices"][0]["message"]["content"])


def flash_of(log: Path) -> bool:
    line = next(x for x in log.read_text().splitlines() if "API plan" in x)
    return "flash attention on" in line


@dataclass
class Outcome:
    started: float
    prompt: int
    status: int
    text: str


class Traffic:
    """Back-to-back requests from a thread, each recorded with when it started."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = chat(self.base_url, PROMPTS[i % len(PROMPTS)])
                text = answer(reply) if reply.status == 200 else json.dumps(reply.body)
                status = reply.status
            except (OSError, ValueError) as exc:
                status, text = 0, repr(exc)
            self.outcomes.append(Outcome(started, i % len(PROMPTS), status, text))
            i += 1

    def served_since(self, since: float) -> int:
        return sum(1 for o in self.outcomes if o.started >= since and o.status == 200)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=200)


def idle_counts(head: ApiHead, workers: list[Worker]) -> dict[str, Any] | None:
    """The head's and workers' session counts once nothing is in flight, else None."""
    status = read_json(head.status)
    if not status:
        return None
    sessions = status["sessions"]
    if sessions["api_slots_busy"] or sessions["queued"] or sessions["waiting_replies"]:
        return None
    open_ = sessions["pipeline_sessions"]
    plan = status["plan"] or ""
    staged = {}
    for worker in workers:
        worker_status = read_json(worker.status)
        if not worker_status:
            return None
        in_plan = worker.node_id[:8] in plan
        staged[worker.name] = worker_status["sessions"]["stage_sessions"]
        if worker_status["sessions"]["stage_queued"]:
            return None
        # A worker of the plan holds exactly the head's open sessions; any other holds none.
        if staged[worker.name] != (open_ if in_plan else 0):
            return None
    return {"head": sessions, "workers": staged, "replans": status["replans"]}


def in_plan(head: ApiHead, workers: list[Worker]) -> Worker:
    """The worker running a stage of the head's plan now."""
    plan = read_json(head.status)["plan"]
    return next(w for w in workers if w.node_id[:8] in plan)


@pytest.fixture
def churn_mesh(
    smollm2: Path, smollm2_profile: EngineProfile, tmp_path: Path
) -> Iterator[tuple[Cluster, ApiHead]]:
    """Two workers and an API head, 300 MB each (the profile fixture probes the engine once,
    before three processes would race to)."""
    cluster = Cluster(tmp_path)
    head = None
    try:
        cluster.add(smollm2, env=LIMIT)
        cluster.add(smollm2, env=LIMIT)
        cluster.wait_connected()
        head = ApiHead(cluster, smollm2, free_port(), KEY, env=LIMIT)
        yield cluster, head
    finally:
        if head is not None:
            head.stop()
        cluster.close()


def test_requests_survive_workers_killed_and_restarted(
    churn_mesh: tuple[Cluster, ApiHead], smollm2: Path, tmp_path: Path
) -> None:
    cluster, head = churn_mesh
    solo = solo_texts(smollm2, tmp_path, flash_of(head.log))
    traffic = Traffic(head.base_url)
    try:
        restarted: list[float] = []
        for _ in range(2):
            wait_for(lambda: traffic.served_since(time.monotonic() - 60) >= 2, 120, "answers")
            worker = in_plan(head, cluster.workers)
            worker.proc.kill()  # SIGKILL: no goodbye to anyone
            worker.proc.wait(timeout=10)
            cluster.restart(worker)
            restarted.append(time.monotonic())
            since = restarted[-1]
            wait_for(lambda s=since: traffic.served_since(s) >= 2, 120, "answers after restart")
    finally:
        traffic.stop()
    after = [o for o in traffic.outcomes if o.started >= restarted[0]]
    assert after and all(o.status == 200 for o in after), [
        (o.status, o.text[:200]) for o in after if o.status != 200
    ]
    for outcome in traffic.outcomes:
        if outcome.status == 200:
            assert outcome.text == solo[outcome.prompt]
    counts = wait_for(lambda: idle_counts(head, cluster.workers), 30, "sessions released")
    assert counts["head"]["api_slots_busy"] == 0
    assert counts["head"]["pipeline_sessions"] <= 4
    reasons = [r["reason"] for r in counts["replans"]]
    assert reasons[0] == "start" and reasons.count("stage lost") >= 2, reasons


def test_head_alone_serves_once_a_member_joins(
    smollm2: Path, smollm2_profile: EngineProfile, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    invite_file = tmp_path / "head.invite"
    log_path = tmp_path / "head.log"
    args = [
        *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "head"),
        "--model", str(smollm2), "--invite-file", str(invite_file), "--invite-uses", "5",
        "--status-file", str(tmp_path / "head.status.json"),
        "--api", f"127.0.0.1:{port}", "--api-key", KEY,
    ]  # fmt: skip
    worker = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, env={**ENV, **LIMIT}, stdout=log, stderr=log)
    try:
        wait_for(lambda: "API on http" in log_path.read_text() or proc.poll() is not None, 120)
        assert proc.poll() is None, log_path.read_text()
        models = call(f"{base_url}/models")
        assert models.status == 200 and models.body["data"][0]["id"] == MODEL_ID
        refused = chat(base_url, PROMPTS[0])
        assert refused.status == 503, refused.body
        assert int(refused.headers["Retry-After"]) > 0
        assert "no plan fits" in refused.body["error"]["message"]
        worker = Worker(tmp_path, "w", smollm2, invite_file.read_text().strip(), LIMIT)
        wait_for(worker.ready, what="worker ready")
        served = wait_for(
            lambda: (r := chat(base_url, PROMPTS[0])).status == 200 and r, 120, "a plan"
        )
        solo = solo_texts(smollm2, tmp_path, "flash attention on" in log_path.read_text())
        assert answer(served) == solo[0]
        status = read_json(tmp_path / "head.status.json")
        reasons = [r["reason"] for r in status["replans"]]
        assert reasons[0] == "start" and status["replans"][0]["plan"] is None
        assert status["replans"][-1]["plan"] is not None
    finally:
        if worker is not None:
            worker.stop()
        stop_process(proc)
