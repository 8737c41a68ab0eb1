"""What an operator writes into an asset's history in the Dagster UI rather than runs: "Report
materialization events" (an asset's page, for chosen partitions) and "Wipe materializations"
(the whole asset, or a partition range). Sent as the UI sends them, its GraphQL mutations
(reportRunlessAssetEvents, wipeAssets) to the code location workspace.yaml names; the work
itself done by a real `drive`. Neither may move work on, hold it back or delete anything: the
sensors plan from OpsDB, the steps look at the storage; and the UI comes back to what OpsDB
and the storage say, without `ccat-dt retry`."""

from __future__ import annotations

import json
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    BetaWarning,
    DagsterInstance,
    PreviewWarning,
)

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import CURSOR_KEY, DriveReport, drive, launch
from ccat_assets.instance import write_instance_yaml
from ccat_assets.routing import stages_of
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.stages import Stage
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, plan, source_root
from tests.test_dry_runs import the_ui
from tests.test_operator_actions import (
    CHECKS_OF,
    assert_shown_passed,
    check_status,
    integrity_tick,
    opsdb_state,
    storage_files,
)

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

REPORT = """mutation ReportEventMutation($eventParams: ReportRunlessAssetEventsParams!) {
  reportRunlessAssetEvents(eventParams: $eventParams) { __typename
    ... on PythonError { message } ... on UnauthorizedError { message }
    ... on ReportRunlessAssetEventsSuccess { assetKey { path } } } }"""
WIPE = """mutation AssetWipeMutation($assetPartitionRanges: [PartitionsByAssetSelector!]!) {
  wipeAssets(assetPartitionRanges: $assetPartitionRanges) { __typename
    ... on AssetWipeSuccess { assetPartitionRanges { assetKey { path }
                                                     partitionRange { start end } } }
    ... on UnsupportedOperationError { message } ... on PythonError { message } } }"""
ARCHIVES = ("cologne", "us")


def report_materializations(ui: Any, asset: str, partitions: list[str]) -> None:
    """The asset page's "Report materialization events" for these partitions."""
    answer = ui(REPORT, eventParams={
        "eventType": "ASSET_MATERIALIZATION", "assetKey": {"path": [asset]},
        "partitionKeys": partitions, "description": "done, I am sure"})
    assert answer["reportRunlessAssetEvents"]["__typename"] == \
        "ReportRunlessAssetEventsSuccess", answer


def wipe(ui: Any, *ranges: tuple[str, tuple[str, str] | None]) -> dict[str, Any]:
    """The asset page's "Wipe materializations": an asset whole (None) or a partition range."""
    answer = ui(WIPE, assetPartitionRanges=[
        {"assetKey": {"path": [asset]},
         **({"partitions": {"range": {"start": span[0], "end": span[1]}}} if span else {})}
        for asset, span in ranges])
    return dict(answer["wipeAssets"])


def raw_files(config: Config) -> dict[str, bytes]:
    source = source_root(config)
    return {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*.dat")}


def archived_once(config: Config, raw: dict[str, bytes]) -> None:
    """Read from the disks: each archive site's LTA tars hold every observed file once, with
    its bytes; no raw file is left at the source, no package in a buffer."""
    for site in ARCHIVES:
        members: dict[str, bytes] = {}
        for tar in config.resolve_root(f"sites/{site}/lta").rglob("*.tar"):
            with tarfile.open(tar) as archive:
                for member in archive.getmembers():
                    if member.isfile() and member.name in raw:
                        data = archive.extractfile(member)
                        assert data is not None and member.name not in members, member.name
                        members[member.name] = data.read()
        assert members == raw, site
    assert not list(source_root(config).rglob("*.dat")), "raw files left at the source"
    for site in ("ccat", *ARCHIVES):
        assert not list(config.resolve_root(f"sites/{site}/buffer").rglob("*.tar")), site


def evaluation(instance: DagsterInstance, asset: str, check: str,
               partition: str) -> AssetCheckEvaluation:
    """The check's latest evaluation on the partition, as the Checks tab shows it."""
    [record] = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey(asset), check), limit=1,
        partition_filter=_partition(partition))
    assert record.event is not None and record.event.dagster_event is not None
    data = record.event.dagster_event.event_specific_data
    assert isinstance(data, AssetCheckEvaluation)
    return data


def _partition(key: str) -> Any:
    from dagster._core.storage.event_log.base import PartitionKeyFilter

    return PartitionKeyFilter(key=key)


def test_materializations_reported_for_work_not_done_move_nothing_and_the_work_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package planned, nothing of it built or sent; the operator reports a materialization
    of every lifecycle asset's partition of it ("Report materialization events"), and of the
    site and LTA copies of a package archived and purged before (done). Before, the integrity
    sensor asked for a run of each partition's checks alone: for the copies not made, the
    blocking check found none and failed its run; that failed run counted as a failed attempt
    of the copy, and while it was queued or running the copy sensor left the copy out (a run
    of the partition in flight) and moved on: the drive ended with failed runs ("FAILED
    recheck:site_copies:..."), at times with the package still at the observatory, waiting
    for the re-attempt's back-off. Now such a partition's check is told from OpsDB, a warning
    on the hand-made materialization ("no copy of ... OpsDB records none"), without a run;
    nothing is deleted or skipped for the event; the drive builds, sends and archives the
    package and purges its sources as for any package, every file once in each archive; the
    done package's copies are read again and pass, nothing of them moved; and the UI ends
    showing each partition materialized by its own run, every check passed. purge_status,
    reported for the package not purged, showed a green purge (its checks run again: no
    deletion to certify, the bytes safe in the kept sources); now it shows a warning told from
    OpsDB ("no purge of ... OpsDB records no deletion"), until the purge's own run."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, name="obs-a", files=2, size=20_000)
        raw = raw_files(config)
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent
        with DagsterInstance.from_config(str(home)) as instance:
            defs = build_definitions(config)
            assert drive(defs, instance, wait_s=10).failed == []  # obs-a archived and purged
            [done] = instance.get_dynamic_partitions("packages")
            before = storage_files(config)
            observe(config, opsdb, files=2, size=20_000)
            raw_now = raw_files(config)
            raw.update(raw_now)
            package = plan(config, opsdb, instance)
            reported = {"raw_files": [package], "packages": [package],
                        "site_copies": [f"{package}|{s}" for s in ARCHIVES]
                        + [f"{done}|{s}" for s in ARCHIVES],
                        "lta_copies": [f"{package}|{s}" for s in ARCHIVES]
                        + [f"{done}|{s}" for s in ARCHIVES],
                        "purge_status": [package]}
            with the_ui(instance, config.path, monkeypatch) as ui:
                for asset, partitions in reported.items():
                    report_materializations(ui, asset, partitions)

            # The integrity sensor's next tick, its runs executed: what the UI shows then.
            key = CURSOR_KEY + "integrity_sensor"
            requests, cursor = integrity_tick(
                defs, instance, instance.run_storage.get_cursor_values({key})[key])
            assert cursor is not None
            instance.run_storage.set_cursor_values({key: cursor})  # where the drive goes on
            rechecked = DriveReport()
            for request in requests:
                launch(defs, instance, request, origin="integrity_sensor", report=rechecked)
            assert rechecked.failed == [], rechecked.failed
            assert not [k for k in rechecked.launched if k.startswith(tuple(
                f"recheck:{asset}:{package}" for asset in (
                    "packages", "site_copies", "lta_copies", "purge_status")))], \
                rechecked.launched
            # purge_status of the package not purged: no green purge (before: its checks run
            # again, both passed), a warning told from OpsDB, the package's safety evaluated
            said = evaluation(instance, "purge_status", "deletion_certificates", package)
            assert not said.passed and said.severity == AssetCheckSeverity.WARN, said
            assert (said.description or "").startswith(f"no purge of {package}: OpsDB "
                                                       "records no deletion"), said
            assert check_status(instance, "purge_status", "deletion_certificates")[
                package] == "failed"
            assert evaluation(instance, "purge_status", "filed_bytes_safe", package).passed
            for asset, check in (("packages", "package_checksum"),
                                 ("site_copies", "site_copy_checksum"),
                                 ("lta_copies", "lta_copy_checksum")):
                for partition in (p for p in reported[asset] if p.startswith(package)):
                    said = evaluation(instance, asset, check, partition)
                    assert not said.passed and (said.description or "").startswith(
                        "no copy of "), (asset, partition, said)
                    assert "OpsDB records none" in (said.description or "")
            status = {asset: check_status(instance, asset, check)
                      for asset, check in (("site_copies", "site_copy_checksum"),
                                           ("lta_copies", "lta_copy_checksum"))}
            for asset in status:  # the done package's copies: read again (or purged), passed
                assert {status[asset][f"{done}|{s}"] for s in ARCHIVES} == {"passed"}, status
            assert raw_files(config) == raw_now  # nothing deleted for the event
            assert {p: v for p, v in storage_files(config).items()
                    if p in before} == before  # nothing of the done package moved

            report = drive(defs, instance, wait_s=10)

            assert report.failed == [], report.failed
            for asset, checks in CHECKS_OF.items():  # each partition: its own run's, green
                for partition in instance.get_materialized_partitions(AssetKey(asset)):
                    [record] = instance.fetch_materializations(AssetRecordsFilter(
                        asset_key=AssetKey(asset), asset_partitions=[partition]),
                        limit=1).records
                    assert record.run_id != "" or not partition.startswith(package), \
                        (asset, partition)
                    for check in checks:
                        assert check_status(instance, asset, check)[partition] == "passed", \
                            (asset, check, partition)
        archived_once(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_wiped_materializations_are_restated_at_the_next_tick_and_nothing_is_redone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Wipe materializations" of site_copies and lta_copies, whole, while the drive has
    nothing to do (two packages archived and purged); a partition range's wipe first, which
    Dagster refuses for this storage (UnsupportedOperationError: nothing wiped). Before, the
    integrity sensor noticed the wipe only at its slow round (10 min): the next drives showed
    no copy at all while OpsDB holds them verified, until a drive came that late. Now its next
    tick restates every partition OpsDB holds done, with its check (passed, naming the recorded
    verification: the only evaluation left in the check's history, which the wipe emptied);
    nothing on the storage is read, sent or deleted, OpsDB is unchanged, nothing else runs."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, name="obs-a", files=2, size=20_000)
        observe(config, opsdb, name="obs-b", files=2, size=20_000)
        raw = raw_files(config)
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent
        with DagsterInstance.from_config(str(home)) as instance:
            defs = build_definitions(config)
            assert drive(defs, instance, wait_s=10).failed == []
            shown = {asset: instance.get_materialized_partitions(AssetKey(asset))
                     for asset in CHECKS_OF}
            before, files = opsdb_state(opsdb), storage_files(config)
            keys = sorted(shown["lta_copies"])
            with the_ui(instance, config.path, monkeypatch) as ui:
                refused = wipe(ui, ("lta_copies", (keys[0], keys[-1])))
                assert refused["__typename"] == "UnsupportedOperationError", refused
                assert {asset: instance.get_materialized_partitions(AssetKey(asset))
                        for asset in CHECKS_OF} == shown
                assert wipe(ui, ("site_copies", None), ("lta_copies", None))[
                    "__typename"] == "AssetWipeSuccess"
            for asset in ("site_copies", "lta_copies"):
                assert instance.get_materialized_partitions(AssetKey(asset)) == set()

            report = drive(defs, instance, wait_s=10)

            assert report.failed == [], report.failed
            assert [k for k in report.launched if not k.startswith("integrity-opsdb:")] == []
            assert len(report.launched) == 1, report.launched
            assert_shown_passed(instance, shown)
            for asset, check in (("site_copies", "site_copy_checksum"),
                                 ("lta_copies", "lta_copy_checksum")):
                for partition in shown[asset]:
                    history = instance.event_log_storage.get_asset_check_execution_history(
                        AssetCheckKey(AssetKey(asset), check), limit=10,
                        partition_filter=_partition(partition))
                    assert len(history) == 1, (asset, partition, history)
                    said = evaluation(instance, asset, check, partition)
                    assert said.passed and (said.description or "").startswith(
                        "restated from OpsDB: verified "), said.description
            assert storage_files(config) == files  # nothing read back, sent or deleted
            assert opsdb_state(opsdb) == before
            assert drive(defs, instance, wait_s=10).launched == []  # once
        archived_once(config, raw)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_wiped_while_runs_work_nothing_is_sent_twice_and_the_ui_shows_opsdb_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Wipe materializations" of site_copies and lta_copies, whole, while the drive works:
    a package archived at both sites (its partitions materialized), another package's copy
    runs in flight. Nothing is sent again or archived twice (every file once in each archive,
    one copy per package and location), the purge deletes the sources as it would, and by
    the drive's end the UI shows every copy OpsDB holds verified: what the runs in flight
    materialized after the wipe by those runs, the rest restated from OpsDB. Before, the
    partitions materialized before the wipe showed none until the integrity sensor's slow
    round (10 min), after the drive had ended."""
    from ccat_assets.runpool import RunPool

    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, name="obs-a", files=2, size=20_000)
        observe(config, opsdb, name="obs-b", files=2, size=200_000)
        raw = raw_files(config)
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent
        with DagsterInstance.from_config(str(home)) as instance, \
                the_ui(instance, config.path, monkeypatch) as ui:
            wiped: list[set[str]] = []  # the lta_copies partitions materialized then
            wait = RunPool.wait

            def operator(pool: RunPool, timeout: float | None = None) -> Any:
                """Once a copy is archived and another copy run executes: the wipe."""
                copying = [child for child in pool.children.values()
                           if Stage.SITE_COPY in stages_of(child.queued.run)]
                archived = instance.get_materialized_partitions(AssetKey("lta_copies"))
                if not wiped and copying and archived:
                    wiped.append(archived)
                    assert wipe(ui, ("site_copies", None), ("lta_copies", None))[
                        "__typename"] == "AssetWipeSuccess"
                return wait(pool, timeout)

            monkeypatch.setattr(RunPool, "wait", operator)
            report = drive(build_definitions(config), instance, wait_s=10)
            monkeypatch.undo()

            assert wiped, "no moment with a copy archived and another in flight"
            assert report.failed == [], report.failed
            shown = {asset: instance.get_materialized_partitions(AssetKey(asset))
                     for asset in CHECKS_OF}
            assert len(shown["site_copies"]) == len(shown["lta_copies"]) == 4, shown
            assert_shown_passed(instance, shown)
            restated = set()
            for partition in shown["lta_copies"]:
                [record] = instance.fetch_materializations(AssetRecordsFilter(
                    asset_key=AssetKey("lta_copies"), asset_partitions=[partition]),
                    limit=1).records
                metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
                if "restated_from" in metadata:
                    restated.add(partition)
            assert wiped[0] <= restated, (wiped, restated)  # those done before the wipe
            key = CURSOR_KEY + "integrity_sensor"
            state = json.loads(instance.run_storage.get_cursor_values({key})[key])
            assert state["waiting"] == [] and state["held"] == [], state
        archived_once(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_a_materialization_reported_by_hand_never_heals_a_failed_run_whose_work_is_not_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package's copy to us fails on a fault its re-attempt may ride out (the transfer cut,
    retryable), and the drive ends with the re-attempt waiting for its back-off; then the
    operator reports site_copies and lta_copies of that package at us materialized, by hand
    (before the drive ends, on a long drive). Before, the drive counted the failed run
    healed ("healed by a later run of the same work": exit 0, nobody to act) on those
    hand-made materializations, though no copy is at us. Now only a run's materialization
    heals; the copy is made by the next drive."""
    from ccat_assets.driver import healed_runs
    from ccat_dt.transports.base import TransferError
    from ccat_dt.transports.local import LocalTransport

    config = deployment(tmp_path / "deploy", policies={"max_attempts": 1,
                                                      "retry_backoff_first_s": 3.0})
    opsdb = OpsDB(config.opsdb_url)
    us = config.resolve_root("sites/us/buffer")
    landed = LocalTransport._landed

    def cut(transport: LocalTransport, temporary: Path) -> None:
        landed(transport, temporary)
        if temporary.is_relative_to(us):
            raise TransferError("the link to us dropped", retryable=True)

    try:
        observe(config, opsdb, files=2, size=20_000)
        raw = raw_files(config)
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent
        with DagsterInstance.from_config(str(home)) as instance:
            defs = build_definitions(config)
            monkeypatch.setattr(LocalTransport, "_landed", cut)
            report = drive(defs, instance, wait_s=0)
            monkeypatch.undo()
            # the copy to us failed (twice on a loaded machine: its re-attempt, a run named
            # "reattempt:site_copy:PACKAGE|us:...", came due before the drive ended), nothing else
            assert report.failed and all(
                failed.removeprefix("reattempt:").startswith("site_copy:")
                and (":us:" in failed or "|us:" in failed) for failed in report.failed), report
            [package] = instance.get_dynamic_partitions("packages")
            with the_ui(instance, config.path, monkeypatch) as ui:
                for asset in ("site_copies", "lta_copies"):
                    report_materializations(ui, asset, [f"{package}|us"])
            assert not list(config.resolve_root("sites/us").rglob("*.tar"))

            assert healed_runs(instance, report) == [], report

            time.sleep(3.0)  # the re-attempt's back-off
            assert drive(defs, instance, wait_s=10).failed == []
        archived_once(config, raw)
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
