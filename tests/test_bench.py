"""`meshchat bench --json` runs every configuration and reports the figures it promises.

It asserts shape and sanity only: speed targets are read from the benchmark's output, never
asserted in tests (timings on a shared machine swing too much).
"""

from __future__ import annotations

import json
from pathlib import Path

from meshchat.bench import even_ranges
from tests.cli_helpers import run_meshchat


def test_even_ranges_cover_the_model() -> None:
    assert even_ranges(30, 2) == [(0, 15), (15, 30)]
    assert even_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_ranges(7, 3) == [(0, 2), (2, 5), (5, 7)]


def test_bench_json(smollm2: Path, tmp_path: Path) -> None:
    result = run_meshchat(
        "bench", "--json", "--repeats", "1", "--model", str(smollm2), data_dir=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["threads"] >= 1 and report["prompt_tokens"] == 512
    for row in ("solo", "split2", "split3", "solo_beside_mesh", "mesh2", "mesh3"):
        figures = report["rows"][row]
        assert figures["decode_tok_s"] > 0 and figures["prefill_tok_s"] > 0
        assert figures["ttft_ms"] > 0
    for ratio in ("split2_vs_solo_decode", "split2_vs_solo_prefill", "mesh2_vs_solo_decode"):
        assert 0 < report["ratios"][ratio] < 10
    assert report["splits"]["mesh3"] == [[0, 10], [10, 20], [20, 30]]
    assert 0 < report["hop_latency_ms_p50"] <= report["hop_latency_ms_p99"]
    # mesh2's decode tokens make 2 hops, mesh3's 3; the parts are medians of >= 0 spans.
    assert set(report["per_hop"]) == {"2 hops", "3 hops"}
    for route in report["per_hop"].values():
        assert route["tokens"] > 0 and 0 < route["p50_ms"] <= route["p99_ms"]
        assert min(route[f"{part}_ms"] for part in ("encode", "send", "wire", "receive")) >= 0
    assert report["wire_bytes_per_token"] > 4 * 576  # one float32 hidden vector, plus framing
    assert report["memory_bandwidth_gbs"] > 0
    assert report["decode_bound_tok_s"] > report["rows"]["solo"]["decode_tok_s"]
