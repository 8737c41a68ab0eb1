"""Storage that refuses changes while intact: a location's file system remounted read-only
(EROFS: what ext4 does after an error, or an operator's maintenance mount), a file or
directory made immutable (`chattr +i`: EPERM, even for root). The pipeline must keep every
byte and record only what happened on the disk, never take a refusal for corruption, tell a
person at once where and what to do (only a person remounts a disk), and finish by itself
once the storage takes changes again. Each location is a small tmpfs (as in
test_disk_full.py), remounted read-only and back."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select, update

from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    PackageState,
    PhysicalCopy,
    utcnow,
)
from ccat_dt.pending import scrub_due
from tests.faults.disks import MountDisk
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
from tests.faults.test_disk_full import _stages
from tests.sshd import SshServer
from tests.test_multisite import multisite

KB = 1024


def _config(tmp_path: Path, **overrides: object) -> Config:
    return deployment(tmp_path / "deploy", policies={"max_attempts": 3,
                                                     "retry_backoff_first_s": 5}, **overrides)


def _problems(config: Config, opsdb: OpsDB) -> dict[str, str]:
    with opsdb.session() as session:
        return {p.key: f"{p.subject}\n{p.detail}"
                for p in current_problems(session, config, utcnow())}


def _past_failover_horizon(opsdb: OpsDB, label: str) -> None:
    """As if the location had failed since two days ago (its failover horizon is 24 h)."""
    with opsdb.session() as session:
        location = next(loc for loc in session.scalars(select(DataLocation))
                        if loc.label == label)
        assert location.failing_since is not None, f"{label} not recorded failing"
        session.execute(update(DataLocation).where(DataLocation.id == location.id).values(
            failing_since=utcnow() - timedelta(hours=48)))


def _recorded_gone_yet_on_disk(opsdb: OpsDB) -> list[str]:
    """Copies OpsDB records DELETED whose file is still at their path (read on the disk)."""
    with opsdb.session() as session:
        return [f"{c.location.label} {c.relative_path}" for c in session.scalars(
            select(PhysicalCopy).where(PhysicalCopy.status == CopyStatus.DELETED))
            if (Path(c.location.root) / c.relative_path).exists()]


def _corrupt(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return [f"{c.location.label} {c.relative_path}" for c in session.scalars(
            select(PhysicalCopy).where(PhysicalCopy.status == CopyStatus.CORRUPT))]


@pytest.mark.parametrize(("transport", "label"), [
    ("local", "cologne/lta"), ("local", "cologne/buffer"), ("rsync", "cologne/lta")])
def test_a_read_only_archive_disk_is_told_at_once_still_read_and_heals_once_writable(
        tmp_path: Path, instance: DagsterInstance, mount_disk: MountDisk,
        request: pytest.FixtureRequest, transport: str, label: str) -> None:
    """Cologne's buffer or LTA disk turns read-only after a first package was archived: the
    next package's copy there fails once (nothing recorded there, nothing quarantined, nothing
    purged), and a person is told at once that the disk is read-only and to remount it
    (before: nobody until the re-attempt horizon, 72 h). The LTA's copies are read as ever: the
    scrub keeps re-reading them and, past the failover horizon, they are not reported as
    unreadable ("cannot be looked at ... mount the disk"), nor the site as "unreachable" (a
    read-only disk was taken for an unmounted one). Writable again, the next automatic
    attempt converges and the notice is resolved."""
    if transport == "local":
        config = _config(tmp_path)
    else:
        sshd: SshServer = request.getfixturevalue("sshd")
        config = multisite(tmp_path, sshd, max_attempts=3, retry_backoff_first_s=6)
    opsdb = OpsDB(config.opsdb_url)
    disk = mount_disk(config, label, 1024 * KB)
    observe(config, opsdb, name="obs-0")
    assert run(config, instance).failed == []
    [archived] = package_names(opsdb)
    disk.remount("ro")
    source = observe(config, opsdb, name="obs-1")

    report = run(config, instance, wait_s=0)

    [_, package] = package_names(opsdb)
    # the copy there failed; on a loaded machine its first re-attempt (6 s) came due within
    # the same drive and failed the same way: nothing else failed
    assert report.failed[0].startswith("site_copy:"), report.failed
    assert all(package in key and "cologne" in key for key in report.failed), report.failed
    assert package_state(opsdb, package) != PackageState.FAILED
    assert _corrupt(opsdb) == []
    assert all(p.is_file() for p in source)  # nothing purged
    problems = _problems(config, opsdb)
    assert f"read_only:{label}" in problems, problems  # told at once
    assert "Remount it read-write" in problems[f"read_only:{label}"]
    stage = ("site copy cologne" if label.endswith("buffer") else "LTA copy cologne")
    state, detail = _stages(config, opsdb, package)[stage]
    assert state == "failed" and "next attempt at" in detail, detail
    assert detail.startswith("destination disk read-only; "), detail
    if label.endswith("lta"):
        with opsdb.session() as session:
            due = scrub_due(session, 10**12, utcnow())
        assert (archived, "cologne") in [(d.package, d.site) for d in due]
    _past_failover_horizon(opsdb, label)
    problems = _problems(config, opsdb)
    assert f"archive_unreadable:{label}" not in problems, problems
    if label.endswith("buffer"):
        assert "read-only since" in problems["site_down:cologne"], problems
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)

    disk.remount("rw")
    report = run(config, instance)

    assert report.failed == []
    archived_everywhere(config, opsdb)
    assert not [key for key in _problems(config, opsdb) if key.startswith("read_only:")]
    assert_safe(config, opsdb)
    opsdb.dispose()


@pytest.mark.parametrize("label", ["ccat/instruments", "ccat/buffer", "cologne/buffer"])
def test_a_read_only_disk_at_purge_keeps_its_files_is_told_and_heals_once_writable(
        tmp_path: Path, instance: DagsterInstance, mount_disk: MountDisk, label: str) -> None:
    """A package archived in both LTAs, its sources and buffer copies kept by retention; then
    the source disk (or a buffer's) turns read-only and the retention ends. The purge deletes
    what it can elsewhere; every file on the read-only disk stays, none is recorded deleted or
    quarantined; a person is told at once which disk is read-only and to remount it, and the
    run's failure says so (before: only the errno, nobody told until the re-attempt horizon).
    Writable again, the purge's next automatic attempt deletes them and the notice is
    resolved."""
    config = _config(tmp_path, sites=_sites(1000.0))
    opsdb = OpsDB(config.opsdb_url)
    disk = mount_disk(config, label, 1024 * KB)
    observe(config, opsdb)
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    kept = [p for p in disk.root.rglob("*") if p.is_file() and p.name != ".ccat-dt-location"]
    assert kept
    disk.remount("ro")
    config = retention(config, 0)

    report = run(config, instance, wait_s=0)

    assert [key.split(":")[0] for key in report.failed][:1] == ["purge"], report.failed
    assert all(p.is_file() for p in kept)
    assert _recorded_gone_yet_on_disk(opsdb) == []
    assert _corrupt(opsdb) == []
    problems = _problems(config, opsdb)
    assert f"read_only:{label}" in problems, problems  # told at once
    state, detail = _stages(config, opsdb, package)["purge"]
    assert state == "failed" and "Read-only file system" in detail, detail
    assert "Remount it read-write" in detail and "next attempt at" in detail, detail
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)

    disk.remount("rw")
    report = run(config, instance)

    assert report.failed == []
    assert not any(p.exists() for p in kept)
    archived_everywhere(config, opsdb)
    assert not [key for key in _problems(config, opsdb) if key.startswith("read_only:")]
    assert_safe(config, opsdb)
    opsdb.dispose()


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Paths to `chattr +i` (refused even to root: EPERM); the flag is cleared afterwards."""
    flagged: list[Path] = []
    yield flagged
    for path in flagged:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def _chattr(flag: str, path: Path) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here (needs root and chattr): "
                    f"{done.stderr.strip()}")


@pytest.mark.parametrize("what", ["a source file", "its directory", "the observatory tar"])
def test_an_immutable_file_is_kept_by_the_purge_and_deleted_once_it_is_not(
        tmp_path: Path, instance: DagsterInstance, immutable: list[Path], what: str) -> None:
    """One file of a package (or the directory holding the sources) is made immutable during
    the retention: the purge deletes the package's other copies, keeps that one without
    recording it deleted or quarantined, and says which file the storage refused and what to
    do (before: only "[Errno 1] Operation not permitted"); the disk is not taken for
    read-only. Once the flag is cleared the purge's next automatic attempt deletes it."""
    config = _config(tmp_path, sites=_sites(1000.0))
    opsdb = OpsDB(config.opsdb_url)
    sources = observe(config, opsdb)
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    [tar] = config.resolve_root("sites/ccat/buffer").rglob(f"{package}.tar")
    flagged, refused = {"a source file": (sources[1], [sources[1]]),
                        "its directory": (sources[0].parent, sources),
                        "the observatory tar": (tar, [tar])}[what]
    _chattr("+i", flagged)
    immutable.append(flagged)
    config = retention(config, 0)

    report = run(config, instance, wait_s=0)

    assert [key.split(":")[0] for key in report.failed][:1] == ["purge"], report.failed
    assert all(p.is_file() for p in refused)
    assert not any(p.exists() for p in {*sources, tar} - set(refused))
    assert _recorded_gone_yet_on_disk(opsdb) == []
    assert _corrupt(opsdb) == []
    state, detail = _stages(config, opsdb, package)["purge"]
    assert state == "failed" and "Operation not permitted" in detail, detail
    assert str(refused[0]) in detail and "chattr -i" in detail, detail
    assert not [key for key in _problems(config, opsdb) if key.startswith("read_only:")]
    assert_safe(config, opsdb)

    subprocess.run(["chattr", "-i", str(flagged)], check=True)
    report = run(config, instance)

    assert report.failed == []
    assert not any(p.exists() for p in refused)
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    opsdb.dispose()
