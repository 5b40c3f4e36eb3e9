"""What taking turns costs on this machine, with no network: the floor under the mesh rows.

    python scripts/bench_turns.py --model M [--repeats 3]

Two measurements, each with llama.cpp stages exactly as `meshchat bench` runs them:
- turns: the model split into N processes (N = 1, 2, 3) that decode one token after another,
  handing the turn on over a pipe. This is a mesh without QUIC, serialisation or Python I/O;
  whatever it loses against N = 1 is the operating system's and OpenMP's share.
- idle: one process decoding 10 layers, with a pause between steps (0, 2, 8, 20 ms), as a mesh
  stage waits for its turn. On a virtual machine, a step after a pause can cost several times a
  step without one: OpenMP's threads sleep, and waking them (and an idle vCPU) is slow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import Stage, StageOptions
from meshchat.inference.local import build_stages
from meshchat.paths import DataDir

SPLITS = {1: [(0, 30)], 2: [(0, 15), (15, 30)], 3: [(0, 10), (10, 20), (20, 30)]}
PROMPT = 512
STEPS = 128


def load_stage(model: Path, data: DataDir, ranges: list[tuple[int, int]], index: int) -> Stage:
    options = StageOptions(n_ctx=1024, max_sessions=1, n_batch=PROMPT, n_threads=2)
    stages = build_stages(model, ranges, data.slices, data.fingerprints, options)
    for other in stages:
        if other is not stages[index]:
            other.close()
    return stages[index]


def prefill(stage: Stage) -> None:
    import numpy as np

    stage.open_session("s")
    if stage.is_last:
        stage.configure_sampling("s", SamplingParams(temperature=0.0))
    hidden = None if stage.is_first else np.zeros((PROMPT, stage.n_embd), dtype=np.float32)
    stage.forward("s", 0, list(range(1, PROMPT + 1)), hidden)


def step(stage: Stage, position: int) -> None:
    import numpy as np

    hidden = None if stage.is_first else np.zeros((1, stage.n_embd), dtype=np.float32)
    stage.forward("s", position, [5], hidden)


def stage_process(
    model: Path, data: DataDir, n: int, index: int, take: int, give: int, ready: int
) -> None:
    stage = load_stage(model, data, SPLITS[n], index)
    prefill(stage)
    os.write(ready, b"r")
    position = PROMPT
    while os.read(take, 1) == b"t":
        step(stage, position)
        position += 1
        if position == PROMPT + STEPS:
            stage.rollback("s", PROMPT)
            position = PROMPT
        os.write(give, b"t")
    os.write(give, b"q")  # pass the quit on down the chain


def turns(model: Path, data: DataDir, n: int, repeats: int) -> list[float]:
    """Decode tok/s of each repetition, the model split over `n` processes in turn."""
    pipes = [os.pipe() for _ in range(n + 1)]
    ready = os.pipe()
    children = []
    for index in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                take, give = pipes[index][0], pipes[index + 1][1]
                stage_process(model, data, n, index, take, give, ready[1])
            finally:
                os._exit(0)
        children.append(pid)
    start, end = pipes[0][1], pipes[n][0]
    for _ in range(n):
        os.read(ready[0], 1)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(STEPS):
            os.write(start, b"t")
            os.read(end, 1)
        rates.append(STEPS / (time.perf_counter() - started))
    os.write(start, b"q")
    for pid in children:
        os.waitpid(pid, 0)
    return rates


def idle(model: Path, data: DataDir, pause_s: float) -> tuple[float, float, float]:
    """Median, mean and p90 ms of a 10-layer decode step after `pause_s` of idling."""
    stage = load_stage(model, data, SPLITS[3], 0)
    prefill(stage)
    times = []
    for i in range(200):
        if pause_s:
            time.sleep(pause_s)
        started = time.perf_counter()
        step(stage, PROMPT + i)
        times.append((time.perf_counter() - started) * 1000)
    stage.close()
    times.sort()
    return statistics.median(times), statistics.mean(times), times[int(0.9 * len(times))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = DataDir(Path(tmp))
        for n in (1, 2, 3):
            rates = turns(args.model, data, n, args.repeats)
            print(f"turns  {n} process(es): decode {statistics.median(rates):6.1f} tok/s "
                  f"(runs: {', '.join(f'{r:.1f}' for r in rates)})", flush=True)  # fmt: skip
        for pause_ms in (0, 2, 8, 20):
            median, mean, p90 = idle(args.model, data, pause_ms / 1000)
            print(f"idle   {pause_ms:2d} ms before each step: median {median:5.2f} ms, "
                  f"mean {mean:5.2f}, p90 {p90:5.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
