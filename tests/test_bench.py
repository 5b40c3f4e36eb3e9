"""`meshchat bench --json` runs every configuration and reports the figures it promises.

It asserts shape and sanity only: speed targets are read from the benchmark's output, never
asserted in tests (timings on a shared machine swing too much).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshchat.bench import even_ranges
from tests.cli_helpers import run_meshchat


def test_even_ranges_cover_the_model() -> None:
    assert even_ranges(30, 2) == [(0, 15), (15, 30)]
    assert even_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_ranges(7, 3) == [(0, 2), (2, 5), (5, 7)]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a minute and a half alone; five times that with the cores shared
def test_bench_json_on_a_tiny_synthetic_model(smollm2: Path, tmp_path: Path) -> None:
    """Every row, on a 4M-parameter random llama (the smoke test: seconds, not minutes)."""
    result = run_meshchat(
        "bench", "--json", "--repeats", "1", "--model", str(smollm2), "--synthetic", "4M",
        data_dir=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model_path"].endswith(".gguf") and "synthetic-llama-4M" in report["model_path"]
    assert report["threads"] >= 1 and report["prompt_tokens"] == 512
    rows = ["solo", "split2", "split3", "solo_beside_mesh", "mesh2", "mesh3"]
    if len(os.sched_getaffinity(0)) >= 2:
        rows += ["solo_one_core", "mesh2_own_cores"]
        assert 0 < report["ratios"]["mesh2_own_cores_vs_solo_decode"] < 10
        assert isinstance(report["mesh2_own_cores_fits_one_node"], bool)
    for row in rows:
        figures = report["rows"][row]
        assert figures["decode_tok_s"] > 0 and figures["prefill_tok_s"] > 0
        assert figures["ttft_ms"] > 0
    for ratio in ("split2_vs_solo_decode", "split2_vs_solo_prefill", "mesh2_vs_solo_decode"):
        assert 0 < report["ratios"][ratio] < 10
    n_layers = report["splits"]["solo"][0][1]
    assert report["splits"]["mesh3"] == [[a, b] for a, b in even_ranges(n_layers, 3)]
    # Each mesh row runs under a budget and says whether the model would fit one node under
    # it. On this 4M model it would: a non-last stage's logits buffers (256 rows x 49152
    # vocab) outweigh the whole model's weights, so no budget can force its split. Budgets
    # that force one are tested on the default model (test_memory_cluster.py).
    for mesh in ("mesh2", "mesh3"):
        assert report[f"{mesh}_node_memory_mib"] > 0
        assert isinstance(report[f"{mesh}_fits_one_node"], bool)
        assert report[f"{mesh}_failovers"] == 0
        assert report[f"{mesh}_predicted_decode_tok_s"] > 0
        assert f"{mesh}_prediction_error" in report
        # Predicted again with the speeds the row's stages showed (observed_speed).
        assert report[f"{mesh}_observed_predicted_decode_tok_s"] > 0
        assert f"{mesh}_observed_prediction_error" in report
    assert 0 < report["hop_latency_ms_p50"] <= report["hop_latency_ms_p99"]
    # mesh2's decode tokens make 2 hops, mesh3's 3 (whose workers' marks may not all be on
    # disk when the head reads them); the parts are medians of >= 0 spans.
    assert "2 hops" in report["per_hop"] and set(report["per_hop"]) <= {"2 hops", "3 hops"}
    for route in report["per_hop"].values():
        assert route["tokens"] > 0 and 0 < route["p50_ms"] <= route["p99_ms"]
        assert min(route[f"{part}_ms"] for part in ("encode", "send", "wire", "receive")) >= 0
    assert report["wire_bytes_per_token"] > 4 * 64  # one float32 hidden vector, plus framing
    assert report["memory_bandwidth_gbs"] > 0
