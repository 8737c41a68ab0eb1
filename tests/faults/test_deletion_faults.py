"""Deletion rests on what is on the storage now (issue 12): the record and the storage drift
apart during the sources' retention, then the purge runs. Each test drives the real pipeline,
then reads the storage: every filed byte is still in a good copy somewhere."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml
from dagster import DagsterInstance, RunRequest
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, healed_runs, launch
from ccat_dt import reaper
from ccat_dt.config import Config, ConfigError, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT
from ccat_dt.diagnosis import diagnose
from ccat_dt.marker import MARKER, MARKER_TEXT
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataFileCopy,
    utcnow,
)
from ccat_dt.reaper import certificate_problems
from ccat_dt.replicas import check_stage
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    deployment,
    observe,
    package_names,
    package_state,
    run,
    source_root,
)
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import flip_byte, run_cli
from tests.sshd import SshServer
from tests.test_multisite import multisite

KEEP = 1000.0  # hours: the sources and buffers outlive the first drive


def _sites(hours: float) -> list[dict[str, Any]]:
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    for site in sites:
        for location in site["locations"]:
            if location["type"] in ("source", "buffer"):
                location["retention_hours"] = hours
    return sites


def retention(config: Config, hours: float) -> Config:
    """The same deployment with another retention for sources and buffers (an operator's
    edit of the YAML): the purge of the next drive may then delete."""
    settings = yaml.safe_load(config.path.read_text())
    settings["sites"] = _sites(hours)
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


@pytest.fixture
def kept(tmp_path: Path) -> Config:
    """A deployment whose sources and buffers are kept through the first drive."""
    return deployment(tmp_path / "kept", sites=_sites(KEEP))


def lta_tar(config: Config, site: str, package: str) -> Path:
    [tar] = config.resolve_root(f"sites/{site}/lta").rglob(f"{package}.tar")
    return tar


def archived_with_sources(config: Config, instance: DagsterInstance) -> tuple[OpsDB, str,
                                                                             list[Path]]:
    opsdb = OpsDB(config.opsdb_url)
    files = observe(config, opsdb)
    run(config, instance)
    [package] = package_names(opsdb)
    assert package_state(opsdb, package) == PackageState.ARCHIVED
    assert all(p.is_file() for p in files)  # retention keeps them
    return opsdb, package, files


def flip_middle_byte(path: Path) -> None:
    flip_byte(path, path.stat().st_size // 2)


def deletion_certificates(opsdb: OpsDB) -> list[dict[str, Any]]:
    with opsdb.session() as session:
        return [op.evidence for op in session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION)) if op.evidence
            and "copies" in op.evidence]


@pytest.mark.parametrize("fault", ["removed", "corrupted"])
def test_one_lta_copy_gone_during_retention_is_restored_before_sources_go(
        kept: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str],
        fault: str) -> None:
    opsdb, package, files = archived_with_sources(kept, instance)
    tar = lta_tar(kept, "us", package)
    tar.unlink() if fault == "removed" else flip_middle_byte(tar)

    config = retention(kept, 0)
    if fault == "removed":  # the plan already says what the purge's look will find
        capsys.readouterr()
        assert run_cli("--config", str(config.path), "purge", "--plan") == 0
        plan = capsys.readouterr().out
        assert f"keep   {package}" in plan and "storage re-check: us/lta" in plan
        assert "missing" in plan
    run(config, instance)

    assert lost_filed_files(config, opsdb) == []
    # The purge re-checked the storage, found the copy bad, kept everything until the repair
    # sensor restored it from Cologne; only then did the sources go, under a fresh look.
    with opsdb.session() as session:
        failed = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.VERIFICATION,
            Operation.reason == "re-check before a deletion")).all()
        assert len(failed) == 1 and failed[0].error
    archived_everywhere(config, opsdb)
    assert not any(p.exists() for p in files)
    for certificate in deletion_certificates(opsdb):
        assert len(certificate["copies"]) == 2 or certificate["required"] == 1
        assert all(c["regular_file"] and c["checked_at"] for c in certificate["copies"])
    assert certificate_problems(opsdb, config, package) == []


@pytest.mark.parametrize("fault", ["removed", "corrupted"])
def test_both_lta_copies_gone_are_archived_again_from_the_buffers_before_sources_go(
        kept: Config, instance: DagsterInstance, fault: str) -> None:
    """Both archives lost the package during the sources' retention, each site's buffer copy
    still verified: the purge's look finds both LTA copies bad and deletes nothing; each site
    archives again from its own buffer; only then, under a fresh look at the new copies, do
    the sources and buffers go."""
    opsdb, package, files = archived_with_sources(kept, instance)
    for site in ("cologne", "us"):
        tar = lta_tar(kept, site, package)
        tar.unlink() if fault == "removed" else flip_middle_byte(tar)

    config = retention(kept, 0)
    run(config, instance)

    assert lost_filed_files(config, opsdb) == []
    archived_everywhere(config, opsdb)  # the storage: both LTA tars hash to the package
    with opsdb.session() as session:
        bad = {c.id for c in session.scalars(select(PackageCopy).where(
            PackageCopy.status != CopyStatus.PRESENT)) if c.location.location_type
            == LocationType.LONG_TERM_ARCHIVE}
        rearchived = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.ARCHIVE, Operation.id > 5)).all()
        label = {loc.id: loc.label for loc in session.scalars(select(DataLocation))}
        assert sorted((label[o.source_location_id or 0], label[o.destination_location_id or 0])
                      for o in rearchived) == [("cologne/buffer", "cologne/lta"),
                                               ("us/buffer", "us/lta")]
    assert len(bad) == 2
    for certificate in deletion_certificates(opsdb):  # never the copies found bad
        assert not {c["copy_id"] for c in certificate["copies"]} & bad
    assert not any(p.exists() for p in files)
    assert certificate_problems(opsdb, config, package) == []


@pytest.mark.parametrize("rewrite", ["same size", "other size"])
def test_source_rewritten_after_archiving_is_kept(kept: Config, instance: DagsterInstance,
                                                 rewrite: str) -> None:
    """An instrument rewrote a source file after its package was archived: the new bytes are
    in no archive, so the file is kept (the others go) and a person is told. Once the person
    puts the filed bytes back, or takes the file away, `purge --package` decides it afresh and
    the notice is resolved."""
    opsdb, package, files = archived_with_sources(kept, instance)
    victim = files[1]
    filed = victim.read_bytes()
    new = os.urandom(victim.stat().st_size + (0 if rewrite == "same size" else 7))
    victim.write_bytes(new)  # an instrument rewrote it: these bytes were never archived

    config = retention(kept, 0)
    run(config, instance)

    assert victim.read_bytes() == new
    assert lost_filed_files(config, opsdb) == []
    with opsdb.session() as session:
        copies = session.scalars(select(RawDataFileCopy)).all()
        [changed] = [c for c in copies if c.relative_path.endswith(victim.name)]
        assert changed.status == CopyStatus.CORRUPT
        reasons = " ".join(d.detail for d in diagnose(session, config, package, utcnow()))
    assert "changed since it was recorded" in " ".join(
        op[1] or "" for op in _deletions(opsdb))
    assert "changed at its source since filing" in reasons
    # Only the rewritten file is kept: the others' filed bytes are in both archives.
    assert [p for p in files if p.exists()] == [victim]
    with opsdb.session() as session:
        [told] = [p for p in current_problems(session, config, utcnow())
                  if p.kind == "source_changed"]
    assert str(victim) in told.subject and f"purge --package {package}" in told.detail

    assert run_cli("--config", str(config.path), "purge", "--package", package) == 0
    assert victim.read_bytes() == new  # a person has not acted yet: still kept

    if rewrite == "same size":
        victim.write_bytes(filed)  # the person put the filed bytes back
    else:
        victim.rename(victim.with_name("rewritten-by-instrument.dat"))  # kept elsewhere
    assert run_cli("--config", str(config.path), "purge", "--package", package) == 0

    assert not victim.exists()
    assert victim.with_name("rewritten-by-instrument.dat").exists() == (rewrite != "same size")
    with opsdb.session() as session:
        assert [p for p in current_problems(session, config, utcnow())
                if p.kind == "source_changed"] == []
    assert certificate_problems(opsdb, config, package) == []
    assert lost_filed_files(config, opsdb) == []


def test_an_audit_repair_while_purge_package_records_a_source_taken_away_marks_nothing(
        kept: Config, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """The person took the rewritten source away and runs `purge --package`, which finds its
    path empty and puts the copy back to PRESENT to decide it afresh (its deletion recorded
    under a certificate); `ccat-dt audit --repair` (an operator's loop) runs at that moment.
    Before, the audit took the empty path for a lost copy and marked it CORRUPT, and the purge
    kept it again as "changed at its source since filing", the person told once more to act
    on a file already gone. Now the audit leaves it to the purge: nothing lost, nothing
    marked, and the deletion is recorded."""
    from tests.faults.test_actions_meanwhile import cli

    opsdb, package, files = archived_with_sources(kept, instance)
    victim = files[1]
    victim.write_bytes(os.urandom(victim.stat().st_size + 7))  # rewritten by an instrument
    config = retention(kept, 0)
    run(config, instance)
    moved = victim.with_name("rewritten-by-instrument.dat")
    victim.rename(moved)  # taken away by a person (kept beside it: unknown to OpsDB)
    real = reaper._look_again_at_changed_sources
    audits: list[Any] = []

    def then_audit(*args: Any, **kwargs: Any) -> set[int]:
        back = real(*args, **kwargs)
        audits.append(cli(config, "audit", "--repair"))  # at the moment it was put back
        return back

    monkeypatch.setattr(reaper, "_look_again_at_changed_sources", then_audit)
    assert run_cli("--config", str(config.path), "purge", "--package", package) == 0
    monkeypatch.undo()

    [audited] = audits
    findings = [line.split()[0] for line in audited.stdout.splitlines()
                if line and not line[0].isspace() and "copies checked" not in line]
    assert findings == ["dark"], audited.stdout  # the moved file, only reported
    assert "0 repaired" in audited.stdout, audited.stdout
    assert not victim.exists()  # the storage
    with opsdb.session() as session:
        [copy] = [c for c in session.scalars(select(RawDataFileCopy))
                  if c.relative_path.endswith(victim.name)]
        assert copy.status == CopyStatus.DELETED
        assert [p for p in current_problems(session, config, utcnow())
                if p.kind == "source_changed"] == []
    assert certificate_problems(opsdb, config, package) == []
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb, expected_findings=[("dark", moved.name)])


def _deletions(opsdb: OpsDB) -> list[tuple[str, str | None]]:
    with opsdb.session() as session:
        return [(op.status.value, op.error) for op in session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION))]


def test_directory_symlink_in_the_source_never_deletes_another_observations_file(
        kept: Config, instance: DagsterInstance) -> None:
    opsdb, package, files = archived_with_sources(kept, instance)
    # obs-1 is still being observed (open, not archived): its file must survive.
    other = source_root(kept) / "obs-1" / "primecam" / "f280"
    other.mkdir(parents=True)
    theirs = other / files[0].name
    theirs.write_bytes(b"obs-1's only copy")
    observed = source_root(kept) / "obs-0"
    shutil.rmtree(observed)
    observed.symlink_to(source_root(kept) / "obs-1")  # obs-0's tree now points at obs-1's

    config = retention(kept, 0)
    run(config, instance)

    assert theirs.read_bytes() == b"obs-1's only copy"
    assert lost_filed_files(config, opsdb) == []  # obs-0's bytes are in both archives
    errors = " ".join(error or "" for _, error in _deletions(opsdb))
    assert "passes through a symlink" in errors


def test_two_archive_locations_on_one_directory_are_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    sites = _sites(0)
    for site in sites:
        if site["short_name"] == "us":
            [lta] = [loc for loc in site["locations"] if loc["type"] == "long_term_archive"]
            lta["root"] = "alias-of-cologne-lta"
    config = deployment(tmp_path / "one", sites=_sites(0))
    (config.directory / "alias-of-cologne-lta").symlink_to(
        config.resolve_root("sites/cologne/lta"))
    settings = yaml.safe_load(config.path.read_text())
    settings["sites"] = sites
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(ConfigError, match="cologne/lta and us/lta are on the same directory"):
        load_config(config.path)
    assert run_cli("--config", str(config.path), "status") == 2
    assert "one disk would count as two copies" in capsys.readouterr().err


@pytest.mark.parametrize("markers", ["naming their location", "from before they did"])
def test_an_archive_root_swapped_for_the_other_archive_after_loading_deletes_nothing(
        kept: Config, instance: DagsterInstance, markers: str) -> None:
    """The configuration was checked when it was loaded; then, during a long drive, Cologne's
    archive root becomes a symlink to the US archive (a wrong mount, a disk swap). Each LTA
    copy still hashes right, but Cologne's root now holds the US archive's marker: its copy
    is not counted, and nothing that needs two archive copies (the sources, the observatory
    tar) or Cologne's own (its buffer copy) is deleted; the purge says why. Only the US
    buffer copy, which relies on the US archive copy alone, may go. With markers that do not
    name their location (written before they did), the two LTA copies are one file on the
    storage: neither counts, and nothing of the package is deleted."""
    opsdb, package, files = archived_with_sources(kept, instance)
    config = retention(kept, 0)  # loaded (and checked) before the swap, as a drive holds it
    cologne, us = config.resolve_root("sites/cologne/lta"), config.resolve_root("sites/us/lta")
    if markers == "from before they did":
        for root in (cologne, us):
            (root / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    cologne.rename(cologne.with_name("lta.away"))
    cologne.symlink_to(us)
    held = {p: p.read_bytes() for p in files + [
        *config.resolve_root("sites/cologne/buffer").rglob("*.tar"),
        *config.resolve_root("sites/ccat/buffer").rglob("*.tar")]}

    report = reaper.purge_package(opsdb, config, package, now=utcnow())

    assert {p: p.read_bytes() for p in held} == held  # the storage: every such copy there
    why = ("holds the marker of location us/lta" if markers == "naming their location"
           else "the same file on the storage as")
    assert any(why in f for f in report.failures), report.failures
    if markers == "from before they did":
        assert report.deleted == 0 and deletion_certificates(opsdb) == []
    for certificate in deletion_certificates(opsdb):  # none relies on Cologne's
        assert [c["location"] for c in certificate["copies"]] == ["lta"]
        assert [c["site"] for c in certificate["copies"]] == ["us"]


def test_an_unmounted_archive_root_is_never_written_to(kept: Config,
                                                       instance: DagsterInstance) -> None:
    """The archive disk is not mounted: its mount point is an empty directory without the
    marker `ccat-dt init` wrote. Nothing is archived there and no source is purged."""
    mount_point = kept.resolve_root("sites/us/lta")
    shutil.rmtree(mount_point)
    mount_point.mkdir()
    config = retention(kept, 0)
    opsdb = OpsDB(config.opsdb_url)
    files = observe(config, opsdb)

    run(config, instance)

    assert list(mount_point.iterdir()) == []
    assert all(p.is_file() for p in files)
    assert lost_filed_files(config, opsdb) == []
    [package] = package_names(opsdb)
    with opsdb.session() as session:
        stages = {s.stage: s for s in diagnose(session, config, package, utcnow())}
        location = session.scalar(select(DataLocation).where(DataLocation.root == str(
            mount_point)))
        assert location is not None and location.location_type == LocationType.LONG_TERM_ARCHIVE
    assert "marker" in stages["LTA copy us"].detail


def test_sources_purged_then_both_archives_bad_is_loud(tmp_path: Path,
                                                       instance: DagsterInstance,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    config = deployment(tmp_path / "lost", sites=_sites(0))
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    run(config, instance)
    [package] = package_names(opsdb)
    archived_everywhere(config, opsdb)
    for site in ("cologne", "us"):
        flip_middle_byte(lta_tar(config, site, package))
    capsys.readouterr()

    assert run_cli("--config", str(config.path), "audit", "--checksums", "--repair") == 1

    assert package_state(opsdb, package) == PackageState.LOST
    out = capsys.readouterr().out
    assert f"LOST: {package}: DATA LOST" in out
    assert run_cli("--config", str(config.path), "status") == 0
    assert capsys.readouterr().out.lstrip().startswith(f"LOST: {package}")
    assert run_cli("--config", str(config.path), "why", package) == 0
    assert "DATA LOST" in capsys.readouterr().out
    assert run_cli("--config", str(config.path), "drive") == 1
    with opsdb.session() as session:  # a person is told (the notification sensor sends these)
        [told] = [p for p in current_problems(session, config, utcnow()) if p.kind == "lost"]
    assert told.key == f"lost:{package}" and "DATA LOST" in told.detail


def retention_in_place(config: Config, hours: float) -> Config:
    """`retention` for a deployment whose sites are not the embedded default's (hosts, roots
    edited): the YAML's own sites, their sources and buffers kept `hours`."""
    settings = yaml.safe_load(config.path.read_text())
    for site in settings["sites"]:
        for location in site["locations"]:
            if location["type"] in ("source", "buffer"):
                location["retention_hours"] = hours
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


def test_a_remote_buffer_file_replaced_by_other_bytes_of_its_size_is_never_deleted(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance) -> None:
    """A buffer copy on an archive host (deleted over ssh) whose file now holds other bytes
    of the recorded size: those bytes are in no archive, so the purge refuses to delete them
    and tells a person; the other buffer copy goes."""
    config = retention_in_place(multisite(tmp_path, sshd), KEEP)
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=2, size=100_000)
        run(config, instance)
        with opsdb.session() as session:
            remote = {c.location.label: Path(c.location.root) / c.relative_path
                      for c in session.scalars(select(PackageCopy))
                      if c.location.location_type == LocationType.BUFFER and c.location.host}
        assert sorted(remote) == ["cologne/buffer", "us/buffer"]
        with opsdb.session() as session:  # each identity recorded as its transfer verified it
            identities = {c.location.label: (c.inode, c.mtime_ns)
                          for c in session.scalars(select(PackageCopy)) if c.location.host}
        for label, path in remote.items():
            assert identities[label] == (path.stat().st_ino, path.stat().st_mtime_ns), label
        replaced = remote["cologne/buffer"]
        foreign = os.urandom(replaced.stat().st_size)
        replaced.write_bytes(foreign)  # someone else's bytes at our path, same size

        config = retention_in_place(config, 0)
        report = run(config, instance, wait_s=0)

        assert replaced.read_bytes() == foreign  # the storage: never deleted
        assert not remote["us/buffer"].exists()
        # a refusal is decided, not transient: its run fails, not retried within it (a retry
        # would end green, the refusal left to the notification alone)
        assert [key.split(":")[0] for key in report.failed] == ["purge"], report
        # nor "healed" by a purge that succeeds after it (an operator's Materialize: the
        # refused copy waits for a person): `drive` exits 1 for it
        [package] = package_names(opsdb)
        launch(build_definitions(config), instance, RunRequest(
            partition_key=package, job_name="purge_job"), origin="the UI", report=DriveReport())
        assert healed_runs(instance, report) == [], report
        with opsdb.session() as session:
            statuses = {c.location.label: c.status for c in session.scalars(select(PackageCopy))
                        if c.location.location_type == LocationType.BUFFER}
            told = [p.kind for p in current_problems(session, config, utcnow())]
        assert statuses["cologne/buffer"] == CopyStatus.DELETION_FAILED
        assert "deletion_refused" in told
        # what its check shows in the UI (a Materialize of that copy): the refusal, not "no copy"
        shown = check_stage(opsdb, config, package, "cologne", LocationType.BUFFER)
        assert not shown.passed, shown
        assert shown.description.startswith("deletion refused at cologne buffer"), shown
        assert str(replaced) in shown.description
        assert lost_filed_files(config, opsdb) == []
    finally:
        opsdb.dispose()


def _buffer_file(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A marked location root and the path of a buffer copy's file under it (not written)."""
    root = tmp_path / name
    (root / "obs").mkdir(parents=True)
    (root / MARKER).write_text("")
    return root, root / "obs" / "pkg.tar"


def _claim_of(root: Path, path: Path, data: bytes, host: str | None, *,
              inode: int | None = None, mtime_ns: int | None = None) -> reaper._Claim:
    """The deletion of the buffer copy at `path` recorded as holding `data`."""
    return reaper._Claim(
        copy_id=0, operation_id=0, path=path, root=root,
        relative_path=str(path.relative_to(root)), prune_dirs=False, host=host,
        size=len(data), checksum=xxhash.xxh3_128(data).hexdigest(), inode=inode,
        mtime_ns=mtime_ns, source=False, rehash=False)


def test_a_remote_file_with_its_recorded_identity_is_deleted_unread_any_other_hashed_first(
        tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote buffer copy is 50 GB read again if its deletion hashes it: the file its
    transfer verified (same inode and mtime to the nanosecond, checked in the rm's own shell)
    is deleted unread; the same bytes in another file are hashed first, then deleted; other
    bytes written in place a moment later (same inode, same size) are hashed and kept."""
    root, path = _buffer_file(tmp_path, "remote-buffer")
    path.write_bytes(data := os.urandom(50_000))
    hashed: list[str] = []
    real_look = reaper.look

    def look(*args: Any, **kwargs: Any) -> Any:
        hashed.append(str(path))
        return real_look(*args, **kwargs)

    monkeypatch.setattr(reaper, "look", look)

    def claim() -> reaper._Claim:
        info = path.stat()
        return _claim_of(root, path, data, sshd.destination, inode=info.st_ino,
                         mtime_ns=info.st_mtime_ns)

    assert reaper._unlink_remote(sshd.ssh, claim()) == len(data)
    assert not path.exists() and hashed == []

    path.write_bytes(data)
    recorded = claim()
    copied = path.with_name("copy")
    shutil.copyfile(path, copied)
    copied.replace(path)  # the same bytes, another file
    assert reaper._unlink_remote(sshd.ssh, recorded) == len(data)
    assert not path.exists() and len(hashed) == 1

    path.write_bytes(data)
    recorded = claim()
    with path.open("r+b") as stream:  # other bytes, in place, right after
        stream.write(b"x" * 10)
    with pytest.raises(reaper._Changed):
        reaper._unlink_remote(sshd.ssh, recorded)
    assert path.read_bytes()[:10] == b"x" * 10 and len(hashed) == 2


def test_a_local_file_replaced_while_its_deletion_hashes_it_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy whose identity was never recorded is hashed before its unlink, which for a
    large file takes minutes: a file renamed over the path meanwhile (same size, other bytes)
    is not the one hashed and is kept, as is one written to in place after the hash."""
    root, path = _buffer_file(tmp_path, "buffer")
    data = os.urandom(50_000)
    foreign = os.urandom(len(data))
    real_look = reaper.look_local

    def replaced(*args: Any, **kwargs: Any) -> Any:
        seen = real_look(*args, **kwargs)
        path.with_name("other").write_bytes(foreign)
        path.with_name("other").replace(path)  # renamed over it after the hash
        return seen

    def written(*args: Any, **kwargs: Any) -> Any:
        seen = real_look(*args, **kwargs)
        time.sleep(0.02)  # past the file system's timestamp tick, as a real hash's minutes are
        with path.open("r+b") as stream:  # in place, same inode, same size
            stream.write(foreign[:10])
        return seen

    claim = _claim_of(root, path, data, None)
    for change, left in ((replaced, foreign), (written, foreign[:10] + data[10:])):
        path.write_bytes(data)
        monkeypatch.setattr(reaper, "look_local", change)
        with pytest.raises(reaper._Changed):
            reaper._unlink_local(claim)
        assert path.read_bytes() == left
    monkeypatch.setattr(reaper, "look_local", real_look)
    path.write_bytes(data)
    assert reaper._unlink_local(claim) == len(data) and not path.exists()


def test_a_remote_copy_gone_before_its_rm_never_takes_a_file_that_appeared_there_with_it(
        tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote copy without a recorded identity is hashed on its host before the `rm`; found
    gone, nothing is removed: a file of the same size that takes the path between that look
    and the `rm` is not the recorded copy and stays. Gone with an identity recorded: the same
    answer (already missing), nothing removed."""
    root, path = _buffer_file(tmp_path, "remote-buffer")
    data = os.urandom(50_000)
    foreign = os.urandom(len(data))
    real_look = reaper.look

    def look(*args: Any, **kwargs: Any) -> Any:
        seen = real_look(*args, **kwargs)
        path.write_bytes(foreign)  # appears right after the look, before the rm
        return seen

    monkeypatch.setattr(reaper, "look", look)

    with pytest.raises(FileNotFoundError):
        reaper._unlink_remote(sshd.ssh, _claim_of(root, path, data, sshd.destination))
    assert path.read_bytes() == foreign

    path.unlink()
    monkeypatch.setattr(reaper, "look", real_look)
    with pytest.raises(FileNotFoundError):
        reaper._unlink_remote(sshd.ssh, _claim_of(root, path, data, sshd.destination,
                                                  inode=12345,
                                                  mtime_ns=1_700_000_000_123_456_789))
    assert not path.exists() and root.joinpath("obs").is_dir()


def test_a_purge_failing_on_an_unmounted_archive_says_why_and_heals_once_it_is_back(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The sources' retention is over, but the cologne LTA disk is not mounted when the purge
    looks: nothing is deleted, `why` says the purge failed and why (the run's own error, not
    only "failed") and when it is tried again; mounted again, that re-attempt deletes."""
    config = deployment(tmp_path / "kept", sites=_sites(KEEP),
                        policies={"retry_backoff_first_s": 0.2})
    opsdb, package, files = archived_with_sources(config, instance)
    config = retention(config, 0)
    marker = config.resolve_root("sites/cologne/lta") / MARKER
    marker.rename(marker.with_name("unmounted"))

    run(config, instance, wait_s=0)

    assert all(p.is_file() for p in files)  # the storage: nothing deleted
    with opsdb.session() as session:
        purge = next(s for s in diagnose(session, config, package, utcnow()) if s.stage == "purge")
    assert purge.state == "failed", purge
    assert "cannot be re-checked" in purge.detail and "next attempt" in purge.detail, purge

    marker.with_name("unmounted").rename(marker)
    run(config, instance)

    assert not any(p.exists() for p in files)
    with opsdb.session() as session:
        purge = next(s for s in diagnose(session, config, package, utcnow()) if s.stage == "purge")
    assert purge.state == "done", purge
    opsdb.dispose()
