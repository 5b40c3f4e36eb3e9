"""`meshchat bench [--json]`: the performance table (see meshchat.bench)."""

from __future__ import annotations

import argparse
import json
import sys

from meshchat.bench import (
    PROMPT_TOKENS,
    LlamaCppRow,
    bench_prompt,
    format_table,
    run_benchmark,
)
from meshchat.commands.common import choose_model, thread_count
from meshchat.engine.stage import Stage, StageOptions
from meshchat.errors import UsageError
from meshchat.inference.capabilities import calibration
from meshchat.inference.local import build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.paths import DataDir


def run_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    data = DataDir.resolve(args.data_dir)
    choice = choose_model(args, data)
    threads = thread_count(args.threads)
    prompt = bench_prompt(choice.path)
    model = LocalModel.from_header(choice.header, data)
    calib = calibration(model, data, threads)
    options = StageOptions(
        n_ctx=1024, max_sessions=1, n_batch=PROMPT_TOKENS, n_threads=threads
    ).with_profile(calib.profile)

    def make_stages(ranges: list[tuple[int, int]]) -> list[Stage]:
        return build_stages(choice.path, ranges, data.slices, data.fingerprints, options)

    def progress(message: str) -> None:
        print(f"meshchat bench: {message}", file=sys.stderr)

    from meshchat.inference.mesh_bench import MeshRows

    # The mesh rows send the prompt in generate --join's micro-batches (its default chunk).
    mesh = MeshRows(choice.path, data, threads, n_ctx=1024)
    reference = LlamaCppRow(choice.path, calib.profile, n_ctx=1024)
    try:
        report = run_benchmark(
            choice.spec,
            make_stages,
            prompt,
            threads,
            args.repeats,
            progress,
            mesh,
            reference=reference,
            profile=calib,
        )
    finally:
        mesh.close()
        reference.close()
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
