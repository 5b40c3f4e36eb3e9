"""Shared helpers for the namespace and impairment tests: load the harness scripts by path.

The harness lives in `scripts/` (it is also a CLI); tests import it from there instead of
shipping it inside the package.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as module `meshchat_scripts_<name>` (once)."""
    mod_name = f"meshchat_scripts_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and friends look the module up by name
    spec.loader.exec_module(module)
    return module


netns = load_script("netns")


def require_netns() -> None:
    """Skip the calling test, with the reason, where namespaces cannot be made."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def wait_for(
    what: str,
    cond: Callable[[], bool],
    timeout: float,
    poll: float = 0.2,
    dump: Callable[[], str] | None = None,
) -> None:
    """Poll `cond` (sleeping between looks) until true; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            extra = f"\n{dump()}" if dump is not None else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(poll)
