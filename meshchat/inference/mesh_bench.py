"""The benchmark's mesh rows: the model split over separate processes on loopback.

`MeshRows` starts `meshchat --headless` workers (their own data dirs in a temp dir that share
this run's cache, the same thread count as the solo row, the model from the same file) and a
head per row in this process, on an event loop in a background thread:
- mesh2: head [0, n/2) → worker 0 [n/2, n)
- mesh3: head [0, n/3) → worker 1 → worker 2
`worker_cpus` pins the workers to those CPUs (meshchat.inference.own_cores gives each node a core).
With `budgets`, every node of a row offers more memory than that row's largest stage needs and
less than the whole model needs (MESHCHAT_MEMORY_LIMIT for the workers, the head's offer to the
planner likewise): the split is forced, as for a model bigger than any one machine.
Each repetition runs the real `MeshPipeline.forward` path that `generate --join` uses. The loop's
thread is the process's compute thread (meshchat.engine.compute), as in `generate --join`; the
bench's solo runs between the mesh rows run on it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from meshchat.engine import compute
from meshchat.engine.sampling import SamplingParams
from meshchat.errors import MeshchatError
from meshchat.inference import hop_timing
from meshchat.inference.capabilities import MEMORY_LIMIT_ENV, NodeCaps, calibration
from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.local_model import LocalModel
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.inference.planner import ModelNeeds, Plan, Prediction, StagePlan
from meshchat.mesh.identity import NodeId
from meshchat.mesh.node import Node
from meshchat.paths import DataDir

T = TypeVar("T")
GREEDY = SamplingParams(temperature=0.0)
_WORKERS_NEEDED = {"mesh2": 1, "mesh3": 3}  # worker 0 serves mesh2, workers 1 and 2 mesh3
_WORKER_ROW = ("mesh2", "mesh3", "mesh3")  # the row each worker serves, by index
_START_TIMEOUT_S = 120.0
_MIB = 1 << 20


def _even(n_layers: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n_layers / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def _median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3) if seconds else 0.0


class MeshRows:
    def __init__(
        self,
        model_path: Path,
        data: DataDir,
        threads: int,
        n_ctx: int,
        names: tuple[str, ...] = ("mesh2", "mesh3"),
        worker_cpus: set[int] | None = None,
        budgets: bool = False,
    ) -> None:
        self.names = names
        self.n_workers = max(_WORKERS_NEEDED[name] for name in names)
        self.worker_cpus = worker_cpus
        self.model_path = model_path
        self.data = data  # the heads' slices and calibration cache (identities are temporary)
        self.threads = threads
        self.n_ctx = n_ctx
        self.splits: dict[str, list[tuple[int, int]]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="meshchat-bench-")
        self.root = Path(self._tmp.name)
        self.hops = self.root / "hops"  # every node's decode-step marks (hop_timing)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._nodes: list[Node] = []
        self._pipelines: dict[str, MeshPipeline] = {}
        self._model: LocalModel  # opened by start()
        self._decode_bytes = 0
        self._decode_frames = 0
        self.with_budgets = budgets
        self.budgets: dict[str, int] = {}  # bytes each node of a row offers (with `budgets`)
        self.fits_one_node: dict[str, bool] = {}  # the planner's view, under those budgets
        self.predicted: dict[str, Prediction] = {}  # the planner's figures for each row
        self.predicted_solo: Prediction | None = None  # the whole model on the head
        # What each row's planner sees, to predict again with the speeds its stages showed.
        self._planning: dict[str, tuple[MeshCoordinator, list[NodeCaps], Plan]] = {}
        self._measured: dict[str, list[float]] = {}
        # Per decode step: the stages' compute (as they report it) and the rest of the wall time.
        self._compute_s: dict[str, list[float]] = {}
        self._network_s: dict[str, list[float]] = {}
        self._step_s: dict[str, list[float]] = {}  # whole decode steps, for their tail

    # -- setup ---------------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None]) -> None:
        # Every node runs on this machine: calibrate once here and give the workers the result,
        # rather than have three processes calibrate at once and slow each other down.
        # The workers also share this data dir's cache: the slices the in-process rows wrote
        # and the fingerprint. Else each worker writes its own slice files (100+ MB in all),
        # and the kernel's writeback of them competes with the rows for the two cores.
        model = self._model = LocalModel.open(self.model_path, self.data)
        compute.run_sync(calibration, model, self.data, self.threads)
        if self.with_budgets:
            self.budgets = {name: self._budget(name) for name in self.names}
        cache = self.data.ensure(self.data.root / "cache")
        for i in range(self.n_workers):
            worker = self.root / f"w{i}"
            worker.mkdir()
            (worker / "cache").symlink_to(cache, target_is_directory=True)
        progress(f"starting {self.n_workers} mesh worker(s) on loopback")
        invite = self._start_workers()
        self._thread.start()
        self._call(self._setup(invite), _START_TIMEOUT_S)

    def _budget(self, name: str) -> int:
        """What each node of row `name` offers: halfway from its largest even stage's need to
        the whole model's, so every stage fits and the model fits no node."""
        needs, n = ModelNeeds.of(self._model), self._model.n_layers
        largest = max(
            needs.memory(first, end, end == n, self.n_ctx, 1)
            for first, end in _even(n, int(name.removeprefix("mesh")))
        )
        return (largest + needs.memory(0, n, True, self.n_ctx, 1)) // 2

    def _start_workers(self) -> str:
        env = {**os.environ, "MESHCHAT_MDNS": "0", "MESHCHAT_THREADS": str(self.threads),
               hop_timing.ENV: str(self.hops)}  # fmt: skip
        invite = ""
        for i in range(self.n_workers):
            budget = self.budgets.get(_WORKER_ROW[i])
            if budget is not None:
                env[MEMORY_LIMIT_ENV] = str(budget)
            invite_file = self.root / f"w{i}.invite"
            args = [
                sys.executable, "-m", "meshchat.cli", "--headless", "--listen", "127.0.0.1:0",
                "--data-dir", str(self.root / f"w{i}"), "--model", str(self.model_path),
                "--invite-file", str(invite_file), "--invite-uses", "8",
            ]  # fmt: skip
            if invite:
                args += ["--join", invite]
            log = (self.root / f"w{i}.log").open("wb")
            self._procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=log))
            if self.worker_cpus:  # before the worker starts any thread: they inherit it
                os.sched_setaffinity(self._procs[-1].pid, self.worker_cpus)
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not invite_file.exists():
                if self._procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise MeshchatError(f"bench worker {i} did not start: see {log.name}")
                time.sleep(0.05)
            invite = invite or invite_file.read_text().strip()
        return invite

    async def _setup(self, invite: str) -> None:
        compute.adopt_loop()  # the heads' stages compute on this loop, as in generate --join
        hop_timing.enable(self.hops)
        data = self.data
        model = self._model
        workers: list[NodeId] = []
        for name in self.names:
            parts = int(name.removeprefix("mesh"))
            node = Node(DataDir(self.root / name), "127.0.0.1:0")
            await node.start()
            self._nodes.append(node)
            inviter = await node.join(invite)
            coordinator = MeshCoordinator(node, model, data, threads=self.threads, n_ctx=self.n_ctx)
            await coordinator.settle(inviter, timeout=10.0)
            if not workers:
                # Wait for every worker's start-up calibration, so none runs during a row.
                peers = sorted(node.connected())
                caps = await asyncio.gather(*(coordinator.query(p) for p in peers))
                workers = [c.node_id for c in caps]
                if len(workers) < self.n_workers:
                    raise MeshchatError(f"only {len(workers)} bench workers connected")
            ranges = _even(model.n_layers, parts)
            chosen = workers[:1] if parts == 2 else workers[1:3]
            nodes = [node.node_id, *chosen]
            stages = tuple(StagePlan(n, *r) for n, r in zip(nodes, ranges, strict=True))
            self.splits[name] = ranges
            plan = Plan(stages)
            offers = [
                self._offer(c, node) for c in await coordinator.gather() if c.node_id in nodes
            ]
            planner = coordinator.planner(offers)
            if self.predicted_solo is None:
                whole = coordinator.planner([c for c in offers if c.node_id == nodes[0]])
                solo = Plan((StagePlan(nodes[0], 0, model.n_layers),))
                self.predicted_solo = whole.predict(solo)
            self.predicted[name] = planner.predict(plan)
            self._planning[name] = (coordinator, offers, plan)
            self.fits_one_node[name] = bool(planner.search(1))
            self._pipelines[name] = await coordinator.start(plan)

    def _offer(self, caps: NodeCaps, head: Node) -> NodeCaps:
        """The head's own offer under its row's budget (the workers' come with it already)."""
        budget = self.budgets.get(self._row_of(head))
        if budget is None or caps.node_id != head.node_id:
            return caps
        return replace(caps, free_memory=min(caps.free_memory, budget))

    def _row_of(self, head: Node) -> str:
        return self.names[self._nodes.index(head)]

    # -- running -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 600.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def run_once(
        self, name: str, prompt: list[int], decode_tokens: int, record: Callable[..., None]
    ) -> None:
        """Prefill `prompt`, decode greedily; `record(prefill_s, ttft_s, decode_s)`."""
        figures = self._call(self._once(name, prompt, decode_tokens))
        self._measured.setdefault(name, []).append(decode_tokens / figures[2])
        record(*figures)

    async def _once(
        self, name: str, prompt: list[int], decode_tokens: int
    ) -> tuple[float, float, float]:
        pipeline = self._pipelines[name]
        compute_s = self._compute_s.setdefault(name, [])
        network_s = self._network_s.setdefault(name, [])
        step_s = self._step_s.setdefault(name, [])
        session = uuid.uuid4().hex
        await pipeline.open_session(session)
        try:
            await pipeline.configure_sampling(session, GREEDY)
            started = time.perf_counter()
            token = await pipeline.forward(session, 0, prompt)
            first = time.perf_counter()
            position = len(prompt)
            bytes_before, tokens_before = pipeline.wire_bytes, pipeline.wire_tokens
            for _ in range(decode_tokens):
                token = await pipeline.forward(session, position, [token])
                position += 1
                compute_s.append(sum(pipeline.last_step.stage_compute_s))
                network_s.append(pipeline.last_step.network_s)
                step_s.append(pipeline.last_step.wall_s)
            done = time.perf_counter()
            self._decode_bytes += pipeline.wire_bytes - bytes_before
            self._decode_frames += pipeline.wire_tokens - tokens_before
        finally:
            await pipeline.close_session(session)
        return first - started, first - started, done - first

    def report(self) -> dict[str, Any]:
        hops = sorted(
            itertools.chain.from_iterable(p.hop_samples for p in self._pipelines.values())
        )
        if not hops:
            return {}
        p99 = hops[min(len(hops) - 1, int(len(hops) * 0.99))]
        accuracy: dict[str, float | bool] = {}
        for name, predicted in self.predicted.items():
            runs = self._measured.get(name, [])[1:]  # the first run is the warm-up
            if runs:
                measured = statistics.median(runs)
                accuracy[f"{name}_predicted_decode_tok_s"] = round(predicted.decode_tok_s, 1)
                accuracy[f"{name}_prediction_error"] = round(
                    predicted.decode_tok_s / measured - 1, 3
                )
                accuracy[f"{name}_predicted_compute_ms"] = round(predicted.compute_s * 1000, 3)
                # The same plan predicted again with each node's speed as its stages showed it
                # in this row's runs (observed_speed): what the next plan would be told.
                coordinator, offers, plan = self._planning[name]
                observed = coordinator.planner(offers).predict(plan)
                accuracy[f"{name}_observed_predicted_decode_tok_s"] = round(
                    observed.decode_tok_s, 1
                )
                accuracy[f"{name}_observed_prediction_error"] = round(
                    observed.decode_tok_s / measured - 1, 3
                )
                accuracy[f"{name}_predicted_network_ms"] = round(predicted.network_s * 1000, 3)
                accuracy[f"{name}_compute_ms"] = _median_ms(self._compute_s[name])
                accuracy[f"{name}_network_ms"] = _median_ms(self._network_s[name])
                # Medians above; the mean shows the tail (steps slowed by other programs),
                # which sets the row's tok/s as much as the median does on shared cores.
                steps = self._step_s[name]
                accuracy[f"{name}_step_ms_median"] = _median_ms(steps)
                accuracy[f"{name}_step_ms_mean"] = round(statistics.fmean(steps) * 1000, 3)
            # A row that failed over may have run on fewer nodes: its figures are not the row's.
            accuracy[f"{name}_failovers"] = self._pipelines[name].failovers
            if name in self.budgets:
                accuracy[f"{name}_node_memory_mib"] = self.budgets[name] // _MIB
                accuracy[f"{name}_fits_one_node"] = self.fits_one_node[name]
        if self.predicted_solo is not None:
            accuracy["solo_predicted_decode_tok_s"] = round(self.predicted_solo.decode_tok_s, 1)
        return {
            **accuracy,
            "hop_latency_ms_p50": round(statistics.median(hops) * 1000, 3),
            "hop_latency_ms_p99": round(p99 * 1000, 3),
            "wire_bytes_per_token": round(self._decode_bytes / max(self._decode_frames, 1), 1),
            # mesh2's decode tokens make 2 hops, mesh3's 3: one entry each.
            "per_hop": hop_timing.per_hop_summary(hop_timing.load(self.hops)),
        }

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._teardown(), 30.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._tmp.cleanup()

    async def _teardown(self) -> None:
        for pipeline in self._pipelines.values():
            with contextlib.suppress(Exception):
                await pipeline.close()
        for node in self._nodes:
            await node.stop()
