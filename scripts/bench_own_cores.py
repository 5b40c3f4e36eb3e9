"""What the mesh costs when each node has a core to itself: the transport's share alone.

    python scripts/bench_own_cores.py --model M [--repeats 3]

`meshchat bench` runs its mesh rows with every node on this machine's two shared cores, so
they also pay for taking turns on those cores (see scripts/bench_turns.py). Here, as on two
machines of one core each:
- this process (the solo rows and the mesh2 head) is pinned to CPU 0,
- the one mesh worker is pinned to CPU 1,
- every stage uses one thread.
What mesh2 loses against solo is then the hops: QUIC, framing and the event loops, run on the
same core as the stage's compute, as on a one-core machine. Needs two CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from meshchat.bench import PROMPT_TOKENS, bench_prompt, run_benchmark
from meshchat.engine.stage import Stage, StageOptions
from meshchat.inference.local import build_stages
from meshchat.inference.mesh_bench import MeshRows
from meshchat.model.gguf_file import read_header
from meshchat.model.spec import spec_from_header
from meshchat.paths import DataDir

HEAD_CPU, WORKER_CPU = 0, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_own_cores: needs two CPUs")
    # Before any thread starts: llama.cpp's threads and the mesh loop inherit the pinning.
    os.sched_setaffinity(0, {HEAD_CPU})
    spec = spec_from_header(read_header(args.model))
    options = StageOptions(n_ctx=1024, max_sessions=1, n_batch=PROMPT_TOKENS, n_threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        data = DataDir(Path(tmp))

        def make_stages(ranges: list[tuple[int, int]]) -> list[Stage]:
            return build_stages(args.model, ranges, data.slices, data.fingerprints, options)

        mesh = MeshRows(args.model, data, 1, 1024, names=("mesh2",), worker_cpus={WORKER_CPU})
        try:
            report = run_benchmark(
                spec,
                make_stages,
                bench_prompt(args.model),
                1,
                args.repeats,
                lambda message: print(f"bench_own_cores: {message}", file=sys.stderr),
                mesh,
            )
        finally:
            mesh.close()
    keys = ("rows", "ratios", "hop_latency_ms_p50", "hop_latency_ms_p99")
    print(json.dumps({key: report[key] for key in keys}, indent=2))


if __name__ == "__main__":
    main()
