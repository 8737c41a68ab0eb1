"""Fixtures for the fault-injection suite: a fresh embedded deployment per test (from the root
conftest) with automatic re-attempts seconds apart; the Dagster instance is the root conftest's."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from dagster import BetaWarning, PreviewWarning

from ccat_dt.config import Config

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

FAST_BACKOFF = 0.2  # seconds before the first automatic re-attempt (60 s in production)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The embedded default, with automatic re-attempts seconds apart instead of minutes."""
    from tests.faults.pipeline import deployment

    return deployment(tmp_path / "deploy", policies={
        "max_attempts": 3, "retry_backoff_first_s": FAST_BACKOFF})
