"""Shared fixtures: a fresh embedded deployment (config + migrated SQLite OpsDB) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.topology import prepare_opsdb


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = load_config(write_default_config(tmp_path / "deploy"))
    prepare_opsdb(cfg)
    return cfg


@pytest.fixture
def opsdb(config: Config) -> Iterator[OpsDB]:
    db = OpsDB(config.opsdb_url)
    yield db
    db.dispose()


pytest_plugins = ["tests.services", "tests.sshd", "tests.victoria", "tests.notify_servers"]
