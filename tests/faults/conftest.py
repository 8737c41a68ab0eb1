"""Fixtures for the fault-injection suite: a fresh embedded deployment per test (from the root
conftest) and a Dagster instance whose storage is fast enough to run many small lifecycles."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import BetaWarning, DagsterInstance, PreviewWarning

from ccat_dt.config import Config
from tests.helpers import new_instance_home

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

SHM = Path("/dev/shm")
SHM_NEEDED = 256 * 2**20  # the instance of one test writes a few MB


def _instance_home(tmp_path: Path) -> tuple[Path, Path | None]:
    """Dagster's run and event storage on tmpfs when there is one (each run commits dozens of
    events, each an fsync on a real disk); the OpsDB and every data location stay on disk."""
    try:
        if os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > SHM_NEEDED:
            scratch = Path(tempfile.mkdtemp(prefix="ccat-faults-", dir=SHM))
            return scratch / "dagster_home", scratch
    except OSError:
        pass
    return tmp_path / "dagster_home", None


FAST_BACKOFF = 0.2  # seconds before the first automatic re-attempt (60 s in production)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The embedded default, with automatic re-attempts seconds apart instead of minutes."""
    from tests.faults.pipeline import deployment

    return deployment(tmp_path / "deploy", policies={
        "max_attempts": 3, "retry_backoff_first_s": FAST_BACKOFF})


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A persistent instance (other processes can open it), with the embedded default's
    run and event storage."""
    home, scratch = _instance_home(tmp_path)
    new_instance_home(home)
    try:
        with DagsterInstance.from_config(str(home)) as dagster_instance:
            yield dagster_instance
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
