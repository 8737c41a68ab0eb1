"""An operator's command while the pipeline works on the same thing: `ccat-dt exclude` while
the package's tar is written, `ccat-dt stage --release` while the request is unpacked. Each
ends with OpsDB and the storage agreeing: what the command said is what happened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance
from sqlalchemy import select

import ccat_assets.stages.common as stage_common
import ccat_assets.stages.packaging as packaging_stage
import ccat_assets.stages.purge as purge_stage
import ccat_dt.packages as packages
import resources.placement as placement
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    PackageCopy,
    RawDataFile,
    RawDataPackage,
)
from ccat_dt.tarball import read_manifest
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    archived_everywhere,
    child_argv,
    observe,
    package_names,
    plan,
    run,
    source_root,
    spawn,
    wait_for,
)
from tests.faults.storage_truth import good_archive_sites, lost_filed_files


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
    run(config, instance, in_process=True)
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


# Where "Delete partition" in the UI strikes a run of the package: the function of the step's
# body (or of its IO manager) it strikes in, at its first call with these arguments.
DELETED_DURING: dict[str, tuple[Any, str, tuple[Any, ...]]] = {
    "files' check": (packaging_stage, "source_problems", ()),
    "packaging": (packages, "ensure_built", ()),
    "copy planned": (stage_common, "plan_placement", (LocationType.BUFFER,)),
    "copy in flight": (placement, "place", (LocationType.BUFFER,)),
    "copy's check": (stage_common, "check_stage", ("cologne", LocationType.BUFFER)),
    "archiving planned": (stage_common, "plan_placement", (LocationType.LONG_TERM_ARCHIVE,)),
    "purge": (purge_stage, "purge_package", ()),
}


@pytest.mark.parametrize("during", DELETED_DURING)
def test_partition_deleted_in_the_ui_while_its_run_works_on_it(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, during: str) -> None:
    """"Delete partition" of a package in the UI while a run of it is in a step: the run
    goes on, the partition is added back as its step ends, and the package is archived at
    every site with nothing failed. Before, Dagster failed the step as it recorded its output
    ("Partition range P to P is not a valid range"), the copy's archiving step was not run,
    and `drive` ended with a failed run no later run healed (exit 1)."""
    observe(config, opsdb, files=3)
    module, name, when = DELETED_DURING[during]
    real = getattr(module, name)
    deleted: list[str] = []

    def struck(*args: Any, **kwargs: Any) -> Any:
        if not deleted and all(arg in args for arg in when):
            [package] = instance.get_dynamic_partitions("packages")
            instance.delete_dynamic_partition("packages", package)
            deleted.append(package)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, struck)
    report = run(config, instance, in_process=True)
    assert deleted, f"no partition deleted during {during}"
    assert report.failed == [], report.failed
    archives = {f"{site.short_name}/lta" for site in config.settings.archive_sites}
    assert all(sites == archives for sites in good_archive_sites(config, opsdb).values())
    assert_safe(config, opsdb)
    [package] = deleted
    for asset in ("packages", "purge_status"):
        assert package in instance.get_materialized_partitions(AssetKey(asset)), asset


def test_partition_deleted_just_after_a_step_added_it_back_fails_that_run_once_healed(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted just after a step added it back (a gap no step can close; here as the copy
    step's body ends, before Dagster records its output): that run fails, its re-attempt (the
    partition revived with its request) copies and archives the package, and `drive` counts
    the failure healed (exit 0). Before, such a failure was never healed: not a retried
    error."""
    observe(config, opsdb, files=3)
    real = stage_common.keep_partition
    deleted: list[str] = []

    def then_deleted(context: Any) -> None:
        real(context)
        if not deleted and "|" in str(context.partition_key):  # the copy's, not the tar's
            [package] = instance.get_dynamic_partitions("packages")
            instance.delete_dynamic_partition("packages", package)
            deleted.append(package)

    monkeypatch.setattr(stage_common, "keep_partition", then_deleted)
    report = run(config, instance, in_process=True)
    assert deleted and len(report.failed) == 1, report.failed
    assert report.unhealed == [], report.unhealed
    archives = {f"{site.short_name}/lta" for site in config.settings.archive_sites}
    assert all(sites == archives for sites in good_archive_sites(config, opsdb).values())
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
    run(config, instance, in_process=True)
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



def _audits(config: Config) -> list[subprocess.CompletedProcess[str]]:
    """What an operator types while the drive works: a plain audit, then a repairing one."""
    return [cli(config, "audit"), cli(config, "audit", "--checksums", "--repair")]


def test_audit_while_the_drive_works_reports_its_work_in_flight_not_as_problems(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt audit` and `audit --checksums --repair` at each point of a package's lifecycle
    where its files lie on the storage without OpsDB knowing them yet: a tar half written, a tar
    built and a copy landed (renamed into place, not recorded), a copy landed under its
    temporary name, a staged file moved into place, a file the purge unlinked and has not
    recorded. Each audit exits 0, names the files being written as in flight, and repairs
    nothing. Before, they were "partial" and "dark" problems (exit 1): an operator auditing
    a running system was told of faults that were only work."""
    import ccat_dt.reaper as reaper
    import ccat_dt.replicas as replicas
    import ccat_dt.staging as staging
    import ccat_dt.tarball as tarball
    import ccat_dt.transports.local as local

    observe(config, opsdb, files=3)
    told: dict[str, list[subprocess.CompletedProcess[str]]] = {}

    def audit_at(point: str, owner: Any, name: str, *, after: bool) -> None:
        real = getattr(owner, name)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            if not after and point not in told:
                told[point] = _audits(config)
            result = real(*args, **kwargs)
            if after and point not in told:
                told[point] = _audits(config)
            return result

        monkeypatch.setattr(owner, name, hooked)

    audit_at("tar half written", tarball._TarWriter, "add_file", after=True)
    audit_at("tar built, not recorded", packages, "_record_built", after=False)
    audit_at("copy under its temporary name", local, "rename_into_place", after=False)
    audit_at("copy landed, not recorded", replicas, "_record", after=False)
    audit_at("purge unlinked, not recorded", reaper, "_unlink_local", after=True)
    run(config, instance, in_process=True)
    archived_everywhere(config, opsdb)
    staging.request_staging(opsdb, location="ramses/processing",
                            selection=staging.Selection(observation="obs-0"),
                            expires_in=staging.timedelta(hours=1))
    audit_at("staged file moved into place", staging, "rename_into_place", after=True)
    run(config, instance, in_process=True)

    assert len(told) == 6, sorted(told)
    wrong = [(point, " ".join(done.args[5:]), done.returncode, done.stdout + done.stderr)
             for point, audits in told.items() for done in audits
             if done.returncode != 0 or "0 problem(s), 0 repaired" not in done.stdout
             or ("in_flight" in done.stdout) == (point == "purge unlinked, not recorded")]
    assert wrong == [], "\n".join(map(str, wrong))
    final = cli(config, "audit", "--checksums")
    assert final.returncode == 0 and "in_flight" not in final.stdout, final.stdout
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_audit_during_a_transfer_still_reports_a_file_truly_gone(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """While a transfer's process holds its copy half landed, a filed source file is deleted by
    hand: `ccat-dt audit` exits 1 naming that file lost, and the transfer's temporary file as
    in flight. Once the transfer's process is killed nothing writes that file any more: it is
    a leftover again ("partial"), not in flight."""
    files = observe(config, opsdb, files=3)
    name = plan(config, opsdb, instance)
    packages.build(opsdb, config, name)
    marker = tmp_path / "held"
    transfer = spawn(child_argv(config, "place", name, "cologne", "buffer",
                                kill="hold-mid-write", marker=str(marker)))
    try:
        wait_for(marker, transfer)
        files[0].unlink()  # truly gone: its package has left for no archive yet
        during = cli(config, "audit")
    finally:
        transfer.kill()
        transfer.communicate(timeout=30)
    after = cli(config, "audit")

    part = f".{name}.tar.part"
    assert during.returncode == 1, during.stdout + during.stderr
    kinds = {line.split()[0]: line for line in during.stdout.splitlines()
             if line and not line[0].isspace()}
    assert str(files[0]) in kinds.get("lost", ""), during.stdout
    assert part in kinds.get("in_flight", "") and "partial" not in kinds, during.stdout
    assert after.returncode == 1 and "in_flight" not in after.stdout, after.stdout
    assert any(line.startswith("partial") and part in line
               for line in after.stdout.splitlines()), after.stdout
