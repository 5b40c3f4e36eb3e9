"""Run only by tests/test_ci_netns_skips.py (its name keeps it out of the suite): a namespace
test that skips, to check what the suite's conftest makes of that skip."""

import pytest


@pytest.fixture
def lab() -> None:
    pytest.skip("pretending the lab cannot be built")


@pytest.mark.netns
def test_a_namespace_test_that_skips() -> None:
    pytest.skip("pretending namespaces are unavailable")


@pytest.mark.netns
def test_a_namespace_test_whose_fixture_skips(lab: None) -> None:
    raise AssertionError("never runs")


def test_an_ordinary_test_that_skips() -> None:
    pytest.skip("ordinary tests may skip")
