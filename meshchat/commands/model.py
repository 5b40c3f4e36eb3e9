"""`meshchat model pull|list|rm|info [PATH]`: the model store, and the slices seeded from
peers (issue 14), which `list` shows with their origin and size and `rm` frees."""

from __future__ import annotations

import argparse

from meshchat.errors import UsageError
from meshchat.model.fingerprint import FingerprintCache
from meshchat.model.gguf_file import read_header
from meshchat.model.seeded import SeedStore
from meshchat.model.spec import spec_from_header
from meshchat.model.store import DEFAULT_MODEL, ModelStore
from meshchat.paths import DataDir


def run_model(args: argparse.Namespace) -> int:
    data = DataDir.resolve(args.data_dir)
    store = ModelStore(data.models)
    if args.model_command == "pull":
        path = store.pull_default()
        print(f"{path} ({DEFAULT_MODEL.size} bytes, sha256 {DEFAULT_MODEL.sha256[:16]}… verified)")
        return 0
    if args.model_command == "list":
        models = store.models()
        seeded = SeedStore.in_store(data.models).slices()
        if not models and not seeded:
            print(f"no models in {store.directory} (run `meshchat model pull`)")
        for path in models:
            header = read_header(path)
            spec = spec_from_header(header)
            print(
                f"{path.name}  {spec.arch}  {spec.n_layers} layers  {spec.main_quant}  "
                f"{_size(spec.file_size)}  {path}"
            )
        for entry in seeded:
            origin = ", ".join(str(o)[:12] for o in entry.origin) or "?"
            print(
                f"{entry.name}  seeded layers {entry.layers} of {entry.fingerprint.short}  "
                f"{_size(entry.size)}  from {origin}  {entry.path}"
            )
        return 0
    if args.model_command == "rm":
        removed = SeedStore.in_store(data.models).remove(args.name)
        if not removed:
            raise UsageError(f"no seeded slice matches {args.name!r} (see `meshchat model list`)")
        for path in removed:
            print(f"removed {path}")
        return 0
    path = store.resolve(args.path)
    header = read_header(path)
    spec = spec_from_header(header)
    fingerprint = FingerprintCache(data.fingerprints).get(header)
    types = ", ".join(f"{name} x{count}" for name, count in sorted(spec.tensor_types.items()))
    rows = [
        ("path", str(path)),
        ("name", spec.name),
        ("architecture", spec.arch),
        ("layers", str(spec.n_layers)),
        ("width", str(spec.n_embd)),
        ("heads", f"{spec.n_head} (kv {spec.n_head_kv})"),
        ("feed-forward", str(spec.n_ff)),
        ("context", str(spec.context_length)),
        ("vocabulary", str(spec.vocab_size)),
        ("quant", f"{spec.main_quant} ({types})"),
        ("size", f"{_size(spec.file_size)} ({spec.file_size} bytes)"),
        ("fingerprint", fingerprint.model),
        ("chat template", "yes" if spec.has_chat_template else "no"),
    ]
    if spec.sliding_window_pattern is not None:
        rows.append(
            ("sliding window", "".join("s" if s else "G" for s in spec.sliding_window_pattern))
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"
