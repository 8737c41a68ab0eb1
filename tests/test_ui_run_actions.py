"""Runs an operator removes in the Dagster UI: "Delete" on a run `ccat-dt drive` holds queued
(`instance.delete_run`, which the UI's deleteRun calls)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from dagster import BetaWarning, DagsterInstance, PreviewWarning

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.instance import write_instance_yaml
from ccat_assets.runpool import Queued, RunPool
from ccat_dt.opsdb.database import OpsDB
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment
from tests.test_parallel_drive import ROUTES
from tests.test_parallel_drive import observe as observe_modules

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)


def test_a_run_deleted_while_the_drive_holds_it_queued_is_not_executed_and_the_drive_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Delete" in the UI on a run the drive created and holds until its link (a limit of 1)
    is free. Before, the drive raised DagsterRunNotFoundError as it routed the run to start
    it: it stopped, interrupting the runs it was executing (copies failed mid-transfer). Now
    the run is not executed (as the daemon executes no deleted run), the drive says so and
    goes on; the re-attempt sensor's sweep for unattended work asks for the deleted run's
    copy again, and every package ends archived at both sites."""
    config = deployment(tmp_path / "deploy", routes=ROUTES,
                        policies={"unattended_after_s": 0.001})
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    opsdb = OpsDB(config.opsdb_url)
    deleted: list[Queued] = []
    wait = RunPool.wait

    def deleting(pool: RunPool, timeout: float | None = None) -> Any:
        if not deleted and pool.queue:  # waiting for its link: the operator deletes it
            deleted.append(pool.queue[-1])
            pool.instance.delete_run(pool.queue[-1].run.run_id)  # what deleteRun calls
        return wait(pool, timeout)

    monkeypatch.setattr(RunPool, "wait", deleting)
    try:
        observe_modules(config, opsdb, observations=2)  # 2 packages to each archive first
        with DagsterInstance.from_config(str(home)) as instance:
            lines: list[str] = []
            report = drive(build_definitions(config), instance, wait_s=10, log=lines.append)

            [gone] = deleted
            assert report.failed == [], report.failed
            assert any(line.startswith(f"DELETED {gone.key} (run {gone.run.run_id})")
                       for line in lines), lines
            assert instance.all_logs(gone.run.run_id) == []  # never executed
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
