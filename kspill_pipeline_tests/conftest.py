"""Shared fixtures.

Tests that need the real public data in ``../shared/data`` use the ``shared_data`` fixture: they
skip with a clear reason when the folder is absent, and fail instead when
``KSPILL_REQUIRE_SHARED=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("KSPILL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def _require_shared() -> bool:
    return os.environ.get("KSPILL_REQUIRE_SHARED", "") == "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skip (or fail under KSPILL_REQUIRE_SHARED=1) when absent."""
    if not SHARED_DATA.is_dir():
        msg = f"shared public data folder not found at {SHARED_DATA}"
        if _require_shared():
            pytest.fail(msg + " and KSPILL_REQUIRE_SHARED=1")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_universe(tmp_path_factory) -> Path:
    """The synthetic `tiny` universe, generated once per test session."""
    from kspill_pipeline.synthetic import generate

    out = tmp_path_factory.mktemp("tiny_universe")
    generate(out, scale="tiny", seed=7)
    return out


@pytest.fixture(scope="session")
def full_tiny_store(tiny_universe, tmp_path_factory) -> Path:
    """Every asset of the graph materialised once on the tiny universe (``kspill run``); tests that
    modify a store copy it first."""
    from kspill_pipeline import cli

    st = tmp_path_factory.mktemp("full_tiny_store")
    assert cli.main(["run", "--data", str(tiny_universe), "--store", str(st), "--ephemeral"]) == 0
    return st
