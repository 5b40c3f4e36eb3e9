"""`meshchat bench`'s "a core per node" rows: the mesh's own cost, without taking turns.

    python -m meshchat.inference.own_cores --model M --data-dir D --repeats N

The bench's other mesh rows run every node on this machine's shared cores, so they also pay for
taking turns on them (see scripts/bench_turns.py). Here, as on two machines of one core each:
- this process (the solo row and the mesh2 head) is pinned to CPU 0,
- the one mesh worker is pinned to CPU 1,
- every stage uses one thread, and solo is measured the same way.
What mesh2 loses against solo is then the hops: QUIC, framing and the event loops, run on the
same core as the stage's compute, as on a one-core machine. The bench runs this in a child
process, since pinning must come before any thread starts. Needs two CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from meshchat.bench import PROMPT_TOKENS, bench_prompt, run_benchmark
from meshchat.engine.stage import Stage, StageOptions
from meshchat.inference.local import build_stages
from meshchat.inference.mesh_bench import MeshRows
from meshchat.mesh import polling
from meshchat.model.gguf_file import read_header
from meshchat.model.spec import spec_from_header
from meshchat.paths import DataDir

HEAD_CPU, WORKER_CPU = 0, 1


def possible() -> bool:
    """Whether this process may use two CPUs (the method needs one per node)."""
    return {HEAD_CPU, WORKER_CPU} <= os.sched_getaffinity(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshchat.inference.own_cores")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not possible():
        sys.exit("own_cores: needs CPUs 0 and 1")
    # Before any thread starts: llama.cpp's threads and the mesh loop inherit the pinning.
    os.sched_setaffinity(0, {HEAD_CPU})
    polling.install()  # the head's loop, as `meshchat` gives every command's (mesh/polling.py)
    spec = spec_from_header(read_header(args.model))
    data = DataDir(args.data_dir)
    options = StageOptions(n_ctx=1024, max_sessions=1, n_batch=PROMPT_TOKENS, n_threads=1)

    def make_stages(ranges: list[tuple[int, int]]) -> list[Stage]:
        return build_stages(args.model, ranges, data.slices, data.fingerprints, options)

    mesh = MeshRows(
        args.model, data, 1, 1024, names=("mesh2",), worker_cpus={WORKER_CPU}, budgets=True
    )
    try:
        report = run_benchmark(
            spec,
            make_stages,
            bench_prompt(args.model),
            1,
            args.repeats,
            lambda message: print(f"own cores: {message}", file=sys.stderr),
            mesh,
            local_rows=(),
        )
    finally:
        mesh.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
