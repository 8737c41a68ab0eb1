"""Disks that fail an operation with EIO (a bad sector on read, a controller error on write,
"fsyncgate": an fsync that says EIO once, its dirty pages dropped): each faulty location is a
fault-injecting FUSE file system (tests/faultfs.py), so the pipeline's own processes see the
kernel's error. A copy that cannot be read now is not proved bad: it is neither quarantined nor
replaced, nothing is deleted on its word, and the work heals by itself once the disk answers; a
disk that keeps failing is named to a person (location, path, errno)."""

from __future__ import annotations

import copy
import os
import shutil
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import xxhash
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets import cli
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.audit import audit
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.defaults import EMBEDDED_DEFAULT
from ccat_dt.health import location_failure
from ccat_dt.notify import current_problems
from ccat_dt.objectstore import Stores
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    utcnow,
)
from ccat_dt.packages import get_package
from ccat_dt.pending import scrub_due
from ccat_dt.references import Placement
from ccat_dt.replicas import Placed, verify
from ccat_dt.scrub import scrub
from ccat_dt.staging import Selection, request_staging
from ccat_dt.storage import Wanted, look
from ccat_dt.transports.base import Endpoint, TransferError, TransferResult
from ccat_dt.transports.bbcp import BbcpOptions, BbcpTransport
from ccat_dt.transports.local import LocalTransport
from ccat_dt.transports.rsync import RsyncTransport
from ccat_dt.transports.s3 import S3Transport
from resources import placement
from tests.faultfs import MountFaulty, faulty_disk, mount_faulty  # noqa: F401  # the fixture
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    deployment,
    observe,
    operations,
    package_names,
    package_state,
    run,
)
from tests.faults.retrying import operator_retry
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_disk_full import _copies, _stages, told
from tests.notify_servers import Receiver
from tests.s3server import S3Server, s3, s3server  # noqa: F401  # fixtures
from tests.sshd import SshServer
from tests.test_multisite import multisite
from tests.test_s3 import PREFIX as S3_PREFIX
from tests.test_s3 import s3_deployment

TAR = "obs-0/obs-0_primecam-f280_p00.tar"


def _config(tmp_path: Path, webhook: Receiver | None = None, **policies: float) -> Config:
    told = {"notifications": {"webhook": {"url": webhook.url, "timeout_s": 2}}} if webhook else {}
    return deployment(tmp_path / "deploy", **told, policies={
        "max_attempts": 2, "retry_backoff_first_s": 0.2, **policies})


def told_once_of_the_disk(config: Config, opsdb: OpsDB, instance: DagsterInstance,
                          webhook: Receiver, capsys: pytest.CaptureFixture[str], package: str,
                          label: str, path: Path) -> None:
    """A person was told once, over the webhook, that the disk at `label` failed to read
    `path` and is to be checked; `why` names the copy there, `status` lists the location and
    the problem told; another drive tells nothing more."""
    [text] = webhook.texts
    assert label in text and str(path) in text and "Input/output error" in text, text
    assert "Check the disk" in text, text
    state, detail = _stages(config, opsdb, package)[f"copy at {label}"]
    assert state == "unreadable" and str(path) in detail, (state, detail)
    capsys.readouterr()
    cli.main(["--config", str(config.path), "status"])
    out = capsys.readouterr().out
    assert f"location {label} unhealthy" in out and str(path) in out, out
    assert "problem [webhook] " in out and label in out.split("problem [webhook] ")[1], out
    run(config, instance, wait_s=0)
    assert len(webhook.texts) == 1, webhook.texts  # once, not per attempt or per drive



def unreadable_once_placed(monkeypatch: pytest.MonkeyPatch, disk: Any, site: str,
                           kind: LocationType) -> None:
    """`disk` fails every read of the package's tar once a copy was placed at `site`'s
    location of `kind` (sent or archived from there: from then on unreadable too)."""
    real_place = placement.place

    def place(opsdb: OpsDB, config: Config, obj: Placement, kind_placed: LocationType,
              **options: Any) -> Placed:
        placed = real_place(opsdb, config, obj, kind_placed, **options)
        if (obj.site, kind_placed) == (site, kind):
            disk.fail("read", TAR)
        return placed

    monkeypatch.setattr(placement, "place", place)

def test_an_archive_copy_its_disk_cannot_read_is_not_taken_for_a_bad_one(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """Cologne's LTA disk fails every read of an archived tar (a bad sector): its check's
    re-read, the fixity scrub and `audit --repair` say it could not be read, but the copy is
    not quarantined and nothing writes over it; the disk failing again is told (location,
    path, EIO). The other package's copy there is still due for the scrub (before: the whole
    location was left out of it while marked). Once the disk reads again the copy re-reads
    intact and the problem clears."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    observe(config, opsdb)
    observe(config, opsdb, name="obs-1")
    assert run(config, instance).failed == []
    package, other = package_names(opsdb)
    archived = (disk.backing / TAR).stat()
    disk.fail("read", TAR)

    check = verify(opsdb, config, package, "cologne", LocationType.LONG_TERM_ARCHIVE)
    [(_, _, scrubbed)] = scrub(opsdb, config, [(package, "cologne")])
    audited = audit(opsdb, checksums=True, repair=True, config=config)
    report = run(config, instance, wait_s=0)  # a repair would start here

    assert disk.hits() == [f"read {TAR}"] * 3, disk.hits()
    for result in (check, scrubbed):
        assert not result.passed and not result.reached, result
        assert "Input/output error" in result.description, result
        assert "mismatch" not in result.description, result
    assert [f.path for f in audited.findings] == [str(disk.root / TAR)], audited.findings
    assert audited.repaired == []
    assert not [k for k in report.launched if k.startswith("repair:")], report.launched
    after = (disk.backing / TAR).stat()  # the archived file itself, never replaced
    assert (after.st_ino, after.st_mtime_ns) == (archived.st_ino, archived.st_mtime_ns)
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    with opsdb.session() as session:
        [problem] = [p for p in current_problems(session, config, utcnow())
                     if p.kind == "disk_error"]
    assert problem.key == "disk_error:cologne/lta", problem
    assert f"{disk.root}/{TAR}" in problem.detail and "(EIO)" in problem.detail, problem
    with opsdb.session() as session:
        due = {(d.package, d.site) for d in scrub_due(session, 1 << 40, utcnow())}
    assert (other, "cologne") in due, due

    disk.heal()

    assert verify(opsdb, config, package, "cologne", LocationType.LONG_TERM_ARCHIVE).passed
    assert not [key for key in told(config, opsdb) if key.startswith("disk_error:")]
    assert run(config, instance).failed == []
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_an_archive_disk_marked_for_a_file_it_cannot_read_is_not_told_as_unmounted(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """Cologne's LTA disk fails the read of one archived tar once (its check's re-read): the
    location is marked failing for it and, nothing read fine there since, is still failing
    past the failover horizon. A person is told that its disk failed to read that file and to
    check the disk (before: "archive location cologne/lta cannot be looked at ... Bring it back
    (mount the disk, restore the bucket or its marker, fix the credentials)": the disk is
    mounted and answers, one file is unreadable). Told once, as the disk error it is."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    observe(config, opsdb)
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    disk.fail("read", TAR, times=1)
    assert not verify(opsdb, config, package, "cologne", LocationType.LONG_TERM_ARCHIVE).reached
    later = utcnow() + timedelta(hours=config.settings.policies.site_failover_hours, minutes=1)

    with opsdb.session() as session:
        told_later = [p for p in current_problems(session, config, later)
                      if p.key.endswith(":cologne/lta")]

    assert disk.hits() == [f"read {TAR}"], disk.hits()
    assert os.path.ismount(disk.root) and (disk.root / ".ccat-dt-location").is_file()
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
    assert hash_file(disk.root / TAR)[0] == checksum  # it reads again: the copy is intact
    [problem] = told_later
    assert problem.key == "disk_error:cologne/lta", problem
    text = f"{problem.subject}\n{problem.detail}"
    assert "mount the disk" not in text and "cannot be looked at" not in text, text
    assert f"{disk.root}/{TAR}" in text and "(EIO)" in text, text
    assert "Check the disk" in text, text
    opsdb.dispose()


def test_an_archive_copy_unreadable_when_the_purge_looks_deletes_nothing_on_its_word(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """The purge re-hashes the LTA copies it relies on just before deleting (recheck window 0):
    Cologne's copy cannot be read then, so the observatory's files and buffer copies stay (two
    verified LTA copies are required, one could be read); the copy is not quarantined, and
    once the disk reads again the purge finishes by itself."""
    config = _config(tmp_path, deletion_recheck_hours=0)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    disk.fail("read", TAR)  # the archiving reads back its temporary file, not this name
    source = observe(config, opsdb)

    # bounded: before, the copy was quarantined, repaired over, found unreadable, ... forever
    report = drive(build_definitions(config), instance, max_rounds=20)

    assert any(hit == f"read {TAR}" for hit in disk.hits()), disk.hits()
    assert all(p.is_file() for p in source)  # nothing deleted on the word of that copy
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert not [k for k in report.launched if k.startswith("repair:")], report.launched

    disk.heal()
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert not any(p.exists() for p in source)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_an_archive_copy_whose_re_read_failed_is_hashed_before_a_deletion_relies_on_it(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cologne's LTA copy is archived and verified; once the last archive copy is made, its
    disk fails every read of the tar and a re-read (its check) says so, within the purge's
    recheck window (24 h, the default). The purge hashes it again before relying on it, which
    fails: the observatory's files and buffer copy are kept (before: verified within the
    window and unchanged in size and identity, it was relied on unread, and the observatory's
    files were deleted on the word of a copy its disk could not read). Once the disk reads
    again the purge finishes by itself."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    real_place = placement.place

    def place(opsdb: OpsDB, config: Config, obj: Placement, kind: LocationType,
              **options: Any) -> Placed:
        placed = real_place(opsdb, config, obj, kind, **options)
        if (obj.site, kind) == ("us", LocationType.LONG_TERM_ARCHIVE):
            disk.fail("read", TAR)
            assert not verify(opsdb, config, obj.package, "cologne",
                              LocationType.LONG_TERM_ARCHIVE).reached
        return placed

    monkeypatch.setattr(placement, "place", place)
    source = observe(config, opsdb)

    run(config, instance, wait_s=0, in_process=True)

    assert config.settings.policies.deletion_recheck_hours == 24
    assert all(p.is_file() for p in source)  # nothing deleted on the word of that copy
    assert disk.hits().count(f"read {TAR}") >= 2, disk.hits()  # its check, and the purge
    assert (config.resolve_root("sites/ccat/buffer") / TAR).is_file()
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)

    disk.heal()
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert not any(p.exists() for p in source)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_an_archive_copy_its_disk_cannot_read_fails_only_its_replication_not_the_destination(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """Cologne's LTA disk keeps failing the reads of one package's tar (a bad sector does not
    heal), the source of that package's replication to the us site: that copy fails naming
    its source as unreadable (before: "local copy ... failed: [Errno 5]", and us's buffer,
    whose disk is fine, was marked failing and told as a disk failing with I/O errors), and
    its automatic re-attempt sends the package from cologne's verified buffer copy instead
    (before: every re-attempt read the same bad copy again, waiting for a person). The us
    copies hold the package's bytes; the unreadable tar is neither deleted nor written over,
    the purge does not rely on it unread (its re-read fails: the buffer copies and the
    observatory's files are kept) and its disk is told, naming the file. The other package,
    at the same locations, is archived and purged meanwhile; once the disk reads again the
    purge finishes by itself."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    disk.fail("read", TAR)  # the archiving reads back its temporary file, not this name
    bad = observe(config, opsdb, name="obs-0")
    good = observe(config, opsdb, name="obs-1")

    run(config, instance, wait_s=0)  # no `ccat-dt retry`, the disk not healed

    package, other = package_names(opsdb)
    stages = _stages(config, opsdb, package)
    assert "location us/buffer" not in stages, stages  # its disk is fine
    problems = told(config, opsdb)
    assert "disk_error:us/buffer" not in problems, problems
    with opsdb.session() as session:
        pkg = get_package(session, package)
        checksum = pkg.checksum
        labels = {loc.id: loc.label for loc in session.scalars(select(DataLocation))}
        to_us = [(labels[o.source_location_id], o.status, o.error or "")
                 for o in session.scalars(select(Operation).where(
                     Operation.package_id == pkg.id,
                     Operation.operation_type == OperationType.TRANSFER,
                     Operation.destination_location_id.in_(
                         [i for i, label in labels.items() if label == "us/buffer"]))
                     .order_by(Operation.id)) if o.source_location_id is not None]
        kept = sorted(c.location.label for c in pkg.copies if c.status == CopyStatus.PRESENT)
        [archived] = [(c.inode, c.mtime_ns) for c in pkg.copies
                      if c.location.label == "cologne/lta"]  # as the archiving recorded it
    assert to_us[0][:2] == ("cologne/lta", OperationStatus.FAILED), to_us
    assert f"source unreadable: {disk.root / TAR}" in to_us[0][2], to_us
    assert "Input/output error" in to_us[0][2], to_us
    assert to_us[-1][:2] == ("cologne/buffer", OperationStatus.COMPLETED), to_us
    assert stages["site copy us"][0] == "done", stages
    us_lta = config.resolve_root("sites/us/lta") / TAR
    assert hash_file(us_lta)[0] == checksum  # the bytes at the destination, read now
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    assert {"ccat/buffer", "cologne/buffer", "cologne/lta", "us/lta"} <= set(kept), kept
    assert all(p.is_file() for p in bad)  # not purged on the word of the unreadable copy
    with opsdb.session() as session:
        [problem] = [p for p in current_problems(session, config, utcnow())
                     if p.kind == "disk_error"]
    assert problem.key == "disk_error:cologne/lta", problem
    assert f"{disk.root}/{TAR}" in problem.detail and "(EIO)" in problem.detail, problem
    assert package_state(opsdb, other) == PackageState.ARCHIVED
    assert not any(p.exists() for p in good)  # the other package went its way
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert lost_filed_files(config, opsdb) == []
    after = (disk.root / TAR).stat()  # the unreadable tar itself: never replaced
    assert (after.st_ino, after.st_mtime_ns) == archived, (after, archived)

    disk.heal()
    run(config, instance)

    after = (disk.root / TAR).stat()
    assert (after.st_ino, after.st_mtime_ns) == archived, (after, archived)
    archived_everywhere(config, opsdb)
    assert not any(p.exists() for p in bad)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_the_disk_error_of_a_file_still_unreadable_is_not_resolved_by_another_files_read(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Cologne's LTA disk keeps failing the reads of one package's tar (a bad sector): its
    replication is sent from another copy and a person is told the disk (disk_error). Then
    another package's tar on that disk is re-read fine (its check). The notice stays, naming
    the file, while that file is still unreadable, as `why` and `status` say it is (before:
    any success on the disk resolved it, a bad sector reported as mended while `why` kept
    showing the copy unreadable); once that very file reads intact again, it is resolved."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    disk.fail("read", TAR)  # the archiving reads back its temporary file, not this name
    observe(config, opsdb, name="obs-0")
    observe(config, opsdb, name="obs-1")
    run(config, instance, wait_s=0)  # healed from cologne's buffer copy: no `ccat-dt retry`
    package, other = package_names(opsdb)
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
        [archived] = [(c.inode, c.mtime_ns) for c in get_package(session, package).copies
                      if c.location.label == "cologne/lta"]
    assert "disk_error:cologne/lta" in told(config, opsdb)

    assert verify(opsdb, config, other, "cologne", LocationType.LONG_TERM_ARCHIVE).passed

    with opsdb.session() as session:
        [problem] = [p for p in current_problems(session, config, utcnow())
                     if p.kind == "disk_error"]
    assert problem.key == "disk_error:cologne/lta", problem
    assert f"{disk.root}/{TAR}" in problem.detail and "Check the disk" in problem.detail, problem
    assert _stages(config, opsdb, package)["copy at cologne/lta"][0] == "unreadable"
    capsys.readouterr()
    cli.main(["--config", str(config.path), "status"])
    assert f"{disk.root}/{TAR}" in capsys.readouterr().out  # the location, still failing for it
    assert disk.hits().count(f"read {TAR}") >= 1, disk.hits()
    after = (disk.root / TAR).stat()  # the unreadable tar itself: never replaced
    assert (after.st_ino, after.st_mtime_ns) == archived, (after, archived)

    disk.heal()

    assert verify(opsdb, config, package, "cologne", LocationType.LONG_TERM_ARCHIVE).passed
    assert hash_file(disk.root / TAR)[0] == checksum
    assert not [key for key in told(config, opsdb) if key.startswith("disk_error:")]
    assert "copy at cologne/lta" not in _stages(config, opsdb, package)
    opsdb.dispose()


def _transfers_to(opsdb: OpsDB, package: str, label: str) -> list[tuple[str, OperationStatus, str]]:
    """The package's transfers to the location `label`: (source location, status, error)."""
    with opsdb.session() as session:
        pkg = get_package(session, package)
        labels = {loc.id: loc.label for loc in session.scalars(select(DataLocation))}
        return [(labels[o.source_location_id], o.status, o.error or "")
                for o in session.scalars(select(Operation).where(
                    Operation.package_id == pkg.id,
                    Operation.operation_type == OperationType.TRANSFER,
                    Operation.destination_location_id.in_(
                        [i for i, name in labels.items() if name == label]))
                    .order_by(Operation.id)) if o.source_location_id is not None]


@pytest.mark.parametrize("transport", ["rsync", pytest.param("bbcp", marks=pytest.mark.skipif(
    shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged for Debian); "
    "tests/test_bbcp.py classifies its captured message for a source read error"))])
def test_an_archive_copy_its_disk_cannot_read_over_ssh_fails_only_its_replication(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        sshd: SshServer, transport: str) -> None:
    """As above, the archive sites reached over ssh with rsync or bbcp: Cologne's LTA disk (a
    host of its own) keeps failing the reads of one package's tar, the source of its
    replication to us. That transfer fails naming its source as unreadable (before, rsync:
    "rsync exited 23: ... read errors mapping ...", not retried, its useless partial of zeros
    kept, and us's buffer, whose disk is fine, marked failing with "Input/output error"); its
    re-attempt sends the package from cologne's verified buffer copy. The us copies hold the
    package's bytes, nothing is left half-written there, and the unreadable tar is neither
    deleted nor written over (its bytes, read past the fault, are still the package's)."""
    config = multisite(tmp_path, sshd, transport, max_attempts=2, retry_backoff_first_s=0.2)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    disk.fail("read", TAR)  # the archiving reads back its temporary file, not this name
    observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0)  # no `ccat-dt retry`, the disk not healed

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        pkg = get_package(session, package)
        checksum = pkg.checksum
        [archived] = [(c.inode, c.mtime_ns) for c in pkg.copies
                      if c.location.label == "cologne/lta"]  # as the archiving recorded it
        failing = {loc.label: loc.unhealthy_reason for loc in session.scalars(
            select(DataLocation)) if loc.failing_since is not None}
    to_us = _transfers_to(opsdb, package, "us/buffer")
    assert to_us[0][:2] == ("cologne/lta", OperationStatus.FAILED), to_us
    assert f"source unreadable: {disk.root / TAR}" in to_us[0][2], to_us
    assert "Input/output error" in to_us[0][2], to_us
    assert to_us[-1][:2] == ("cologne/buffer", OperationStatus.COMPLETED), to_us
    assert "us/buffer" not in failing, failing  # its disk is fine
    assert "disk_error:us/buffer" not in told(config, opsdb)
    us = [config.resolve_root(location.root) for location in config.settings.site("us").locations]
    us_lta = [root / TAR for root in us if (root / TAR).is_file()]
    assert [hash_file(path)[0] for path in us_lta] == [checksum] * len(us_lta) and us_lta
    assert [p for root in us for p in root.rglob("*") if ".part" in p.name] == []
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    after = (disk.root / TAR).stat()  # the unreadable tar itself: never replaced
    assert (after.st_ino, after.st_mtime_ns) == archived, (after, archived)
    assert hash_file(disk.backing / TAR)[0] == checksum  # nor written to
    opsdb.dispose()


@pytest.mark.parametrize("transport", ["rsync", pytest.param("bbcp", marks=pytest.mark.skipif(
    shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged for Debian); "
    "tests/test_bbcp.py classifies its captured message for a source read error"))])
def test_a_replication_whose_every_source_copy_cannot_be_read_is_told_to_a_person(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        sshd: SshServer, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    """Over ssh (rsync, bbcp), Cologne's LTA and buffer disks both fail the reads of the tar
    once it is archived there: the replication to us tries one copy, then the other, each
    failing as "source unreadable" naming its file (before: the destination's fault, us's
    healthy buffer marked failing, the same copy read again). With no readable copy left the
    work is escalated at once (re-attempt horizon 0.1 s) and a person is told, the last error
    naming the unreadable file. Nothing is written at us, both unreadable copies are left as
    they were (not quarantined), and the observatory's files are kept."""
    config = multisite(tmp_path, sshd, transport, max_attempts=2, retry_backoff_first_s=0.2,
                       retry_horizon_hours=0.1 / 3600)
    opsdb = OpsDB(config.opsdb_url)
    lta, buffer = faulty_disk(config, "cologne/lta"), faulty_disk(config, "cologne/buffer")
    lta.fail("read", TAR)  # the archiving reads back its temporary file, not this name
    unreadable_once_placed(monkeypatch, buffer, "cologne", LocationType.LONG_TERM_ARCHIVE)
    source = observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0, in_process=True)

    [package] = package_names(opsdb)
    to_us = _transfers_to(opsdb, package, "us/buffer")
    assert {label for label, _, _ in to_us} == {"cologne/lta", "cologne/buffer"}, to_us
    for label, status, error in to_us:
        disk = lta if label == "cologne/lta" else buffer
        assert status == OperationStatus.FAILED, to_us
        assert f"source unreadable: {disk.root / TAR}" in error, to_us
    problems = told(config, opsdb)
    assert "disk_error:us/buffer" not in problems, problems
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
        [escalated] = [p for p in current_problems(session, config, utcnow())
                       if p.key.startswith("escalated:site_copy:")]
        failing = [loc.label for loc in session.scalars(select(DataLocation))
                   if loc.failing_since is not None]
    assert f"{package}|us" in escalated.key, escalated
    assert "source unreadable: " in escalated.detail and TAR in escalated.detail, escalated
    assert "us/buffer" not in failing, failing  # its disk is fine
    us = [config.resolve_root(location.root) for location in config.settings.site("us").locations]
    assert [p for root in us for p in root.rglob("*") if p.name != ".ccat-dt-location"
            and p.is_file()] == []
    for disk in (lta, buffer):
        assert hash_file(disk.backing / TAR)[0] == checksum  # neither written over nor gone
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert all(p.is_file() for p in source)
    opsdb.dispose()


def test_rsync_from_a_file_its_disk_cannot_read_fails_that_file_as_the_sources(
        tmp_path: Path, faulty_disk: MountFaulty, sshd: SshServer) -> None:  # noqa: F811
    """rsync to a host reached over ssh, from a disk that fails the reads of one file, alone
    and in a batched session with a readable file: that file fails as its source's, named,
    retried, not the destination's (before: "rsync exited 23: ... read errors mapping ...", not
    retried, and the destination marked failing for it), and rsync's partial copy of it (zeros
    where the read failed, kept by --partial) is removed (before: kept, for the next attempt
    to append to). The readable file lands intact; the unreadable one is left as it was."""
    config = _config(tmp_path)
    disk = faulty_disk(config, "cologne/lta")
    files = {name: os.urandom(300_000) for name in ("bad.tar", "good.tar")}
    for name, data in files.items():
        (disk.root / name).write_bytes(data)
    disk.fail("read", "bad.tar")
    target = sshd.root / tmp_path.name
    target.mkdir()
    transport = RsyncTransport(sshd.ssh, tmp_path / "logs")

    def pair(name: str, directory: str) -> tuple[Endpoint, Endpoint, str]:
        return (Endpoint(PurePosixPath(disk.root / name)),
                sshd.endpoint(target / directory / name),
                xxhash.xxh3_128(files[name]).hexdigest())

    with pytest.raises(TransferError) as alone:
        transport.copy(*pair("bad.tar", "alone"))
    bad, good = transport.copy_many([pair("bad.tar", "batch"), pair("good.tar", "batch")])

    for failure in (alone.value, bad):
        assert isinstance(failure, TransferError), failure
        assert f"source unreadable: {disk.root / 'bad.tar'}: its disk failed the read: " \
            "Input/output error" in str(failure), failure
        assert failure.retryable and not location_failure(failure), failure
    assert isinstance(good, TransferResult), good
    assert (target / "batch" / "good.tar").read_bytes() == files["good.tar"]
    left = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert left == ["batch/good.tar"], left  # no partial copy of the unreadable file
    assert (disk.backing / "bad.tar").read_bytes() == files["bad.tar"]
    assert disk.hits() and set(disk.hits()) == {"read bad.tar"}, disk.hits()


@pytest.mark.skipif(shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged "
                    "for Debian); tests/test_bbcp.py classifies its captured message")
def test_bbcp_from_a_file_its_disk_cannot_read_fails_that_file_as_the_sources(
        tmp_path: Path, faulty_disk: MountFaulty, sshd: SshServer) -> None:  # noqa: F811
    """bbcp to a host reached over ssh, from a disk that fails the reads of one file, alone
    and in a batched session with a readable file: that file fails as its source's, named,
    retried, not the destination's (before: a permanent "bbcp failed (exit 128): ...
    Input/output error writing SRC", the destination marked failing for it, and in a batch the
    readable file failed with it for good). The readable file goes (its session's peer failed:
    alone on the next attempt); nothing is left half-written at the destination, and the
    unreadable file is left as it was."""
    config = _config(tmp_path)
    disk = faulty_disk(config, "cologne/lta")
    files = {name: os.urandom(3 * 2**20) for name in ("bad.tar", "good.tar")}
    for name, data in files.items():
        (disk.root / name).write_bytes(data)
    disk.fail("read", "bad.tar")
    target = sshd.root / tmp_path.name
    target.mkdir()
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")

    def pair(name: str, directory: str) -> tuple[Endpoint, Endpoint, str]:
        return (Endpoint(PurePosixPath(disk.root / name)),
                sshd.endpoint(target / directory / name),
                xxhash.xxh3_128(files[name]).hexdigest())

    with pytest.raises(TransferError) as alone:
        transport.copy(*pair("bad.tar", "alone"))
    bad, good = transport.copy_many([pair("bad.tar", "batch"), pair("good.tar", "batch")])
    if isinstance(good, TransferError):  # not sent for its peer's failure: sent alone now
        assert good.retryable and not location_failure(good), good
        transport.copy(*pair("good.tar", "batch"))

    for failure in (alone.value, bad):
        assert isinstance(failure, TransferError), failure
        assert f"source unreadable: {disk.root / 'bad.tar'}: its disk failed the read: " \
            "Input/output error" in str(failure), failure
        assert failure.retryable and not location_failure(failure), failure
    assert (target / "batch" / "good.tar").read_bytes() == files["good.tar"]
    left = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert left == ["batch/good.tar"], left  # no partial copy of the unreadable file
    assert (disk.backing / "bad.tar").read_bytes() == files["bad.tar"]
    assert disk.hits() and set(disk.hits()) == {"read bad.tar"}, disk.hits()


@pytest.mark.parametrize("size", [200_000, 12 * 2**20], ids=["one-part", "multipart"])
def test_an_upload_from_a_file_its_disk_cannot_read_fails_as_the_sources(
        tmp_path: Path, faulty_disk: MountFaulty, s3: S3Server, size: int) -> None:  # noqa: F811
    """An upload to an object store from a disk that fails the reads of the package's tar:
    it fails as its source's, named and retried (before: "...: cannot reach http://...:
    [Errno 5] Input/output error", the store taken for unreachable and its location, whose
    store is fine, marked failing with "Input/output error", told as a failing disk). Nothing
    is left in the bucket (no object, no unfinished upload); the tar is left as it was."""
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", s3.url, bucket)
    disk = faulty_disk(config, "cologne/buffer")
    data = os.urandom(size)
    (disk.root / "pkg.tar").write_bytes(data)
    disk.fail("read", "pkg.tar")
    destination = Endpoint(PurePosixPath("obs-0/pkg.tar"), store=f"s3://{bucket}/{S3_PREFIX}")

    with pytest.raises(TransferError) as failed:
        S3Transport(Stores.of(config)).copy(Endpoint(PurePosixPath(disk.root / "pkg.tar")),
                                            destination, xxhash.xxh3_128(data).hexdigest())

    assert f"source unreadable: {disk.root / 'pkg.tar'}: its disk failed the read: " \
        "Input/output error" in str(failed.value), failed.value
    assert failed.value.retryable and not location_failure(failed.value), failed.value
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [key for key in keys if "pkg.tar" in key] == [], keys
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert (disk.backing / "pkg.tar").read_bytes() == data
    assert disk.hits() and set(disk.hits()) == {"read pkg.tar"}, disk.hits()


def test_a_source_file_its_disk_cannot_read_fails_packaging_naming_it_and_heals(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """The instrument disk fails the reads of one filed file: packaging fails naming that file
    and its location (before: "packaging at ccat/buffer: Input/output error", and the
    observatory buffer, whose disk is fine, was marked unhealthy), the package is not FAILED,
    the failing disk is told; once it reads again the re-attempt archives it by itself."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "ccat/instruments")
    source = observe(config, opsdb)
    disk.fail("read", "obs-0/primecam/f280/scan-1.dat")

    report = run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    # only its packaging failed (re-attempts due meanwhile, 0.2 s back-off, may run too)
    assert report.failed and all(key.startswith(("package:", "reattempt:packaging:"))
                                 for key in report.failed), report.failed
    assert package_state(opsdb, package) != PackageState.FAILED
    stages = _stages(config, opsdb, package)
    state, detail = stages["packaging"]
    assert state == "failed" and "next attempt at" in detail, detail
    assert str(source[1]) in detail and "Input/output error" in detail, detail
    assert "location ccat/buffer" not in stages, stages  # its disk is fine
    assert "disk_error:ccat/instruments" in told(config, opsdb)
    assert all(p.is_file() for p in source)

    disk.heal()
    report = run(config, instance)

    assert report.failed == [], report.failed
    archived_everywhere(config, opsdb)
    assert not [key for key in told(config, opsdb) if key.startswith("disk_error:")]
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_a_temporary_file_whose_truncation_fails_is_let_go(
        tmp_path: Path, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """The disk fails the truncation of a copy's temporary file (EIO): that attempt fails, and
    the next one in the same process copies it (before: the failed attempt kept the file open
    with its lock, and every later attempt of the run was refused "another process is
    writing" it)."""
    config = _config(tmp_path)
    disk = faulty_disk(config, "cologne/lta")
    source = tmp_path / "package.tar"
    source.write_bytes(os.urandom(100_000))
    checksum = hash_file(source)[0]
    disk.fail("truncate", "*.part", times=1)

    with pytest.raises(TransferError, match="Input/output error"):
        LocalTransport().copy_file(source, disk.root / TAR, checksum)
    LocalTransport().copy_file(source, disk.root / TAR, checksum)

    assert disk.hits() == [f"truncate obs-0/.{Path(TAR).name}.part"]
    assert hash_file(disk.backing / TAR)[0] == checksum


def test_a_staging_whose_nearest_archive_copy_cannot_be_read_stages_from_another(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """Cologne's LTA copy, the nearest to the processing cluster, cannot be read (for good):
    the staging fails "source unreadable" naming it, and its automatic re-attempt stages from
    the us archive copy (before: every re-attempt read cologne's bad copy again). The staged
    files hold the filed bytes; the unreadable tar is untouched. Its disk is told to a person
    once, naming the location and the file, and `status` shows it (before: nothing was marked
    and nobody told, the staging having healed; a disk with a bad sector went unreported)."""
    config = _config(tmp_path, webhook_receiver)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    source = observe(config, opsdb, files=2, size=20_000)
    filed = {p.name: hash_file(p)[0] for p in source}
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    archived = (disk.backing / TAR).stat()
    disk.fail("read", TAR)
    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0", module="primecam/f280"),
                           expires_in=timedelta(hours=1))

    run(config, instance)

    staged = {p.name: hash_file(p)[0] for p in
              (config.resolve_root("sites/ramses/processing") / name).rglob("*.dat")}
    assert staged == filed
    assert disk.hits() == [f"read {TAR}"], disk.hits()
    tried = operations(opsdb, OperationType.STAGING, package)
    assert [status for status, _ in tried] == [OperationStatus.FAILED,
                                               OperationStatus.COMPLETED], tried
    assert f"source unreadable: {disk.root / TAR}" in (tried[0][1] or ""), tried
    after = (disk.backing / TAR).stat()
    assert (after.st_ino, after.st_mtime_ns) == (archived.st_ino, archived.st_mtime_ns)
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    told_once_of_the_disk(config, opsdb, instance, webhook_receiver, capsys, package,
                          "cologne/lta", disk.root / TAR)
    opsdb.dispose()


def _archivings_to(opsdb: OpsDB, package: str, label: str
                   ) -> list[tuple[str, OperationStatus, str]]:
    """The package's archivings into the LTA location `label`: (source location, status,
    error), in order."""
    with opsdb.session() as session:
        pkg = get_package(session, package)
        labels = {loc.id: loc.label for loc in session.scalars(select(DataLocation))}
        return [(labels[o.source_location_id], o.status, o.error or "")
                for o in session.scalars(select(Operation).where(
                    Operation.package_id == pkg.id,
                    Operation.operation_type == OperationType.ARCHIVE,
                    Operation.destination_location_id.in_(
                        [i for i, name in labels.items() if name == label]))
                    .order_by(Operation.id)) if o.source_location_id is not None]


def _buffer_kept(tmp_path: Path, site: str, webhook: Receiver | None = None,
                 **policies: float) -> Config:
    """The test deployment with `site`'s buffer kept for 1000 h after archiving (its copy, the
    one found unreadable, is still there to look at after the drive)."""
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    for location in next(s for s in sites if s["short_name"] == site)["locations"]:
        if location["type"] == "buffer":
            location["retention_hours"] = 1000
    told = {"notifications": {"webhook": {"url": webhook.url, "timeout_s": 2}}} if webhook else {}
    return deployment(tmp_path / "deploy", sites=sites, **told,
                      policies={"max_attempts": 2, "retry_backoff_first_s": 0.2, **policies})


def test_an_archiving_whose_buffer_copy_cannot_be_read_archives_from_another_copy(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """Cologne's buffer disk fails every read of the package's tar (a bad sector) once it
    landed there: archiving it into cologne's LTA fails naming its source as unreadable, and
    the re-attempt (no `ccat-dt retry`, the disk not healed) archives it from the nearest other
    verified copy, the observatory buffer's (no archive holds it yet; before: every attempt
    read cologne's bad buffer copy again, until a person acted). Cologne's LTA tar and then
    us's hold the package's bytes; the observatory is purged on the word of those two LTA
    copies; the unreadable buffer copy is left as it was (not quarantined, not written over,
    not deleted on its word: it is kept here by its retention). Its disk is told to a person
    once, naming the location and the file, and `status` shows it (before: nothing was marked
    and nobody told, the archiving having healed; a disk with a bad sector went unreported)."""
    config = _buffer_kept(tmp_path, "cologne", webhook_receiver)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/buffer")
    disk.fail("read", TAR)  # the transfer reads back its temporary file, not this name
    source = observe(config, opsdb)

    run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        pkg = get_package(session, package)
        checksum = pkg.checksum
        [buffered] = [(c.status, c.inode, c.mtime_ns) for c in pkg.copies
                      if c.location.label == "cologne/buffer"]  # as the transfer recorded it
    tried = _archivings_to(opsdb, package, "cologne/lta")
    assert tried[0][:2] == ("cologne/buffer", OperationStatus.FAILED), tried
    assert f"source unreadable: {disk.root / TAR}" in tried[0][2], tried
    assert tried[-1][:2] == ("ccat/buffer", OperationStatus.COMPLETED), tried
    assert f"read {TAR}" in disk.hits(), disk.hits()
    for site in ("cologne", "us"):  # the archived bytes, read now
        assert hash_file(config.resolve_root(f"sites/{site}/lta") / TAR)[0] == checksum
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    assert not any(p.exists() for p in source)  # purged on the two readable LTA copies
    assert not (config.resolve_root("sites/ccat/buffer") / TAR).exists()
    # the unreadable copy: PRESENT, its file the one the transfer landed, its bytes intact
    assert buffered[0] == CopyStatus.PRESENT, buffered
    backing = (disk.backing / TAR).stat()
    assert (backing.st_ino, backing.st_mtime_ns) == buffered[1:], (backing, buffered)
    assert hash_file(disk.backing / TAR)[0] == checksum
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert not [k for k in told(config, opsdb) if k.startswith("escalated:")]
    assert lost_filed_files(config, opsdb) == []
    told_once_of_the_disk(config, opsdb, instance, webhook_receiver, capsys, package,
                          "cologne/buffer", disk.root / TAR)

    disk.heal()  # the invariants read every present copy

    assert_safe(config, opsdb)
    opsdb.dispose()


def test_an_archiving_whose_every_source_copy_cannot_be_read_is_told_to_a_person(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cologne's buffer disk fails the reads of the package's tar once it landed there, and
    the observatory buffer's disk fails them too from then on: the archiving into cologne's
    LTA tries the one copy, then the other (before: the buffer copy only, at every attempt),
    each failing as "source unreadable" naming its file. With no readable copy left the work
    is escalated at once (re-attempt horizon 0.1 s) and a person is told, the last error
    naming the unreadable file. Nothing is archived, both unreadable copies are left as they
    were (not quarantined, neither written over nor deleted), and the observatory's files are
    kept."""
    config = _buffer_kept(tmp_path, "cologne", retry_horizon_hours=0.1 / 3600)
    opsdb = OpsDB(config.opsdb_url)
    buffer, observatory = faulty_disk(config, "cologne/buffer"), faulty_disk(config, "ccat/buffer")
    buffer.fail("read", TAR)  # the transfer reads back its temporary file, not this name
    unreadable_once_placed(monkeypatch, observatory, "cologne", LocationType.BUFFER)
    source = observe(config, opsdb)

    run(config, instance, wait_s=0, in_process=True)

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
        [escalated] = [p for p in current_problems(session, config, utcnow())
                       if p.key.startswith("escalated:")]
    tried = _archivings_to(opsdb, package, "cologne/lta")
    assert {label for label, _, _ in tried} == {"cologne/buffer", "ccat/buffer"}, tried
    for label, status, error in tried:
        disk = buffer if label == "cologne/buffer" else observatory
        assert status == OperationStatus.FAILED, tried
        assert f"source unreadable: {disk.root / TAR}" in error, tried
    assert escalated.key == f"escalated:lta_copy:{package}|cologne", escalated
    assert "source unreadable: " in escalated.detail and TAR in escalated.detail, escalated
    for site in ("cologne", "us"):
        lta = config.resolve_root(f"sites/{site}/lta")
        assert [p for p in lta.rglob("*") if p.is_file()
                and p.name != ".ccat-dt-location"] == [], site
    for disk in (buffer, observatory):
        assert hash_file(disk.backing / TAR)[0] == checksum  # neither written over nor gone
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert all(p.is_file() for p in source)
    opsdb.dispose()


def test_an_observatory_tar_its_disk_cannot_read_is_told_not_rebuilt_over(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """The observatory buffer's disk fails the reads of the package's tar once it is built
    (the build hashes what it writes): its only copy, so there is no other to send from. The
    transfer to the primary site fails "source unreadable" naming it, is escalated at once
    (re-attempt horizon 0.1 s) and told to a person; the tar is not quarantined and not
    rebuilt over from the raw files (recovery.py rebuilds only a tar found corrupt), nothing
    is written at the archives, and the raw files are kept. Once the disk reads again the
    operator's retry archives it."""
    config = _config(tmp_path, retry_horizon_hours=0.1 / 3600)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "ccat/buffer")
    disk.fail("read", TAR)  # the build writes and hashes a temporary file, not this name
    source = observe(config, opsdb)

    run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        pkg = get_package(session, package)
        checksum = pkg.checksum
        [(status, inode, mtime_ns)] = [(c.status, c.inode, c.mtime_ns) for c in pkg.copies]
        [escalated] = [p for p in current_problems(session, config, utcnow())
                       if p.key.startswith("escalated:")]
    assert escalated.key == f"escalated:site_copy:{package}|cologne", escalated
    assert f"source unreadable: {disk.root / TAR}" in escalated.detail, escalated
    assert status == CopyStatus.PRESENT
    assert [status for status, _ in operations(opsdb, OperationType.PACKAGING, package)] == [
        OperationStatus.COMPLETED]  # built once: not rebuilt over the unreadable tar
    backing = (disk.backing / TAR).stat()
    assert (backing.st_ino, backing.st_mtime_ns) == (inode, mtime_ns)
    assert hash_file(disk.backing / TAR)[0] == checksum
    for site in ("cologne", "us"):
        for kind in ("buffer", "lta"):
            root = config.resolve_root(f"sites/{site}/{kind}")
            assert [p for p in root.rglob("*") if p.is_file()
                    and p.name != ".ccat-dt-location"] == [], (site, kind)
    assert all(p.is_file() for p in source)

    disk.heal()
    assert ("site_copy", package, "cologne") in operator_retry(config, instance, opsdb)
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert not any(p.exists() for p in source)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


@pytest.mark.parametrize("transport", ["local", "rsync", pytest.param(
    "bbcp", marks=pytest.mark.skipif(shutil.which("bbcp") is None, reason=(
        "bbcp is not installed (not packaged for Debian); the rsync case runs the same "
        "verification script (remote.VERIFY_AND_RENAME_MANY_SCRIPT) for a batch")))])
def test_a_destination_disk_that_cannot_read_back_what_landed_is_told_as_its_disk(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        sshd: SshServer, transport: str) -> None:
    """us's buffer disk takes writes but fails every read of what lands on it (a failing disk
    or controller): each replication to it fails at its verification, the read-back of the
    landed file. Whatever the transport, that is the disk's failure, told as one: us/buffer
    marked failing with the I/O error and a person told (before, over bbcp: "checksum
    mismatch ... got nothing readable", a per-file fault, every re-attempt sending the package
    again and the disk never named; over rsync: "xxhsum ... failed: a failure occurred reading
    the input file", the disk marked but not told as failing its reads). Nothing is recorded
    there, the sources are not purged; once the disk reads again the work heals by itself and
    nothing is left half-written."""
    if transport == "local":
        config = _config(tmp_path)
    else:
        config = multisite(tmp_path, sshd, transport, max_attempts=2,
                           retry_backoff_first_s=0.2)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "us/buffer")
    disk.fail("read", "*.part")  # what lands there, under its temporary name
    raw = observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0)  # no `ccat-dt retry`, the disk not healed

    [package] = package_names(opsdb)
    to_us = _transfers_to(opsdb, package, "us/buffer")
    assert to_us and all(status == OperationStatus.FAILED for _, status, _ in to_us), to_us
    assert all("Input/output error" in error for _, _, error in to_us), to_us
    assert not any("checksum mismatch" in error for _, _, error in to_us), to_us
    with opsdb.session() as session:
        failing = {loc.label: loc.unhealthy_reason or "" for loc in session.scalars(
            select(DataLocation)) if loc.failing_since is not None}
    assert "input/output error" in failing.get("us/buffer", "").lower(), failing
    assert "disk_error:us/buffer" in told(config, opsdb), told(config, opsdb)
    assert ("us/buffer", CopyStatus.PRESENT) not in _copies(opsdb)
    assert all(p.is_file() for p in raw)  # not purged: us holds no copy

    disk.heal()
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert [p for p in disk.backing.rglob("*") if ".part" in p.name] == []
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_a_batch_landing_on_a_disk_that_cannot_read_it_back_is_told_as_its_disk(
        tmp_path: Path, sshd: SshServer) -> None:
    """A batch of packages sent over ssh in one session (rsync here; bbcp's sessions verify
    with the same script, remote.VERIFY_AND_RENAME_MANY_SCRIPT) onto a disk that takes the
    writes but fails every read: each file's verdict is the disk's I/O error, in the system's
    words (before: "cannot read ... to verify it", a bbcp session's "checksum mismatch ... got
    nothing readable"), which marks the location, not the file (health.location_failure);
    nothing is renamed into place; the look at a file there says the same."""
    disk = mount_faulty(tmp_path / "dest", tmp_path / "faultfs", "us/buffer")
    try:
        disk.fail("read", "*.tar*")  # its marker is read as ever
        pairs = []
        for number in range(3):
            source = tmp_path / f"pkg-{number}.tar"
            source.write_bytes(os.urandom(100_000 + number))
            pairs.append((Endpoint(PurePosixPath(source)),
                          sshd.endpoint(tmp_path / "dest" / source.name), hash_file(source)[0]))
        results = RsyncTransport(sshd.ssh, tmp_path / "logs").copy_many(pairs)
        for result in results:
            assert isinstance(result, TransferError), result
            assert "reading back" in str(result) and "Input/output error" in str(result), result
            assert "checksum mismatch" not in str(result), result
            assert location_failure(result), result
        assert not [p for p in disk.backing.iterdir() if not p.name.startswith(".")]
        # A copy there re-read over ssh (a purge's re-check, an audit, the scrub) says so too
        # (before: "cannot read NAME on HOST", the system's words lost).
        (disk.backing / "kept.tar").write_bytes(b"bytes the disk holds")
        [seen] = look(str(tmp_path / "dest"), sshd.destination, sshd.ssh,
                      [Wanted("kept.tar", rehash=True)])
        assert seen.problem == f"cannot read kept.tar on {sshd.destination}: Input/output error"
    finally:
        disk.unmount()


@pytest.mark.parametrize("how", ["rsync", "rsync batch", pytest.param("bbcp", marks=(
    pytest.mark.skipif(shutil.which("bbcp") is None, reason=(
        "bbcp is not installed (not packaged for Debian); rsync's flusher and the batch's "
        "verification are the same kind of sync")))), "bbcp batch"])
def test_a_landed_file_whose_flush_failed_once_is_never_verified(
        tmp_path: Path, sshd: SshServer, how: str) -> None:
    """The destination disk fails one flush of a landed file (EIO: its pages could not be
    written back), then flushes as ever. Linux reports a write-back error once, to whichever
    fsync comes first: a flusher that syncs the landing files while the transfer runs, or a
    verification that syncs again after a failed flush, would take that one report and then
    see a clean sync, and the copy (hashed from the page cache, which still holds the lost
    bytes) would be renamed into place and recorded verified though its bytes never reached
    the disk. (A single copy over ssh was renamed even after its own verification's flush
    failed: the script's `&&` chain stopped before the rename's `;`.) Now the flushers while a
    transfer runs flush the file system (sync -f: the file's own error stays for its
    verification's fsync), a failed fsync is never retried and stops the rename: the copy
    fails naming the disk's I/O error, and nothing is renamed into place."""
    disk = mount_faulty(tmp_path / "dest", tmp_path / "faultfs", "us/buffer")
    try:
        batch = how.endswith("batch")
        sources = []
        for number in range(3 if batch else 1):
            source = tmp_path / f"pkg-{number}.tar"
            source.write_bytes(os.urandom(2 * 2**20 + number))
            sources.append(source)
        pairs = [(Endpoint(PurePosixPath(s)), sshd.endpoint(tmp_path / "dest" / s.name),
                  hash_file(s)[0]) for s in sources]
        disk.fail("fsync", "*.part" if how != "bbcp batch" else "*pkg-*", times=1)
        # ~1 s at this rate: the flusher syncs the landing file several times meanwhile
        transport: RsyncTransport | BbcpTransport = (
            RsyncTransport(sshd.ssh, tmp_path / "logs", bandwidth_limit_kbps=2000)
            if how.startswith("rsync") else
            BbcpTransport(BbcpOptions(rate_limit="2M", progress_interval_s=1,
                                      stall_timeout_s=60), sshd.ssh, tmp_path / "logs"))
        results = _copy_or_error(transport, pairs)
        assert any("fsync" in hit for hit in disk.hits()), disk.hits()
        for result in results:
            assert isinstance(result, TransferError), result
            assert "Input/output error" in str(result), result
            assert location_failure(result), result
        assert not [p for p in disk.backing.iterdir() if p.name.startswith("pkg-")]
    finally:
        disk.unmount()


def _copy_or_error(transport: RsyncTransport | BbcpTransport,
                   pairs: list[tuple[Endpoint, Endpoint, str]]
                   ) -> list[TransferResult | TransferError]:
    """Each pair's outcome: one copy, or a batch (copy_many), whose session as a whole may
    fail too."""
    try:
        if len(pairs) == 1:
            return [transport.copy(*pairs[0])]
        return transport.copy_many(pairs)
    except TransferError as error:
        return [error] * len(pairs)
