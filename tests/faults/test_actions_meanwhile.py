"""An operator's command while the pipeline works on the same thing: `ccat-dt exclude` while
the package's tar is written, `ccat-dt stage --release` while the request is unpacked. Each
ends with OpsDB and the storage agreeing: what the command said is what happened."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.packages as packages
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus, PackageCopy, RawDataFile, RawDataPackage
from ccat_dt.tarball import read_manifest
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    archived_everywhere,
    observe,
    package_names,
    plan,
    run,
    source_root,
)
from tests.faults.storage_truth import lost_filed_files


def cli(config: Config, *argv: str) -> subprocess.CompletedProcess[str]:
    """`ccat-dt ...` as an operator types it, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_HOME", None)
    env.pop("CCAT_DT_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config",
                           str(config.path), *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)


def test_exclude_while_the_package_is_being_built(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt exclude FILE` while the packaging run writes the tar (members already read):
    either the command is refused and nothing changes, or the package goes out without the
    file. Before, the command said "taken out ... rebuilt without it" (exit 0) and the build
    recorded its tar with the file: the tar and both archives held a file OpsDB said was in no
    package. Now the build sees the package changed under it, quarantines its tar and builds
    again."""
    files = observe(config, opsdb, files=3)
    victim = files[1]
    relative = victim.relative_to(source_root(config)).as_posix()
    real = packages.build_package
    told: list[subprocess.CompletedProcess[str]] = []

    def build_package(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)  # the tar is written and renamed, not yet recorded
        if not told:
            told.append(cli(config, "exclude", relative, "--reason", "private calibration"))
        return built

    monkeypatch.setattr(packages, "build_package", build_package)
    run(config, instance, workers=1)
    [done] = told
    [name] = package_names(opsdb)
    with opsdb.session() as session:
        raw = session.scalar(select(RawDataFile).where(RawDataFile.relative_path == relative))
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert raw is not None and package is not None
        excluded = raw.excluded_at is not None
        manifest = {f["path"] for f in (package.manifest or {})["files"]}
        recorded = {f.relative_path for f in package.files}
    lta = list(config.resolve_root("sites/cologne/lta").rglob("*.tar"))
    in_tar = {e.path for t in lta for e in read_manifest(t)}
    if excluded:  # told "taken out of P ... rebuilt without it"
        assert done.returncode == 0
        assert relative not in manifest, (manifest, recorded)
        assert relative not in in_tar
    else:
        assert done.returncode == 2 and "nothing was changed" in done.stderr
    assert manifest == recorded | ({relative} if not excluded else set())
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def _archived_members(config: Config) -> set[str]:
    """The files in the package tars of every long-term archive, as their manifests list them."""
    return {entry.path for site in ("cologne", "us")
            for tar in config.resolve_root(f"sites/{site}/lta").rglob("*.tar")
            for entry in read_manifest(tar)}


def _taken_out_everywhere(config: Config, opsdb: OpsDB, relative: str) -> None:
    """The package went out without the file, as `exclude` said; its first tar is no copy."""
    [name] = package_names(opsdb)
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None
        manifest = {f["path"] for f in (package.manifest or {})["files"]}
        recorded = {f.relative_path for f in package.files}
        checksums = {c.checksum for c in package.copies if c.status == CopyStatus.PRESENT}
        assert checksums == {package.checksum}, checksums
    assert relative not in _archived_members(config)  # the storage
    assert manifest == recorded and relative not in recorded
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_exclude_after_the_tar_is_recorded_before_its_check_keeps_the_file_out(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt exclude FILE` once the packaging run recorded its tar, before that run's check
    re-reads it: the tar is quarantined by the command, and the check finds its bytes intact.
    Before, that re-read marked the tar PRESENT again ("checksum matches"): the package was
    never rebuilt and both archives got the file the command said was taken out. Now the
    check is red (the tar is not the package any more) and the package is rebuilt without it."""
    files = observe(config, opsdb, files=3)
    relative = files[1].relative_to(source_root(config)).as_posix()
    real = packages.build
    told: list[subprocess.CompletedProcess[str]] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)  # the tar recorded PRESENT, the run's check not yet run
        if not told:
            told.append(cli(config, "exclude", relative, "--reason", "private calibration"))
        return built

    monkeypatch.setattr(packages, "build", build)
    run(config, instance, workers=1)
    [done] = told
    assert done.returncode == 0, done.stderr
    _taken_out_everywhere(config, opsdb, relative)


def test_audit_repair_after_an_exclude_leaves_the_old_tar_quarantined(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """`ccat-dt audit --checksums --repair` between `exclude` and the rebuild: the old tar is
    CORRUPT in OpsDB and its bytes match its checksum. It is not "intact again" (it holds the
    file taken out): nothing is reported or repaired, and the package is rebuilt without the
    file. Before, the audit marked it PRESENT and the drive sent it to both archives."""
    files = observe(config, opsdb, files=3)
    relative = files[1].relative_to(source_root(config)).as_posix()
    name = plan(config, opsdb, instance)
    packages.build(opsdb, config, name)  # the packaging step: its tar at the observatory
    assert cli(config, "exclude", relative, "--reason", "private calibration").returncode == 0

    audited = cli(config, "audit", "--checksums", "--repair")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "0 repaired" in audited.stdout, audited.stdout
    with opsdb.session() as session:
        statuses = [c.status for c in session.scalars(select(PackageCopy))]
    assert statuses == [CopyStatus.CORRUPT]
    run(config, instance)
    _taken_out_everywhere(config, opsdb, relative)


def test_release_while_the_request_is_being_unpacked(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt stage --release R` while R's staging run moves its unpacked files into place:
    the release takes the scratch directory away, so the next rename fails. The files already
    moved to their staged names are recorded STAGED all the same, so the purge that follows
    the release removes them (before, they stayed on the processing disk for good)."""
    import ccat_dt.staging as staging
    from ccat_dt.storage import files_under

    observe(config, opsdb, files=3)
    run(config, instance)  # archived at both sites, purged at the observatory
    name = staging.request_staging(opsdb, location="ramses/processing",
                                   selection=staging.Selection(observation="obs-0"),
                                   expires_in=staging.timedelta(hours=1))
    root = config.resolve_root("sites/ramses/processing")
    real = staging.rename_into_place
    told: list[subprocess.CompletedProcess[str]] = []

    def rename(source: str, target: str, **kwargs: Any) -> None:
        real(source, target, **kwargs)
        if not told and str(target).startswith(str(root)):
            told.append(cli(config, "stage", "--release", name))

    monkeypatch.setattr(staging, "rename_into_place", rename)
    try:
        staging.stage(opsdb, config, name)
    finally:
        monkeypatch.undo()
    [done] = told
    assert done.returncode == 0, done.stderr
    run(config, instance)  # the purge cycle removes a released request's files
    left = [str(p.relative_to(root)) for p in files_under(root / name)] \
        if (root / name).exists() else []
    assert left == [], left
    assert_safe(config, opsdb)

