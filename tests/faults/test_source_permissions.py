"""A source file refused to the user ccat-dt runs as (EACCES: an instrument wrote it 0600 as
another user, a directory was made 0700, an ACL or SELinux refusal): told as the source's
problem, naming the file, its owner and mode and what to do; never as the destination's, whose
location stays healthy; another verified copy sent instead where there is one.

The tests run as root, which file modes do not stop: each refusal is the kernel's EACCES from
a fault-injecting FUSE disk (tests/faultfs.py), on the open of the file (its mode) or on the
look-up of every name in its directory (a directory that cannot be entered), the file's or
directory's owner and mode set as a refusing one's would be on the disk below."""

from __future__ import annotations

import errno
import os
import shutil
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import xxhash
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.health import location_failure
from ccat_dt.objectstore import Stores
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    OperationStatus,
    OperationType,
    PackageState,
)
from ccat_dt.packages import get_package
from ccat_dt.references import Placement
from ccat_dt.replicas import Placed
from ccat_dt.staging import Selection, request_staging
from ccat_dt.transports.base import Endpoint, TransferError, Transport
from ccat_dt.transports.bbcp import BbcpOptions, BbcpTransport
from ccat_dt.transports.local import LocalTransport
from ccat_dt.transports.rsync import RsyncTransport
from ccat_dt.transports.s3 import S3Transport
from resources import placement
from tests.faultfs import FaultyDisk, MountFaulty, faulty_disk  # noqa: F401  # the fixture
from tests.faults.pipeline import (
    observe,
    operations,
    package_names,
    package_state,
    run,
)
from tests.faults.test_disk_errors import TAR, _config, _transfers_to
from tests.faults.test_disk_full import _copies, told
from tests.s3server import S3Server, s3, s3server  # noqa: F401  # fixtures
from tests.sshd import SshServer
from tests.test_multisite import multisite
from tests.test_s3 import PREFIX as S3_PREFIX
from tests.test_s3 import s3_deployment

OWNER = 4321  # the instrument's user, not the one ccat-dt runs as (nor any in /etc/passwd)
BBCP = pytest.mark.skipif(shutil.which("bbcp") is None, reason="bbcp is not installed (not "
                          "packaged for Debian); tests/test_bbcp.py classifies its message")


def refuse(disk: FaultyDisk, relative: str, how: str) -> str:
    """Make `relative` on `disk` refused to its readers, as `how` does: "file", the file
    written mode 0600 by OWNER; "directory", its directory made 0700 by OWNER. Returns what
    the refusal is told with."""
    if how == "file":
        os.chown(disk.backing / relative, OWNER, OWNER)
        os.chmod(disk.backing / relative, 0o600)
        disk.fail("open", relative, code=errno.EACCES)
        return f"permission denied (owner uid {OWNER}, mode 0600)"
    directory = PurePosixPath(relative).parent
    os.chown(disk.backing / directory, OWNER, OWNER)
    os.chmod(disk.backing / directory, 0o700)
    disk.fail("getattr", f"{directory}/*", code=errno.EACCES)
    return (f"permission denied (its directory {disk.root / directory} cannot be entered: "
            f"owner uid {OWNER}, mode 0700)")


def untouched(disk: FaultyDisk, relative: str, how: str, checksum: str) -> None:
    """The refused file's bytes, owner and mode are as they were: never written, replaced or
    re-moded by ccat-dt."""
    path = disk.backing / relative
    info = (path if how == "file" else path.parent).stat()
    assert (info.st_uid, info.st_mode & 0o777) == (OWNER, 0o600 if how == "file" else 0o700)
    assert hash_file(path)[0] == checksum


def refused_once_archived(monkeypatch: pytest.MonkeyPatch, *disks: FaultyDisk) -> None:
    """The package's tar on `disks` (Cologne's) refused as a file of another user, mode 0600,
    from the moment it is archived at Cologne (the runs execute in this process: workers=1)."""
    real_place = placement.place

    def place(opsdb: OpsDB, config: Config, obj: Placement, kind: LocationType,
              **options: Any) -> Placed:
        placed = real_place(opsdb, config, obj, kind, **options)
        if (obj.site, kind) == ("cologne", LocationType.LONG_TERM_ARCHIVE):
            for disk in disks:
                refuse(disk, TAR, "file")
        return placed

    monkeypatch.setattr(placement, "place", place)


def _sum(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def failing(opsdb: OpsDB) -> dict[str, str]:
    """The locations marked failing, with why."""
    with opsdb.session() as session:
        return {loc.label: loc.unhealthy_reason or "" for loc in session.scalars(
            select(DataLocation)) if loc.failing_since is not None}


def not_by_transfers(marked: dict[str, str]) -> None:
    """No transfer marked a location failing: the destinations (us) are not, and a source
    copy's location only by the purge's re-read of a copy it relies on ("copy N at ...: cannot
    read ..."), whose refusal is told as its disk's (left as it is: not a transfer's)."""
    assert not [label for label in marked if label.startswith("us/")], marked
    assert all(reason.startswith("copy ") for reason in marked.values()), marked


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["file", "directory"])
@pytest.mark.parametrize("transport", [
    "local", "rsync", pytest.param("bbcp", marks=BBCP),
    "rsync from its host", pytest.param("bbcp from its host", marks=BBCP)])
def test_a_source_refused_for_lack_of_permission_fails_as_the_sources(
        tmp_path: Path, faulty_disk: MountFaulty, sshd: SshServer,  # noqa: F811
        transport: str, how: str) -> None:
    """A transport reading a file refused to its user, alone and in a batched session with a
    readable file: that file fails as its source's, naming it, its owner and mode (or the
    directory that cannot be entered) and whom to make it readable by; not retried within the
    run, and not the destination's (before, rsync: "rsync exited 23: ... send_files failed to
    open ...: Permission denied (13)", bbcp: "bbcp failed (exit 2): ... Permission denied
    opening SRC", both the destination's location failure, and in a bbcp batch the readable
    file failed with it for good; local: "Permission denied" and no more). The readable file
    lands; nothing of the refused one is left at the destination; it is left as it was."""
    config = _config(tmp_path)
    disk = faulty_disk(config, "cologne/lta")
    files = {name: os.urandom(3 * 2**20) for name in ("bad.tar", "good.tar")}
    (disk.root / "obs").mkdir()
    for name, data in files.items():  # the readable file outside the refused one's directory
        (disk.root / ("obs/bad.tar" if name == "bad.tar" else name)).write_bytes(data)
    said = refuse(disk, "obs/bad.tar", how)
    host = sshd.destination if transport.endswith("from its host") else None
    target = sshd.root / tmp_path.name
    target.mkdir()
    movers: dict[str, Transport] = {
        "local": LocalTransport(), "rsync": RsyncTransport(sshd.ssh, tmp_path / "logs"),
        "bbcp": BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")}
    mover = movers[transport.split()[0]]

    def pair(name: str, directory: str) -> tuple[Endpoint, Endpoint, str]:
        there = target / directory / name
        return (Endpoint(PurePosixPath(disk.root / ("obs/bad.tar" if name == "bad.tar"
                                                    else name)), host),
                Endpoint(PurePosixPath(there)) if transport == "local" else sshd.endpoint(there),
                xxhash.xxh3_128(files[name]).hexdigest())

    with pytest.raises(TransferError) as alone:
        mover.copy(*pair("bad.tar", "alone"))
    bad, good = mover.copy_many([pair("bad.tar", "batch"), pair("good.tar", "batch")])
    if isinstance(good, TransferError):  # bbcp: not sent for its peer's failure, sent alone now
        assert good.retryable and not location_failure(good), good
        mover.copy(*pair("good.tar", "batch"))

    where = f"{disk.root / 'obs/bad.tar'}" + (f" on {host}" if host else "")
    by = f"the user ccat-dt logs in as on {host}" if host else "the user running ccat-dt"
    for failure in (alone.value, bad):
        assert isinstance(failure, TransferError), failure
        assert f"source unreadable: {where}: {said}: make it readable by {by} (root, uid 0)" \
            in str(failure), failure
        assert not failure.retryable and not location_failure(failure), failure
    assert (target / "batch" / "good.tar").read_bytes() == files["good.tar"]
    assert _files(target) == ["batch/good.tar"]  # no partial or landing file of the refused one
    untouched(disk, "obs/bad.tar", how, _sum(files["bad.tar"]))
    assert disk.hits() and {hit.split()[1] for hit in disk.hits()} == {"obs/bad.tar"}


@pytest.mark.parametrize("how", ["file", "directory"])
def test_an_upload_from_a_refused_file_fails_as_the_sources(
        tmp_path: Path, faulty_disk: MountFaulty, s3: S3Server, how: str) -> None:  # noqa: F811
    """An upload to an object store of a file refused to ccat-dt's user fails as its source's,
    naming it and what to do (before, the file's own refusal: "...: cannot reach http://...:
    [Errno 13] Permission denied", retried as the store unreachable, and the object-store
    location, whose store is fine, marked failing). Nothing is left in the bucket (no object,
    no unfinished upload); the file is left as it was."""
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", s3.url, bucket)
    disk = faulty_disk(config, "cologne/buffer")
    data = os.urandom(200_000)
    (disk.root / "obs").mkdir()
    (disk.root / "obs/pkg.tar").write_bytes(data)
    said = refuse(disk, "obs/pkg.tar", how)
    destination = Endpoint(PurePosixPath("obs-0/pkg.tar"), store=f"s3://{bucket}/{S3_PREFIX}")

    with pytest.raises(TransferError) as failed:
        S3Transport(Stores.of(config)).copy(Endpoint(PurePosixPath(disk.root / "obs/pkg.tar")),
                                            destination, xxhash.xxh3_128(data).hexdigest())

    assert f"source unreadable: {disk.root / 'obs/pkg.tar'}: {said}: make it readable by the " \
        "user running ccat-dt (root, uid 0)" in str(failed.value), failed.value
    assert not failed.value.retryable and not location_failure(failed.value), failed.value
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [key for key in keys if "pkg.tar" in key] == [], keys
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    untouched(disk, "obs/pkg.tar", how, _sum(data))


@pytest.mark.parametrize("transport", ["rsync", pytest.param("bbcp", marks=BBCP)])
def test_an_archive_copy_refused_over_ssh_is_passed_over_for_another(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        sshd: SshServer, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    """Over ssh (rsync, bbcp), Cologne's LTA copy of the tar, the source of its replication to
    us, is refused to ccat-dt's user there: that transfer fails naming it as the source's
    (before: "rsync exited 23 ... Permission denied (13)" / "bbcp failed (exit 2) ...", the
    destination's permanent failure, us's buffer, whose disk is fine, marked failing and the
    same copy read again by every re-attempt); its re-attempt sends the package from cologne's
    verified buffer copy. The us copies hold the package's bytes, nothing is left half-written
    there, no person is told (another copy served), and the refused tar is left as it was."""
    config = multisite(tmp_path, sshd, transport, max_attempts=2, retry_backoff_first_s=0.2)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    refused_once_archived(monkeypatch, disk)
    observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0, workers=1)

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
    to_us = _transfers_to(opsdb, package, "us/buffer")
    assert to_us[0][:2] == ("cologne/lta", OperationStatus.FAILED), to_us
    assert f"source unreadable: {disk.root / TAR} on {sshd.destination}: permission denied " \
        f"(owner uid {OWNER}, mode 0600): make it readable by the user ccat-dt logs in as on " \
        f"{sshd.destination} (root, uid 0)" in to_us[0][2], to_us
    assert to_us[-1][:2] == ("cologne/buffer", OperationStatus.COMPLETED), to_us
    not_by_transfers(failing(opsdb))  # us's disks are fine
    assert told(config, opsdb) == []
    us = [config.resolve_root(location.root) for location in config.settings.site("us").locations]
    us_lta = [root / TAR for root in us if (root / TAR).is_file()]
    assert [hash_file(path)[0] for path in us_lta] == [checksum] * len(us_lta) and us_lta
    assert [p for root in us for p in root.rglob("*") if ".part" in p.name] == []
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    assert checksum is not None
    untouched(disk, TAR, "file", checksum)
    opsdb.dispose()


def test_a_staging_whose_nearest_archive_copy_is_refused_stages_from_another(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """Cologne's LTA copy, the nearest to the processing cluster, is refused to ccat-dt's
    user: the staging fails naming it as the source's, with what to do (before: "source
    unreadable: ...: Permission denied" and no more), and its automatic re-attempt stages
    from the us archive copy. The staged files hold the filed bytes; the refused tar is left
    as it was, and no location is marked failing."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    source = observe(config, opsdb, files=2, size=20_000)
    filed = {p.name: hash_file(p)[0] for p in source}
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    data = (disk.backing / TAR).read_bytes()
    said = refuse(disk, TAR, "file")
    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0", module="primecam/f280"),
                           expires_in=timedelta(hours=1))

    run(config, instance)

    staged = {p.name: hash_file(p)[0] for p in
              (config.resolve_root("sites/ramses/processing") / name).rglob("*.dat")}
    assert staged == filed
    tried = operations(opsdb, OperationType.STAGING, package)
    assert [status for status, _ in tried] == [OperationStatus.FAILED,
                                               OperationStatus.COMPLETED], tried
    assert f"source unreadable: {disk.root / TAR}: {said}: make it readable by the user " \
        "running ccat-dt (root, uid 0)" in (tried[0][1] or ""), tried
    assert failing(opsdb) == {}
    untouched(disk, TAR, "file", _sum(data))
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    opsdb.dispose()
