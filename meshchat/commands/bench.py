"""`meshchat bench [--json]`: the performance table (see meshchat.bench)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshchat.bench import (
    PROMPT_TOKENS,
    SOLO_BESIDE_MESH,
    LlamaCppRow,
    bench_prompt,
    format_table,
    run_benchmark,
)
from meshchat.commands.common import ModelChoice, choose_model, thread_count
from meshchat.engine.stage import Stage, StageOptions
from meshchat.errors import MeshchatError, UsageError
from meshchat.inference import own_cores
from meshchat.inference.capabilities import calibration
from meshchat.inference.local import build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.model.gguf_file import read_header
from meshchat.model.spec import spec_from_header
from meshchat.model.synthetic import synthetic_model
from meshchat.paths import DataDir, machine_cache_dir


def run_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    data = DataDir.resolve(args.data_dir)
    choice = choose_model(args, data)
    if args.synthetic:  # a random llama of that size, with the chosen model's tokenizer
        path = synthetic_model(args.synthetic, choice.path, machine_cache_dir())
        header = read_header(path)
        choice = ModelChoice(path, header, spec_from_header(header))
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
    mesh = MeshRows(choice.path, data, threads, n_ctx=1024, budgets=True)
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
    if own_cores.possible():
        progress("mesh2 with a core per node, one thread each (a child process)")
        add_own_cores(report, run_own_cores(choice.path, data, args.repeats))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def run_own_cores(model: Path, data: DataDir, repeats: int) -> dict[str, Any]:
    """meshchat.inference.own_cores's report (in a child: pinning precedes every thread)."""
    command = [
        sys.executable, "-m", "meshchat.inference.own_cores", "--model", str(model),
        "--data-dir", str(data.root), "--repeats", str(repeats),
    ]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise MeshchatError(f"the a-core-per-node rows failed (exit {done.returncode})")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def add_own_cores(report: dict[str, Any], child: dict[str, Any]) -> None:
    """The child's rows, as `solo_one_core` and `mesh2_own_cores`, into the bench's report."""
    solo, mesh = child["rows"][SOLO_BESIDE_MESH], child["rows"]["mesh2"]
    report["rows"] |= {"solo_one_core": solo, "mesh2_own_cores": mesh}
    for metric in ("decode", "prefill"):
        key = f"{metric}_tok_s"
        report["ratios"][f"mesh2_own_cores_vs_solo_{metric}"] = round(mesh[key] / solo[key], 3)
    report["splits"]["mesh2_own_cores"] = child["splits"]["mesh2"]
    for key, value in child.items():
        if key.startswith("mesh2_"):
            report[key.replace("mesh2_", "mesh2_own_cores_", 1)] = value
        elif key.startswith("solo_predict"):
            report[key.replace("solo_", "solo_one_core_", 1)] = value
    report["per_hop_own_cores"] = child.get("per_hop")
