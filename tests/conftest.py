"""Shared test helpers: where the official-code fixtures live, and how to skip/fail without them.

Fixtures are read from ``$HESS_FIXTURES`` or ``../shared/fixtures`` beside the repository.  When they
are absent a test skips with the reason; with ``HESS_REQUIRE_FIXTURES=1`` (set by ``.ci/run``) it fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("HESS_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def fixture_path(*parts: str) -> Path:
    """Path to a fixture file or folder; skips (or fails under HESS_REQUIRE_FIXTURES=1) when absent."""
    path = fixtures_dir().joinpath(*parts)
    if not path.exists():
        msg = f"fixture {path} not found (set HESS_FIXTURES or place ../shared/fixtures beside the repo)"
        if os.environ.get("HESS_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models/tensors: much faster on the shared 2-core machine
    (no fork/join or spin contention).  Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
