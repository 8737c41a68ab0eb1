"""Faults in the bytes of a transfer on the embedded (local) transport: a flipped byte and a
truncated file in the landed temporary file, and a full destination disk."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.replicas as replicas
import ccat_dt.transports.local as local
from ccat_dt import tarball
from ccat_dt.config import Config, load_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.health import unhealthy
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    OperationStatus,
    OperationType,
    PackageCopy,
    utcnow,
)
from ccat_dt.packages import get_package
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    deployment,
    observe,
    operations,
    package_names,
    run,
    source_root,
)
from tests.helpers import first_caller
from tests.notify_servers import Receiver
from tests.sshd import SshServer
from tests.test_multisite import multisite


def _landed_once(monkeypatch: pytest.MonkeyPatch, damage: str, marker: Path) -> None:
    """The first temporary file a local transfer lands, in whichever run's process, is
    damaged before it is verified; `marker` then names it."""
    real = local.LocalTransport._landed

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if first_caller(marker, str(temporary)):
            data = bytearray(temporary.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x10
            else:
                del data[len(data) // 3:]
            temporary.write_bytes(bytes(data))
        real(self, temporary)

    monkeypatch.setattr(local.LocalTransport, "_landed", landed)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_in_transit_is_caught_retried_and_converges(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    observe(config, opsdb)
    damaged = config.directory / "damaged"
    _landed_once(monkeypatch, damage, damaged)

    report = run(config, instance)

    assert damaged.exists(), "the fault was never injected"
    assert report.failed == []  # the step's own retry (Dagster retry policy) got it through
    [package] = package_names(opsdb)
    transfers = operations(opsdb, OperationType.TRANSFER, package)
    assert transfers[0][0] == OperationStatus.FAILED
    assert "checksum mismatch on arrival" in (transfers[0][1] or "")
    assert transfers[1:] and all(s == OperationStatus.COMPLETED for s, _ in transfers[1:])
    with opsdb.session() as session:  # the damaged bytes never counted as a copy
        copies = session.scalars(select(PackageCopy).where(
            PackageCopy.package_id == get_package(session, package).id)).all()
        assert not [c for c in copies if c.status == CopyStatus.CORRUPT]
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_a_tar_that_reads_back_damaged_is_rebuilt_by_the_step_retry_and_converges(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaging build reads its tar back as it writes it; the first build's tar is
    damaged on the disk before that read. The build fails, its tar never renamed into place,
    the buffer not marked unhealthy (one file's fault), and the step's retry builds it again."""
    observe(config, opsdb)
    damaged = config.directory / "damaged"
    real = tarball._TarWriter.read_back

    def read_back(self: tarball._TarWriter) -> None:
        part = next(Path(config.directory).rglob(".*.tar.part"), None)
        if part is not None and first_caller(damaged, str(part)):
            with open(part, "r+b") as landed:
                landed.seek(self.landed.size)
                byte = landed.read(1)
                landed.seek(self.landed.size)
                landed.write(bytes([byte[0] ^ 0x10]))
        real(self)

    monkeypatch.setattr(tarball._TarWriter, "read_back", read_back)
    report = run(config, instance)

    assert damaged.exists(), "the fault was never injected"
    assert report.failed == []
    [package] = package_names(opsdb)
    builds = operations(opsdb, OperationType.PACKAGING, package)
    assert builds[0][0] == OperationStatus.FAILED
    assert "checksum mismatch on read-back" in (builds[0][1] or "")
    assert builds[1:] and all(s == OperationStatus.COMPLETED for s, _ in builds[1:])
    with opsdb.session() as session:
        assert all(location.unhealthy_until is None
                   for location in session.scalars(select(DataLocation)))
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_full_disk_is_reported_with_its_next_attempt_and_converges_once_enlarged(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full is not retried within the run (no retry storm); the re-attempt sensor asks
    again after a back-off, `why` says when; once the disk is enlarged the next attempt
    converges, without an operator's retry."""
    config = deployment(tmp_path / "deploy", policies={"max_attempts": 3,
                                                       "retry_backoff_first_s": 8})
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb)
    writes = tmp_path / "writes"  # a line per write tried, from whichever run's process

    def copy_onto_a_full_disk(source: int, destination: int, length: int,
                              buffer: bytearray) -> int:
        with open(writes, "a") as handle:
            handle.write("write\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local, "_copy_slice", copy_onto_a_full_disk)
    report = run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    assert [key.split(":")[0] for key in report.failed] == ["site_copy"]
    assert len(writes.read_text().splitlines()) == 1  # not retryable: the step gave up at
    # once, no retry storm
    [(status, error)] = operations(opsdb, OperationType.TRANSFER, package)
    assert status == OperationStatus.FAILED and "No space left on device" in (error or "")
    with opsdb.session() as session:
        stages = {s.stage: s for s in diagnose(session, config, package, utcnow())}
        assert stages["site copy cologne"].state == "failed"
        assert "disk full" in stages["site copy cologne"].detail
        assert "next attempt at" in stages["site copy cologne"].detail
        assert stages["site copy us"].state == "waiting"  # us's row: not cologne's error
        copies = session.scalars(select(PackageCopy).where(
            PackageCopy.package_id == get_package(session, package).id)).all()
        assert [c.location.location_type for c in copies] == [LocationType.BUFFER]
    assert all(p.is_file() for p in source)  # nothing purged
    assert_safe(config, opsdb)  # and no temporary file left taking the space

    # A replayed tick does not re-run the failed partition before its back-off is over ...
    assert run(config, instance, wait_s=0).launched == []
    monkeypatch.undo()  # ... the disk is enlarged; the next automatic attempt gets through
    report = run(config, instance)

    assert report.launched[0].startswith(f"reattempt:site_copy:{package}|cologne:")
    assert report.failed == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    opsdb.dispose()


def _before_the_archive_at_cologne(monkeypatch: pytest.MonkeyPatch, marker: Path,
                                   put: Callable[[Path, Path], object], *,
                                   while_it_travels: bool = False) -> None:
    """Once, just before the cologne LTA's final name is looked at (or just after that look,
    as the bytes start to travel): `put(source, final)`, as if something had written there."""
    real = replicas._occupied

    def occupied(opsdb, config, destination_id, jobs):  # type: ignore[no-untyped-def]
        final = Path(str(jobs[0].destination.path))
        looked = real(opsdb, config, destination_id, jobs) if while_it_travels else None
        if "/cologne/lta/" in str(final) and first_caller(marker, str(final)):
            final.parent.mkdir(parents=True, exist_ok=True)
            put(Path(str(jobs[0].placement.source.endpoint.path)), final)
        return looked or real(opsdb, config, destination_id, jobs)

    monkeypatch.setattr(replicas, "_occupied", occupied)


@pytest.mark.parametrize("while_it_travels", [False, True], ids=["before", "while-travelling"])
def test_a_file_opsdb_does_not_know_at_an_archive_path_is_never_written_over(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, webhook_receiver: Receiver,
        while_it_travels: bool) -> None:
    """The LTA path a package is archived to holds a file OpsDB has no record of (an older
    archive, an OpsDB restored from a backup), there before the transfer or written while the
    package travels: it is left as it is, the archive refused and a person told at once; once
    it is moved away, the next automatic attempt archives the package and the notice is
    resolved."""
    settings = yaml.safe_load(config.path.read_text())
    settings["notifications"] = {"webhook": {"url": webhook_receiver.url, "timeout_s": 2}}
    config.path.write_text(yaml.safe_dump(settings))
    config = load_config(config.path)
    foreign = os.urandom(70_000)
    marker = tmp_path / "written"
    _before_the_archive_at_cologne(monkeypatch, marker,
                                   lambda _source, final: final.write_bytes(foreign),
                                   while_it_travels=while_it_travels)
    observe(config, opsdb)

    run(config, instance, wait_s=0)

    final = Path(marker.read_text())
    assert final.read_bytes() == foreign  # the storage: nothing written over it
    [package] = package_names(opsdb)
    archives = operations(opsdb, OperationType.ARCHIVE, package)
    refused = [error or "" for status, error in archives if status == OperationStatus.FAILED]
    assert refused and all("does not record there" in e for e in refused), archives
    with opsdb.session() as session:
        at_cologne = [c for c in session.scalars(select(PackageCopy))
                      if c.location.label == "cologne/lta"]
    assert at_cologne == []
    with opsdb.session() as session:  # that file's fault, not the disk's: not passed over
        assert [location.label for location in unhealthy(session, utcnow())] == []
    assert all(p.is_file() for p in source_root(config).rglob("*.dat"))  # nothing purged
    [told] = webhook_receiver.texts  # a person is told at once, and only about this
    assert "a file OpsDB does not know" in told and str(final) in told, told

    shutil.move(final, tmp_path / "moved-away")  # the person's part
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert len(webhook_receiver.texts) == 2 and "RESOLVED" in webhook_receiver.texts[1]
    assert (tmp_path / "moved-away").read_bytes() == foreign
    assert_safe(config, opsdb)


def test_the_package_bytes_found_at_an_archive_path_are_taken_as_the_copy(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's own bytes already at the LTA path with no record (a transfer renamed into
    place, then its process died before recording it): re-hashed and recorded as the copy,
    never transferred again."""
    marker, inode = tmp_path / "written", tmp_path / "inode"

    def put(source: Path, final: Path) -> None:
        shutil.copyfile(source, final)
        inode.write_text(str(final.stat().st_ino))

    _before_the_archive_at_cologne(monkeypatch, marker, put)
    observe(config, opsdb)

    run(config, instance)

    final = Path(marker.read_text())
    archived_everywhere(config, opsdb)
    assert final.stat().st_ino == int(inode.read_text())  # the storage: the file found is it
    [package] = package_names(opsdb)
    assert [s for s, _ in operations(opsdb, OperationType.ARCHIVE, package)] == [
        OperationStatus.COMPLETED] * 2
    assert_safe(config, opsdb)


def test_a_file_where_a_packages_directory_should_be_is_told_and_copied_once_moved(
        tmp_path: Path, instance: DagsterInstance, sshd: SshServer) -> None:
    """A regular file `obs-0` sits at the archive sites' buffer roots, where the directory of
    observation obs-0's package should be. Its site copy fails once, naming that file (not
    retried within the run: no retry storm), nothing written, the file left as it is, nothing
    purged at the observatory; the buffer is not marked failing (obs-1's package still goes
    there); `why` and a notification, at once, say what to do. Once the file is moved away,
    the next automatic attempt copies the package (no `ccat-dt retry`). Before, over rsync:
    "rsync exited 12: mkdir: cannot create directory ...: File exists | rsync: connection
    unexpectedly closed", retried three times in the run, the buffer marked failing. (On
    this machine the look at the final name before a copy finds such a file already: told as
    a file OpsDB does not know, not reaching the transport; over ssh the look finds the name
    missing.)"""
    config = multisite(tmp_path, sshd, max_attempts=3, retry_backoff_first_s=6)
    opsdb = OpsDB(config.opsdb_url)
    blocked = observe(config, opsdb, name="obs-0")
    observe(config, opsdb, name="obs-1")
    blockers = [Path(config.location_root(config.location(site, "buffer"))) / "obs-0"
                for site in ("cologne", "us")]
    for blocker in blockers:
        blocker.write_bytes(b"not a directory")

    report = run(config, instance, wait_s=0)

    [package] = [name for name in package_names(opsdb) if name.startswith("obs-0")]
    assert report.failed and all(package in key for key in report.failed), report.failed
    tried = operations(opsdb, OperationType.TRANSFER, package)
    # One try per run (a re-attempt may be due before the drive is idle): not retried in a run
    assert [s for s, _ in tried] == [OperationStatus.FAILED] * len(report.failed), tried
    for _, error in tried:
        assert "obs-0 is not a directory (a file is there): move it away" in (error or ""), error
    assert all(b.read_bytes() == b"not a directory" for b in blockers)  # left as it is
    assert all(p.is_file() for p in blocked)  # nothing purged at the observatory
    with opsdb.session() as session:
        assert unhealthy(session, utcnow()) == []  # the other packages still go there
        stages = {s.stage: s for s in diagnose(session, config, package, utcnow())}
        failed = [s for s in stages.values() if s.state == "failed"]
        assert len(failed) == 1, stages
        assert "a file is where the package's directory should be" in failed[0].detail
        assert "move it away" in failed[0].detail and "next attempt at" in failed[0].detail
        other = session.scalars(select(PackageCopy).join(PackageCopy.package).where(
            PackageCopy.package_id != get_package(session, package).id)).all()
        assert {c.location.label for c in other if c.location.location_type
                == LocationType.LONG_TERM_ARCHIVE and c.is_verified} == {"cologne/lta",
                                                                         "us/lta"}
        problems = current_problems(session, config, utcnow())
    assert [p.kind for p in problems] == ["in_the_way"], problems
    assert str(blockers[0].parent) in problems[0].detail or str(blockers[1].parent) \
        in problems[0].detail, problems[0].detail
    assert "move it away" in problems[0].detail and "nothing to re-run" in problems[0].detail
    # (assert_safe would flag the blockers: files OpsDB does not know, as `audit` does)

    for blocker in blockers:  # a person moves the file away
        blocker.unlink()
    # The next attempt is due after a back-off that doubles per failure (6, 12, 24 s): a
    # loaded machine's first drive can fail twice before it idles, so wait out the longest.
    report = run(config, instance, wait_s=30)

    assert report.failed == []
    archived_everywhere(config, opsdb)
    with opsdb.session() as session:
        assert current_problems(session, config, utcnow()) == []
    assert_safe(config, opsdb)
    opsdb.dispose()
