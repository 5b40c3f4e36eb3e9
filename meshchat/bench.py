"""Benchmarks: how fast the model runs whole and split, on this machine, in one run.

Every configuration loads once; then repetitions run the configurations interleaved
(solo, split2, split3, solo, ...) so a noisy neighbour slows them alike, and each figure is the
median over repetitions. Ratios compare against the unsplit run of the same invocation.
"""

from __future__ import annotations

import itertools
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshchat.engine import compute
from meshchat.engine.profile import EngineProfile, llama_defaults
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import Stage
from meshchat.engine.tokenizer import Tokenizer
from meshchat.inference.local import LocalPipeline
from meshchat.inference.profiling import FAR_POSITION, PREFILL_TOKENS, Calibration
from meshchat.model.spec import ModelSpec

if TYPE_CHECKING:
    from meshchat.inference.mesh_bench import MeshRows

GREEDY = SamplingParams(temperature=0.0)
PROMPT_TOKENS = 512
DECODE_TOKENS = 128
# Solo again, run between the mesh rows: their reference (see run_benchmark).
SOLO_BESIDE_MESH = "solo_beside_mesh"
# Plain llama-cpp-python (its high-level `Llama`, no meshchat code) with the same settings.
LLAMA_CPP = "llama_cpp"
# Beside the mesh, solo hands each step to the compute thread, which is the mesh's event loop:
# one 512-token prefill of a 1B model there held the loop 28 s with the cores shared, past QUIC's
# 15 s idle timeout, and every mesh row failed over to the head alone. 64-token chunks hold it
# a few seconds at most.
SOLO_PREFILL_CHUNK = 64
# Any text will do: the benchmark needs a realistic prompt of exactly PROMPT_TOKENS tokens.
_FILLER = (
    "Pipeline parallelism splits a model by layers: each machine runs a contiguous range and "
    "passes the hidden state of every token to the next machine in the chain. "
)


@dataclass
class RowResult:
    """Per-repetition measurements of one configuration."""

    decode_tok_s: list[float] = field(default_factory=list)
    prefill_tok_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)

    def record(
        self, prefill_s: float, ttft_s: float, decode_s: float, prompt: int, decode: int
    ) -> None:
        self.prefill_tok_s.append(prompt / prefill_s)
        self.ttft_ms.append(ttft_s * 1000)
        self.decode_tok_s.append(decode / decode_s)

    def summary(self) -> dict[str, float]:
        return {
            "decode_tok_s": round(statistics.median(self.decode_tok_s), 2),
            "prefill_tok_s": round(statistics.median(self.prefill_tok_s), 2),
            "ttft_ms": round(statistics.median(self.ttft_ms), 2),
        }


def bench_prompt(model_path: Path) -> list[int]:
    """PROMPT_TOKENS tokens of English text for the model at `model_path`."""
    tokenizer = Tokenizer(model_path)
    prompt: list[int] = []
    while len(prompt) < PROMPT_TOKENS:
        prompt += tokenizer.tokenize(_FILLER, add_special=False)
    return prompt[:PROMPT_TOKENS]


def even_ranges(n_layers: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n_layers / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def _direct(fn: Callable[..., int], *args: object) -> int:
    return fn(*args)


def _prefill_chunks(prompt: list[int]) -> list[list[int]]:
    return [prompt[i : i + SOLO_PREFILL_CHUNK] for i in range(0, len(prompt), SOLO_PREFILL_CHUNK)]


def run_pipeline_once(
    pipeline: LocalPipeline,
    prompt: list[int],
    decode_tokens: int,
    result: RowResult,
    step: Callable[..., int] = _direct,
) -> None:
    """Prefill `prompt`, then decode greedily; append this repetition's figures to `result`.

    `step` runs each forward call: beside the mesh, compute.run_sync (see run_solo).
    """
    session = uuid.uuid4().hex
    for stage in pipeline.stages:
        stage.open_session(session)
    try:
        pipeline.stages[-1].configure_sampling(session, GREEDY)
        started = time.perf_counter()
        chunks = [prompt] if step is _direct else _prefill_chunks(prompt)
        position = 0
        for chunk in chunks:
            token = step(pipeline.forward_sync, session, position, chunk)
            position += len(chunk)
        first = time.perf_counter()
        for _ in range(decode_tokens):
            token = step(pipeline.forward_sync, session, position, [token])
            position += 1
        done = time.perf_counter()
    finally:
        for stage in pipeline.stages:
            stage.close_session(session)
    result.ttft_ms.append((first - started) * 1000)
    result.prefill_tok_s.append(len(prompt) / (first - started))
    result.decode_tok_s.append(decode_tokens / (done - first))


class LlamaCppRow:
    """The reference row: llama-cpp-python's own greedy loop with this machine's profile.

    It is what a user would write without meshchat: `Llama(...)` and `generate`, with the
    engine profile meshchat chose here (flash attention, extra buffer types, threads), so the
    `solo_vs_llama_cpp` ratios show what meshchat's own loop costs or saves.
    """

    def __init__(self, model_path: Path, profile: EngineProfile, n_ctx: int) -> None:
        from llama_cpp import Llama

        with llama_defaults(profile):
            self.llm = Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=PROMPT_TOKENS,
                n_ubatch=PROMPT_TOKENS,
                n_threads=profile.threads,
                n_threads_batch=profile.threads,
                flash_attn=profile.flash_attn,
                verbose=False,
            )

    def run_once(self, prompt: list[int], decode_tokens: int, result: RowResult) -> None:
        self.llm.reset()
        started = time.perf_counter()
        first = 0.0
        stream = self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0)
        for count, _token in enumerate(stream):
            if count == 0:
                first = time.perf_counter()
            elif count == decode_tokens:
                break
        done = time.perf_counter()
        result.record(first - started, first - started, done - first, len(prompt), decode_tokens)

    def close(self) -> None:
        self.llm.close()


def memory_bandwidth_gbs(size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Copy bandwidth of main memory: bytes read plus bytes written per second (median)."""
    source = np.ones(size_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in before timing
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        samples.append(2 * size_bytes / (time.perf_counter() - started))
    return statistics.median(samples) / 1e9


def bytes_read_per_token(spec: ModelSpec) -> int:
    """Weights one decode step reads: every layer plus the output matrix."""
    return sum(spec.layer_bytes) + spec.output_bytes


def run_benchmark(
    spec: ModelSpec,
    make_stages: Callable[[list[tuple[int, int]]], list[Stage]],
    prompt: list[int],
    threads: int,
    repeats: int,
    progress: Callable[[str], None] = lambda _msg: None,
    mesh: MeshRows | None = None,
    reference: LlamaCppRow | None = None,
    profile: Calibration | None = None,
    local_rows: tuple[str, ...] = ("solo", "split2", "split3"),
) -> dict[str, object]:
    """The in-process `local_rows` (solo, splits); with `mesh` (not started yet), also its rows.

    With `reference`, plain llama-cpp-python runs in every repetition too, after the
    in-process rows; `profile` (the engine profile and its trials) goes into the report.

    The in-process rows run first, with no mesh running. Then the mesh starts, and its rows run
    interleaved with solo once more ("solo_beside_mesh"): the mesh ratios compare runs of the
    same minutes, since this machine's speed drifts by 10% and more between minutes.
    """
    configs = {
        "solo": [(0, spec.n_layers)],
        "split2": even_ranges(spec.n_layers, 2),
        "split3": even_ranges(spec.n_layers, 3),
    }
    configs = {name: configs[name] for name in configs if name in local_rows or name == "solo"}
    pipelines = {name: LocalPipeline(make_stages(ranges)) for name, ranges in configs.items()}
    mesh_names = list(mesh.names) if mesh else []
    beside = [SOLO_BESIDE_MESH] if mesh else []
    plain = [LLAMA_CPP] if reference else []
    results = {name: RowResult() for name in [*local_rows, *plain, *beside, *mesh_names]}

    def run_solo(result: RowResult, prompt: list[int], decode: int) -> None:
        # Each step goes to the compute thread (the mesh's loop) on its own, so the loop serves
        # QUIC between steps (see SOLO_PREFILL_CHUNK).
        run_pipeline_once(pipelines["solo"], prompt, decode, result, step=compute.run_sync)

    try:
        for pipeline in pipelines.values():  # warm-up: page in weights, build graphs
            compute.run_sync(run_pipeline_once, pipeline, prompt[:64], 8, RowResult())
        if reference is not None:
            compute.run_sync(reference.run_once, prompt[:64], 8, RowResult())
        for repeat in range(repeats):
            progress(f"repetition {repeat + 1}/{repeats} in this process")
            for name in local_rows:
                compute.run_sync(
                    run_pipeline_once, pipelines[name], prompt, DECODE_TOKENS, results[name]
                )
            if reference is not None:
                compute.run_sync(reference.run_once, prompt, DECODE_TOKENS, results[LLAMA_CPP])
        if mesh is not None:
            mesh.start(progress)
            run_solo(RowResult(), prompt[:64], 8)
            for name in mesh_names:
                mesh.run_once(name, prompt[:64], 8, lambda *_figures: None)
            for repeat in range(repeats):
                progress(f"repetition {repeat + 1}/{repeats} on the mesh")
                run_solo(results[SOLO_BESIDE_MESH], prompt, DECODE_TOKENS)
                for name in mesh_names:
                    row = results[name]
                    mesh.run_once(
                        name,
                        prompt,
                        DECODE_TOKENS,
                        lambda p, t, d, row=row: row.record(p, t, d, len(prompt), DECODE_TOKENS),
                    )
            configs[SOLO_BESIDE_MESH] = configs["solo"]
            configs.update(mesh.splits)
    finally:
        for pipeline in pipelines.values():
            for stage in pipeline.stages:
                stage.close()
    if "solo" not in local_rows:
        del configs["solo"]
    rows = {name: result.summary() for name, result in results.items()}
    bandwidth = memory_bandwidth_gbs()
    per_token = bytes_read_per_token(spec)
    ratios = {}
    for name in [n for n in rows if n not in ("solo", SOLO_BESIDE_MESH, LLAMA_CPP)]:
        solo = rows[SOLO_BESIDE_MESH if name in mesh_names else "solo"]
        for metric in ("decode", "prefill"):
            key = f"{metric}_tok_s"
            ratios[f"{name}_vs_solo_{metric}"] = round(rows[name][key] / solo[key], 3)
    if LLAMA_CPP in rows:
        for metric in ("decode", "prefill"):
            key = f"{metric}_tok_s"
            ratios[f"solo_vs_llama_cpp_{metric}"] = round(
                rows["solo"][key] / rows[LLAMA_CPP][key], 3
            )
    mesh_report = mesh.report() if mesh else {}
    predicted_solo = mesh_report.get("solo_predicted_decode_tok_s")
    if isinstance(predicted_solo, float):
        solo_measured = rows[SOLO_BESIDE_MESH]["decode_tok_s"]
        mesh_report["solo_prediction_error"] = round(predicted_solo / solo_measured - 1, 3)
        # The same error with this minute's machine speed taken out: the planner's mesh/solo
        # ratio against the measured one (others' programs move both rows alike).
        for name in mesh_names:
            predicted = mesh_report.get(f"{name}_predicted_decode_tok_s")
            if isinstance(predicted, float):
                ratio = (predicted / predicted_solo) / (rows[name]["decode_tok_s"] / solo_measured)
                mesh_report[f"{name}_prediction_error_vs_solo"] = round(ratio - 1, 3)
    return {
        "model": spec.name,
        "model_path": str(spec.path),
        "threads": threads,
        "repeats": repeats,
        "prompt_tokens": len(prompt),
        "decode_tokens": DECODE_TOKENS,
        "splits": {name: [list(r) for r in ranges] for name, ranges in configs.items()},
        "rows": rows,
        "ratios": ratios,
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "bytes_per_token": per_token,
        "decode_bound_tok_s": round(bandwidth * 1e9 / per_token, 1),
        **mesh_report,
        **({"engine": engine_report(profile)} if profile else {}),
    }


def engine_report(calibration: Calibration) -> dict[str, object]:
    """The chosen engine profile, llama.cpp's system info, and every probe behind the choice."""
    trials = []
    for trial in calibration.trials:
        entry: dict[str, object] = {"profile": trial.profile.label, "outcome": trial.outcome.value}
        if trial.speed is not None:
            entry["decode_s_per_gb"] = round(trial.speed.decode_s_per_byte * 1e9, 4)
            entry["prefill_s_per_gb"] = round(trial.speed.prefill_s_per_byte * 1e9, 4)
            # How much slower a token decodes at the probe's far position than near its start.
            far = (FAR_POSITION - PREFILL_TOKENS) * trial.speed.context_s_per_byte
            entry["decode_slower_far"] = round(far / trial.speed.decode_s_per_byte, 3)
        if trial.detail:
            entry["detail"] = trial.detail
        trials.append(entry)
    return {
        "profile": calibration.profile.to_json(),
        "label": calibration.profile.label,
        "system_info": calibration.system_info,
        "measured_layers": list(calibration.measured_layers),
        "load_per_cpu": calibration.load_per_cpu,
        "trials": trials,
    }


def format_table(report: dict[str, object]) -> str:
    rows = report["rows"]
    assert isinstance(rows, dict)
    lines = [
        f"model {report['model']}  threads {report['threads']}  "
        f"median of {report['repeats']} interleaved runs",
        f"{'row':<17} {'decode tok/s':>13} {'prefill tok/s':>14} {'ttft ms':>9}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<17} {row['decode_tok_s']:>13.1f} {row['prefill_tok_s']:>14.1f} "
            f"{row['ttft_ms']:>9.1f}"
        )
    ratios = report["ratios"]
    assert isinstance(ratios, dict)
    lines.append("")
    lines += [f"{name:<28} {value:.3f}" for name, value in ratios.items()]
    mesh_keys = [k for k in report if k.startswith(("mesh2_", "mesh3_"))]
    for key in ("hop_latency_ms_p50", "hop_latency_ms_p99", "wire_bytes_per_token", *mesh_keys):
        if key in report:
            lines.append(f"{key:<28} {report[key]}")
    per_hop = report.get("per_hop")
    if isinstance(per_hop, dict):  # hop_timing.per_hop_summary
        for route, figures in per_hop.items():
            parts = " ".join(f"{k.removesuffix('_ms')} {v}" for k, v in figures.items())
            lines.append(f"{'per_hop ' + route:<28} {parts} (ms)")
    lines.append(f"{'memory_bandwidth_gbs':<28} {report['memory_bandwidth_gbs']}")
    lines.append(f"{'decode_bound_tok_s':<28} {report['decode_bound_tok_s']}")
    engine = report.get("engine")
    if isinstance(engine, dict):
        lines.append(f"{'engine_profile':<28} {engine['label']}")
    return "\n".join(lines)
