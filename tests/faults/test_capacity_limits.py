"""Destinations that refuse for a capacity reason other than plain full bytes, each on a real
limit of the kernel: a file system out of inodes with bytes free (ENOSPC), a file larger than
the writer may write (EFBIG: the writing process's file-size limit, `ulimit -f`), a quota
exceeded (EDQUOT: a btrfs quota group), and a raw file larger than the ustar format holds
(8 GiB) given a header that holds its size. Each is a disk or process limit only a person lifts: the
work fails without a retry storm, nothing is left under a final name, nothing is taken for
corruption, a person is told what is true, and the next automatic attempt converges once the
limit is lifted."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.health import unhealthy
from ccat_dt.marker import write_marker
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    utcnow,
)
from ccat_dt.packages import plan_packages
from ccat_dt.tarball import (
    MANIFEST_NAME,
    PackageMember,
    _header,
    build_package,
    extract_package,
)
from tests.faults.disks import MountDisk
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    archived_everywhere,
    deployment,
    observe,
    operations,
    package_names,
    package_state,
    run,
)
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_disk_full import _parts, _stages
from tests.services import unavailable
from tests.sshd import SshServer, serve
from tests.test_multisite import multisite

KB = 1024
GIB = 1 << 30


def _problems(config: Config, opsdb: OpsDB) -> dict[str, str]:
    with opsdb.session() as session:
        return {p.key: f"{p.subject}\n{p.detail}"
                for p in current_problems(session, config, utcnow())}


def _converges(config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """Once a person lifted the limit: the next drive archives everything, nothing lost,
    nothing left to tell, the storage safe."""
    report = run(config, instance)
    assert report.failed == []
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert _problems(config, opsdb) == {}
    assert_safe(config, opsdb)


def _unhealthy(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return [location.label for location in unhealthy(session, utcnow())]


def _backoff_config(tmp_path: Path, transport: str, request: pytest.FixtureRequest) -> Config:
    if transport == "local":
        return deployment(tmp_path / "deploy", policies={"max_attempts": 3,
                                                         "retry_backoff_first_s": 5})
    sshd: SshServer = request.getfixturevalue("sshd")
    return multisite(tmp_path, sshd, max_attempts=3, retry_backoff_first_s=6)


def _refused_once_then_converges(config: Config, opsdb: OpsDB, instance: DagsterInstance,
                                 root: Path, kind: str) -> tuple[str, str]:
    """The first drive: the site copy and its archiving into cologne's LTA (at `root`) run,
    the archiving is refused once (not retried within the run), nothing is recorded or left
    there, nothing is quarantined or purged. Returns `why`'s line for the LTA copy and the
    notification of `kind` about cologne/lta."""
    report = run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    assert [key.split(":")[0] for key in report.failed] == ["site_copy"], report.failed
    assert package_state(opsdb, package) != PackageState.FAILED
    tried = operations(opsdb, OperationType.ARCHIVE, package)
    assert [s for s, _ in tried] == [OperationStatus.FAILED], tried  # no retry storm
    with opsdb.session() as session:
        copies = [(c.location.label, c.status) for c in session.scalars(select(PackageCopy))]
    assert "cologne/lta" not in [label for label, _ in copies], copies
    assert not [c for c in copies if c[1] == CopyStatus.CORRUPT], copies  # not a bit flip
    assert _parts(root) == [] and not list(root.rglob("*.tar"))
    state, detail = _stages(config, opsdb, package)["LTA copy cologne"]
    assert state == "failed" and "next attempt at" in detail, detail
    assert str(root) in detail, detail
    told = _problems(config, opsdb)
    assert list(told) == [f"{kind}:cologne/lta"], told  # at once; nothing else (unreadable...)
    assert lost_filed_files(config, opsdb) == []
    return detail, told[f"{kind}:cologne/lta"]


# -- 1. no inode left, bytes free (ENOSPC) -----------------------------------------------------

@pytest.mark.parametrize("transport", ["local", "rsync"])
def test_an_archive_out_of_inodes_with_bytes_free_is_told_so_and_heals_once_files_go(
        tmp_path: Path, instance: DagsterInstance, mount_disk: MountDisk,
        request: pytest.FixtureRequest, transport: str) -> None:
    """Cologne's LTA has 4 MB free but no inode left (another program's many small files
    took them): the kernel refuses to create the copy's temporary file (ENOSPC). Told as a
    full disk (not retried within the run, not a corrupt copy, not an unreadable archive),
    and truly: `why` and the notification say no inode is left although bytes are free, not
    just "disk full". Once a person deletes those small files, the next automatic attempt
    converges (nothing enlarged)."""
    config = _backoff_config(tmp_path, transport, request)
    opsdb = OpsDB(config.opsdb_url)
    disk = mount_disk(config, "cologne/lta", 4096 * KB, nr_inodes="64")
    small = disk.root / "small"
    small.mkdir()
    made: list[str] = []
    with pytest.raises(OSError, match="No space left"):
        for i in range(64):
            (small / str(i)).touch()
            made.append(f"/small/{i}")
    assert os.statvfs(disk.root).f_favail == 0
    assert shutil.disk_usage(disk.root).free > 3 * KB * KB
    source = observe(config, opsdb)

    detail, notice = _refused_once_then_converges(config, opsdb, instance, disk.root,
                                                  "disk_full")

    assert "destination disk full" in detail and "no inode left" in detail, detail
    assert "no inode left" in notice and "df -i" in notice, notice
    assert all(p.is_file() for p in source)
    assert_safe(config, opsdb, expected_findings=[("dark", name) for name in made])

    shutil.rmtree(small)  # a person deletes the small files
    _converges(config, opsdb, instance)
    opsdb.dispose()


# -- 2. a file larger than the writer may write (EFBIG) ---------------------------------------

# A local copy made by a process whose file-size limit (RLIMIT_FSIZE, `ulimit -f`) is below the
# package's size: CPython ignores SIGXFSZ, so its write fails with EFBIG instead of the signal
# killing it. Prints the outcome as JSON.
_LIMITED_COPY = """
import json, resource, sys
from pathlib import PurePosixPath
from ccat_dt.transports.base import Endpoint, TransferError
from ccat_dt.transports.local import LocalTransport
source, destination, checksum, limit = sys.argv[1:5]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
try:
    done = LocalTransport().copy(Endpoint(PurePosixPath(source)),
                                 Endpoint(PurePosixPath(destination)), checksum)
    print(json.dumps({"checksum": done.checksum}))
except TransferError as exc:
    print(json.dumps({"error": str(exc), "retryable": exc.retryable}))
"""


def test_a_local_copy_larger_than_the_writer_may_write_fails_once_and_leaves_nothing(
        tmp_path: Path) -> None:
    """The writing process may write files of 64 KB at most; the package is 200 KB: the
    kernel refuses the write past the limit (EFBIG). The copy fails as not worth retrying
    (the same limit refuses it again at once), its temporary file is removed, nothing is
    left under the final name, and the source is untouched."""
    source = tmp_path / "src" / "pkg.tar"
    source.parent.mkdir()
    source.write_bytes(os.urandom(200 * KB))
    checksum = hash_file(source)[0]
    destination = tmp_path / "lta" / "obs-0" / "pkg.tar"

    done = subprocess.run([sys.executable, "-c", _LIMITED_COPY, str(source), str(destination),
                           checksum, str(64 * KB)], capture_output=True, text=True,
                          cwd=REPO, check=False)

    assert done.returncode == 0, done.stderr  # not killed by SIGXFSZ
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert "File too large" in outcome["error"], outcome
    assert outcome["retryable"] is False, outcome  # no retry storm within the run
    assert [p.name for p in (tmp_path / "lta").rglob("*") if p.is_file()] == []
    assert hash_file(source) == (checksum, 200 * KB)


# Packaging by a process whose file-size limit is below the tar's size: OpsDB (SQLite, ~300 KB)
# stays below it. Prints the outcome as JSON.
_LIMITED_BUILD = """
import json, resource, sys
from ccat_dt.config import load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.packages import PackageBuildFailed, build
config = load_config(sys.argv[1])
opsdb = OpsDB(config.opsdb_url)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    build(opsdb, config, sys.argv[2])
    print(json.dumps({"built": True}))
except PackageBuildFailed as exc:  # failed once, for good in this run, not quarantined
    print(json.dumps({"error": str(exc), "permanent": True}))
except OSError as exc:  # retried within the run
    print(json.dumps({"error": str(exc), "permanent": False}))
"""


def test_a_tar_larger_than_the_packaging_may_write_fails_once_and_leaves_nothing(
        tmp_path: Path) -> None:
    """The packaging runs under a 1 MiB file-size limit; the tar would be ~1.8 MB: the write
    past the limit fails (EFBIG). The build fails for this run (not retried within it: the
    same limit refuses it at once), nothing of the tar is left at the observatory buffer, the
    package is not quarantined, the buffer is not marked failing, the raw files stay; `why`
    says the destination takes no file this big."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb, size=600_000)
    with opsdb.session() as session:
        [package] = [p.name for p in plan_packages(session, config)]

    done = subprocess.run([sys.executable, "-c", _LIMITED_BUILD, str(config.path), package,
                           str(KB * KB)], capture_output=True, text=True, cwd=REPO,
                          check=False)

    assert done.returncode == 0, done.stderr  # not killed by SIGXFSZ
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert "File too large" in outcome["error"] and outcome["permanent"], outcome
    buffer = Path(config.location_root(config.location("ccat", "buffer")))
    assert [p.name for p in buffer.rglob("*") if p.is_file()] == [".ccat-dt-location"]
    assert package_state(opsdb, package) != PackageState.FAILED
    assert _unhealthy(opsdb) == []
    state, detail = _stages(config, opsdb, package)["packaging"]
    assert state == "failed" and "takes no file this big" in detail, detail
    assert all(p.is_file() for p in source)
    opsdb.dispose()


@pytest.fixture
def size_limited_sshd(tmp_path: Path) -> Iterator[tuple[SshServer, Path]]:
    """An sshd whose sessions run with a file-size limit (`prlimit --fsize`, bytes, as an
    fsize line in limits.conf gives a login), read from the returned file at each login:
    rsync's receiver there cannot write a file larger. Write "unlimited" to lift it."""
    if shutil.which("prlimit") is None:
        unavailable("prlimit", "util-linux's prlimit is not installed")
    limit = tmp_path / "fsize"
    limit.write_text("unlimited\n")
    force = (f'ForceCommand exec prlimit --fsize="$(cat {limit})" -- "${{SHELL:-/bin/sh}}" -c '
             '"$SSH_ORIGINAL_COMMAND"')
    with serve(tmp_path / "sshd", [force]) as server:
        yield server, limit


def test_an_archive_host_that_takes_no_file_this_big_is_told_and_heals_once_lifted(
        tmp_path: Path, instance: DagsterInstance,
        size_limited_sshd: tuple[SshServer, Path]) -> None:
    """The archive host lets ccat-dt's user write files of 64 KB at most (its login's
    file-size limit); the package is ~125 KB. rsync's receiver there gets EFBIG: the copy
    fails once, not retried within the run, its partial file removed (it can never be
    completed) and nothing under the final name; no copy recorded, nothing purged at the
    source, the package not taken for corrupt; the location is not passed over for it (it
    takes smaller files); `why` and a notification say at once that the destination takes no
    file this big. Once the limit is lifted, the next automatic attempt converges."""
    sshd, limit = size_limited_sshd
    limit.write_text(f"{64 * KB}\n")
    config = multisite(tmp_path, sshd, max_attempts=3, retry_backoff_first_s=6)
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb)
    buffer_root = Path(config.location_root(config.location("cologne", "buffer")))

    report = run(config, instance, wait_s=0)

    [package] = package_names(opsdb)
    assert [key.split(":")[0] for key in report.failed] == ["site_copy"], report.failed
    assert package_state(opsdb, package) != PackageState.FAILED
    tried = operations(opsdb, OperationType.TRANSFER, package)
    assert [s for s, _ in tried] == [OperationStatus.FAILED], tried  # not retried in the run
    assert "File too large" in (tried[0][1] or ""), tried
    with opsdb.session() as session:
        copies = [(c.location.label, c.status) for c in session.scalars(select(PackageCopy))]
    assert [label for label, _ in copies] == ["ccat/buffer"], copies
    assert not [c for c in copies if c[1] == CopyStatus.CORRUPT]
    assert _parts(buffer_root) == [] and not list(buffer_root.rglob("*.tar"))
    state, detail = _stages(config, opsdb, package)["site copy cologne"]
    assert state == "failed" and "next attempt at" in detail, detail
    assert "takes no file this big" in detail, detail
    assert "cologne/buffer" not in _unhealthy(opsdb)
    told = _problems(config, opsdb)
    assert [key for key in told if not key.startswith("too_large:")] == [], told
    [notice] = told.values()
    assert package in notice and "File too large" in notice and "fsize" in notice, notice
    assert all(p.is_file() for p in source)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)

    limit.write_text("unlimited\n")  # a person lifts the limit
    _converges(config, opsdb, instance)
    opsdb.dispose()


# -- 3. a quota exceeded while the disk has room (EDQUOT) --------------------------------------

class QuotaDisk:
    """A btrfs file system (128 MiB, on a loop device) mounted at a location root, whose
    quota group limits what is stored there: past it, writes fail with EDQUOT, for root too
    (a user quota on ext4 or tmpfs spares root; this kernel has no ext4 quota format either)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def limit(self, limit: str) -> None:
        """`limit`: "1M", or "none" to lift it."""
        subprocess.run(["btrfs", "qgroup", "limit", limit, str(self.root)], check=True,
                       capture_output=True)


@pytest.fixture
def quota_disk(tmp_path: Path) -> Iterator[Callable[[Config, str, str], QuotaDisk]]:
    """quota_disk(config, "site/location", "1M") -> QuotaDisk, marked as that location's
    disk; unmounted (and its loop device freed) afterwards."""
    missing = [tool for tool in ("mkfs.btrfs", "btrfs") if shutil.which(tool) is None]
    if missing:
        unavailable("btrfs", f"missing {', '.join(missing)}: run `make test-deps` "
                    "(scripts/setup-test-host installs btrfs-progs)")
    mounted: list[Path] = []

    def mount(config: Config, label: str, limit: str) -> QuotaDisk:
        site, name = label.split("/")
        root = Path(config.location_root(config.location(site, name)))
        root.mkdir(parents=True, exist_ok=True)
        image = tmp_path / f"{site}-{name}.btrfs"
        with open(image, "wb") as out:
            out.truncate(128 * KB * KB)
        for argv in (["mkfs.btrfs", "-q", "-f", str(image)],
                     ["mount", "-o", "loop", str(image), str(root)]):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                unavailable("a btrfs disk", f"{argv[0]}: {done.stderr.strip()} (needs root)")
            if argv[0] == "mount":
                mounted.append(root)
        subprocess.run(["btrfs", "quota", "enable", str(root)], check=True, capture_output=True)
        write_marker(root, label)
        disk = QuotaDisk(root)
        disk.limit(limit)
        return disk

    yield mount
    for root in reversed(mounted):
        subprocess.run(["umount", str(root)], capture_output=True)  # the loop device goes too


@pytest.mark.parametrize("transport", ["local", "rsync"])
def test_an_archive_over_its_quota_is_told_so_and_heals_once_the_quota_is_raised(
        tmp_path: Path, instance: DagsterInstance, request: pytest.FixtureRequest,
        quota_disk: Callable[[Config, str, str], QuotaDisk], transport: str) -> None:
    """Cologne's LTA has 1 MiB of quota left on a disk with ~50 MB free; the package is
    ~1.8 MB: its copy fails with EDQUOT half way. Told as a refused write (not retried
    within the run, not a corrupt copy, not an unreadable archive, nothing left there, its
    partial file removed) and truly: `why` and the notification say the quota, not a full
    disk, and to raise it. Once it is raised, the next automatic attempt converges."""
    config = _backoff_config(tmp_path, transport, request)
    opsdb = OpsDB(config.opsdb_url)
    disk = quota_disk(config, "cologne/lta", "1M")
    assert shutil.disk_usage(disk.root).free > 20 * KB * KB
    source = observe(config, opsdb, size=600_000)

    detail, notice = _refused_once_then_converges(config, opsdb, instance, disk.root,
                                                  "over_quota")

    assert "Disk quota exceeded" in detail and "over its quota" in detail, detail
    assert "over its quota since" in notice and "raise the quota" in notice, notice
    assert "full" not in notice.split("\n")[0], notice
    assert all(p.is_file() for p in source)
    assert_safe(config, opsdb)

    disk.limit("none")  # a person raises the quota
    _converges(config, opsdb, instance)
    opsdb.dispose()


# -- 4. members the ustar format cannot hold --------------------------------------------------

USTAR_MAX_SIZE = 8**11 - 1  # 11 octal digits: 8 GiB - 1 byte


def test_a_raw_file_over_8_gib_gets_a_header_that_holds_its_size() -> None:
    """A member larger than ustar's 11 octal digits (8 GiB - 1 byte) is written with a pax size
    record, read back with its size. Only the header: packaging 9 GiB for real writes 18 GiB
    and takes minutes (done by hand: GNU tar lists it, the unpacking is byte-exact)."""
    big = 9 * GIB
    header = _header("obs-0/primecam/f280/huge.dat", big, 0)

    with tarfile.open(fileobj=io.BytesIO(header)) as tar:
        member = tar.next()

    assert member is not None and member.size == big > USTAR_MAX_SIZE
    assert member.pax_headers["size"] == str(big)


def test_a_long_name_is_packaged_and_unpacked_byte_exact(tmp_path: Path) -> None:
    """A file whose path is longer than ustar's 100-byte name field is written with a pax path
    record, listed by GNU tar with its name and size, and unpacked byte for byte by what
    staging unpacks with."""
    source, tar_path, unpacked = tmp_path / "src", tmp_path / "pkg.tar", tmp_path / "staged"
    long_name = f"obs-0/primecam/f280/{'d' * 90}/{'n' * 120}.dat"
    assert len(long_name.encode()) > 100
    (source / long_name).parent.mkdir(parents=True)
    (source / long_name).write_bytes(os.urandom(5000))
    members = [PackageMember(source / long_name, long_name, 5000,
                             hash_file(source / long_name)[0])]

    build_package(members, tar_path, package_name="pkg")

    with tarfile.open(tar_path) as tar:
        found = {m.name: m for m in tar.getmembers()}
    assert set(found) == {long_name, MANIFEST_NAME}
    assert found[long_name].pax_headers["path"] == long_name
    listing = subprocess.run(["tar", "-tvf", str(tar_path)], capture_output=True, text=True,
                             check=False)
    assert (listing.returncode, listing.stderr) == (0, "")
    assert {line.split()[-1]: int(line.split()[2])
            for line in listing.stdout.splitlines()}[long_name] == 5000
    manifest = extract_package(tar_path, unpacked)
    assert [(e.path, e.size, e.checksum) for e in manifest] == [
        (long_name, 5000, members[0].checksum)]
    assert hash_file(unpacked / long_name) == (members[0].checksum, 5000)
