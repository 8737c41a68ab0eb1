"""A source file refused to the user ccat-dt runs as (EACCES: an instrument wrote it 0600 as
another user, a directory was made 0700, an ACL or SELinux refusal): told as the source's
problem, naming the file, its owner and mode and what to do; never as the destination's, whose
location stays healthy; another verified copy sent instead where there is one; a person told
when there is none; and once a person makes it readable, the next automatic attempt reads it.

The tests run as root, which file modes do not stop: each refusal is the kernel's EACCES from
a fault-injecting FUSE disk (tests/faultfs.py), on the open of the file (its mode) or on the
look-up of every name in its directory (a directory that cannot be entered), the file's or
directory's owner and mode set as a refusing one's would be on the disk below."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import xxhash
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.partitions import package_site_key
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.health import location_failure
from ccat_dt.notify import current_problems
from ccat_dt.objectstore import Stores
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    OperationStatus,
    OperationType,
    PackageState,
    utcnow,
)
from ccat_dt.packages import get_package
from ccat_dt.pending import scrub_due
from ccat_dt.reattempt import unsettled, waiting
from ccat_dt.references import Placement
from ccat_dt.replicas import Placed, verify
from ccat_dt.scrub import scrub
from ccat_dt.stages import Stage
from ccat_dt.staging import Selection, request_staging
from ccat_dt.transports.base import Endpoint, TransferError, Transport
from ccat_dt.transports.bbcp import BbcpOptions, BbcpTransport
from ccat_dt.transports.local import LocalTransport
from ccat_dt.transports.rsync import RsyncTransport
from ccat_dt.transports.s3 import S3Transport
from resources import placement
from tests.faultfs import FaultyDisk, MountFaulty, faulty_disk  # noqa: F401  # the fixture
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    observe,
    operations,
    package_names,
    package_state,
    run,
)
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import KEEP, retention_in_place
from tests.faults.test_disk_errors import TAR, _config, _transfers_to
from tests.faults.test_disk_full import _copies, _stages, told
from tests.helpers import copied_deployment, driven_template, template_directory
from tests.notify_servers import Receiver
from tests.s3server import S3Server, s3, s3server  # noqa: F401  # fixtures
from tests.sshd import SshServer
from tests.test_multisite import multisite
from tests.test_operator_actions import by_hand
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


def grant(disk: FaultyDisk, relative: str, how: str) -> None:
    """What a person does once told: the file (or its directory) readable by ccat-dt again."""
    target = disk.backing / (relative if how == "file" else str(PurePosixPath(relative).parent))
    os.chown(target, 0, 0)
    os.chmod(target, 0o644 if how == "file" else 0o755)
    disk.heal()


def untouched(disk: FaultyDisk, relative: str, how: str, checksum: str) -> None:
    """The refused file's bytes, owner and mode are as they were: never written, replaced or
    re-moded by ccat-dt."""
    path = disk.backing / relative
    info = (path if how == "file" else path.parent).stat()
    assert (info.st_uid, info.st_mode & 0o777) == (OWNER, 0o600 if how == "file" else 0o700)
    assert hash_file(path)[0] == checksum


def refused_once_archived(monkeypatch: pytest.MonkeyPatch, *disks: FaultyDisk) -> None:
    """The package's tar on `disks` (Cologne's) refused as a file of another user, mode 0600,
    from the moment it is archived at Cologne (the runs execute in this process:
    `in_process=True`)."""
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
    """No transfer marked a location failing: the destinations (us) are not, nor the refused
    copy's location (the purge's re-read of a copy it relies on, refused, marks nothing
    either); a location is marked only for a copy ("copy N at ...") its disk failed to read."""
    assert not [label for label in marked if label.startswith("us/")], marked
    assert all(reason.startswith("copy ") for reason in marked.values()), marked


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


_TEMPLATES: dict[tuple[str, bool], tuple[Path, Path]] = {}


def _template(kind: str, sshd: SshServer | None) -> tuple[Path, Path]:
    """A deployment driven to the end once per test process (tests.helpers.driven_template):
    the archives on a disk of this machine (`_config`) or, with `sshd`, on hosts reached over
    ssh (`multisite`, rsync). "kept": obs-0 observed, its sources and buffers kept
    (retention KEEP), so archived everywhere with every buffer copy still there; "archived":
    obs-0 and obs-1 observed, archived everywhere and purged. Its deployment directory and
    instance, for `driven`."""
    key = (kind, sshd is not None)
    if key not in _TEMPLATES:
        directory = template_directory(f"source-permissions-{kind}-{'ssh' if sshd else 'local'}")
        config = _config(directory) if sshd is None else multisite(
            directory, sshd, "rsync", max_attempts=2, retry_backoff_first_s=0.2)
        opsdb = OpsDB(config.opsdb_url)
        if kind == "kept":
            config = retention_in_place(config, KEEP)
            observe(config, opsdb)
        else:
            observe(config, opsdb)
            observe(config, opsdb, name="obs-1")
        _TEMPLATES[key] = driven_template(config, opsdb)
    return _TEMPLATES[key]


@contextmanager
def driven(kind: str, tmp_path: Path, sshd: SshServer | None = None,
           webhook: Receiver | None = None) -> Iterator[tuple[Config, DagsterInstance]]:
    """The test's own copy of `_template(kind, sshd)` (tests.helpers.copied_deployment; over
    ssh, the hosts' roots copied to where `multisite(tmp_path, ...)` puts them), told over
    `webhook` when given: its configuration and instance."""
    deploy, home = _template(kind, sshd)
    elsewhere = [] if sshd is None else [(sshd.root / deploy.parent.name,
                                          sshd.root / tmp_path.name)]
    with copied_deployment(deploy, home, tmp_path, elsewhere) as instance:
        path = tmp_path / "deploy" / CONFIG_NAME
        if webhook is not None:
            settings = yaml.safe_load(path.read_text())
            settings["notifications"] = {"webhook": {"url": webhook.url, "timeout_s": 2}}
            path.write_text(yaml.safe_dump(settings, sort_keys=False))
        yield load_config(path), instance


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


@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_raw_file_refused_to_ccat_dt_fails_packaging_is_told_and_goes_once_readable(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        how: str) -> None:
    """An instrument wrote a raw file 0600 as its own user (or made its directory 0700): the
    packaging fails naming the file, its owner and mode and what to do, the package is not
    quarantined (before, a directory that cannot be entered quarantined it as "source changed
    since filing") and no location is marked failing (before, the instruments' location, for
    one file's mode). Failing so again on its re-attempt, it is told to a person (before: only
    past the re-attempt horizon, days later, as stalled work). Once the file is readable the
    next automatic attempt archives the package, nobody re-running anything, and the notice
    is resolved. Nothing is left at the buffer meanwhile; the raw files are never touched."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "ccat/instruments")
    source = observe(config, opsdb)
    filed = {p: p.read_bytes() for p in source}
    refused = str(source[1].relative_to(disk.root))
    said = refuse(disk, refused, how)

    run(config, instance, wait_s=1)  # its re-attempts due within a second: two at least

    [package] = package_names(opsdb)
    assert package_state(opsdb, package) != PackageState.FAILED
    state, detail = _stages(config, opsdb, package)["packaging"]
    assert state == "failed" and "next attempt at" in detail, detail
    assert detail.startswith("source file not readable by ccat-dt's user; attempt "), detail
    assert f"source unreadable: {source[1]} at ccat/instruments: {said}: make it readable " \
        "by the user running ccat-dt (root, uid 0)" in detail, detail
    with opsdb.session() as session:
        problems = {p.key: p for p in current_problems(session, config, utcnow())}
    assert failing(opsdb) == {}
    problem = problems[f"source_refused:packaging:{package}"]
    assert str(source[1]) in problem.detail and "make it readable" in problem.detail, problem
    assert "next automatic attempt" in problem.detail, problem
    assert [key for key in problems if not key.startswith("source_refused:")] == [], problems
    buffer = config.resolve_root("sites/ccat/buffer")
    assert [p for p in buffer.rglob("*") if p.is_file() and p.name != ".ccat-dt-location"] == []
    untouched(disk, refused, how, _sum(filed[source[1]]))

    grant(disk, refused, how)
    report = run(config, instance)

    assert report.failed == [], report.failed
    assert not [p for p in told(config, opsdb) if p.startswith("source_refused:")]
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


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
    there, no person is told of the transfer (another copy served), and the refused tar is
    left as it was. (The purge of cologne's buffer copy, which relies on that tar, may tell it
    as the permission it is, once refused twice.)"""
    config = multisite(tmp_path, sshd, transport, max_attempts=2, retry_backoff_first_s=0.2)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    refused_once_archived(monkeypatch, disk)
    observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=0, in_process=True)

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
    assert [key for key in told(config, opsdb) if key != f"source_refused:purge:{package}"] == []
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


def every_source_copy_refused(tmp_path: Path, instance: DagsterInstance,
                              faulty_disk: MountFaulty,  # noqa: F811
                              monkeypatch: pytest.MonkeyPatch
                              ) -> tuple[Config, OpsDB, list[FaultyDisk], str, str, list[Path]]:
    """Cologne's LTA and buffer copies of the tar both refused to ccat-dt's user once it is
    archived there, the replication to us tried from each until a person is told: (config,
    OpsDB, cologne's two disks, the package, its checksum, its source files). Checked: each
    transfer failed as its source's, naming the file; us's locations not marked failing
    (before, with the local transport, nothing told a person until the re-attempt horizon,
    days later); the person told names the file and what to do (and, the purge of cologne's
    buffer copy relying on the refused LTA copy, that one as a permission too); nothing
    written at us, nor over either copy."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    lta, buffer = faulty_disk(config, "cologne/lta"), faulty_disk(config, "cologne/buffer")
    refused_once_archived(monkeypatch, lta, buffer)
    source = observe(config, opsdb, name="obs-0")

    run(config, instance, wait_s=1, in_process=True)  # its re-attempts due within a second

    [package] = package_names(opsdb)
    to_us = _transfers_to(opsdb, package, "us/buffer")
    assert {label for label, _, _ in to_us} == {"cologne/lta", "cologne/buffer"}, to_us
    for label, status, error in to_us:
        disk = lta if label == "cologne/lta" else buffer
        assert status == OperationStatus.FAILED, to_us
        assert f"source unreadable: {disk.root / TAR}: permission denied" in error, to_us
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
        problems = {p.key: p for p in current_problems(session, config, utcnow())}
    not_by_transfers(failing(opsdb))
    problem = problems[f"source_refused:site_copy:{package}|us"]
    assert f"{TAR}: permission denied" in problem.detail, problem
    assert "make it readable by the user running ccat-dt" in problem.detail, problem
    # The purge of cologne's buffer copy relies on cologne's LTA copy, refused too: told as
    # the permission it is, naming that file (before: its location marked as a failing disk).
    purge = problems.pop(f"source_refused:purge:{package}", None)
    assert purge is None or (f"{lta.root / TAR}: permission denied" in purge.detail
                             and "SMART" not in purge.detail), purge
    assert list(problems) == [problem.key], problems
    assert [p for root in _us(config) for p in root.rglob("*")
            if p.name != ".ccat-dt-location" and p.is_file()] == []
    assert checksum is not None
    for disk in (lta, buffer):
        untouched(disk, TAR, "file", checksum)
    return config, opsdb, [lta, buffer], package, checksum, source


def _us(config: Config) -> list[Path]:
    """The roots of us's locations."""
    return [config.resolve_root(location.root) for location in config.settings.site("us").locations]


def test_a_replication_whose_every_source_copy_is_refused_is_told_and_goes_once_readable(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every source copy of a replication refused (every_source_copy_refused): a person is
    told. Once both are readable again the next automatic attempt sends the package, nobody
    re-running anything, and the notice is resolved."""
    config, opsdb, disks, package, checksum, source = every_source_copy_refused(
        tmp_path, instance, faulty_disk, monkeypatch)
    for disk in disks:
        grant(disk, TAR, "file")
    report = run(config, instance, in_process=True)

    assert report.failed == [], report.failed
    assert told(config, opsdb) == []
    archived_everywhere(config, opsdb)
    for disk in disks:
        assert not (disk.backing / TAR).exists() or hash_file(disk.backing / TAR)[0] == checksum
    assert not any(p.exists() for p in source)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_a_refused_replication_done_by_another_path_than_its_re_attempt_is_no_longer_told(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every source copy of a replication refused and a person told (every_source_copy_refused);
    once readable, the copy is made by an operator's "Materialize" in the UI, not by the
    re-attempt sensor, and no sensor ticks since (the re-attempt sensor stopped, a drive whose
    last ticks were only the periodic sensors). The notice is resolved all the same: what it is
    derived from (the re-attempt row) is read against OpsDB, which shows the copy made (before,
    the row stayed until a tick of the re-attempt sensor, and so did the notice, with the copy
    verified at us). `status` lists no re-attempt of it either."""
    config, opsdb, disks, package, checksum, _ = every_source_copy_refused(
        tmp_path, instance, faulty_disk, monkeypatch)
    for disk in disks:
        grant(disk, TAR, "file")

    assert by_hand(build_definitions(config), instance, "site_copies",
                   str(package_site_key(package, "us")))

    copied = [root / TAR for root in _us(config) if (root / TAR).is_file()]
    assert [hash_file(path)[0] for path in copied] == [checksum], copied  # us's buffer
    assert _stages(config, opsdb, package)["site copy us"][0] == "done"
    # The purge of cologne's buffer copy, if told (every_source_copy_refused), is not done:
    # the copy is there still; its notice stays until a purge deletes it.
    purge = f"source_refused:purge:{package}"
    assert [key for key in told(config, opsdb) if key != purge] == []
    with opsdb.session() as session:
        assert [(row.stage, row.partition) for row in unsettled(session, config)
                if row.stage != Stage.PURGE] == []
    assert [hash_file(disk.backing / TAR)[0] for disk in disks] == [checksum] * 2
    opsdb.dispose()


def test_a_denied_purge_done_by_another_path_than_its_re_attempt_is_no_longer_told(
        tmp_path: Path, faulty_disk: MountFaulty) -> None:  # noqa: F811
    """The purge of Cologne's buffer copy is refused (a directory ccat-dt's user cannot enter)
    and a person told (deletion_denied); once the directory can be entered, the purge is
    done by an operator's "Materialize" in the UI, not by the purge sensor, and no sensor
    ticks since. The notice is resolved and `status` lists no failing purge: the purge's
    re-attempt row is read against OpsDB, which shows nothing left to delete (before, a purge
    row was kept as recorded, and its notice stayed, until the purge sensor's next tick).
    Archived everywhere, the buffers kept for now: a copy of one deployment so driven
    (`driven`, "kept")."""
    with driven("kept", tmp_path) as (config, instance):
        _a_denied_purge_done_by_another_path(config, instance, faulty_disk)


def _a_denied_purge_done_by_another_path(config: Config, instance: DagsterInstance,
                                         faulty_disk: MountFaulty) -> None:  # noqa: F811
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/buffer")
    [package] = package_names(opsdb)
    kept = disk.backing / TAR
    refuse(disk, TAR, "directory")
    config = retention_in_place(config, 0)
    run(config, instance, wait_s=1)  # the purge's re-attempts due within a second
    assert kept.is_file()
    assert [key for key in told(config, opsdb) if key.startswith("deletion_denied:")], \
        told(config, opsdb)

    grant(disk, TAR, "directory")  # a person lets ccat-dt's user in again, then purges
    assert by_hand(build_definitions(config), instance, "purge_status", package)

    assert not kept.exists()  # the storage: deleted
    assert dict(_copies(opsdb))["cologne/buffer"] == CopyStatus.DELETED
    assert [key for key in told(config, opsdb)
            if key.startswith(("deletion_denied:", "source_refused:purge"))] == []
    with opsdb.session() as session:
        assert [row.partition for row in waiting(session) if row.stage == Stage.PURGE], \
            "no purge tick since: its row is still recorded"
        assert [row.partition for row in unsettled(session, config)
                if row.stage == Stage.PURGE] == []
    state, _ = _stages(config, opsdb, package)["purge"]
    assert state != "failed", _stages(config, opsdb, package)
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
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


def refused_once_archived_everywhere(monkeypatch: pytest.MonkeyPatch, disk: FaultyDisk,
                                     how: str) -> None:
    """Cologne's LTA copy of the tar refused to ccat-dt's user (`refuse`, `how`) once the
    last archive copy (us's) is made: every copy is sent, and the purge's re-read of that one,
    just before deleting, is refused (the runs execute in this process: in_process)."""
    real_place = placement.place

    def place(opsdb: OpsDB, config: Config, obj: Placement, kind: LocationType,
              **options: Any) -> Placed:
        placed = real_place(opsdb, config, obj, kind, **options)
        if (obj.site, kind) == ("us", LocationType.LONG_TERM_ARCHIVE):
            refuse(disk, TAR, how)
        return placed

    monkeypatch.setattr(placement, "place", place)


@pytest.mark.parametrize("how", ["file", "directory"])
@pytest.mark.parametrize("where", ["local", "over ssh"])
def test_an_archive_copy_the_purge_relies_on_refused_is_told_as_a_permission_not_a_disk(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        sshd: SshServer, monkeypatch: pytest.MonkeyPatch, webhook_receiver: Receiver,
        where: str, how: str) -> None:
    """The purge re-reads the archive copies a deletion relies on just before deleting
    (recheck window 0): Cologne's is refused to ccat-dt's user (a file mode 0600 of another
    user, or its directory 0700). Nothing is deleted on its word (the observatory's files and
    buffer copy stay), the copy is not taken for a bad one, and no location is marked
    failing; a person is told it is a permission to grant, naming the file, its owner and mode
    and whom to make it readable by (before: cologne/lta was marked failing as a disk that
    cannot read it, whose advice is "Check the disk (kernel log, SMART)"). Once it is
    readable, the next automatic purge deletes, nobody re-running anything, and the notice is
    resolved. The archives on a disk of this machine, or on hosts reached over ssh (rsync),
    where the look is made by a script on the host (before, a directory that cannot be
    entered was taken for the file missing there: the copy marked CORRUPT)."""
    if where == "local":
        config = _config(tmp_path, webhook_receiver, deletion_recheck_hours=0)
        by = "the user running ccat-dt (root, uid 0)"
    else:
        config = multisite(tmp_path, sshd, "rsync", max_attempts=2, retry_backoff_first_s=0.2,
                           deletion_recheck_hours=0)
        settings = yaml.safe_load(config.path.read_text())
        settings["notifications"] = {"webhook": {"url": webhook_receiver.url, "timeout_s": 2}}
        config.path.write_text(yaml.safe_dump(settings))
        config = load_config(config.path)
        by = f"the user ccat-dt logs in as on {sshd.destination} (root, uid 0)"
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    refused_once_archived_everywhere(monkeypatch, disk, how)
    source = observe(config, opsdb)

    run(config, instance, wait_s=1, in_process=True)  # the purge's re-attempts due within a second

    [package] = package_names(opsdb)
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
    assert checksum is not None
    assert all(p.is_file() for p in source)  # nothing deleted on the word of the refused copy
    assert (config.resolve_root("sites/ccat/buffer") / TAR).is_file()
    us = [config.resolve_root(loc.root) / TAR for loc in config.settings.site("us").locations]
    assert checksum in [hash_file(path)[0] for path in us if path.is_file()]
    assert failing(opsdb) == {}  # neither a disk error nor a location that cannot be looked at
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    path = disk.root / (TAR if how == "file" else str(PurePosixPath(TAR).parent))
    [text] = webhook_receiver.texts
    assert str(path) in text and "permission denied" in text, text
    assert f"make it readable by {by}" in text, text
    assert f"owner uid {OWNER}" in text, text
    assert "SMART" not in text and "Check the disk" not in text, text
    state, detail = _stages(config, opsdb, package)["purge"]
    assert state == "failed" and "make it readable by" in detail, (state, detail)
    untouched(disk, TAR, how, checksum)

    grant(disk, TAR, how)
    run(config, instance, in_process=True)

    assert not any(p.exists() for p in source)
    archived_everywhere(config, opsdb)
    assert len(webhook_receiver.texts) == 2 and "RESOLVED" in webhook_receiver.texts[1]
    assert failing(opsdb) == {}
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


@pytest.mark.parametrize("how", ["file", "directory"])
@pytest.mark.parametrize("where", ["local", "over ssh"])
def test_an_archive_copy_whose_check_and_scrub_are_refused_is_told_as_a_permission_not_a_disk(
        tmp_path: Path, faulty_disk: MountFaulty, sshd: SshServer,  # noqa: F811
        where: str, how: str) -> None:
    """Cologne's LTA copy, archived and verified, is then refused to ccat-dt's user (a file
    mode 0600 of another user, or its directory 0700): its check's re-read and the fixity
    scrub cannot read it. Neither takes it for a bad copy (PRESENT, not quarantined, its bytes,
    owner and mode untouched) nor its disk for a failing one: no location is marked (before:
    cologne/lta was marked failing, as a disk that cannot read the file, and told past the
    failover horizon as "its disk failed with an I/O error ... Check the disk (kernel log,
    SMART)"; a buffer so marked was passed over for new work). They say it is a permission,
    in words for a copy (not "source unreadable"), naming the file, its owner and mode and
    whom to make it readable by; so do the notice, at once, and `why`. The copy, and the
    location's other copy, stay due for the scrub; once readable, the next scrub verifies it
    and nothing is left to tell. The archives on a disk of this machine, or on hosts reached
    over ssh (rsync), where the look is made by a script on the host. Both observations
    archived everywhere: a copy of one deployment so driven (`driven`, "archived")."""
    by = ("the user running ccat-dt (root, uid 0)" if where == "local" else
          f"the user ccat-dt logs in as on {sshd.destination} (root, uid 0)")
    with driven("archived", tmp_path, sshd if where == "over ssh" else None) as (config, _):
        _an_archive_copy_whose_check_and_scrub_are_refused(config, faulty_disk, by, how)


def _an_archive_copy_whose_check_and_scrub_are_refused(
        config: Config, faulty_disk: MountFaulty, by: str, how: str) -> None:  # noqa: F811
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    package, other = package_names(opsdb)
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
    assert checksum is not None
    said = refuse(disk, TAR, how)

    check = verify(opsdb, config, package, "cologne", LocationType.LONG_TERM_ARCHIVE)
    [(_, _, scrubbed)] = scrub(opsdb, config, [(package, "cologne")])

    for result in (check, scrubbed):
        assert not result.passed and not result.reached, result  # a warning, not a bad copy
        assert said in result.description, result.description
        assert f"make it readable by {by}" in result.description, result.description
        assert "source unreadable" not in result.description, result.description
    assert failing(opsdb) == {}  # no disk error, no location that cannot be looked at
    assert ("cologne/lta", CopyStatus.PRESENT) in _copies(opsdb)
    assert not [c for c in _copies(opsdb) if c[1] == CopyStatus.CORRUPT]
    untouched(disk, TAR, how, checksum)
    later = utcnow() + timedelta(hours=config.settings.policies.site_failover_hours, minutes=1)
    with opsdb.session() as session:
        now_told = current_problems(session, config, utcnow())
        later_told = current_problems(session, config, later)
        due = {(d.package, d.site) for d in scrub_due(session, 1 << 40, utcnow())}
    assert not [p.key for p in now_told + later_told
                if p.kind in ("disk_error", "archive_unreadable")], now_told + later_told
    [refused] = [p for p in now_told if p.kind == "copy_refused"]
    text = f"{refused.subject}\n{refused.detail}"
    assert package in refused.subject and "cologne/lta" in refused.subject, text
    assert said in text and f"make it readable by {by}" in text, text
    assert "SMART" not in text and "Check the disk" not in text, text
    assert {(package, "cologne"), (other, "cologne")} <= due, due  # read again later
    state, detail = _stages(config, opsdb, package)["copy at cologne/lta"]
    assert state == "refused" and f"make it readable by {by}" in detail, (state, detail)

    grant(disk, TAR, how)
    [(_, _, scrubbed)] = scrub(opsdb, config, [(package, "cologne")])

    assert scrubbed.passed, scrubbed
    assert hash_file(disk.root / TAR)[0] == checksum
    assert not [key for key in told(config, opsdb) if key.startswith("copy_refused:")]
    assert "copy at cologne/lta" not in _stages(config, opsdb, package)
    assert failing(opsdb) == {}
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_an_archive_directory_refused_to_ccat_dt_fails_as_the_destinations_not_a_foreign_file(
        tmp_path: Path, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        ) -> None:
    """The directory a package is archived into at Cologne was made 0700 by another user: the
    look at the final name before the transfer cannot say what is there, so the transfer goes
    ahead and fails on the permission, the destination's fault (cologne/lta marked failing,
    re-attempted; no person told of a foreign file). Before: the refused look was taken for a
    file OpsDB does not record there, the archive refused for good as a foreign file. Once the
    directory is readable, the next automatic attempt archives it."""
    config = _config(tmp_path)
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/lta")
    (disk.backing / PurePosixPath(TAR).parent).mkdir()
    refuse(disk, TAR, "directory")
    source = observe(config, opsdb)

    run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    archives = [error or "" for status, error in operations(opsdb, OperationType.ARCHIVE, package)
                if status == OperationStatus.FAILED]
    assert archives and not [e for e in archives if "does not record there" in e], archives
    assert all("Permission denied" in e or "permission denied" in e for e in archives), archives
    assert not [key for key in told(config, opsdb) if key.startswith("foreign_file:")]
    assert "cologne/lta" in failing(opsdb), failing(opsdb)
    assert [p for p in (disk.backing / PurePosixPath(TAR).parent).iterdir()] == []
    assert all(p.is_file() for p in source)

    grant(disk, TAR, "directory")
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


@pytest.mark.parametrize("where", ["over ssh", "local"])
def test_a_buffer_copy_in_a_directory_ccat_dt_cannot_enter_is_kept_told_and_purged_later(
        tmp_path: Path, faulty_disk: MountFaulty,  # noqa: F811
        request: pytest.FixtureRequest, webhook_receiver: Receiver, where: str) -> None:
    """Cologne's buffer is on an archive host (deleted over ssh), or on this machine; once the
    package is archived everywhere, the directory holding its buffer copy is made 0700 by
    another user, so ccat-dt's user cannot enter it. The purge of that copy deletes nothing and
    records nothing deleted: the file stays with its bytes (a file that cannot be looked at is
    neither gone nor another file); a person is told at once that it is a permission to grant,
    and what to do; the other copies are purged. Once the directory can be entered again, the
    next automatic purge deletes it, nobody re-running anything, and the notice is resolved.
    Before, the `rm` script's look found no file there and the copy was recorded deleted ("file
    already missing at deletion time ... treated as deleted") while the file stayed on the host
    for ever, and nobody was told; on this machine the first attempt kept it, but the step's
    retry took the path it could not look at for one emptied since ("yet the file was gone when
    a later purge looked: deleted"). Archived everywhere, the buffers kept for now: a copy
    of one deployment so driven (`driven`, "kept")."""
    sshd = None if where == "local" else request.getfixturevalue("sshd")
    with driven("kept", tmp_path, sshd, webhook_receiver) as (config, instance):
        _a_buffer_copy_in_a_directory_ccat_dt_cannot_enter(config, instance, faulty_disk,
                                                            webhook_receiver)


def _a_buffer_copy_in_a_directory_ccat_dt_cannot_enter(
        config: Config, instance: DagsterInstance, faulty_disk: MountFaulty,  # noqa: F811
        webhook_receiver: Receiver) -> None:
    opsdb = OpsDB(config.opsdb_url)
    disk = faulty_disk(config, "cologne/buffer")
    [package] = package_names(opsdb)
    kept = disk.backing / TAR
    with opsdb.session() as session:
        checksum = get_package(session, package).checksum
    assert checksum is not None and hash_file(kept)[0] == checksum
    refuse(disk, TAR, "directory")
    config = retention_in_place(config, 0)

    run(config, instance, wait_s=1)  # the purge's re-attempts due within a second

    untouched(disk, TAR, "directory", checksum)  # the storage: nothing deleted
    copies = dict(_copies(opsdb))
    assert copies["cologne/buffer"] == CopyStatus.DELETION_IN_PROGRESS, copies  # not DELETED
    assert copies["us/buffer"] == copies["ccat/buffer"] == CopyStatus.DELETED, copies
    assert failing(opsdb) == {}
    [text] = webhook_receiver.texts
    assert "deletion_denied" in text or "cannot be reached" in text, text
    assert str(disk.root / TAR) in text and "permission denied" in text, text
    assert "enter the directories on its way again" in text, text
    assert "next automatic attempt" in text and "nothing to re-run" in text, text
    state, detail = _stages(config, opsdb, package)["purge"]
    assert state == "failed" and "enter the directories on its way again" in detail, detail
    assert "next attempt at" in detail, detail

    grant(disk, TAR, "directory")  # a person lets ccat-dt's user in again
    run(config, instance)

    assert not kept.exists()
    assert dict(_copies(opsdb))["cologne/buffer"] == CopyStatus.DELETED
    archived_everywhere(config, opsdb)
    assert len(webhook_receiver.texts) == 2 and "RESOLVED" in webhook_receiver.texts[1]
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()
