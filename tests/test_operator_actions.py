"""What an operator does in the Dagster UI, done through Dagster's API the way the UI does
it (the asset job, a partition key, no sensor tags), on a finished lifecycle: every button
converges to the truth, and the integrity reports per partition say what OpsDB says."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    PreviewWarning,
    RunRequest,
    RunsFilter,
    build_sensor_context,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, drive, healed_runs, launch
from ccat_assets.integrity import REPORTED, integrity_report_job
from ccat_assets.partitions import package_site_key
from ccat_assets.scrub import scrub_job
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME, write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataPackage,
)
from ccat_dt.progress import ProgressEvent
from ccat_dt.report import disagreements
from ccat_dt.stages import Stage
from ccat_dt.topology import prepare_opsdb
from sensors.reattempt import history as reattempt_history
from tests.helpers import (
    copied_deployment,
    driven_template,
    flip_byte,
    lta_copies_at,
    new_opsdb,
    observe,
    rot_an_lta_copy,
    template_directory,
)

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)


class Archived(NamedTuple):
    config: Config
    opsdb: OpsDB
    instance: DagsterInstance


@functools.cache
def _archived_template() -> tuple[Path, Path]:
    """The default deployment (conftest's `config`) with one observation of one file per module
    observed, filed and driven to the end by the real lifecycle, made once per test process:
    the set-up of most tests here (~4 s of CPU each). Its deployment directory and instance."""
    directory = template_directory("operator-actions-archived")
    config = load_config(write_default_config(directory / "deploy"))
    new_opsdb(config)
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    return driven_template(config, opsdb)


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[Archived]:
    """What `observe(config, opsdb, observations=1, files=1)` and a drive of it to the end
    leave, as a copy of `_archived_template`'s (tests.helpers.copied_deployment): the test's
    own deployment directory, OpsDB and instance."""
    deploy, home = _archived_template()
    with copied_deployment(deploy, home, tmp_path) as instance:
        config = load_config(tmp_path / "deploy" / CONFIG_NAME)
        opsdb = OpsDB(config.opsdb_url)
        yield Archived(config, opsdb, instance)
        opsdb.dispose()


def by_hand(defs: Definitions, dagster: DagsterInstance, asset: str, partition: str,
            tags: dict[str, str] | None = None) -> bool:
    """"Materialize" in the UI: the asset job, one asset selected, a partition, no run key."""
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=dagster, partition_key=partition,
                                    asset_selection=[AssetKey(asset)], raise_on_error=False,
                                    tags=tags or {})
    return result.success


def opsdb_state(opsdb: OpsDB) -> dict[str, Any]:
    """Everything OpsDB says about packages and copies, except when copies were last verified
    and the verification operations (re-reading is what a re-materialisation may add)."""
    with opsdb.session() as session:
        packages = {p.name: (p.state, p.checksum) for p in session.scalars(select(RawDataPackage))}
        copies = {c.id: (c.status, c.location_id, c.relative_path, c.checksum)
                  for c in session.scalars(select(PhysicalCopy))}
        operations = {o.id: (o.operation_type, o.status, o.copy_id)
                      for o in session.scalars(select(Operation))
                      if o.operation_type != OperationType.VERIFICATION}
    return {"packages": packages, "copies": copies, "operations": operations}


def lta_intact(opsdb: OpsDB) -> None:
    for site in ("cologne", "us"):
        for copy in lta_copies_at(opsdb, site):
            if copy.status == CopyStatus.PRESENT:
                path = Path(copy.location.root) / copy.relative_path
                assert hash_file(path)[0] == copy.package.checksum


def test_materialize_by_hand_on_an_archived_package_changes_nothing_but_verifications(
        driven: Archived) -> None:
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    before = opsdb_state(opsdb)
    names = sorted(before["packages"])
    assert all(state == PackageState.ARCHIVED for state, _ in before["packages"].values())
    with opsdb.session() as session:
        verifications = session.query(Operation).filter(
            Operation.operation_type == OperationType.VERIFICATION).count()

    # "Materialize" on an archived lta_copies partition (its buffer copy purged)
    lta_key = str(package_site_key(names[0], "us"))
    assert by_hand(defs, instance, "lta_copies", lta_key)
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("lta_copies"), asset_partitions=[lta_key]), limit=1).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["outcome"].value == "already there, verified now"
    # a backfill of site_copies for one site: one run per partition, as the backfill daemon
    for name in names:
        assert by_hand(defs, instance, "site_copies", str(package_site_key(name, "cologne")),
                       tags={"dagster/backfill": "test"})
    # "Materialize" on packages for an archived package (its sources purged)
    assert by_hand(defs, instance, "packages", names[1])
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("packages"), asset_partitions=[names[1]]), limit=1).records
    assert record.asset_materialization is not None
    outcome = record.asset_materialization.metadata["outcome"].value
    assert isinstance(outcome, str) and "not rebuilt" in outcome
    # "Materialize" on raw_files of an archived package: its check passes, and says that the
    # sources were purged after archiving (not "all present": they are rightly gone)
    assert by_hand(defs, instance, "raw_files", names[1])
    [run] = instance.get_runs(limit=1)
    [evaluation] = [r.dagster_event.event_specific_data for r in instance.all_logs(
        run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event]
    assert isinstance(evaluation, AssetCheckEvaluation) and evaluation.passed
    assert evaluation.description == "0 present, 1 purged after archiving (not expected at " \
        "the source any more)", evaluation.description
    # ... and twice: the same answer
    assert by_hand(defs, instance, "lta_copies", lta_key)

    # The sensors see nothing new to do (no second run, no purge of anything), none failed.
    follow_up = drive(defs, instance)
    assert follow_up.failed == [] and follow_up.launched == []
    assert instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE])) == []
    assert opsdb_state(opsdb) == before  # OpsDB unchanged ...
    with opsdb.session() as session:  # ... except the new verification records
        assert session.query(Operation).filter(
            Operation.operation_type == OperationType.VERIFICATION).count() > verifications
    lta_intact(opsdb)
    assert disagreements(opsdb) == []
    # every check of those partitions is green on its latest materialization
    for asset, check, key in [("lta_copies", "lta_copy_checksum", lta_key),
                              ("site_copies", "site_copy_checksum",
                               str(package_site_key(names[0], "cologne"))),
                              ("packages", "package_checksum", names[1])]:
        assert check_status(instance, asset, check)[key] == "passed"



def check_status(dagster: DagsterInstance, asset: str, check: str) -> dict[str, str]:
    """Per partition, what the UI shows for the check: "passed"/"failed" when the latest
    evaluation targets the partition's latest materialization, "stale" otherwise."""
    infos = dagster.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(AssetKey(asset), check)])
    out = {}
    for info in infos:
        status = ("passed" if info.latest_execution_status
                  == AssetCheckExecutionRecordStatus.SUCCEEDED else "failed"
                  if info.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED
                  else info.latest_execution_status.value)
        out[str(info.partition_key)] = status if info.is_current else "stale"
    return out


def test_materialize_on_a_rotten_lta_copy_repairs_it_and_names_the_copy_it_came_from(
        driven: Archived) -> None:
    """"Materialize" on an archived lta_copies partition whose copy rotted: the re-read finds
    it bad, the repair comes from the other archive's verified copy, and the partition's
    metadata says so (not the rotten copy the step had planned to start from)."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    bad = rot_an_lta_copy(opsdb, "cologne")
    key = str(package_site_key(bad.package.name, "cologne"))

    assert by_hand(defs, instance, "lta_copies", key)

    path = Path(bad.location.root) / bad.relative_path
    assert hash_file(path)[0] == bad.package.checksum  # the storage: repaired
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("lta_copies"), asset_partitions=[key]), limit=1).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["from"].value == "us/lta", metadata
    outcome = str(metadata["outcome"].value)  # a repair, found by this run's own re-read
    assert outcome.startswith(f"repaired: replaced the copy {bad.id} at cologne/"), outcome
    assert f"by a re-read in run {record.run_id} (checksum mismatch: " in outcome, outcome
    assert outcome.endswith(", with one copied from us/lta"), outcome
    replaced: Any = metadata["replaced"].value
    [entry] = replaced
    assert entry["copy_id"] == bad.id and entry["path"] == str(path), entry
    assert entry["found_by"] == f"a re-read in run {record.run_id}", entry


def test_a_scrub_finding_is_red_on_its_partition_until_the_repair_makes_it_green(
        driven: Archived,
        progress_events: list[ProgressEvent]) -> None:
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    bad = rot_an_lta_copy(opsdb, "us")
    copies = [(site, c) for site in ("cologne", "us") for c in lta_copies_at(opsdb, site)]
    keys = [str(package_site_key(c.package.name, site)) for site, c in copies]
    bad_key = str(package_site_key(bad.package.name, "us"))

    scrub = scrub_job.execute_in_process(
        instance=instance, resources=defs.resources,
        run_config={"ops": {"reread_lta_copies": {"config": {"partitions": keys}}}})
    assert scrub.success
    scrubbed = [e for e in progress_events if e.stage == "scrub"]  # bytes re-read, as it went
    total = sum(c.size for _, c in copies)
    assert [e.done_bytes for e in scrubbed] == [
        sum(c.size for _, c in copies[:n]) for n in range(1, len(copies) + 1)] + [total]
    assert all(e.total_bytes == total for e in scrubbed) and scrubbed[-1].finished

    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert {k for k, v in status.items() if v != "passed"} == {bad_key}
    assert status[bad_key] == "failed"  # red on exactly that partition
    with opsdb.session() as session:
        assert session.get_one(PackageCopy, bad.id).status == CopyStatus.CORRUPT
    overview = tick_overview(defs, instance)  # the operator's overview says so too
    assert overview["us quarantined"] == 1 and overview["packages at risk"] == 1
    assert bad.package.name in overview["overview"] and "AT RISK" in overview["overview"]

    assert drive(defs, instance).failed == []  # the repair sensor and what follows

    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert set(status.values()) == {"passed"} and bad_key in status
    certificates = check_status(instance, "purge_status", "deletion_certificates")
    assert certificates and set(certificates.values()) == {"passed"}
    assert check_status(instance, "purge_status", "filed_bytes_safe").get(
        bad.package.name, "passed") == "passed"
    lta_intact(opsdb)
    [record] = instance.fetch_materializations(AssetKey("operator_overview"), limit=1).records
    latest = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert latest["us quarantined"].value == 0 and latest["us verified"].value == 2
    assert latest["packages stuck"].value == 0


def tick_overview(defs: Definitions, dagster: DagsterInstance) -> dict[str, Any]:
    """One tick of the overview sensor, its materialisation recorded as the daemon does."""
    repository = defs.get_repository_def()
    sensor = repository.get_sensor_def("overview_sensor")
    with build_sensor_context(instance=dagster, repository_def=repository,
                              resources=defs.resources) as context:
        [event] = sensor.evaluate_tick(context).asset_events
    dagster.report_runless_asset_event(event)
    return {k: v.value for k, v in event.metadata.items()}


def test_an_audit_quarantine_is_reported_on_its_partition_by_the_integrity_sensor(
        driven: Archived) -> None:
    """A copy quarantined outside any run (here a failed re-read recorded as the audit and the
    deletion re-check record theirs) turns its partition's check red at the next tick."""
    from ccat_dt.replicas import reread

    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    bad = lta_copies_at(opsdb, "cologne")[0]
    path = Path(bad.location.root) / bad.relative_path
    path.write_bytes(b"x" * 10)
    assert not reread(opsdb, config, bad.id).passed  # CORRUPT, a failed verification
    bad_key = str(package_site_key(bad.package.name, "cologne"))

    sensor = next(s for s in defs.get_repository_def().sensor_defs
                  if s.name == "integrity_sensor")
    with build_sensor_context(instance=instance, resources=defs.resources,
                              repository_def=defs.get_repository_def()) as context:
        tick = sensor.evaluate_tick(context)  # one tick, before the repair sensor's
    report = DriveReport()
    for request in tick.run_requests or []:
        launch(defs, instance, request, origin="integrity_sensor", report=report)
    assert len(report.launched) == 1 and report.failed == []
    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert {k for k, v in status.items() if v != "passed"} == {bad_key}

    assert drive(defs, instance).failed == []  # the repair, and its check
    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert set(status.values()) == {"passed"}
    lta_intact(opsdb)


def quarantined_lta_copy(config: Config, opsdb: OpsDB,
                         instance: DagsterInstance) -> tuple[Definitions, str]:
    """An observation archived everywhere, then a byte of one cologne LTA copy flipped and
    found by a re-read outside any run (CORRUPT): the definitions and that partition's key."""
    from ccat_dt.replicas import reread

    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = lta_copies_at(opsdb, "cologne")[0]
    flip_byte(Path(bad.location.root) / bad.relative_path, 100, 0x01)
    assert not reread(opsdb, config, bad.id).passed
    return defs, str(package_site_key(bad.package.name, "cologne"))


def test_a_finding_whose_report_runs_after_the_repair_leaves_the_partition_green(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:  # noqa: F811
    """Runs execute side by side: the integrity sensor's report of a quarantine may run after
    the repair it prompted. The repaired partition stays green; the finding stays in the
    run's log (seen as a flaky test_scrub under load, 2026-12-03)."""
    defs, bad_key = quarantined_lta_copy(config, opsdb, instance)
    repository = defs.get_repository_def()
    sensor = repository.get_sensor_def("integrity_sensor")
    with build_sensor_context(instance=instance, resources=defs.resources,
                              repository_def=repository) as context:
        [late] = sensor.evaluate_tick(context).run_requests or []  # held back, as by a queue

    assert drive(defs, instance).failed == []  # the repair, its check, its own report
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    report = DriveReport()
    launch(defs, instance, late, origin="integrity_sensor", report=report)
    assert report.failed == []

    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    lta_intact(opsdb)


def test_a_finding_reported_while_its_repair_runs_leaves_the_partition_green(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:  # noqa: F811
    """The report of a quarantine may run while the repair it prompted is in flight (created,
    its check planned, not evaluated yet): the finding is only logged, and once the repair's
    check passes the UI shows the partition green, not without a current check (seen as a
    flaky test_scrub under load, 2026-12-04)."""
    from dagster._core.execution.api import execute_run

    from ccat_assets.driver import _create

    defs, bad_key = quarantined_lta_copy(config, opsdb, instance)
    repository = defs.get_repository_def()

    def tick(name: str) -> list[RunRequest]:
        with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                  resources=defs.resources, repository_def=repository
                                  ) as context:
            return list(repository.get_sensor_def(name).evaluate_tick(context).run_requests
                        or [])

    [late] = tick("integrity_sensor")  # held back, as by a queue
    [repair] = tick("repair_sensor")  # the buffer copy was purged: refilled first
    assert repair.partition_key == bad_key and repair.job_name == "site_copy_job"
    launch(defs, instance, repair, origin="repair_sensor", report=DriveReport())
    [repair] = tick("repair_sensor")  # then the LTA copy from it
    assert repair.partition_key == bad_key and repair.job_name == "lta_copy_job"
    run, runnable = _create(repository.get_job(repair.job_name), instance, bad_key,
                            dict(repair.run_config), dict(repair.tags))  # its check planned

    report = DriveReport()
    launch(defs, instance, late, origin="integrity_sensor", report=report)  # meanwhile
    assert report.failed == []
    assert execute_run(runnable, run, instance).success

    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    lta_intact(opsdb)


def test_materialize_of_a_package_opsdb_does_not_know_fails_once_with_that_cause(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """A partition left behind (an OpsDB restored from an older backup): each asset fails
    once, its headline the cause, never an internal error retried."""
    defs = build_definitions(config)
    instance.add_dynamic_partitions("packages", ["obs-nope_primecam-f280_p00"])
    for asset in ("raw_files", "packages", "purge_status"):
        assert not by_hand(defs, instance, asset, "obs-nope_primecam-f280_p00")
        [run] = instance.get_runs(limit=1)
        failures = [r.dagster_event.step_failure_data for r in instance.all_logs(
            run.run_id, of_type=DagsterEventType.STEP_FAILURE) if r.dagster_event]
        assert len(failures) == 1, asset  # not retried
        [failure] = failures
        assert failure.user_failure_data is not None, (asset, failure.error)
        assert failure.user_failure_data.description == \
            "unknown package 'obs-nope_primecam-f280_p00'", asset


def test_materialize_before_its_upstream_is_there_fails_once_saying_what_it_waits_for(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """"Materialize" clicked on a copy whose upstream is not there yet (real clicks in the UI
    showed these: the run fails once, nothing moves): site_copies of a package not built,
    lta_copies at its primary before the buffer copy there, site_copies at the other archive
    site before any LTA copy. Before, each said only "no verified copy to send to SITE yet",
    though the observatory holds a verified tar: the operator could not tell what to do
    first. Now each says what it waits for and which partition makes it; nothing lands
    outside the observatory, on the disks or in OpsDB."""
    from tests.faults.pipeline import observe as observe_one
    from tests.faults.pipeline import plan
    from tests.test_dry_runs import primary

    defs = build_definitions(config)
    observe_one(config, opsdb, name="obs-1", files=1, size=20_000)
    package = plan(config, opsdb, instance)
    first = primary(opsdb, package)
    other = ({"cologne", "us"} - {first}).pop()

    def fails_once(asset: str, partition: str) -> str:
        assert not by_hand(defs, instance, asset, partition), (asset, partition)
        [run] = instance.get_runs(limit=1)
        failures = [r.dagster_event.step_failure_data for r in instance.all_logs(
            run.run_id, of_type=DagsterEventType.STEP_FAILURE) if r.dagster_event]
        assert len(failures) == 1, (asset, partition)  # not retried
        [failure] = failures
        assert failure.user_failure_data is not None, (asset, failure.error)
        said = failure.user_failure_data.description or ""
        assert said.startswith(f"package {package}: no verified copy to send to "), said
        assert said.endswith("nothing was copied (the sensors make it once its source is "
                             "there)"), said
        return said

    said = fails_once("site_copies", f"{package}|{first}")
    assert f"the package is not built yet (planned; packages {package} builds it)" in said
    assert by_hand(defs, instance, "raw_files", package)
    assert by_hand(defs, instance, "packages", package)
    said = fails_once("lta_copies", f"{package}|{first}")
    assert f"{first}'s buffer holds no verified copy (site_copies {package}|{first} makes " \
        "it)" in said, said
    said = fails_once("site_copies", f"{package}|{other}")
    assert f"leaves ccat once, for its primary archive site {first}; {other} receives it " \
        f"from a verified LTA copy" in said and f"(lta_copies {package}|{first} makes the " \
        "first)" in said, said
    # The storage: the tar at the observatory buffer, nothing at either archive site.
    for site in ("cologne", "us"):
        for location in ("buffer", "lta"):
            root = config.resolve_root(f"sites/{site}/{location}")
            assert [p.name for p in root.rglob("*") if p.is_file()
                    and not p.name.startswith(".ccat-dt")] == [], (site, location)
    with opsdb.session() as session:
        assert [c.location.site.short_name for c in session.scalars(select(PhysicalCopy))
                if c.location.site.short_name != "ccat"] == []


def test_a_missing_lta_copy_is_archived_again_after_its_buffer_is_refilled(
        driven: Archived, monkeypatch: pytest.MonkeyPatch) -> None:
    """An archived and purged package's LTA tar at us gone from its disk, found (quarantined)
    by a re-read: the repair refills us's buffer from cologne's LTA copy, then archives it
    again. Real clicks found it stuck: "Report materialization event" on that lta_copies
    partition had the integrity sensor run its check (a run of the partition in flight) just
    as lta_copy_sensor looked at the refilled buffer copy, so that sensor passed it over; the
    repair sensor then asked for the archiving under the run key of the refill it had
    launched ("repair:PACKAGE:us:COPY"), which Dagster skips as already completed: the
    package stayed AT RISK with one LTA copy, no run asking for it, drives exiting 0. Here
    lta_copy_sensor is stopped by the operator (passing the copy over as surely): the repair
    sensor archives it itself, under a key of its own."""
    from ccat_dt.replicas import reread
    from tests.test_stopped_sensors import toggle

    config, opsdb, instance = driven  # observed, filed and driven to the end
    bad = lta_copies_at(opsdb, "us")[0]
    path = Path(bad.location.root) / bad.relative_path
    path.unlink()
    assert not reread(opsdb, config, bad.id).passed  # quarantined: missing
    toggle(config, instance, monkeypatch, ("sensor", "stop", "lta_copy_sensor"))
    report = drive(build_definitions(config), instance)
    repairs = [key for key in report.launched if key.startswith("repair:")]
    assert report.failed == [], report
    assert len(repairs) == 2 and repairs[1] == f"{repairs[0]}:archive", report.launched
    assert path.is_file() and hash_file(path)[0] == bad.checksum  # the storage: back, intact
    with opsdb.session() as session:
        package = session.get_one(RawDataPackage, bad.package_id)
        assert package.state == PackageState.ARCHIVED
        assert [c.status for c in package.copies
                if c.location.location_type == LocationType.BUFFER
                and c.status != CopyStatus.DELETED] == []  # the refill purged again
    assert drive(build_definitions(config), instance).launched == []


def test_a_finding_written_just_after_its_repair_was_created_leaves_the_partition_green(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The report of a quarantine looks for a run of the partition in flight, finds none, and
    the repair's run is created before it writes the finding (the daemon or a drive creates
    runs in another process): the finding is then the partition's latest check execution, on
    the old materialization, and the repair's passed check is outranked (stale in the UI, seen
    as a flaky test_scrub under `-n 2`, 2026-12-05). The integrity sensor's next tick says the
    repair's check again: green."""
    from dagster._core.execution.api import execute_run

    import ccat_assets.integrity as integrity
    from ccat_assets.driver import _create

    defs, bad_key = quarantined_lta_copy(config, opsdb, instance)
    repository = defs.get_repository_def()

    def tick(name: str) -> list[RunRequest]:
        with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                  resources=defs.resources, repository_def=repository
                                  ) as context:
            return list(repository.get_sensor_def(name).evaluate_tick(context).run_requests
                        or [])

    [late] = tick("integrity_sensor")
    [repair] = tick("repair_sensor")  # the buffer copy was purged: refilled first
    launch(defs, instance, repair, origin="repair_sensor", report=DriveReport())
    [repair] = tick("repair_sensor")  # then the LTA copy from it
    assert repair.partition_key == bad_key and repair.job_name == "lta_copy_job"
    job = repository.get_job(repair.job_name)
    created: list[tuple[DagsterRun, Any]] = []
    looked = integrity.in_flight

    def created_after_the_look(dagster: DagsterInstance) -> Any:
        busy = looked(dagster)
        created.append(_create(job, instance, bad_key, dict(repair.run_config),
                               dict(repair.tags)))
        return busy

    monkeypatch.setattr(integrity, "in_flight", created_after_the_look)
    report = DriveReport()
    launch(defs, instance, late, origin="integrity_sensor", report=report)
    assert report.failed == []
    monkeypatch.undo()
    [(run, runnable)] = created
    assert execute_run(runnable, run, instance).success  # the repair, its check passed
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "stale"

    follow_up = drive(defs, instance)  # the sensors' next ticks (and the refill's purge)
    assert follow_up.failed == []
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    [restated] = [key for key in follow_up.launched if key.startswith("integrity-restate:")]
    [said] = instance.get_runs(RunsFilter(tags={"dagster/run_key": restated}))
    [evaluation] = [r.dagster_event.event_specific_data for r in instance.all_logs(
        said.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event]
    assert isinstance(evaluation, AssetCheckEvaluation) and evaluation.passed
    assert f"the check of run {run.run_id[:8]}, said again" in (evaluation.description or "")
    assert drive(defs, instance).launched == []  # said once
    lta_intact(opsdb)


LTA_CHECK = (("lta_copies", "lta_copy_checksum"),)
EXECUTE_CHECKS = """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
CHECK_SUMMARY = """{ assetNodes(assetKeys: [{path: ["lta_copies"]}]) { assetChecksOrError {
  ... on AssetChecks { checks { name executionForLatestMaterialization { status
  evaluation { severity description } } } } } } }"""


def test_execute_checks_in_the_ui_re_reads_a_partition_and_without_one_is_canceled_saying_why(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catalog -> lta_copies -> Checks -> "Execute all": the UI launches the check alone, with
    no partition (its own per-check "Execute" is disabled on partitioned assets, this one is
    not). The run failed on Dagster's "Cannot access partition_key for a non-partitioned
    run", and the asset turned red in the lineage ("execution failed") on a healthy archive
    until its next materialization. Now the run is canceled before it is queued, saying why
    and what to do instead, and the check reads "skipped". The same check launched for one
    partition (its partition tags, as the launchpad sets them) re-reads that copy on its
    storage: a rotten one is red at once, and repaired by the next drive. Sent as the UI
    sends it, through GraphQL, to the code location workspace.yaml names."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    from ccat_assets.instance import write_instance_yaml

    repo = Path(__file__).resolve().parent.parent
    observe(config, opsdb, observations=1, files=1)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.chdir(repo)
    with DagsterInstance.from_config(str(home)) as dagster:
        defs = build_definitions(config)
        assert drive(defs, dagster).failed == []
        bad = rot_an_lta_copy(opsdb, "us")
        bad_key = package_site_key(bad.package.name, "us")

        def execute_checks(tags: dict[str, str],
                           checks: tuple[tuple[str, str], ...] = LTA_CHECK) -> str:
            selector = {"jobName": "__ASSET_JOB", "repositoryName": "__repository__",
                        "repositoryLocationName": "ccat_assets.definitions:defs",
                        "assetSelection": [], "assetCheckSelection": [
                            {"assetKey": {"path": [asset]}, "name": name}
                            for asset, name in checks]}
            answer = execute_dagster_graphql(workspace.create_request_context(), EXECUTE_CHECKS, {
                "p": {"mode": "default", "runConfigData": "{}", "selector": selector,
                      "executionMetadata": {"tags": [{"key": k, "value": v}
                                                     for k, v in tags.items()]}}}
            ).data["launchPipelineExecution"]
            assert answer["__typename"] == "LaunchRunSuccess", answer
            drive(defs, dagster, wait_s=10)  # no daemon here: the drive executes it
            return str(answer["run"]["runId"])

        def asset_summary() -> dict[str, Any]:
            [node] = execute_dagster_graphql(workspace.create_request_context(),
                                             CHECK_SUMMARY).data["assetNodes"]
            [check] = node["assetChecksOrError"]["checks"]
            return dict(check["executionForLatestMaterialization"])

        target = WorkspaceFileTarget(paths=[str(repo / "workspace.yaml")])
        with WorkspaceProcessContext(dagster, target) as workspace:
            run_id = execute_checks({})  # "Execute all": no partition
            summary = asset_summary()  # the lineage node is red on EXECUTION_FAILED or ERROR
            assert summary["status"] == "SKIPPED", summary
            run = dagster.get_run_by_id(run_id)
            assert run is not None
            assert run.status == DagsterRunStatus.CANCELED, run.status
            [canceled] = dagster.all_logs(run_id, of_type=DagsterEventType.RUN_CANCELED)
            assert "Partitions -> a partition -> Materialize" in (canceled.message or "")
            with opsdb.session() as session:  # nothing was found: the rotten copy not read
                assert session.get_one(PackageCopy, bad.id).status == CopyStatus.PRESENT

            run_id = execute_checks({"dagster/partition": str(bad_key),  # one partition
                                     **{f"dagster/partition/{d}": k
                                        for d, k in bad_key.keys_by_dimension.items()}})
            [evaluation] = [r.dagster_event.event_specific_data for r in dagster.all_logs(
                run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event]
            assert isinstance(evaluation, AssetCheckEvaluation)  # re-read on its storage: red
            assert not evaluation.passed and "checksum mismatch" in (evaluation.description or "")
            assert evaluation.partition == str(bad_key)

            # The other package's cologne LTA copy deleted behind OpsDB's back, then the
            # checks that rest on the LTA copies run alone: both passed on OpsDB's last
            # verification ("verified LTA copies at cologne/lta, us/lta"; "... at cologne,
            # us"); now they look, say what is missing, and the drive restores it.
            [gone] = [c for c in lta_copies_at(opsdb, "cologne") if c.package_id != bad.package_id]
            gone_path = Path(gone.location.root) / gone.relative_path
            gone_path.unlink()
            run_id = execute_checks({"dagster/partition": gone.package.name},
                                    (("packages", "package_checksum"),
                                     ("purge_status", "filed_bytes_safe")))
            said = {e.asset_check_key.name: e for r in dagster.all_logs(
                run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event
                and isinstance(e := r.dagster_event.event_specific_data, AssetCheckEvaluation)}
            assert sorted(said) == ["filed_bytes_safe", "package_checksum"], said
            assert not any(e.passed for e in said.values()), said
            assert "AT RISK" in (said["filed_bytes_safe"].description or ""), said
            told = " ".join(e.description or "" for e in said.values())  # by the first to look
            assert f"cologne/lta copy {gone.id}: missing" in told, told
            assert hash_file(gone_path)[0] == gone.package.checksum  # made again

        status = check_status(dagster, "lta_copies", "lta_copy_checksum")  # the same drive
        assert {v for k, v in status.items() if k != "None"} == {"passed"}, status  # repaired it
        assert drive(defs, dagster).failed == []
        lta_intact(opsdb)


def integrity_tick(defs: Definitions, dagster: DagsterInstance,
                   cursor: str | None = None) -> tuple[list[RunRequest], str | None]:
    """One tick of the integrity sensor (from `cursor`): its run requests and new cursor."""
    repository = defs.get_repository_def()
    with build_sensor_context(instance=dagster, instance_ref=dagster.get_ref(), cursor=cursor,
                              resources=defs.resources, repository_def=repository) as context:
        result = repository.get_sensor_def("integrity_sensor").evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


@pytest.mark.parametrize("then", ["ended", "materialized"])
def test_a_finding_while_its_partition_has_a_run_in_flight_is_reported_once_that_run_ended(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, then: str) -> None:
    """A copy quarantined while a run of its partition is queued (here a repair, created, its
    check planned). Its report was dropped ("its own check reports it") and the sensor's
    cursor had moved on: when that run ended without materializing (canceled, failed before
    its copy), the quarantined copy stayed green in the UI for ever. Now the sensor holds the
    finding back while the run is in flight and reports it once the run has ended; a run that
    materialized the partition meanwhile has its own check, which stands."""
    from dagster._core.execution.api import execute_run

    from ccat_assets.driver import _create

    defs, bad_key = quarantined_lta_copy(config, opsdb, instance)
    job = defs.get_repository_def().get_job("lta_copy_job")
    run, runnable = _create(job, instance, bad_key, {}, {})  # queued, its check planned

    def tick_and_launch(cursor: str | None) -> tuple[list[str], str | None]:
        """One tick of the integrity sensor, its runs executed: their run keys, the cursor."""
        requests, cursor = integrity_tick(defs, instance, cursor)
        report = DriveReport()
        for request in requests:
            launch(defs, instance, request, origin="integrity_sensor", report=report)
        assert report.failed == []
        return report.launched, cursor

    # The quarantine seen while the run is queued: held back (written now, it would outrank
    # the run's planned check); the package at risk is reported on purge_status.
    _, cursor = tick_and_launch(None)
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] != "failed"
    if then == "ended":
        instance.report_run_canceled(run)  # an operator's Terminate: nothing materialized
        launched, cursor = tick_and_launch(cursor)
        assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "failed"
        assert [k.split(":")[0] for k in launched] == ["integrity-held"], launched
    else:
        assert execute_run(runnable, run, instance).success  # the repair, its check passed
        launched, cursor = tick_and_launch(cursor)  # (the package safe again: purge_status)
        assert not [k for k in launched if k.startswith("integrity-held:")], launched
        assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    launched, _ = tick_and_launch(cursor)  # said once; nothing is held any more
    assert not [k for k in launched if k.startswith("integrity-held:")], launched
    assert drive(defs, instance).failed == []  # the repair (or nothing left to do)
    assert set(check_status(instance, "lta_copies", "lta_copy_checksum").values()) == {"passed"}
    lta_intact(opsdb)


def test_hand_reported_events_are_checked_again_on_the_storage_at_the_next_tick(
        driven: Archived) -> None:
    """"Report materialization event" (a partition of lta_copies, of purge_status) and, on the
    Checks tab, "Report evaluation" (a rotten copy's check marked passed by hand): runless
    events, done as the UI's mutations do them. Each left the partition's check stale (no
    result on its latest materialization) for good. Now the integrity sensor's next tick asks
    for the partition's checks alone, which read the copy on its storage: the check says the
    storage's answer on the latest materialization, the hand-made one; nothing is moved."""
    from dagster import AssetMaterialization

    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    _, cursor = integrity_tick(defs, instance)  # the sensor has looked: from here on
    bad = rot_an_lta_copy(opsdb, "us")
    bad_key = str(package_site_key(bad.package.name, "us"))
    # another package's copy: the rotten one's package is not all good (filed_bytes_safe)
    [good] = [c for c in lta_copies_at(opsdb, "cologne") if c.package_id != bad.package_id][:1]
    good_key = str(package_site_key(good.package.name, "cologne"))
    good_hash = hash_file(Path(good.location.root) / good.relative_path)[0]

    instance.report_runless_asset_event(AssetCheckEvaluation(  # "Report evaluation": passed
        asset_key=AssetKey("lta_copies"), check_name="lta_copy_checksum", passed=True,
        partition=bad_key, description="looks fine to me"))
    for asset, key in [("lta_copies", good_key), ("purge_status", good.package.name)]:
        instance.report_runless_asset_event(AssetMaterialization(asset, partition=key))
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "stale"
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[good_key] == "stale"
    assert check_status(instance, "purge_status", "filed_bytes_safe")[
        good.package.name] == "stale"

    requests, after = integrity_tick(defs, instance, cursor)
    report = DriveReport()
    for request in requests:
        launch(defs, instance, request, origin="integrity_sensor", report=report)
    assert len(report.launched) == 3, report.launched
    # the rotten copy's recheck failed (its blocking check): a failure until it is repaired,
    # but no failed attempt of the copy (nothing to wait for: the repair sensor makes it)
    [found] = report.failed
    assert found.startswith(f"recheck:lta_copies:{bad_key}:"), report.failed
    assert healed_runs(instance, report) == []
    assert not [r for r in reattempt_history(instance, Stage.LTA_COPY, bad.package.name, "us")
                if r.failed]

    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert status[bad_key] == "failed" and status[good_key] == "passed", status
    for check in ("filed_bytes_safe", "deletion_certificates"):
        assert check_status(instance, "purge_status", check)[good.package.name] == "passed"
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("lta_copies"), asset_partitions=[good_key]), limit=1).records
    assert record.run_id == ""  # the checks ran alone: the hand-made materialization stands
    assert hash_file(Path(good.location.root) / good.relative_path)[0] == good_hash
    with opsdb.session() as session:  # the rotten copy found, nothing repaired yet
        assert session.get_one(PackageCopy, bad.id).status == CopyStatus.CORRUPT

    replayed = DriveReport()  # the same tick again (the daemon died before its cursor)
    for request in integrity_tick(defs, instance, cursor)[0]:
        launch(defs, instance, request, origin="integrity_sensor", report=replayed)
    # (the quarantine the re-read recorded is a finding of its own, reported once)
    assert [k for k in replayed.launched if k.startswith("recheck:")] == []
    assert not [r for r in integrity_tick(defs, instance, after)[0]  # the next: none again
                if (r.run_key or "").startswith("recheck:")]

    assert drive(defs, instance).failed == []  # the repair
    assert set(check_status(instance, "lta_copies", "lta_copy_checksum").values()) == {"passed"}
    lta_intact(opsdb)
    assert healed_runs(instance, report) == [found]  # repaired: nobody needs to act


def test_a_recheck_that_finds_a_rotten_copy_is_healed_by_its_repair_in_the_same_drive(
        driven: Archived) -> None:
    """A rotten LTA copy (bit rot, OpsDB still holds it verified) whose check an operator
    marked passed by hand ("Report evaluation"): the next drive's recheck reads it, finds it
    bad, quarantines it (its blocking check fails, so does its run), and the repair sensor
    makes it again from the other archive within the same drive. Before, the recheck's failed
    run counted as a failure no later run healed, and as a failed attempt of the copy:
    `ccat-dt drive` exited 1 although the system had done its job and nothing was left for a
    person. Now it is healed once the repaired copy passes the check: exit 0, no re-attempt
    waiting; the copy on the storage is intact again."""
    from ccat_dt.loss import packages_in_danger

    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    bad = rot_an_lta_copy(opsdb, "us")
    bad_key = str(package_site_key(bad.package.name, "us"))
    instance.report_runless_asset_event(AssetCheckEvaluation(  # "Report evaluation": passed
        asset_key=AssetKey("lta_copies"), check_name="lta_copy_checksum", passed=True,
        partition=bad_key, description="looks fine to me"))

    report = drive(defs, instance)

    [found] = report.failed  # the recheck: its blocking check found the copy bad
    assert found.startswith(f"recheck:lta_copies:{bad_key}:"), report.failed
    assert report.healed == [found] and report.unhealed == [], report  # exit 0
    assert report.next_due is None  # no re-attempt waiting for a back-off
    assert any(k.startswith(f"repair:{bad.package.name}:us:") for k in report.launched)
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "passed"
    path = Path(bad.location.root) / bad.relative_path  # read from the storage: intact again
    assert hash_file(path)[0] == bad.package.checksum
    lta_intact(opsdb)
    with opsdb.session() as session:
        assert packages_in_danger(session, config) == []


def test_wiped_materializations_are_restated_from_opsdb_without_re_reading(
        driven: Archived,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """"Wipe materializations" of lta_copies, as the UI's wipeAssets does it for a whole asset
    (a partition's wipe is not supported by the embedded event log storage): the UI showed no
    LTA copy at all while OpsDB holds them verified, and nothing ever changed that. Now the
    integrity sensor, on its slow round, compares what Dagster shows materialized with what
    OpsDB holds verified, and restates the missing partitions from OpsDB: a materialization
    saying so, and a passed check naming the recorded verification, honestly not a re-read
    (nothing is read: no verification added)."""
    import sensors.integrity

    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    lta = AssetKey("lta_copies")
    archived = instance.get_materialized_partitions(lta)
    assert len(archived) == 4
    before = opsdb_state(opsdb)
    with opsdb.session() as session:
        reads = session.query(Operation).count()

    instance.wipe_assets([lta])
    assert instance.get_materialized_partitions(lta) == set()
    assert "passed" not in check_status(instance, "lta_copies", "lta_copy_checksum").values()

    monkeypatch.setattr(sensors.integrity, "RESTATE_EVERY_S", 0.0,  # its slow round is due
                        raising=False)
    assert drive(defs, instance).failed == []
    assert instance.get_materialized_partitions(lta) == archived
    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert {status[key] for key in archived} == {"passed"}, status
    key = sorted(archived)[0]
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=lta, asset_partitions=[key]), limit=1).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["restated_from"].value == "OpsDB", metadata
    [evaluation] = [r.dagster_event.event_specific_data for r in instance.all_logs(
        record.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event
        and r.dagster_event.event_specific_data.partition == key]  # type: ignore[union-attr]
    assert isinstance(evaluation, AssetCheckEvaluation) and evaluation.passed
    assert (evaluation.description or "").startswith("restated from OpsDB: verified "), \
        evaluation.description
    assert "not re-read now" in (evaluation.description or "")
    with opsdb.session() as session:  # told, not read: no operation added
        assert session.query(Operation).count() == reads
    assert opsdb_state(opsdb) == before
    lta_intact(opsdb)
    assert drive(defs, instance).launched == []  # once

    instance.wipe_assets([lta])  # again, later: restated again
    assert drive(defs, instance).failed == []
    assert instance.get_materialized_partitions(lta) == archived
    assert drive(defs, instance).launched == []


def test_a_quarantined_copy_wiped_is_restated_failed_from_opsdb_until_its_repair(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """"Wipe materializations" of lta_copies while one LTA copy is quarantined (found bad,
    not yet made again: its partition materialized, its check red). Before, the integrity
    sensor's restatement after the wipe told only what OpsDB holds verified: the quarantined
    copy's partition showed no materialization and no check at all, nothing red anywhere,
    until a repair materialized it again (never, where nothing can repair it). Now the next
    tick restates it from OpsDB as it was: materialized (`restated_from: OpsDB`), its check
    failed with what the failed verification recorded; the others passed. Nothing is read
    (the rotten file as it was); the repair then turns it green."""
    defs, bad_key = quarantined_lta_copy(config, opsdb, instance)
    lta = AssetKey("lta_copies")
    requests, cursor = integrity_tick(defs, instance)  # the quarantine reported: red
    report = DriveReport()
    for request in requests:
        launch(defs, instance, request, origin="integrity_sensor", report=report)
    assert check_status(instance, "lta_copies", "lta_copy_checksum")[bad_key] == "failed"
    shown = instance.get_materialized_partitions(lta)
    assert bad_key in shown and len(shown) == 4
    [bad] = [c for c in lta_copies_at(opsdb, "cologne")
             if c.package.name == bad_key.split("|")[0]]
    rotten = hash_file(Path(bad.location.root) / bad.relative_path)[0]
    assert rotten != bad.package.checksum

    instance.wipe_assets([lta])  # what the UI's wipeAssets calls
    assert instance.get_materialized_partitions(lta) == set()
    requests, cursor = integrity_tick(defs, instance, cursor)
    report = DriveReport()
    for request in requests:
        launch(defs, instance, request, origin="integrity_sensor", report=report)

    assert report.failed == [] and all(k.startswith("integrity-opsdb:") for k in report.launched)
    assert instance.get_materialized_partitions(lta) == shown
    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert {key: status[key] for key in shown} == {
        key: "failed" if key == bad_key else "passed" for key in shown}, status
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=lta, asset_partitions=[bad_key]), limit=1).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["restated_from"].value == "OpsDB" and metadata["status"].value == \
        "quarantined", metadata
    [evaluation] = [r.dagster_event.event_specific_data for r in instance.all_logs(
        record.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event
        and r.dagster_event.event_specific_data.partition == bad_key]  # type: ignore[union-attr]
    assert isinstance(evaluation, AssetCheckEvaluation) and not evaluation.passed
    assert (evaluation.description or "").startswith(
        f"restated from OpsDB: cologne/lta: copy {bad.id} quarantined "), evaluation.description
    assert hash_file(Path(bad.location.root) / bad.relative_path)[0] == rotten  # not touched

    assert drive(defs, instance).failed == []  # the repair
    assert set(check_status(instance, "lta_copies", "lta_copy_checksum").values()) == {"passed"}
    assert instance.get_materialized_partitions(lta) == shown
    lta_intact(opsdb)


CHECKS_OF = {"raw_files": ("raw_files_present",), "packages": ("package_checksum",),
             "site_copies": ("site_copy_checksum",), "lta_copies": ("lta_copy_checksum",),
             "purge_status": ("deletion_certificates", "filed_bytes_safe")}


def assert_shown_passed(instance: DagsterInstance, shown: dict[str, set[str]]) -> None:
    """The UI shows exactly these partitions of each lifecycle asset materialized, with every
    check of each passed."""
    for asset, checks in CHECKS_OF.items():
        assert instance.get_materialized_partitions(AssetKey(asset)) == shown[asset], asset
        for check in checks:
            status = check_status(instance, asset, check)
            assert {key: status.get(key) for key in shown[asset]} == dict.fromkeys(
                shown[asset], "passed"), (asset, check, status)


def storage_files(config: Config) -> dict[str, tuple[int, int, int]]:
    """Every file at every site (sources, buffers, archives): inode, size, mtime."""
    root = config.path.parent / "sites"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_runs_deleted_in_the_ui_leave_what_they_did_shown_done_and_nothing_redone(
        driven: Archived) -> None:
    """Runs → Delete on every run of an archived and purged observation (`instance.delete_run`,
    what the UI's deleteRun calls: it deletes the run's event log, its materializations and
    check evaluations). Before, every partition of raw_files, packages, site_copies and
    purge_status showed as never materialized for good, and lta_copies' only after the
    integrity sensor's 10-minute round, although OpsDB and the storage say built, copied,
    archived, purged. Now the integrity sensor's next tick sees runs were deleted and restates
    each partition OpsDB holds done from OpsDB, with its checks; the sensors launch no other
    work, nothing on the storage is read, written or deleted, OpsDB is unchanged."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    shown = {asset: instance.get_materialized_partitions(AssetKey(asset)) for asset in CHECKS_OF}
    assert all(shown.values()), shown
    for asset, checks in CHECKS_OF.items():
        for check in checks:
            status = check_status(instance, asset, check)
            assert {key: status.get(key) for key in shown[asset]} == dict.fromkeys(
                shown[asset], "passed"), (asset, check, status)
    before, files = opsdb_state(opsdb), storage_files(config)
    with opsdb.session() as session:
        reads = session.query(Operation).count()

    for run in instance.get_runs():
        instance.delete_run(run.run_id)
    assert not any(instance.get_materialized_partitions(AssetKey(a)) for a in CHECKS_OF)

    report = drive(defs, instance)
    assert report.failed == [], report.failed
    assert [key for key in report.launched if not key.startswith("integrity")] == [], \
        report.launched  # no work asked for again
    assert_shown_passed(instance, shown)
    key = sorted(shown["site_copies"])[0]
    [record] = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("site_copies"), asset_partitions=[key]), limit=1).records
    metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
    assert metadata["restated_from"].value == "OpsDB" and "deleted_at" in metadata, metadata
    [evaluation] = [e for e in (r.dagster_event.event_specific_data for r in instance.all_logs(
        record.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event)
        if isinstance(e, AssetCheckEvaluation) and e.partition == key
        and e.asset_key == AssetKey("site_copies")]
    assert evaluation.passed
    assert "deleted by the purge" in (evaluation.description or ""), evaluation.description
    assert storage_files(config) == files  # nothing read back into place, sent or deleted
    assert opsdb_state(opsdb) == before
    with opsdb.session() as session:  # told, not read: no verification added
        assert session.query(Operation).count() == reads
    lta_intact(opsdb)
    assert drive(defs, instance).launched == []  # once


@pytest.mark.parametrize("then", ["materialized", "ended"])
def test_runs_deleted_while_a_run_of_a_partition_is_in_flight_leave_that_partition_to_it(
        driven: Archived, then: str) -> None:
    """Runs deleted while a run of one package's packaging is queued (created, not started:
    in flight). That run records its work in OpsDB before Dagster stores its materialization,
    so restating its partitions then (as the first version of the restatement did) launched a
    report for nothing, or wrote a restated materialization over the run's own. Now the
    integrity sensor restates every other partition at once and leaves that package's
    raw_files and packages waiting in its cursor: dropped once the run materialized them,
    restated once it ended without (an operator's Terminate). Then nothing more is launched."""
    from dagster._core.execution.api import execute_run

    from ccat_assets.driver import _create

    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    shown = {asset: instance.get_materialized_partitions(AssetKey(asset)) for asset in CHECKS_OF}
    busy = sorted(shown["packages"])[0]
    _, cursor = integrity_tick(defs, instance)  # the sensor has looked at the runs
    for run in instance.get_runs():
        instance.delete_run(run.run_id)
    job = defs.get_repository_def().get_job("package_job")
    run, runnable = _create(job, instance, busy, {}, {})  # in flight

    def tick_and_launch(cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """One tick, its runs executed: the partitions they restated, and the cursor."""
        requests, cursor = integrity_tick(defs, instance, cursor)
        report, told = DriveReport(), []
        for request in requests:
            assert (request.run_key or "").startswith("integrity-opsdb:"), request.run_key
            told += request.run_config["ops"]["report_findings"]["config"]["findings"]
            launch(defs, instance, request, origin="integrity_sensor", report=report)
        assert report.failed == []
        return told, cursor

    told, cursor = tick_and_launch(cursor)
    assert sorted((t["asset"], t["partition"]) for t in told) == sorted(
        (asset, key) for asset, keys in shown.items() for key in keys
        if (asset, key) not in {("raw_files", busy), ("packages", busy)})
    assert cursor is not None and sorted(
        (asset, key) for asset, key, _ in json.loads(cursor)["waiting"]) == [
        ("packages", busy), ("raw_files", busy)]
    assert {asset: instance.get_materialized_partitions(AssetKey(asset))
            for asset in CHECKS_OF} == {asset: keys - {busy} if asset in (
                "raw_files", "packages") else keys for asset, keys in shown.items()}
    if then == "materialized":
        assert execute_run(runnable, run, instance).success  # not rebuilt; materialized
    else:
        instance.report_run_canceled(run)  # Terminate before it started: nothing materialized
    told, cursor = tick_and_launch(cursor)
    assert sorted((t["asset"], t["partition"]) for t in told) == (
        [] if then == "materialized" else [("packages", busy), ("raw_files", busy)])
    assert cursor is not None and json.loads(cursor)["waiting"] == []
    assert_shown_passed(instance, shown)
    for asset in ("raw_files", "packages"):
        [record] = instance.fetch_materializations(AssetRecordsFilter(
            asset_key=AssetKey(asset), asset_partitions=[busy]), limit=1).records
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        assert ("restated_from" in metadata) == (then == "ended"), (asset, metadata)
        assert (record.run_id == run.run_id) == (then == "materialized")
    assert tick_and_launch(cursor)[0] == []  # nothing left: no run
    lta_intact(opsdb)
    assert drive(defs, instance).launched == []


def test_runs_deleted_is_told_by_runs_gone_never_by_runs_created_meanwhile(
        instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """How the integrity sensor tells that runs were deleted between two ticks. The first
    version compared the number of runs with the number at the last tick plus those created
    after the newest then, read in two queries: a run created by another process between
    them (a sensor of the daemon, the UI, a drive) was counted twice, and the next tick took
    it for a deletion and compared every partition again. Now only runs created until a given
    one are counted: a run created meanwhile is never a deletion; a run deleted is one, even
    with others created since."""
    from dagster._core.utils import make_new_run_id

    from sensors.integrity import runs_deleted

    def add() -> str:
        return instance.add_run(DagsterRun(job_name="any", run_id=make_new_run_id())).run_id

    mark, deleted = runs_deleted(instance, None)
    assert (mark, deleted) == ([0, None], False)
    first = add()
    add()
    mark, deleted = runs_deleted(instance, mark)
    assert mark[0] == 2 and not deleted
    add()
    real = instance.get_run_records
    monkeypatch.setattr(instance, "get_run_records",
                        lambda *args, **kwargs: [*real(*args, **kwargs), add()][:-1])
    mark, deleted = runs_deleted(instance, mark)  # one more created between its queries
    assert not deleted
    monkeypatch.undo()
    mark, deleted = runs_deleted(instance, mark)
    assert not deleted and mark[0] == 4, mark
    instance.delete_run(first)
    add()
    mark, deleted = runs_deleted(instance, mark)
    assert deleted
    assert runs_deleted(instance, mark)[1] is False  # told once
    for run in instance.get_runs():
        instance.delete_run(run.run_id)
    mark, deleted = runs_deleted(instance, mark)
    assert deleted and mark == [0, None]


def test_findings_typed_in_by_hand_are_checked_again_on_the_storage(driven: Archived) -> None:
    """integrity_report_job launched from the Launchpad with findings typed in that the
    storage contradicts: a rotten LTA copy said to pass, a sound one said to fail. The
    report is logged (a person's word, as typed), and the next drive runs those partitions'
    checks again on the storage, as after "Report evaluation": the rotten copy is found,
    quarantined and repaired, the sound one passes. Before, both stood as typed: a rotten
    copy green in the UI until something else happened to read it, a sound one red."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    bad = rot_an_lta_copy(opsdb, "us")
    bad_key = str(package_site_key(bad.package.name, "us"))
    [good] = [c for c in lta_copies_at(opsdb, "cologne") if c.package_id != bad.package_id][:1]
    good_key = str(package_site_key(good.package.name, "cologne"))
    events = instance.event_log_storage.get_maximum_record_id()

    def typed(partition: str, passed: bool) -> dict[str, Any]:
        return {"asset": "lta_copies", "check": "lta_copy_checksum", "partition": partition,
                "passed": passed, "description": "typed by hand", "events_before": events}

    assert integrity_report_job.execute_in_process(  # the Launchpad's run
        instance=instance, resources=defs.resources,
        run_config={"ops": {"report_findings": {"config": {"findings": [
            typed(bad_key, True), typed(good_key, False)]}}}}).success
    status = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert (status[bad_key], status[good_key]) == ("passed", "failed")  # as typed

    report = drive(defs, instance)

    assert {k.split(":")[2] for k in report.launched if k.startswith("recheck:")} == {
        bad_key, good_key}, report.launched
    assert any(k.startswith(f"repair:{bad.package.name}:us:") for k in report.launched)
    assert report.unhealed == [], report
    assert set(check_status(instance, "lta_copies", "lta_copy_checksum").values()) == {"passed"}
    lta_intact(opsdb)  # the rotten copy made again: every LTA copy hashes to its checksum
    with opsdb.session() as session:
        assert session.get_one(PackageCopy, bad.id).status != CopyStatus.PRESENT
    assert [k for k in drive(defs, instance).launched if k.startswith("recheck:")] == []


def test_findings_typed_in_by_hand_with_a_bad_one_are_refused_whole_reporting_nothing(
        driven: Archived) -> None:
    """integrity_report_job launched from the Launchpad with findings typed in: one naming
    an asset or check that has none, a package OpsDB does not hold, a site without an LTA, an
    unknown severity or a negative event id refuses them all at once, one line naming each,
    and no check evaluation is stored. Before, the findings before it were reported (a good
    partition turned red) and then the step failed on Dagster's internals (KeyError, "'BAD'
    is not a valid AssetCheckSeverity"), or a check that does not exist, or a partition that
    does not, got a failed evaluation of its own."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    graph = defs.get_repository_def().asset_graph
    checks = {asset: tuple(sorted(key.name for key in graph.get_check_keys_for_assets(
        {AssetKey(asset)}))) for asset in REPORTED}
    assert checks == REPORTED  # the definitions' own checks
    package = lta_copies_at(opsdb, "us")[0].package.name
    shown = check_status(instance, "lta_copies", "lta_copy_checksum")
    events = instance.event_log_storage.get_maximum_record_id()

    def finding(**fields: Any) -> dict[str, Any]:
        return {"asset": "lta_copies", "check": "lta_copy_checksum",
                "partition": f"{package}|us", "passed": False, "description": "typed",
                "events_before": events, **fields}

    run = integrity_report_job.execute_in_process(
        instance=instance, resources=defs.resources, raise_on_error=False,
        run_config={"ops": {"report_findings": {"config": {"findings": [
            finding(), finding(asset="nonsense"), finding(check="bogus"),
            finding(partition="nopkg|us"), finding(partition=f"{package}|ccat"),
            finding(asset="packages", check="package_checksum", partition=f"{package}|us"),
            finding(severity="BAD", events_before=-1),
            finding(asset="purge_status", check="deletion_certificates", partition=package,
                    also=[{"check": "nope", "passed": True, "description": "x"}])]}}}})

    assert check_status(instance, "lta_copies", "lta_copy_checksum") == shown  # as it was
    assert instance.get_records_for_run(  # no evaluation at all, of any check
        run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records == []
    [failure] = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.STEP_FAILURE).records
    step = failure.event_log_entry.dagster_event
    assert step is not None and step.step_failure_data.error is not None
    said = step.step_failure_data.error.message.strip()
    assert said.endswith(
        "integrity_report_job: 7 of 8 findings refused, nothing reported: "
        f"finding 2 (nonsense '{package}|us'): asset 'nonsense' is not one of raw_files, "
        "packages, site_copies, lta_copies, purge_status; "
        f"finding 3 (lta_copies '{package}|us'): 'bogus' is not a check of lta_copies "
        "(lta_copy_checksum); "
        "finding 4 (lta_copies 'nopkg|us'): no package nopkg in OpsDB; "
        f"finding 5 (lta_copies '{package}|ccat'): ccat is not an archive site (those are "
        "cologne, us); "
        f"finding 6 (packages '{package}|us'): not PACKAGE; "
        f"finding 7 (lta_copies '{package}|us'): severity 'BAD' is not WARN or ERROR, "
        "events_before -1 is negative; "
        f"finding 8 (purge_status '{package}'): 'nope' is not a check of purge_status "
        "(deletion_certificates, filed_bytes_safe)"), said
