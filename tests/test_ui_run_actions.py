"""Runs an operator launches or removes in the Dagster UI beyond its buttons' defaults: the
launchpad (shift-click "Materialize"), whose partition tags and run config are editable, and
"Delete" on a run `ccat-dt drive` holds queued. Sent as the UI sends them (its GraphQL
mutation to the code location workspace.yaml names; `instance.delete_run`, which the UI's
deleteRun calls), executed by the drive as it executes queued runs when no daemon runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import (
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    PreviewWarning,
    RunRequest,
    RunsFilter,
)
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG, SENSOR_NAME_TAG
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster_graphql.test.utils import execute_dagster_graphql
from sqlalchemy import select

from ccat_assets import runpool
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, drive, launch
from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.instance import write_instance_yaml
from ccat_assets.integrity import INTEGRITY_SENSOR, integrity_report_job
from ccat_assets.partitions import PACKAGES, package_site_key
from ccat_assets.retry import operator_retry
from ccat_assets.routing import partition_of, stages_of
from ccat_assets.runlog import run_failure
from ccat_assets.runpool import Queued, RunPool, run_limits
from ccat_assets.tags import LINK_TAG, RETRY_TAG, STOPPED_TAG
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, RawDataPackage
from ccat_dt.packages import plan_packages
from ccat_dt.stages import Stage
from ccat_dt.transports.local import LocalTransport
from tests.faults.child import wait_to_be_killed
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    _environment,
    archived_everywhere,
    deployment,
    observe,
    plan,
    source_root,
)
from tests.helpers import lta_copies_at
from tests.test_dry_runs import LOCATION, the_ui
from tests.test_operator_actions import (  # noqa: F401 - driven: a fixture
    Archived,
    by_hand,
    check_status,
    driven,
    lta_intact,
    opsdb_state,
)
from tests.test_parallel_drive import ROUTES, storage
from tests.test_parallel_drive import observe as observe_modules
from tests.test_stuck_runs import terminate_in_the_ui

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on PythonError { message } } }"""


REEXECUTE = """mutation($id: String!, $s: ReexecutionStrategy!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $id, strategy: $s}) { __typename
  ... on LaunchRunSuccess { run { runId } }
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


def drive_with_the_source_unmounted(config: Config, defs: Definitions,
                                    instance: DagsterInstance) -> DriveReport:
    """A drive while the source disk is not mounted (its packaging runs fail), then the disk
    back; the drive's report."""
    source = source_root(config)
    elsewhere = source.with_name("instruments.unmounted")
    source.rename(elsewhere)
    source.mkdir()  # the empty mount point
    try:
        return drive(defs, instance, wait_s=0)
    finally:
        source.rmdir()
        elsewhere.rename(source)


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
        defs = build_definitions(config)
        report = drive_with_the_source_unmounted(config, defs, instance)
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


ONE_SLOT = [{**route, "max_concurrent": 1} for route in ROUTES]  # every link one run at once


def four_packages_one_run_per_link(tmp_path: Path, **overrides: Any
                                   ) -> tuple[Config, Path, OpsDB, dict[str, bytes]]:
    """A deployment whose every link takes one run at once, with four packages filed (two per
    primary archive): its config, its Dagster home, its OpsDB, and the raw files as written."""
    config = deployment(tmp_path / "deploy", routes=ONE_SLOT, **overrides)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    opsdb = OpsDB(config.opsdb_url)
    observe_modules(config, opsdb, observations=2)
    source = config.resolve_root("sites/ccat/instruments")
    return config, home, opsdb, {p.relative_to(source).as_posix(): p.read_bytes()
                                 for p in source.rglob("*.dat")}
LAUNCH_BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(
  backfillParams: $p) { __typename ... on LaunchBackfillSuccess { backfillId }
  ... on PythonError { message } } }"""
CANCEL_BACKFILL = """mutation($id: String!) { cancelPartitionBackfill(backfillId: $id) {
  __typename ... on PythonError { message } } }"""


@contextmanager
def backfill_daemon(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch,
                    config: Config) -> Iterator[tuple[Any, Callable[[], None]]]:
    """The UI's GraphQL on the code location, and one pass of the Dagster daemon's backfill
    loop over it (what `dagster-daemon run` does every few seconds): it submits a backfill's
    runs to the run queue, and cancels those of a backfill being canceled."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))  # the code location's, the queue's
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(
        module_name="ccat_assets.definitions", attribute="defs"))
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:

        def ui(query: str, **variables: Any) -> Any:
            result = execute_dagster_graphql(workspace.create_request_context(), query,
                                             variables)
            assert not result.errors, result.errors
            return result.data

        def daemon_pass() -> None:
            for error in execute_backfill_iteration(workspace, logging.getLogger("backfill")):
                assert error is None, error

        yield ui, daemon_pass


def on_disk(config: Config, raw: dict[str, bytes]) -> None:
    """Read from the disks: the tars in each archive site's LTA hold, once each, exactly the
    observed files (by their path under the source) with their bytes; no raw file is left at
    the source, no package in a buffer."""
    for site in ("cologne", "us"):
        members: dict[str, bytes] = {}
        for tar in config.resolve_root(f"sites/{site}/lta").rglob("*.tar"):
            with tarfile.open(tar) as archive:
                for member in archive.getmembers():
                    if member.isfile() and member.name in raw:
                        data = archive.extractfile(member)
                        assert data is not None and member.name not in members, member.name
                        members[member.name] = data.read()
        assert members == raw, site
    source = config.resolve_root("sites/ccat/instruments")
    assert not [p for p in source.rglob("*.dat")], "raw files left at the source"
    for site in ("ccat", "cologne", "us"):
        assert not list(config.resolve_root(f"sites/{site}/buffer").rglob("*.tar")), site


@pytest.mark.parametrize("action", ["terminate", "cancel backfill"])
def test_a_run_the_drive_holds_for_its_link_can_be_terminated_and_is_never_executed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    """The UI's backfill of the four packages' copies to their primary archives, queued by
    the daemon's backfill loop; no daemon dequeues them, so the drive does, one run per link
    at once: two copies execute, two wait for their link. Then the operator stops one that
    waits (Runs -> Terminate) or the whole backfill (Cancel backfill). Before, the drive had
    marked the waiting runs STARTING, which Dagster cancels in neither way: Terminate was
    refused ("could not be terminated due to having status STARTING") and the canceled
    backfill's waiting runs were executed later all the same. Now the drive leaves them
    QUEUED until it starts them: the stopped runs end CANCELED, never executed, nothing of
    theirs on the disks, the drive goes on with the others, and the sensors do their work
    after the back-off: every package is archived at both sites and purged."""
    config, home, opsdb, raw = four_packages_one_run_per_link(
        tmp_path, policies={"retry_backoff_first_s": 0.2})
    try:
        with opsdb.session() as session:
            primary = {p.name: p.primary_site.short_name for p in plan_packages(session, config)}
        with DagsterInstance.from_config(str(home)) as instance, \
                backfill_daemon(instance, monkeypatch, config) as (ui, daemon_pass):
            instance.add_dynamic_partitions(PACKAGES, list(primary))
            defs = build_definitions(config)
            for package in primary:
                assert by_hand(defs, instance, "packages", package)  # built, at ccat/buffer
            answer = ui(LAUNCH_BACKFILL, p={
                "assetSelection": [{"path": ["site_copies"]}],
                "partitionNames": [str(package_site_key(package, site))
                                   for package, site in primary.items()]})
            assert answer["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"
            backfill = answer["launchPartitionBackfill"]["backfillId"]
            daemon_pass()  # submits its runs: queued, each tagged with its link
            ours = RunsFilter(tags={BACKFILL_ID_TAG: backfill})
            assert {r.status for r in instance.get_runs(ours)} == {DagsterRunStatus.QUEUED}
            assert len(instance.get_runs(ours)) == len(primary)

            stopped: list[str] = []
            wait = RunPool.wait

            def operator(pool: RunPool, timeout: float | None = None) -> Any:
                """Once two copies execute and two wait: the operator's action."""
                waiting = [q.run for q in pool.queue
                           if q.run.tags.get(BACKFILL_ID_TAG) == backfill]
                if not stopped and len(waiting) == 2:
                    if action == "terminate":
                        stopped.append(waiting[-1].run_id)
                        terminate_in_the_ui(instance, waiting[-1], "SAFE_TERMINATE")
                    else:
                        stopped.extend(run.run_id for run in waiting)
                        assert ui(CANCEL_BACKFILL, id=backfill)["cancelPartitionBackfill"][
                            "__typename"] == "CancelBackfillSuccess"
                if stopped and action != "terminate":
                    daemon_pass()  # the daemon goes on with the canceled backfill
                return wait(pool, timeout)

            monkeypatch.setattr(RunPool, "wait", operator)
            lines: list[str] = []
            report = drive(defs, instance, wait_s=10, log=lines.append)
            daemon_pass()

            assert stopped, "\n".join(lines)
            for run_id in stopped:
                run = instance.get_run_by_id(run_id)
                assert run is not None and run.status == DagsterRunStatus.CANCELED, run_id
                assert not instance.all_logs(run_id, of_type={
                    DagsterEventType.RUN_START, DagsterEventType.STEP_START}), run_id
                assert any(line.startswith("CANCELED ") and run_id in line for line in lines), \
                    lines
            with opsdb.session() as session:  # no transfer or anything else of theirs
                assert not session.scalars(select(Operation.id).where(
                    Operation.run_id.in_(stopped))).all()
            others = [r for r in instance.get_runs(ours) if r.run_id not in stopped]
            if action == "terminate":
                assert {r.status for r in others} == {DagsterRunStatus.SUCCESS}
                assert report.failed == [], report.failed
            else:
                canceled = instance.get_backfill(backfill)
                assert canceled is not None and canceled.status == BulkActionStatus.CANCELED
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_a_drive_run_waiting_for_its_link_is_stopped_by_a_plain_terminate_in_the_ui(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensors' copies of four packages to their primary archives, one run per link at
    once: two execute, two wait in the drive's pool for their link. The operator clicks
    Terminate (not "Force termination") on one that waits, as the UI sends it. Before, the
    drive's own waiting runs were NOT_STARTED, which Dagster refuses to terminate ("could not
    be terminated due to having status NOT_STARTED"): only a forced termination stopped
    them. Now they wait QUEUED, as the runs others queued, and are the drive's (STARTING) only
    as they start: the terminated run ends CANCELED and never executes (no bytes of its
    package reach its destination until the work is asked for again), the drive goes on with
    the others, and the sensors redo its copy after the back-off: every package ends archived
    at both sites and purged, nothing failed."""
    config, home, opsdb, raw = four_packages_one_run_per_link(
        tmp_path, policies={"retry_backoff_first_s": 0.2})
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            stopped: list[DagsterRun] = []
            early: list[str] = []  # the stopped copy's bytes at its destination too early
            wait = RunPool.wait

            def operator(pool: RunPool, timeout: float | None = None) -> Any:
                """Once a copy of the drive's waits for its link: the operator's Terminate.
                Then, at each look, its package must be at none of its destination's
                locations while no later run of its copy exists."""
                copying = {child.queued.run.tags.get(LINK_TAG)
                           for child in pool.children.values()
                           if Stage.SITE_COPY in stages_of(child.queued.run)}
                waiting = [q.run for q in pool.queue if not q.adopted
                           and Stage.SITE_COPY in stages_of(q.run)
                           and q.run.tags.get(LINK_TAG) in copying]
                if not stopped and waiting:
                    stopped.append(waiting[-1])
                    terminate_in_the_ui(instance, waiting[-1], "SAFE_TERMINATE")
                if stopped:
                    run = stopped[0]
                    partition = partition_of(run.tags)
                    assert partition is not None and partition[1] is not None
                    again = [r for r in instance.get_runs(RunsFilter(
                        tags={"dagster/partition": run.tags["dagster/partition"]}))
                        if r.run_id != run.run_id]
                    site = config.resolve_root(f"sites/{partition[1]}")
                    if not again:
                        early.extend(str(p) for p in site.rglob(f"*{partition[0]}*"))
                return wait(pool, timeout)

            monkeypatch.setattr(RunPool, "wait", operator)
            lines: list[str] = []
            report = drive(build_definitions(config), instance, wait_s=10, log=lines.append)

            [run] = stopped
            ended = instance.get_run_by_id(run.run_id)
            assert ended is not None and ended.status == DagsterRunStatus.CANCELED
            assert not instance.all_logs(run.run_id, of_type={
                DagsterEventType.RUN_START, DagsterEventType.STEP_START})
            assert any(line.startswith("CANCELED ") and run.run_id in line for line in lines), \
                lines
            assert early == [], early  # nothing of the terminated run on the storage
            with opsdb.session() as session:  # no transfer or anything else of it
                assert not session.scalars(select(Operation.id).where(
                    Operation.run_id == run.run_id)).all()
            assert report.failed == [], report.failed
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


@pytest.mark.parametrize("written", ["by init", "before the launcher"])
def test_a_plain_terminate_in_the_ui_of_a_copy_the_drive_executes_answers_success(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """The operator clicks Terminate (not "Force termination") on a copy the drive executes
    in its pool, held half way through its transfer, as the UI sends it. Before, the run was
    stopped (Dagster marked it CANCELING, the drive interrupted it) but the UI answered
    TerminateRunFailure "Unable to terminate run ...": Dagster asks the instance's run
    launcher, and the DefaultRunLauncher, which did not launch the drive's run, has no process
    to tell. Now the embedded instance's launcher (ccat_assets/launcher.py) answers for the
    runs a live drive's pool executes: success, the run ends CANCELED, its step not started
    again, its half-written file gone from the destination, the drive goes on, and the
    sensors redo the copy after the back-off: every file once in each long-term archive.
    An instance written before (its dagster.yaml without that launcher, until `ccat-dt init`
    runs again) works as it did: the run is stopped the same, the UI answers as before."""
    config = deployment(tmp_path / "deploy", routes=ROUTES,
                        policies={"retry_backoff_first_s": 0.2})
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    if written != "by init":
        settings = yaml.safe_load((home / "dagster.yaml").read_text())
        assert settings.pop("run_launcher")["class"] == "DriveRunLauncher"
        (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    answer = "TerminateRunSuccess" if written == "by init" else "TerminateRunFailure"
    opsdb = OpsDB(config.opsdb_url)
    held, chosen = tmp_path / "held", tmp_path / "held.chosen"
    buffers = [config.resolve_root(f"sites/{site}/buffer") for site in ("cologne", "us")]
    landed = LocalTransport._landed
    halfway: list[Path] = []  # the held copy's temporary file at its destination

    def holding(transport: LocalTransport, temporary: Path) -> None:
        """In the run's process: the first copy to an archive's buffer waits there, its bytes
        half landed, until it is interrupted (once: `chosen` is made by one process only)."""
        landed(transport, temporary)
        if any(temporary.is_relative_to(buffer) for buffer in buffers):
            with suppress(FileExistsError):
                os.close(os.open(chosen, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                chosen.write_text(str(temporary))
                wait_to_be_killed(held)()

    monkeypatch.setattr(LocalTransport, "_landed", holding)
    try:
        observe_modules(config, opsdb, observations=1)  # 2 packages
        source = config.resolve_root("sites/ccat/instruments")
        raw = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*.dat")}
        with DagsterInstance.from_config(str(home)) as instance:
            stopped: list[DagsterRun] = []
            cancel = RunPool.cancel_terminated

            def operator(pool: RunPool) -> list[str]:
                """Looked at every second while the drive's runs execute: once the copy is
                held, the operator's Terminate of its run."""
                if not stopped and held.exists():
                    [child] = [child for child in pool.children.values()
                               if child.pid == int(held.read_text())]
                    run = instance.get_run_by_id(child.queued.run.run_id)
                    assert run is not None and run.status == DagsterRunStatus.STARTED
                    halfway.append(Path(chosen.read_text()))
                    assert halfway[0].is_file()  # the bytes half way, not yet in place
                    stopped.append(run)
                    terminate_in_the_ui(instance, run, "SAFE_TERMINATE", answer)
                return cancel(pool)

            monkeypatch.setattr(RunPool, "cancel_terminated", operator)
            lines: list[str] = []
            report = drive(build_definitions(config), instance, wait_s=10, log=lines.append)

            [run] = stopped
            ended = instance.get_run_by_id(run.run_id)
            assert ended is not None and ended.status == DagsterRunStatus.CANCELED
            assert Stage.SITE_COPY in stages_of(ended)
            assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_RESTARTED)
            assert report.canceled_ids == [run.run_id], "\n".join(lines)  # that one alone
            assert report.failed == [], "\n".join(lines)  # asked for: not a failure
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        assert not halfway[0].exists()
        assert not [p for p in config.resolve_root("sites").rglob("*.part")]
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


# The operator, in a process of its own as the webserver is: once a run is held (the file
# `held` names the process that holds it, or "run RUN_ID"), Runs -> that run -> Terminate,
# as the UI sends it (its dialog sends "Force termination" for a run that Dagster says cannot
# be terminated, a STARTING one). Written to `answered` (JSON): the run, its status as the
# operator saw it, whether its start was written then, the policy sent, what the UI answered
# and when. `held`.sent is made just before Terminate is sent.
OPERATOR = """
import json, sys, time
from pathlib import Path
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster_graphql.test.utils import execute_dagster_graphql
from tests.test_ui_run_actions import SHOWN
from tests.test_stuck_runs import TERMINATE

home, held, answered = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
deadline = time.monotonic() + 300
while not held.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
which = held.read_text()
with DagsterInstance.from_config(home) as instance:
    def start_of(run_id):
        return [r.event_log_entry.dagster_event.pid for r in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.RUN_START).records]
    if which.isdigit():  # the run whose start that process wrote
        [run] = [run for run in instance.get_runs(RunsFilter(
            statuses=[DagsterRunStatus.STARTED])) if start_of(run.run_id) == [int(which)]]
    else:
        run = instance.get_run_by_id(which.split()[1])
    seen, started = run.status.value, bool(start_of(run.run_id))
    with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as workspace:
        shown = execute_dagster_graphql(workspace.create_request_context(), SHOWN,
                                        {"id": run.run_id}).data["runOrError"]
        # the dialog's choice: Terminate where the run can be, else "Force termination"
        policy = "SAFE_TERMINATE" if shown["canTerminate"] else "MARK_AS_CANCELED_IMMEDIATELY"
        held.with_name(held.name + ".sent").touch()
        answer = execute_dagster_graphql(workspace.create_request_context(), TERMINATE,
                                         {"id": run.run_id, "policy": policy}).data
answered.write_text(json.dumps({"run_id": run.run_id, "seen": seen, "started": started,
                                "policy": policy, "at": time.time(),
                                "answer": answer["terminateRun"]["__typename"]}))
"""
SHOWN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { canTerminate } } }"""
HOLD_S = 30.0  # a held copy not interrupted goes on after this (the run was not stopped)


@contextmanager
def an_operator_terminating(home: Path, held: Path) -> Iterator[Path]:
    """The operator's Terminate of the run whose process holds at `held`, sent from a process
    of its own (the webserver's); yields where its answer is written."""
    answered = held.with_name("answered.json")
    operator = subprocess.Popen([sys.executable, "-c", OPERATOR, str(home), str(held),
                                 str(answered)], cwd=REPO, env=_environment())
    try:
        yield answered
        assert operator.wait(timeout=60) == 0
    finally:
        if operator.poll() is None:
            operator.kill()
            operator.wait()


def holding_the_first_copy(monkeypatch: pytest.MonkeyPatch, config: Config, tmp_path: Path,
                           only: Callable[[], bool] = lambda: True) -> tuple[Path, list[Path]]:
    """In whichever process executes it (where `only()` says so), the first copy to an
    archive's buffer waits there, its bytes half landed, until it is interrupted (HOLD_S at
    most): `held` names that process (once: `chosen` is made by one process only, and names
    the copy's temporary file)."""
    held, chosen = tmp_path / "held", tmp_path / "held.chosen"
    buffers = [config.resolve_root(f"sites/{site}/buffer") for site in ("cologne", "us")]
    landed = LocalTransport._landed

    def holding(transport: LocalTransport, temporary: Path) -> None:
        landed(transport, temporary)
        if only() and any(temporary.is_relative_to(buffer) for buffer in buffers):
            with suppress(FileExistsError):
                os.close(os.open(chosen, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                chosen.write_text(str(temporary))
                assert temporary.is_file()  # the bytes half way, not yet in place
                wait_to_be_killed(held, HOLD_S)()

    monkeypatch.setattr(LocalTransport, "_landed", holding)
    return held, [chosen]


def stopped_promptly(instance: DagsterInstance, answered: Path, halfway: Path) -> DagsterRun:
    """What the operator saw: Terminate answered success, the run CANCELED within seconds
    (its copy not started again), its half-written file gone. Returns the run."""
    said = json.loads(answered.read_text())
    assert said["answer"] == "TerminateRunSuccess", said
    record = instance.get_run_record_by_id(said["run_id"])
    assert record is not None and record.dagster_run.status == DagsterRunStatus.CANCELED, \
        record and record.dagster_run.status
    assert record.end_time is not None and record.end_time - said["at"] < 10.0
    assert Stage.SITE_COPY in stages_of(record.dagster_run)
    assert not instance.all_logs(said["run_id"], of_type=DagsterEventType.STEP_RESTARTED)
    assert not halfway.exists()
    # a person stopped it: not a run stopped by no person (whose work, stopped so again and
    # again past the horizon, is told: ccat_dt/reattempt.py)
    assert not record.dagster_run.tags.get(STOPPED_TAG), record.dagster_run.tags
    return record.dagster_run


def test_a_plain_terminate_in_the_ui_stops_a_copy_of_a_drive_with_one_run_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's instance runs one run at a time (`max_concurrent_runs: 1` in its
    dagster.yaml). The operator clicks Terminate on a copy `ccat-dt drive` executes, held half
    way through its transfer. Before, the drive executed such runs in its own process: the UI
    answered "Unable to terminate run ..." and nothing stopped the copy. Now every run of a
    drive executes in a child process, one at a time here: the UI answers success, the run
    ends CANCELED within seconds, its half-written file gone, the drive goes on, and the
    sensors redo the copy after the back-off: every file once in each long-term archive."""
    config = deployment(tmp_path / "deploy", routes=ROUTES,
                        policies={"retry_backoff_first_s": 0.2})
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    settings["concurrency"]["runs"]["max_concurrent_runs"] = 1
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    opsdb = OpsDB(config.opsdb_url)
    held, chosen = holding_the_first_copy(monkeypatch, config, tmp_path)
    try:
        observe_modules(config, opsdb, observations=1)  # 2 packages
        source = config.resolve_root("sites/ccat/instruments")
        raw = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*.dat")}
        with DagsterInstance.from_config(str(home)) as instance:
            assert run_limits(instance)[0] == 1
            with an_operator_terminating(home, held) as answered:
                lines: list[str] = []
                report = drive(build_definitions(config), instance, wait_s=10,
                               log=lines.append)
            run = stopped_promptly(instance, answered, Path(chosen[0].read_text()))
            assert int(held.read_text()) != os.getpid()  # not in the drive's process
            # what the operator asked for, no failure (before: a FAILED line, exit 1)
            assert report.canceled_ids == [run.run_id], "\n".join(lines)  # that one alone
            assert report.failed == [], "\n".join(lines)
            assert any(line.startswith(f"CANCELED {report.canceled[0]} (run {run.run_id})")
                       and "canceled by an operator" in line for line in lines), lines
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        assert not [p for p in config.resolve_root("sites").rglob("*.part")]
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_a_plain_terminate_in_the_ui_stops_a_copy_ccat_dt_retry_executes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt retry` re-runs two packages' copies to their primary archives; the operator
    clicks Terminate on one, held half way through its transfer. Before, `retry` executed its
    runs in its own process: the UI answered "Unable to terminate run ..." and nothing
    stopped the copy. Now they execute in child processes of the drive `retry` runs: the UI
    answers success, the run ends CANCELED within seconds, its half-written file gone, the
    other copy made, and the next drive redoes the stopped copy after the back-off: every
    file once in each long-term archive."""
    config, home, opsdb, raw = four_packages_one_run_per_link(
        tmp_path, policies={"retry_backoff_first_s": 0.2})
    held, chosen = holding_the_first_copy(monkeypatch, config, tmp_path)
    try:
        with opsdb.session() as session:
            primary = {p.name: p.primary_site.short_name for p in plan_packages(session, config)}
        with DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions(PACKAGES, list(primary))
            defs = build_definitions(config)
            for package in primary:
                assert by_hand(defs, instance, "packages", package)  # built, at ccat/buffer
            with an_operator_terminating(home, held) as answered:
                lines: list[str] = []
                retried, report = operator_retry(config, instance, opsdb, log=lines.append)
            assert {(item.package, item.site) for item in retried
                    if item.stage == Stage.SITE_COPY} >= set(primary.items()), retried
            run = stopped_promptly(instance, answered, Path(chosen[0].read_text()))
            assert run.tags.get(RETRY_TAG), run.tags  # one of retry's own
            assert int(held.read_text()) != os.getpid()  # not in retry's process
            assert run.run_id in report.canceled_ids, "\n".join(lines)
            assert run.run_id not in report.failed_ids, "\n".join(lines)
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
            assert drive(defs, instance, wait_s=10).failed == []  # the next attempt
        assert not [p for p in config.resolve_root("sites").rglob("*.part")]
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


@pytest.mark.parametrize("held_where", ["before its last look", "after its last look"])
def test_terminate_in_the_ui_of_a_copy_the_drive_is_starting_stops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_where: str) -> None:
    """The operator clicks Terminate on a copy the drive is starting (STARTING: claimed, its
    child forked, the run's start not yet written). Dagster says such a run cannot be
    terminated, and the UI's dialog sends "Force termination": the run is marked CANCELED,
    and the UI answers success. Before, the run's start then made it STARTED again and it was
    executed to its end, its copy made, the run SUCCESS. Now the child does not start a run
    so terminated (held before its last look), and one terminated after that look, before its
    start was written, is marked again and interrupted once started (held there, then in its
    transfer): the run ends CANCELED within seconds, nothing half-written left, the drive goes
    on, and the sensors redo the copy after the back-off: every file once in each archive."""
    config = deployment(tmp_path / "deploy", routes=ROUTES,
                        policies={"retry_backoff_first_s": 0.2})
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    opsdb = OpsDB(config.opsdb_url)
    held, chosen = tmp_path / "starting", tmp_path / "starting.chosen"
    sent = held.with_name(held.name + ".sent")
    after = held_where == "after its last look"
    name = "execute_run" if after else "_execute"  # (job, run, instance) or (queued, instance)
    real = getattr(runpool, name)
    mine: list[str] = []  # in the child held as it starts: that run

    def held_as_it_starts(*args: Any) -> Any:
        """In the run's child: the first copy waits until the operator sent Terminate, and a
        second more (the UI's answer is on its way)."""
        run: DagsterRun = args[1] if after else args[0].run
        if Stage.SITE_COPY in stages_of(run):
            with suppress(FileExistsError):
                os.close(os.open(chosen, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                written = held.with_name(f".{held.name}.{os.getpid()}")
                written.write_text(f"run {run.run_id}")
                written.rename(held)
                mine.append(run.run_id)
                deadline = time.monotonic() + 60
                while not sent.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(runpool, name, held_as_it_starts)
    if after:  # and its copy (none other), half way, until interrupted
        _, halfway = holding_the_first_copy(monkeypatch, config, tmp_path, lambda: bool(mine))
    try:
        observe_modules(config, opsdb, observations=1)  # 2 packages
        source = config.resolve_root("sites/ccat/instruments")
        raw = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*.dat")}
        with DagsterInstance.from_config(str(home)) as instance:
            with an_operator_terminating(home, held) as answered:
                lines: list[str] = []
                report = drive(build_definitions(config), instance, wait_s=10,
                               log=lines.append)
            said = json.loads(answered.read_text())
            assert (said["seen"], said["started"]) == ("STARTING", False), said
            assert said["policy"] == "MARK_AS_CANCELED_IMMEDIATELY", said
            assert said["answer"] == "TerminateRunSuccess", said
            record = instance.get_run_record_by_id(said["run_id"])
            assert record is not None and record.dagster_run.status == DagsterRunStatus.CANCELED
            assert record.end_time is not None and record.end_time - said["at"] < 10.0
            steps = instance.all_logs(said["run_id"], of_type=DagsterEventType.STEP_START)
            if after:  # interrupted once started: in its transfer, or (on a loaded machine,
                # the interrupt first) before any byte of it landed
                assert not halfway[0].exists() or not Path(halfway[0].read_text()).exists()
            else:  # not executed at all
                assert steps == []
                with opsdb.session() as session:
                    assert not session.scalars(select(Operation.id).where(
                        Operation.run_id == said["run_id"])).all()
            assert report.canceled_ids == [said["run_id"]], "\n".join(lines)
            assert report.failed == [], "\n".join(lines)
            assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        assert not [p for p in config.resolve_root("sites").rglob("*.part")]
        on_disk(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_re_execute_in_the_ui_of_every_finished_run_changes_nothing_and_stays_green(
        driven: Archived, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """"Re-execute" (Runs -> a run -> Re-execute all) of each run of an archived deployment
    (packaging, a site copy and its archiving, a purge), as the UI sends it, executed by the
    next drive: each re-executed run succeeds on the same partition, and the storage (every
    file, byte for byte), OpsDB and every check stay as they were: nothing built, copied or
    deleted again, no package purged twice."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    files, recorded = storage(config), opsdb_state(opsdb)
    parents = instance.get_runs()
    assert {run.job_name for run in parents} == {"package_job", "site_copy_archive_job",
                                                 "purge_job"}
    with the_ui(instance, config.path, monkeypatch) as ui:
        for run in parents:
            answer = ui(REEXECUTE, id=run.run_id, s="ALL_STEPS")["launchRunReexecution"]
            assert answer["__typename"] == "LaunchRunSuccess", (run.job_name, answer)
        report = drive(build_definitions(config), instance)

    assert report.failed == [] and len(report.launched) == len(parents), report
    again = [run for run in instance.get_runs() if "dagster/parent_run_id" in run.tags]
    assert sorted((r.job_name, r.tags["dagster/partition"], r.status) for r in again) == sorted(
        (r.job_name, r.tags["dagster/partition"], DagsterRunStatus.SUCCESS) for r in parents)
    assert storage(config) == files
    assert opsdb_state(opsdb) == recorded
    for asset, check in (("packages", "package_checksum"), ("site_copies", "site_copy_checksum"),
                         ("lta_copies", "lta_copy_checksum"), ("purge_status", "filed_bytes_safe"),
                         ("purge_status", "deletion_certificates")):
        assert set(check_status(instance, asset, check).values()) == {"passed"}, (asset, check)


def test_re_execute_in_the_ui_of_a_failed_run_beside_its_automatic_re_attempt_builds_once(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package's packaging run failed (its source disk was not mounted); the disk is back,
    and an operator clicks "Re-execute from failure" and "Re-execute all" on the failed run
    while the re-attempt sensor also re-attempts it: every run succeeds, the package is built
    once (one package row), archived at both sites, and its sources purged only once verified
    copies exist."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.5})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=1, size=20_000)
        defs = build_definitions(config)
        report = drive_with_the_source_unmounted(config, defs, instance)
        assert report.failed_ids, report.launched  # (a re-attempt due already may fail too)
        failed = report.failed_ids[0]
        with the_ui(instance, config.path, monkeypatch) as ui:
            for strategy in ("FROM_FAILURE", "ALL_STEPS"):
                answer = ui(REEXECUTE, id=failed, s=strategy)["launchRunReexecution"]
                assert answer["__typename"] == "LaunchRunSuccess", (strategy, answer)
            report = drive(defs, instance, wait_s=10)

        assert report.failed == [], report.failed
        again = [run for run in instance.get_runs() if "dagster/parent_run_id" in run.tags]
        assert [run.status for run in again] == [DagsterRunStatus.SUCCESS] * 2
        with opsdb.session() as session:
            assert len(session.scalars(select(RawDataPackage)).all()) == 1
        assert len(list(config.resolve_root("sites/ccat/buffer").rglob("*.tar"))) <= 1
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_re_execute_in_the_ui_of_an_integrity_report_says_the_storage_not_the_past(
        driven: Archived, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """An integrity report of the sensor's (a sound copy found bad then, its partition red),
    re-executed from the UI after the copy was made good without a new materialization: the
    old finding is said again, as Dagster re-executes it, and the next drive runs that
    partition's checks again on the storage, which pass. The sensor's own report is its
    word: no recheck follows it."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    copy = lta_copies_at(opsdb, "cologne")[0]
    key = str(package_site_key(copy.package.name, "cologne"))
    finding = {"asset": "lta_copies", "check": "lta_copy_checksum", "partition": key,
               "passed": False, "description": "found bad then",
               "events_before": instance.event_log_storage.get_maximum_record_id()}
    report = DriveReport()  # the integrity sensor's run, as a drive executes it
    launch(defs, instance, RunRequest(
        job_name=integrity_report_job.name, run_key="integrity:then",
        run_config={"ops": {"report_findings": {"config": {"findings": [finding]}}}}),
        origin=INTEGRITY_SENSOR, report=report)
    [sensors] = instance.get_runs(RunsFilter(job_name=integrity_report_job.name))
    assert sensors.tags[SENSOR_NAME_TAG] == INTEGRITY_SENSOR and report.failed == []
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[key] == "failed"
    assert [k for k in drive(defs, instance).launched if k.startswith("recheck:")] == []
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[key] == "failed"

    with the_ui(instance, config.path, monkeypatch) as ui:
        answer = ui(REEXECUTE, id=sensors.run_id, s="ALL_STEPS")["launchRunReexecution"]
        assert answer["__typename"] == "LaunchRunSuccess", answer
        report = drive(defs, instance)

    assert [k for k in report.launched if k.startswith("recheck:")] == [
        k for k in report.launched if k.startswith(f"recheck:lta_copies:{key}:")] != []
    assert report.failed == [], report
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[key] == "passed"
    lta_intact(opsdb)
