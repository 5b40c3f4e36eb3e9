"""Import hygiene: nothing below the TUI imports textual (checked in a fresh interpreter)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import meshchat

BELOW_TUI = ("engine", "inference", "mesh", "model", "commands")
# The TUI's own non-UI modules say "no textual here"; hold them to it.
TUI_CORE = (
    "config",
    "tui.engine",
    "tui.history",
    "tui.split",
    "tui.mesh_view",
    "tui.markdown_text",
)


def _modules() -> list[str]:
    names = ["meshchat.headless", "meshchat.cli", *(f"meshchat.{m}" for m in TUI_CORE)]
    for package in BELOW_TUI:
        module = __import__(f"meshchat.{package}", fromlist=["_"])
        names.append(module.__name__)
        names += [
            info.name
            for info in pkgutil.walk_packages(module.__path__, prefix=f"{module.__name__}.")
        ]
    return names


def _assert_no_textual(code: str) -> None:
    check = code + "\nbad = sorted(m for m in sys.modules if m.split('.')[0] == 'textual')"
    check += "\nassert not bad, f'textual imported: {bad[:3]}'"
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + check], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_layers_below_the_tui_never_import_textual() -> None:
    modules = _modules()
    assert len(modules) > 20 and meshchat.__name__ == "meshchat"
    _assert_no_textual("\n".join(f"import {m}" for m in modules))


def test_headless_dispatch_never_imports_textual() -> None:
    _assert_no_textual(
        "from meshchat.cli import _dispatch, build_parser\n"
        "fn = _dispatch(build_parser().parse_args(['--headless']))\n"
        "assert fn.__name__ == 'run_headless'"
    )


def test_the_tui_does_import_textual() -> None:
    # The check above would pass vacuously if the import machinery hid textual somehow.
    result = subprocess.run(
        [sys.executable, "-c", "import sys, meshchat.tui.app; assert 'textual' in sys.modules"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
