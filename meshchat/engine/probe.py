"""One probe of an engine profile, run in a child process: `python -m meshchat.engine.probe`.

A backend bug in a setting (ggml's AMX buffers segfault on the first decode on some Intel CPUs)
must cost a probe, never the node: the parent (meshchat.inference.profiling) runs this module in
a child, and a child that dies by a signal, hangs past its bound or answers with nonsense marks
the setting unsafe on this machine.

The child loads the file it is given (the model, or a slice of its first layers) with the
profile, prefills a fixed prompt twice, decodes a few tokens one at a time, and prints one JSON
line: the best prefill time per token, the 40th-percentile decode step, and where it wrote the
last output row (hidden states or logits) for the parent's sanity check. With `far_position`, it
then fills the context up to there and decodes as many tokens again: the second point of the
context term (decode at position 512 of the 1B synthetic model took 7% longer than at 128).
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
    decode_far_s: float | None = None  # the same from far_position on


def measure(request: ProbeRequest) -> ProbeResult:
    end = max(request.prefill_tokens, request.far_position) + request.decode_tokens
    options = StageOptions(
        n_ctx=end + 8,
        max_sessions=1,
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
        decode_s = _decode(stage, session, len(prompt), prompt, request.decode_tokens)
        far = request.far_position
        decode_far_s = None
        if far > len(prompt) + request.decode_tokens:
            position = len(prompt) + request.decode_tokens
            while position < far:  # fill the context, in prompt-sized chunks
                chunk = [prompt[(position + i) % len(prompt)] for i in range(len(prompt))]
                chunk = chunk[: far - position]
                stage.forward(session, position, chunk, sample=False)
                position += len(chunk)
            decode_far_s = _decode(stage, session, far, prompt, request.decode_tokens)
    return ProbeResult(min(prefills), decode_s, bool(np.isfinite(row).all()), decode_far_s)


def _decode(stage: Stage, session: str, position: int, prompt: list[int], n: int) -> float:
    """Decode `n` tokens one at a time from `position`: the 40th-percentile step."""
    steps = []
    for i in range(n):
        started = time.perf_counter()
        stage.forward(session, position + i, [prompt[i % len(prompt)]], sample=False)
        steps.append(time.perf_counter() - started)
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
