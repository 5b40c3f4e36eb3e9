"""One probe of an engine profile, run in a child process: `python -m meshchat.engine.probe`.

A backend bug in a setting (ggml's AMX buffers segfault on the first decode on some Intel CPUs)
must cost a probe, never the node: the parent (meshchat.inference.profiling) runs this module in
a child, and a child that dies by a signal, hangs past its bound or answers with nonsense marks
the setting unsafe on this machine.

The child loads the file it is given (the model, or a slice of its first layers) with the
profile, prefills a fixed prompt twice, decodes a few tokens one at a time, and prints one JSON
line: the best prefill time per token, the 40th-percentile decode step, and where it wrote the
last output row (hidden states or logits) for the parent's sanity check. With `far_position`, a
second session is filled up to there and the two sessions then decode in turns, one token each:
the second point of the context term (decode at position 512 of the 1B synthetic model took 5%
longer than at 152, SmolLM2's 16-17%, three probes each). Taking turns, both points see the
same load: timed one after the other, a busy minute made the far point 3.4 times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meshchat.engine.profile import EngineProfile
from meshchat.engine.stage import Stage, StageOptions
from meshchat.model.slices import LayerRange

# Test-only: "crash:<pattern>" or "hang:<pattern>" (several joined by ",") makes the probe of
# every profile matching a pattern (EngineProfile.matches, e.g. "extra_bufts=on") kill itself
# with SIGSEGV or hang after loading, so the fallback is tested on machines whose backend has
# no such bug.
FAULT_ENV = "MESHCHAT_TEST_PROBE_FAULT"


@dataclass(frozen=True)
class ProbeRequest:
    model: Path
    first: int
    end: int
    total_layers: int
    profile: EngineProfile
    prefill_tokens: int
    decode_tokens: int
    output: Path  # where the last output row goes (.npy)
    far_position: int = 0  # decode again from this position (0: not)


@dataclass(frozen=True)
class ProbeResult:
    prefill_s: float  # per prompt token, best of two prefills
    decode_s: float  # per decode step, 40th percentile
    finite: bool  # every value of the last output row is finite
    # What each token of context adds to a decode step (from far_position against the near
    # session, decoded in turns); None without far_position.
    context_s: float | None = None


def measure(request: ProbeRequest) -> ProbeResult:
    end = max(request.prefill_tokens, request.far_position) + request.decode_tokens
    options = StageOptions(
        n_ctx=end + 8,
        max_sessions=2,
        n_batch=request.prefill_tokens,
    ).with_profile(request.profile)
    layers = LayerRange(request.first, request.end)
    with Stage(request.model, layers, request.total_layers, options) as stage:
        _inject_fault(request.profile)
        vocab = max(stage.n_vocab, 2)
        prompt = [(17 + 31 * i) % vocab for i in range(end)][: request.prefill_tokens]
        session = uuid.uuid4().hex
        stage.open_session(session)
        stage.forward(session, 0, prompt[:8], sample=False)  # page in, build the graphs
        prefills = []
        for _ in range(2):
            stage.rollback(session, 0)
            started = time.perf_counter()
            output = stage.forward(session, 0, prompt, sample=False)
            prefills.append((time.perf_counter() - started) / len(prompt))
        last = output.hidden if output.hidden is not None else output.logits
        assert last is not None
        row = np.array(last[-1], dtype=np.float32)
        np.save(request.output, row)
        near = len(prompt)
        decode_s = _p40(_decode(stage, [(session, near)], prompt, request.decode_tokens)[0])
        far = request.far_position
        context_s = None
        near += request.decode_tokens
        if far > near:
            other = uuid.uuid4().hex
            stage.open_session(other)
            for start in range(0, far, len(prompt)):  # fill its context, prompt-sized chunks
                chunk = [prompt[(start + i) % len(prompt)] for i in range(len(prompt))]
                stage.forward(other, start, chunk[: far - start], sample=False)
            steps = _decode(stage, [(session, near), (other, far)], prompt, request.decode_tokens)
            context_s = max(0.0, _p40(steps[1]) - _p40(steps[0])) / (far - near)
    return ProbeResult(min(prefills), decode_s, bool(np.isfinite(row).all()), context_s)


def _decode(
    stage: Stage, sessions: list[tuple[str, int]], prompt: list[int], n: int
) -> list[list[float]]:
    """Decode `n` tokens one at a time in each (session, from position), in turns: the
    time of every step, by session."""
    steps: list[list[float]] = [[] for _ in sessions]
    for i in range(n):
        for times, (session, position) in zip(steps, sessions, strict=True):
            started = time.perf_counter()
            stage.forward(session, position + i, [prompt[i % len(prompt)]], sample=False)
            times.append(time.perf_counter() - started)
    return steps


def _p40(steps: list[float]) -> float:
    # Other programs only ever slow a run down: the faster runs are the machine's own speed.
    return sorted(steps)[len(steps) * 2 // 5]


def _inject_fault(profile: EngineProfile) -> None:
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, pattern = spec.partition(":")
        if not profile.matches(pattern):
            continue
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif kind == "hang":
            while True:
                time.sleep(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshchat.engine.probe")
    parser.add_argument("request", help="the probe request as JSON")
    raw = json.loads(parser.parse_args(argv).request)
    request = ProbeRequest(
        model=Path(raw["model"]),
        first=int(raw["first"]),
        end=int(raw["end"]),
        total_layers=int(raw["total_layers"]),
        profile=EngineProfile.from_json(raw["profile"]),
        prefill_tokens=int(raw["prefill_tokens"]),
        decode_tokens=int(raw["decode_tokens"]),
        output=Path(raw["output"]),
        far_position=int(raw.get("far_position", 0)),
    )
    result = measure(request)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
