"""The synthetic model writer: llama.cpp loads what it writes, and a split of it is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meshchat.errors import UsageError
from meshchat.model.gguf_file import read_header
from meshchat.model.spec import spec_from_header
from meshchat.model.synthetic import config_for_params, parse_params, synthetic_model
from tests.engine_helpers import greedy_run, stage_chain

PROMPT = [1, 17, 300, 4096, 42, 7, 99, 1000, 5, 6, 8, 12]


@pytest.fixture(scope="module")
def synthetic(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_model("4M", smollm2, tmp_path_factory.mktemp("cache"))


def test_sizes_parse_and_shape_a_llama_of_that_size() -> None:
    assert parse_params("1B") == 10**9 and parse_params("350m") == 350 * 10**6
    with pytest.raises(UsageError):
        parse_params("big")
    cfg = config_for_params(10**9, 49152)
    assert (cfg.arch, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_ff) == (
        "llama",
        2048,
        32,
        8,
        8192,
    )
    total = 49152 * cfg.n_embd + cfg.n_layers * cfg.layer_params()
    assert abs(total - 10**9) < cfg.layer_params()


def test_written_once_and_deterministic(synthetic: Path, smollm2: Path, tmp_path: Path) -> None:
    again = synthetic_model("4M", smollm2, tmp_path)
    assert again.read_bytes() == synthetic.read_bytes()  # seeded: same bytes, same fingerprint
    mtime = again.stat().st_mtime_ns
    assert synthetic_model("4M", smollm2, tmp_path) == again
    assert again.stat().st_mtime_ns == mtime  # cached, not written again
    header = read_header(synthetic)
    assert header.arch == "llama"
    assert header.metadata["tokenizer.ggml.tokens"].raw == (
        read_header(smollm2).metadata["tokenizer.ggml.tokens"].raw
    )


def test_llama_cpp_runs_it_and_a_split_is_exact(synthetic: Path, tmp_path: Path) -> None:
    n_layers = spec_from_header(read_header(synthetic)).n_layers
    with stage_chain(synthetic, [(0, n_layers)], tmp_path) as solo:
        solo_logits, solo_tokens = greedy_run(solo, "s", PROMPT, 8)
    half = n_layers // 2
    with stage_chain(synthetic, [(0, half), (half, n_layers)], tmp_path) as split:
        split_logits, split_tokens = greedy_run(split, "s", PROMPT, 8)
    assert all(np.isfinite(row).all() for row in solo_logits)
    assert len(set(solo_tokens)) > 1  # random weights, but not a constant answer
    assert split_tokens == solo_tokens
    for a, b in zip(split_logits, solo_logits, strict=True):
        np.testing.assert_array_equal(a, b)
