"""An operator's Terminate (the UI's Terminate, and its "Force termination") of a run whose step
executes in a Celery worker, half way through a tar and half way through a transfer, under the
production executor (PostgreSQL, one real worker per site over Redis). Before, dagster-celery
revoked the step's task, which stops no task already executing: the step went on to its end
(here held 120 s; a transfer of hours), the run CANCELING meanwhile. Now the step stops in its
worker within seconds (ccat_assets/celery_watch.py), its temporary file removed and its claim
ended, the run ends CANCELED, and the drive does the work again after the back-off."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.storage import files_under
from tests.faults.invariants import assert_safe
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import observe
from tests.test_celery_worker_killed import (
    SITES,
    Workers,
    deployment,  # noqa: F401 - a fixture
    finish,
    part_files,
    start_drive,
    wait_for,
)
from tests.test_stuck_runs import terminate_in_the_ui

pytestmark = pytest.mark.xdist_group("redis")

HELD_S = 120.0  # a held step that is not stopped goes on after this
STOPPED_WITHIN_S = 30.0


def test_terminate_stops_the_step_in_its_celery_worker(
        deployment: tuple[Config, OpsDB], tmp_path: Path) -> None:  # noqa: F811
    config, opsdb = deployment
    source = observe(config, opsdb, observations=1, files=1)
    workers = Workers(config, tmp_path)
    holds = {"ccat": ("mid-tar", tmp_path / "held-tar"),
             "cologne": ("mid-write", tmp_path / "held-write"), "us": (None, None)}
    for site in SITES:
        workers.start(site, *holds[site], HELD_S)  # type: ignore[arg-type]
    try:
        time.sleep(3)
        drive = start_drive(config, tmp_path, "drive-1")
        with DagsterInstance.get() as instance:
            for site, policy in (("ccat", "SAFE_TERMINATE"),
                                 ("cologne", "MARK_AS_CANCELED_IMMEDIATELY")):
                marker = holds[site][1]
                assert marker is not None
                wait_for(marker, 180, drive, *workers.procs.values())
                [run] = [r for r in instance.get_runs(RunsFilter(
                    statuses=[DagsterRunStatus.STARTED])) if executing(instance, r.run_id)]
                held = executing(instance, run.run_id)  # read before the Terminate ends it
                if policy == "SAFE_TERMINATE":
                    instance.run_coordinator.cancel_run(run.run_id)  # what the UI's calls
                else:
                    terminate_in_the_ui(instance, run, policy)
                stopped(instance, run, site, held)
        assert finish(drive, 240) is not None, "the drive never ended"
    finally:
        workers.stop()
    # the work was done again by the same drive, nobody asked; read from the storage
    assert files_under(source) == [], workers.logs()
    assert part_files(config) == []
    for site in ("cologne", "us"):
        assert len(list(config.resolve_root(f"sites/{site}/lta").rglob("*.tar"))) == 2, site
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def stopped(instance: DagsterInstance, run: DagsterRun, site: str, held: set[str]) -> None:
    """Within seconds the held step ended, interrupted, and the run is CANCELED (a Terminate
    waits for the step: before, the run stayed CANCELING until the step's end). Under "Force
    termination" Dagster makes the interrupt a retry request, which the stopped run ignores."""
    deadline = time.monotonic() + STOPPED_WITHIN_S
    while True:
        ended = [r.event_log_entry.dagster_event_type for r in instance.get_records_for_run(
            run.run_id, of_type={DagsterEventType.STEP_FAILURE,
                                 DagsterEventType.STEP_UP_FOR_RETRY}).records]
        now = instance.get_run_by_id(run.run_id)
        assert now is not None
        if ended and now.status == DagsterRunStatus.CANCELED:
            break
        assert time.monotonic() < deadline, (
            f"{site}: {STOPPED_WITHIN_S:.0f} s after the Terminate, run {now.status.value}, "
            "its step not ended: the step in the worker went on")
        time.sleep(0.5)
    assert held and not held & {r.event_log_entry.step_key for r in instance.get_records_for_run(
        run.run_id, of_type={DagsterEventType.STEP_SUCCESS,
                             DagsterEventType.STEP_RESTARTED}).records}


def executing(instance: DagsterInstance, run_id: str) -> set[str]:
    """The steps of the run that started and have not ended."""
    def steps(kind: DagsterEventType) -> set[str]:
        return {r.event_log_entry.step_key or "" for r in
                instance.get_records_for_run(run_id, of_type=kind).records}
    return steps(DagsterEventType.STEP_START) - steps(DagsterEventType.STEP_SUCCESS) - steps(
        DagsterEventType.STEP_FAILURE)
