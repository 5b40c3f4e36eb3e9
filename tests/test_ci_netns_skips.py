"""CI (issue 12): where network namespaces work, a skipped `netns` test fails the run.

Runs pytest on tests/netns_skip_probe.py in a subprocess (so the suite's conftest applies) and
checks the outcome against what this machine can do; it never skips itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns_helpers import REPO, netns

pytestmark = pytest.mark.timeout(120)


def test_a_netns_skip_fails_where_namespaces_work() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
         "tests/netns_skip_probe.py"],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    out = done.stdout
    assert "SKIPPED" in out and "ordinary tests may skip" in out, out  # other skips stay skips
    if netns.netns_unavailable_reason() is None:
        assert done.returncode == 1, out
        assert "1 failed, 1 skipped, 1 error" in out, out
        assert out.count("although network namespaces work here") >= 2, out
    else:
        assert done.returncode == 0 and "3 skipped" in out, out
