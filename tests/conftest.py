"""Shared fixtures: a fresh embedded deployment (config + migrated SQLite OpsDB) per test, the
same topology in PostgreSQL, a Dagster instance; and which tests are slow (`make test-fast`
runs the others). Shared helper functions are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from ccat_dt import progress
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb.database import OpsDB, migrate
from ccat_dt.progress import ProgressEvent
from ccat_dt.topology import prepare_opsdb, sync_topology
from tests.helpers import new_opsdb, scratch_instance


@pytest.fixture(autouse=True)
def short_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps retried in their run after 0.2 s, 0.4 s, not 2 s, 4 s, in this process and the
    drive's forked children (the faults tested outlast the retries). Processes a test starts
    (`ccat-dt`, daemons, Celery workers) keep the real delay unless the test sets it there
    (tests/test_stuck_runs.py: a "Force termination" under short delays)."""
    monkeypatch.setattr("ccat_assets.stages.common.RETRY_DELAY_S", 0.2)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = load_config(write_default_config(tmp_path / "deploy"))
    new_opsdb(cfg)
    prepare_opsdb(cfg)
    return cfg


@pytest.fixture
def opsdb(config: Config) -> Iterator[OpsDB]:
    db = OpsDB(config.opsdb_url)
    yield db
    db.dispose()


@pytest.fixture
def pg_opsdb(config: Config, postgres_url: str) -> Iterator[OpsDB]:
    """The config's topology in the test PostgreSQL database (tests.services: skipped without
    it), migrated to the head."""
    migrate(postgres_url)
    db = OpsDB(postgres_url)
    with db.session() as session:
        sync_topology(session, config)
    yield db
    db.dispose()


@pytest.fixture
def progress_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProgressEvent]]:
    """Every ccat_dt.progress event while the test runs, each reported (no rate limit)."""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    seen: list[ProgressEvent] = []
    remove = progress.add_sink(seen.append)
    yield seen
    remove()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A persistent Dagster instance of the test's own, with the embedded default's run and
    event storage (dagster.yaml), on tmpfs where there is one (tests.helpers.scratch_instance)."""
    with scratch_instance(tmp_path) as dagster_instance:
        yield dagster_instance


pytest_plugins = ["tests.services", "tests.sshd", "tests.victoria", "tests.notify_servers",
                  "tests.faults.disks", "tests.faults.blackhole"]

# Integration tests that take seconds to minutes each (whole lifecycles, Celery workers, the
# UI in a browser, injected faults, subprocesses of the CLI): marked `slow` here, in one place,
# by node-id prefix; a test can also carry @pytest.mark.slow itself. `make test-fast` runs
# `pytest -m "not slow"`; `make test` and CI (.ci/run) run everything.
SLOW = (
    "tests/faults/",
    "tests/test_celery.py",
    "tests/test_celery_isolated.py",
    "tests/test_celery_worker_killed.py",
    "tests/test_celery_broker_lost.py",
    "tests/test_celery_terminate.py",
    "tests/test_lifecycle.py",
    "tests/test_parallel_drive.py",
    "tests/test_multisite.py",
    "tests/test_observability.py",
    "tests/test_postgres.py",
    "tests/test_retire.py",
    "tests/test_archive_site_added.py",
    "tests/test_stopped_sensors.py",
    "tests/test_stopped_drives.py",
    "tests/test_scrub.py",
    "tests/test_staging.py",
    "tests/test_ui_asset_events.py",
    "tests/test_ui_browser.py",
    "tests/test_ui_run_actions.py",
    "tests/test_daemon_drive.py",
    "tests/test_batching.py",
    "tests/test_audit.py",
    "tests/test_audit_remote.py",
    "tests/test_service.py",
    "tests/test_storage_faults_property.py",
    "tests/test_instance.py::test_init_writes_a_loadable_instance_with_a_limit_per_link",
    "tests/test_planner_properties.py::test_random_histories_keep_the_deletion_invariants",
    "tests/test_cli.py::test_console_script_is_installed",
    "tests/test_rsync.py::test_interrupted_transfer_resumes_from_its_partial_file",
    "tests/test_rsync.py::test_killed_rsync_leaves_partial_that_the_next_copy_completes",
    "tests/test_exit_codes.py::test_output_into_a_closed_pipe_ends_quietly[",
    "tests/test_exit_codes.py::test_demo_",
    "tests/test_exit_codes.py::test_audit_",
    "tests/test_exit_codes.py::test_drive_with_a_failed_run",
    "tests/test_exit_codes.py::test_ctrl_c_stops_a_drive",
    "tests/test_exit_codes.py::test_exit_2_when_the_opsdb_is_read_only",
    "tests/test_totals.py::test_totals_equal_a_fresh_count_after_a_lifecycle",
    "tests/test_dry_runs.py::test_test_sensor_and_test_schedule_of_everything_mid_lifecycle",
)
FAST_EXCEPTIONS = (  # one closed pipe per kind of output stays in the fast run
    "tests/test_exit_codes.py::test_output_into_a_closed_pipe_ends_quietly[status]",
    "tests/test_exit_codes.py::test_output_into_a_closed_pipe_ends_quietly[help]",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW) and not item.nodeid.startswith(FAST_EXCEPTIONS):
            item.add_marker(pytest.mark.slow)
