"""Runs an operator launches or removes in the Dagster UI beyond its buttons' defaults: the
launchpad (shift-click "Materialize"), whose partition tags and run config are editable, and
"Delete" on a run `ccat-dt drive` holds queued. Sent as the UI sends them (its GraphQL
mutation to the code location workspace.yaml names; `instance.delete_run`, which the UI's
deleteRun calls), executed by the drive as it executes queued runs when no daemon runs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from dagster import BetaWarning, DagsterEventType, DagsterInstance, DagsterRunStatus, PreviewWarning
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.instance import write_instance_yaml
from ccat_assets.runlog import run_failure
from ccat_assets.runpool import Queued, RunPool
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, plan, source_root
from tests.test_dry_runs import LOCATION, the_ui
from tests.test_operator_actions import by_hand
from tests.test_parallel_drive import ROUTES
from tests.test_parallel_drive import observe as observe_modules

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on PythonError { message } } }"""


def launchpad(ui: Any, asset: str, tags: dict[str, str],
              run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The launchpad's "Launch run" of one asset, with the tags and config as edited."""
    answer = ui(LAUNCH, p={
        "selector": {**LOCATION, "jobName": "__ASSET_JOB", "assetSelection": [{"path": [asset]}],
                     "assetCheckSelection": []},
        "runConfigData": run_config or {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}})
    return dict(answer["launchRun"])


def test_launchpad_runs_naming_no_partition_of_their_asset_or_setting_resources_fail_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launchpad runs of a built package whose tags or config were edited: a site copy to the
    observatory (no archive site), a package x site key on `packages`, a package alone on
    `site_copies`; a `resources:` section pointing the site-copy IO manager at the LTA or the
    deployment at another configuration file. Before, the first three failed in their steps
    on Dagster's internals ("Partition range ccat to ccat is not a valid range", "Expected 2
    partition keys") or planned a copy to the observatory ("no verified copy to send to ccat
    yet"); the IO manager's run succeeded, writing the package straight into cologne's LTA
    past its buffer; the other configuration failed three attempts as "Exceeded max_retries
    of 2". Now each fails once as it starts, before any step, saying why; a wrong type in the
    config, or a key it does not have, is refused by Dagster at launch; the sensors' runs
    then archive the package."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=2, size=20_000)
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent  # its coordinator
        with DagsterInstance.from_config(str(home)) as instance:
            package = plan(config, opsdb, instance)
            defs = build_definitions(config)
            assert by_hand(defs, instance, "packages", package)  # built, at ccat/buffer
            to = {"dagster/partition": f"{package}|cologne"}
            other = {"config_path": str(tmp_path / "other.yaml")}
            edits = {  # asset, tags, run config: what its run fails saying
                f"'{package}|ccat' is no partition of site_copies": ("site_copies", {
                    "dagster/partition": f"{package}|ccat",
                    "dagster/partition/package": package, "dagster/partition/site": "ccat"},
                    None),
                f"'{package}|cologne' is no partition of packages": ("packages", to, None),
                f"'{package}' is no partition of site_copies": (
                    "site_copies", {"dagster/partition": package}, None),
                "refused: its run config sets resources (site_copy_io_manager)": (
                    "site_copies", to, {"resources": {"site_copy_io_manager": {
                        "config": {"location_type": "long_term_archive"}}}}),
                "refused: its run config sets resources (deployment)": (
                    "packages", {"dagster/partition": package},
                    {"resources": {"deployment": {"config": other}}}),
            }
            launched = {}
            with the_ui(instance, config.path, monkeypatch) as ui:
                for cause, (asset, tags, run_config) in edits.items():
                    answer = launchpad(ui, asset, tags, run_config)
                    assert answer["__typename"] == "LaunchRunSuccess", (cause, answer)
                    launched[cause] = answer["run"]["runId"]
                refused = launchpad(ui, "packages", {"dagster/partition": package},
                                    {"execution": {"config": {"retries": 5}}})
                assert refused["__typename"] == "RunConfigValidationInvalid", refused
                refused = launchpad(ui, "packages", {"dagster/partition": package},
                                    {"purge": {"everything": True}})
                assert refused["__typename"] == "RunConfigValidationInvalid", refused

            report = drive(defs, instance, wait_s=10)

            for cause, run_id in launched.items():
                run = instance.get_run_by_id(run_id)
                assert run is not None and run.status == DagsterRunStatus.FAILURE, cause
                said = run_failure(instance, run_id)
                assert said.startswith(cause) and said.lower().endswith(
                    "nothing was done"), (cause, said)
                assert not instance.all_logs(run_id, of_type=DagsterEventType.STEP_START), cause
            with opsdb.session() as session:  # no copy or anything else recorded by them
                assert not session.scalars(select(Operation.id).where(
                    Operation.run_id.in_(launched.values()))).all()
            assert len(report.failed) == len(launched), report.failed  # each once, no other
            archived_everywhere(config, opsdb)
            assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


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


def test_a_failed_run_deleted_in_the_ui_is_reattempted_when_its_back_off_ends(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """Delete (Runs → a run → Delete) of a package's failed packaging run (its source disk was
    not mounted) before its re-attempt. Before, the re-attempt sensor forgot the failure with
    the run: the work waited for the sweep for unattended work (`unattended_after_s`, an hour
    after the package was made), and a drive ended with the package unbuilt. Now the failure
    OpsDB recorded stands: the re-attempt runs when its back-off ends, and the package is
    archived."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 1.0})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=1, size=20_000)
        source = source_root(config)
        elsewhere = source.with_name("instruments.unmounted")
        source.rename(elsewhere)
        source.mkdir()  # the empty mount point
        defs = build_definitions(config)
        try:
            report = drive(defs, instance, wait_s=0)
        finally:
            source.rmdir()
            elsewhere.rename(source)
        assert report.failed_ids, report.launched
        for run_id in report.failed_ids:
            instance.delete_run(run_id)  # what the UI's deleteRun calls

        report = drive(defs, instance, wait_s=10)

        assert report.failed == [], report.failed
        assert [key for key in report.launched if key.startswith("reattempt:packaging:")], \
            report.launched
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
