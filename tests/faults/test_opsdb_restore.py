"""OpsDB restored from an older backup while the storage moved on (a disaster recovery): the
sensors' cursors and run keys live in the Dagster instance, which is not rolled back, so they
are past work the restored OpsDB shows as due. The re-attempt sensor's sweep asks for work
that no run has done for `policies.unattended_after_s`; the purge looks again at copies a
successful purge already deleted. Checked on the storage: no filed byte lost, no archive tar
rewritten, and the pipeline converges or a person is told."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB, dispose_engines
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataFileCopy,
    utcnow,
)
from ccat_dt.transports import local
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    deployment,
    observe,
    package_names,
    package_state,
    run,
)
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import _sites, retention
from tests.helpers import first_caller

QUIET = 1.0  # s: policies.unattended_after_s here (an hour by default)
POLICIES = {"retry_backoff_first_s": 0.2, "unattended_after_s": QUIET}


def _database(config: Config) -> Path:
    return Path(config.opsdb_url.removeprefix("sqlite:///"))


def backup(config: Config, to: Path) -> None:
    with sqlite3.connect(_database(config)) as live, sqlite3.connect(to) as copy:
        live.backup(copy)


def restore(config: Config, backup_file: Path) -> OpsDB:
    """The backup put back in place of the live OpsDB, as an operator restores one."""
    dispose_engines()
    live = _database(config)
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(backup_file) as copy, sqlite3.connect(live) as restored:
        copy.backup(restored)
    return OpsDB(config.opsdb_url)


def tars(config: Config) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (config.path.parent / "sites").rglob("*.tar")}


def told(config: Config, opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return [p.key for p in current_problems(session, config, utcnow())]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return deployment(tmp_path / "deploy", policies=POLICIES)


def test_observations_filed_after_a_restore_are_archived(
        config: Config, instance: DagsterInstance, tmp_path: Path) -> None:
    """obs-1 went through after the backup; OpsDB is restored; obs-2, filed afterwards, gets
    the ids obs-1 had, which the sensors' cursors have passed. It is archived all the same,
    and obs-1's tars in the archives are left as they are."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0")
    run(config, instance)
    backup(config, tmp_path / "backup.sqlite")
    observe(config, opsdb, name="obs-1")
    run(config, instance)
    archives = tars(config)
    opsdb = restore(config, tmp_path / "backup.sqlite")

    observe(config, opsdb, name="obs-2")
    run(config, instance)  # plans obs-2's package; no sensor asks for its packaging
    time.sleep(QUIET)
    run(config, instance)  # cron's next drive: the sweep finds it unattended

    assert lost_filed_files(config, opsdb) == []
    assert {p: tars(config)[p] for p in archives} == archives
    assert {n: package_state(opsdb, n) for n in package_names(opsdb)} == {
        "obs-0_primecam-f280_p00": PackageState.ARCHIVED,
        "obs-2_primecam-f280_p00": PackageState.ARCHIVED}
    archived_everywhere(config, opsdb)


def test_a_package_planned_again_after_a_restore_is_told_not_left_waiting(
        config: Config, instance: DagsterInstance, tmp_path: Path) -> None:
    """The backup was taken after filing; the package went all the way (sources purged)
    before OpsDB was restored: OpsDB plans it again under the same name, whose packaging run
    key is used. Its sources are gone, so it can never be built again: it is quarantined and a
    person is told, and the archived tars are untouched."""
    opsdb = OpsDB(config.opsdb_url)
    files = observe(config, opsdb)
    backup(config, tmp_path / "backup.sqlite")
    run(config, instance)
    archives = tars(config)
    assert len(archives) == 2 and not any(p.exists() for p in files)
    opsdb = restore(config, tmp_path / "backup.sqlite")

    run(config, instance)  # plans the package again; its packaging run key is used
    time.sleep(QUIET)
    run(config, instance)  # cron's next drive: the sweep finds it unattended

    assert tars(config) == archives
    [package] = package_names(opsdb)
    assert package_state(opsdb, package) == PackageState.FAILED
    assert f"quarantined:{package}" in told(config, opsdb)


def test_copies_a_purge_deleted_before_a_restore_are_recorded_deleted_again(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The backup was taken after archiving, before the purge; the purge then deleted the
    sources and buffer copies, and OpsDB was restored: it records them present again. The
    same purge work (the same copies) ran and succeeded, so its run key is used; it is asked
    for again once quiet, looks at the storage, and records the deletions afresh."""
    kept = deployment(tmp_path / "kept", sites=_sites(1000.0), policies=POLICIES)
    opsdb = OpsDB(kept.opsdb_url)
    files = observe(kept, opsdb)
    run(kept, instance)
    backup(kept, tmp_path / "backup.sqlite")
    config = retention(kept, 0)
    run(config, instance)
    assert not any(p.exists() for p in files)
    opsdb = restore(config, tmp_path / "backup.sqlite")
    with opsdb.session() as session:
        assert {c.status for c in session.scalars(select(RawDataFileCopy))} == {
            CopyStatus.PRESENT}  # what the restored OpsDB believes

    time.sleep(QUIET)
    run(config, instance)

    with opsdb.session() as session:
        assert {c.status for c in session.scalars(select(RawDataFileCopy))} == {
            CopyStatus.DELETED}
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def _backup_while_sending_to(config: Config, site: str, to: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """OpsDB backed up while the first transfer into `site`'s buffer lands, in whichever
    run's process: the package recorded as still on its way there."""
    real = local.LocalTransport._landed
    buffer = config.resolve_root(f"sites/{site}/buffer")

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if temporary.is_relative_to(buffer) and first_caller(config.directory / "backed-up"):
            backup(config, to)
        real(self, temporary)

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)


def _sent_after_restore(config: Config, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file naming every transfer that lands bytes from now on, in whichever run's
    process."""
    sent = config.directory / "sent-after-restore"

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        with sent.open("a") as log:
            log.write(f"{temporary}\n")

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)
    return sent


@pytest.mark.parametrize("site", ["cologne", "us"])  # sent from the observatory; replicated
def test_a_package_restored_mid_transfer_adopts_its_archived_copies_and_finishes(
        config: Config, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, site: str) -> None:
    """The backup was taken while the package travelled; the lifecycle then completed (both
    archives hold its tar, the observatory tar and the raw files are purged) and OpsDB was
    restored: it believes the package on its way, its sources at the observatory. The tars in
    the archives, hashed now to the package's checksum, are adopted as its verified copies
    (recorded so), and the package finishes by itself: nothing sent again, nothing rewritten,
    no person needed."""
    opsdb = OpsDB(config.opsdb_url)
    files = observe(config, opsdb)
    _backup_while_sending_to(config, site, tmp_path / "backup.sqlite", monkeypatch)
    run(config, instance)
    assert (tmp_path / "backup.sqlite").exists(), "the backup was never taken"
    archived_everywhere(config, opsdb)
    archives = {p: (p.read_bytes(), p.stat().st_ino) for p in tars(config)}
    assert len(archives) == 2 and not any(p.exists() for p in files)
    opsdb = restore(config, tmp_path / "backup.sqlite")
    [package] = package_names(opsdb)
    assert package_state(opsdb, package) != PackageState.ARCHIVED  # what OpsDB believes now
    with opsdb.session() as session:  # the archive copies the restored OpsDB still knows
        recorded = {c.location_id for c in session.scalars(select(PackageCopy))
                    if c.location.location_type == LocationType.LONG_TERM_ARCHIVE}
    sent = _sent_after_restore(config, monkeypatch)

    for _ in range(3):  # cron's next drives, each after the quiet time
        time.sleep(QUIET)
        run(config, instance)

    assert {p: (p.read_bytes(), p.stat().st_ino) for p in tars(config)} == archives
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert told(config, opsdb) == []
    assert not sent.exists(), sent.read_text()  # not a byte moved again
    with opsdb.session() as session:
        adopted = {o.destination_location_id for o in session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.COMPLETED, Operation.reason.contains("adopted")))}
        assert adopted == {c.location_id for c in session.scalars(select(PackageCopy))
                           if c.location.location_type == LocationType.LONG_TERM_ARCHIVE
                           and c.is_verified} - recorded


def test_a_package_restored_mid_transfer_with_no_copy_left_anywhere_is_told_at_once(
        config: Config, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the archives' tars are gone too when OpsDB is restored: no copy with the
    package's bytes is left anywhere, so it cannot heal; a person is told within the next
    drives (not when the re-attempt horizon runs out), and nothing is adopted."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    _backup_while_sending_to(config, "cologne", tmp_path / "backup.sqlite", monkeypatch)
    run(config, instance)
    for tar in tars(config):
        tar.unlink()
    opsdb = restore(config, tmp_path / "backup.sqlite")
    [package] = package_names(opsdb)

    for _ in range(3):
        time.sleep(QUIET)
        run(config, instance)

    assert tars(config) == {}
    assert package_state(opsdb, package) == PackageState.FAILED
    assert f"quarantined:{package}" in told(config, opsdb)
    with opsdb.session() as session:
        assert not session.scalar(select(Operation.id).where(
            Operation.reason.contains("adopted")))
