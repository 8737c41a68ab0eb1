"""Fixity scrub and repair: a byte flipped in an LTA copy is found by the scheduled re-read,
the copy is marked bad, a new copy is made from a good one elsewhere, and its check passes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance, build_sensor_context
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from sqlalchemy import select

import ccat_dt.transports.local as local
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.integrity import latest_materialization
from ccat_assets.partitions import package_site_key
from ccat_assets.scrub import scrub_job
from ccat_dt.audit import audit
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataPackage,
    utcnow,
)
from tests.faults.pipeline import deployment
from tests.helpers import lta_copies_at, observe, rot_an_lta_copy
from tests.test_operator_actions import Archived, check_status, driven  # noqa: F401

LTA_CHECK = AssetCheckKey(AssetKey("lta_copies"), "lta_copy_checksum")


def test_scrub_finds_a_flipped_byte_and_repair_restores_the_copy(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:  # noqa: F811
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = rot_an_lta_copy(opsdb, "us")

    report = drive(defs, instance, schedules=True)  # the hourly scrub, then what follows

    scrubs = [key for key in report.launched if key.startswith("scrub:")]
    repairs = [key for key in report.launched if key.startswith("repair:")]
    assert scrubs and repairs and report.failed == []
    history = instance.event_log_storage.get_asset_check_execution_history(LTA_CHECK, limit=50)
    assert any(r.status == AssetCheckExecutionRecordStatus.FAILED for r in history)
    # what the UI shows: every partition's check passed on its latest materialization, the
    # repaired one's too (a finding reported while its repair ran would leave it without one)
    shown = check_status(instance, "lta_copies", "lta_copy_checksum")
    assert len(shown) == 4 and set(shown.values()) == {"passed"}, shown
    us = lta_copies_at(opsdb, "us")
    old = next(c for c in us if c.id == bad.id)
    assert old.status == CopyStatus.DELETED  # the bad copy was replaced, never used as source
    [new] = [c for c in us if c.status == CopyStatus.PRESENT and c.package_id == bad.package_id]
    assert new.id > bad.id and new.is_verified
    assert hash_file(Path(new.location.root) / new.relative_path)[0] == new.package.checksum
    cologne = [c for c in lta_copies_at(opsdb, "cologne") if c.status == CopyStatus.PRESENT]
    assert len(cologne) == 2 and all(c.is_verified for c in cologne)
    # the UI says what the repair replaced: the repaired partition's latest materialization
    # names the corrupt copy, when and by what it was found bad, and why
    repaired = materialized(instance, str(package_site_key(bad.package.name, "us")))
    outcome = repaired["outcome"].value
    assert outcome.startswith("repaired: replaced the copy "), outcome
    assert f"copy {bad.id} at us/{bad.location.name} found corrupt at " in outcome, outcome
    assert " UTC by the fixity scrub (checksum mismatch: " in outcome, outcome
    [replaced] = repaired["replaced"].value
    assert replaced["copy_id"] == bad.id and replaced["found_by"] == "the fixity scrub"
    assert replaced["error"].startswith(f"checksum mismatch: expected {bad.package.checksum}")
    assert replaced["found_at"] and replaced["path"] == str(Path(bad.location.root)
                                                             / bad.relative_path)
    # a first copy, made where none was, says nothing of the kind
    first = materialized(instance, str(package_site_key(bad.package.name, "cologne")))
    assert first["outcome"].value.startswith("copied now from "), first["outcome"]
    assert "replaced" not in first


def materialized(instance: DagsterInstance, partition: str) -> dict[str, Any]:
    """The metadata of the partition's latest lta_copies materialization."""
    latest = latest_materialization(instance, "lta_copies", partition)
    assert latest is not None and latest.asset_materialization is not None
    return dict(latest.asset_materialization.metadata)


def test_a_repair_never_replaces_a_file_that_took_the_quarantined_copys_place(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the repair's bytes travel, someone moves another file to the quarantined copy's
    path: the repair replaces only the bad copy it found there, so that file stays, byte for
    byte, and the repair is refused for a person to look at; once the file is taken away, the
    next attempt repairs."""
    # a back-off that mostly keeps the re-attempt out of the first drive (on a loaded machine
    # it may come within it: refused the same way, the assertions below allow for it)
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 2.0})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = rot_an_lta_copy(opsdb, "us")
    path = Path(bad.location.root) / bad.relative_path
    real = local.LocalTransport._landed

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if temporary.parent == path.parent and not (path.parent / "theirs").exists():
            (path.parent / "theirs").write_bytes(b"someone's file, not the package")
            os.link(path.parent / "theirs", path.parent / ".theirs")
            os.replace(path.parent / ".theirs", path)
        real(self, temporary)

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)
    report = drive(defs, instance, schedules=True, wait_s=0, in_process=True)

    assert report.failed and all(
        key.removeprefix("reattempt:").split(":")[0] in ("repair", "lta_copy")
        for key in report.failed), report.failed
    assert path.read_bytes() == b"someone's file, not the package"
    with opsdb.session() as session:
        refused = [op.error or "" for op in session.scalars(select(Operation).where(
            Operation.package_id == bad.package_id, Operation.status == OperationStatus.FAILED,
            Operation.operation_type.in_([OperationType.TRANSFER, OperationType.ARCHIVE])))]
        assert refused and all("holds a file OpsDB does not record there" in error
                               for error in refused), refused

    monkeypatch.undo()
    # Its re-attempts look again and find that file at the name before they send anything: it
    # is not the quarantined copy (another inode), so it is not replaced either.
    drive(defs, instance, wait_s=3)
    assert path.read_bytes() == b"someone's file, not the package"
    path.unlink()  # the person takes their file away
    (path.parent / "theirs").unlink()
    again = drive(defs, instance, wait_s=10)  # its re-attempt, after the back-off
    assert again.failed == [] and any(key.startswith("reattempt:") for key in again.launched)
    assert hash_file(path)[0] == bad.package.checksum
    opsdb.dispose()


def test_a_symlink_at_a_quarantined_copys_name_is_refused_before_anything_travels(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The archive copy's name now holds a symlink (to someone's file): the scrub quarantines
    the copy; its repair says so at once ("where the quarantined copy was ... a symlink"),
    before any byte travels (not after, for a rename to refuse it with "it appeared while the
    package travelled"); the linked file is untouched; once the link is taken away the next
    attempt repairs the copy."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.5})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = lta_copies_at(opsdb, "us")[0]
    path = Path(bad.location.root) / bad.relative_path
    theirs = tmp_path / "theirs.dat"
    theirs.write_bytes(b"someone's file")
    path.unlink()
    path.symlink_to(theirs)

    report = drive(defs, instance, schedules=True, wait_s=0, in_process=True)

    assert report.failed, report.launched
    assert path.is_symlink() and theirs.read_bytes() == b"someone's file"  # the storage
    assert not list(path.parent.glob(".*.part"))  # nothing travelled
    with opsdb.session() as session:
        refused = session.scalars(select(Operation).where(
            Operation.package_id == bad.package_id, Operation.status == OperationStatus.FAILED,
            Operation.operation_type.in_([OperationType.TRANSFER, OperationType.ARCHIVE]))).all()
        assert refused and all("where the quarantined copy was" in (op.error or "")
                               and "symlink" in (op.error or "") for op in refused)
        assert all(op.bytes in (None, 0) for op in refused)
        said = {st.stage: st for st in diagnose(session, config, bad.package.name, utcnow())}
    assert said["LTA copy us"].state == "quarantined"  # `why`: and why its repair is stuck
    assert "its repair failed" in said["LTA copy us"].detail
    assert "where the quarantined copy was" in said["LTA copy us"].detail

    path.unlink()  # the person takes the link away
    again = drive(defs, instance, wait_s=10)
    assert again.failed == []
    assert not path.is_symlink() and hash_file(path)[0] == bad.package.checksum
    opsdb.dispose()


def test_scrub_of_an_unmounted_archive_marks_nothing_and_overwrites_nothing_after_remount(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """An LTA disk away (its mount point empty, no marker) says nothing about its copies: the
    scrub run fails with that cause, no copy is quarantined, and once the disk is back no repair
    rewrites the intact files."""
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    us = lta_copies_at(opsdb, "us")
    root = Path(us[0].location.root)
    before = {c.relative_path: (root / c.relative_path).stat().st_ino for c in us}
    away = tmp_path / "unmounted-lta"
    root.rename(away)
    root.mkdir()  # the empty mount point

    report = drive(defs, instance, schedules=True)

    assert [key for key in report.failed if key.startswith("scrub:us")]
    assert not [key for key in report.launched if key.startswith("repair:")]
    assert list(root.iterdir()) == []  # nothing written onto the mount point
    root.rmdir()
    away.rename(root)  # mounted again
    report = drive(defs, instance, schedules=True)
    assert not [key for key in report.launched if key.startswith("repair:")]
    for relative, inode in before.items():  # the same files, bytes intact
        assert (root / relative).stat().st_ino == inode
    for copy in lta_copies_at(opsdb, "us"):
        assert hash_file(root / copy.relative_path)[0] == copy.package.checksum
        assert copy.status == CopyStatus.PRESENT


def test_a_repair_whose_source_file_is_gone_blames_the_source_not_the_destination(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """The us LTA copy is bad and the cologne one, still recorded verified, is gone from its
    disk: the repair's copy fails on its source, which is looked at and found missing. Nothing
    is written over the bad us copy, us is not marked unhealthy, and the package is LOST, loudly
    (a person restores it from a backup), not re-attempted against a source that is not there."""
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = rot_an_lta_copy(opsdb, "us")
    bad_path = Path(bad.location.root) / bad.relative_path
    rotten = bad_path.read_bytes()
    audit(opsdb, checksums=True, repair=True, config=config)  # us copy CORRUPT
    [gone] = [c for c in lta_copies_at(opsdb, "cologne") if c.package_id == bad.package_id]
    (Path(gone.location.root) / gone.relative_path).unlink()

    drive(defs, instance, wait_s=0)

    assert bad_path.read_bytes() == rotten  # no repair wrote anything over it
    with opsdb.session() as session:
        blamed = session.scalars(select(DataLocation.name).where(
            DataLocation.failing_since.is_not(None))).all()
        package = session.get_one(RawDataPackage, bad.package_id)
        assert package.state == PackageState.LOST
        assert session.get_one(PackageCopy, gone.id).status == CopyStatus.CORRUPT
    assert blamed == []


def test_a_scrub_typed_in_by_hand_with_bad_partitions_is_refused_whole_changing_nothing(
        driven: Archived) -> None:  # noqa: F811
    """The Launchpad's (or `dagster job execute -c`) scrub_job config with bad entries: the
    run fails at once with one line naming each and why, and nothing is read or recorded, not
    even for its good entries (a rotten copy among them stays unfound: not quarantined, no
    check evaluation); nor is the failed run re-attempted. Before, a site without an LTA
    stored a failed check on a partition that does not exist after the good entries before it
    were re-read (and marked), and a malformed key or unknown package failed with
    "ValueError: not enough values to unpack" or "LookupError: unknown package"."""
    config, opsdb, instance = driven  # observed, filed and driven to the end
    defs = build_definitions(config)
    rotten = rot_an_lta_copy(opsdb, "cologne")
    package = rotten.package.name
    other = next(c.package.name for c in lta_copies_at(opsdb, "us") if c.package.name != package)
    shown = check_status(instance, "lta_copies", "lta_copy_checksum")
    history = instance.event_log_storage.get_asset_check_execution_history(LTA_CHECK, limit=100)
    with opsdb.session() as session:
        operations = len(session.scalars(select(Operation)).all())

    def scrub_by_hand(partitions: list[str]) -> str:
        """What the UI shows as the failed step's error ("" if none failed)."""
        run = scrub_job.execute_in_process(
            instance=instance, resources=defs.resources, raise_on_error=False,
            run_config={"ops": {"reread_lta_copies": {"config": {"partitions": partitions}}}})
        errors = [record.event_log_entry.dagster_event.step_failure_data.error
                  for record in instance.get_records_for_run(
                      run.run_id, of_type=DagsterEventType.STEP_FAILURE).records
                  if record.event_log_entry.dagster_event is not None]
        return " ".join(error.message.strip() for error in errors if error is not None)

    def nothing_changed() -> None:
        """Nothing read, nothing recorded: the rotten copy is still taken for a good one."""
        assert check_status(instance, "lta_copies", "lta_copy_checksum") == shown
        assert len(instance.event_log_storage.get_asset_check_execution_history(
            LTA_CHECK, limit=100)) == len(history)
        with opsdb.session() as session:
            assert session.get_one(PackageCopy, rotten.id).status == CopyStatus.PRESENT
            assert len(session.scalars(select(Operation)).all()) == operations

    said = scrub_by_hand([f"{package}|cologne", f"{package}|ccat"])
    nothing_changed()
    assert said.endswith(f"scrub_job: 1 of 2 partitions refused, nothing re-read: "
                         f"'{package}|ccat': ccat is not an archive site (those are cologne, "
                         "us)"), said
    said = scrub_by_hand(["nonsense", "nopkg|cologne", f"{package}|cologne", f"{package}|ramses",
                          f"{other}|us", f"{other}|us", "a|b|c"])
    assert said.endswith(
        "scrub_job: 5 of 6 partitions refused, nothing re-read: 'nonsense': not PACKAGE|SITE; "
        "'nopkg|cologne': no package nopkg in OpsDB; "
        f"'{package}|ramses': ramses is not an archive site (those are cologne, us); "
        f"'{other}|us': listed 2 times; 'a|b|c': not PACKAGE|SITE"), said
    with opsdb.session() as session:
        copy = session.get_one(PackageCopy, rotten.id)
        copy.status = CopyStatus.DELETED  # a copy OpsDB records as gone (the repair's)
    # a copy OpsDB records no more (a repair's swap since the batch was chosen) is a moment,
    # not a typing error: passed over, judged neither way, the rest of the batch re-read
    gone = scrub_job.execute_in_process(
        instance=instance, resources=defs.resources,
        run_config={"ops": {"reread_lta_copies": {"config": {"partitions": [
            f"{package}|cologne"]}}}})
    assert gone.success and gone.output_for_node("reread_lta_copies") == 0
    told = [record.event_log_entry.user_message
            for record in instance.get_records_for_run(gone.run_id).records]
    assert "scrubbed 0 LTA copies, 0 bad, 0 not reached" in told, told  # (before: 1)
    with opsdb.session() as session:
        session.get_one(PackageCopy, rotten.id).status = CopyStatus.PRESENT

    empty = scrub_job.execute_in_process(  # nothing asked for: nothing to do, no failure
        instance=instance, resources=defs.resources,
        run_config={"ops": {"reread_lta_copies": {"config": {"partitions": []}}}})
    assert empty.success and empty.output_for_node("reread_lta_copies") == 0

    nothing_changed()
    # a refused scrub is no failed work: the re-attempt sensor asks for nothing
    repository = defs.get_repository_def()
    with build_sensor_context(instance=instance, repository_def=repository,
                              resources=defs.resources) as context:
        tick = repository.get_sensor_def("reattempt_sensor").evaluate_tick(context)
    assert not tick.run_requests, tick.run_requests
    # the next scheduled scrub finds the rotten copy as ever
    assert drive(defs, instance, schedules=True).failed == []
    with opsdb.session() as session:
        assert session.get_one(PackageCopy, rotten.id).status != CopyStatus.PRESENT
