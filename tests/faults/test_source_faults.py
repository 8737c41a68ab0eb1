"""Faults at the source: raw files changed after filing, concurrent filing of the same files,
and hostile input (file names, symlinks, configuration)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets import cli
from ccat_dt.config import Config, ConfigError
from ccat_dt.defaults import EMBEDDED_DEFAULT
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import (
    FileSpec,
    FilingError,
    file_directory,
    file_raw_files,
    finish_observation,
    start_observation,
)
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    utcnow,
)
from ccat_dt.packages import get_package, package_path
from ccat_dt.retry import stalled_work
from ccat_dt.tarball import read_manifest
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    MODULE,
    archived_everywhere,
    child_argv,
    deployment,
    finish,
    observe,
    operations,
    package_names,
    package_state,
    plan,
    run,
    source_root,
    spawn,
)
from tests.faults.retrying import operator_retry


@pytest.mark.parametrize("change", ["flipped", "grown"])
def test_source_changed_after_filing_fails_the_package_and_nothing_leaves(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, change: str) -> None:
    files = observe(config, opsdb)
    victim = files[1]
    original = victim.read_bytes()
    if change == "flipped":  # same size: only the checksum can tell
        victim.write_bytes(original[:7] + bytes([original[7] ^ 0x80]) + original[8:])
    else:
        victim.write_bytes(original + b"appended after filing")

    report = run(config, instance)

    [package] = package_names(opsdb)
    assert [key.split(":")[0] for key in report.failed] == ["package"]
    with opsdb.session() as session:
        assert session.scalars(select(PackageCopy)).all() == []  # nothing built, nothing left
    assert all(p.is_file() for p in files)  # every source file kept, the changed one too
    assert not list(config.resolve_root("sites/ccat/buffer").rglob("*.part"))
    assert_safe(config, opsdb, expected_findings=[
        ("changed", victim.relative_to(config.resolve_root("sites/ccat/instruments")).as_posix())])

    assert package_state(opsdb, package) == PackageState.FAILED
    [(status, error)] = operations(opsdb, OperationType.PACKAGING, package)
    assert status == OperationStatus.FAILED
    with opsdb.session() as session:
        stages = {s.stage: s for s in diagnose(session, config, package, utcnow())}
    assert stages["packaging"].state == "failed"
    assert victim.name in stages["packaging"].detail
    if change == "flipped":
        assert "checksum mismatch" in (error or "")
        assert "checksum mismatch" in stages["packaging"].detail

    # Nothing is retried by itself: not by a replayed tick, not by a plain retry.
    assert run(config, instance).launched == []
    assert stalled_work(opsdb, config) == []

    # The instrument team restores the file as filed; the operator rebuilds the package.
    victim.write_bytes(original)
    assert operator_retry(config, instance, opsdb, rebuild_failed=True) == [
        ("packaging", package, "")]

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_a_source_disk_not_mounted_at_packaging_time_is_not_a_changed_source(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """The instruments' disk is not mounted (its empty mount point, no marker) when the
    package is built: the blocking raw_files_present check failed the package for good
    ("source changed since filing: No such file or directory", FAILED, permanent; found
    by a helper clicking Materialize), although nothing changed. Now the check fails for the
    time being, saying the disk is not there; once it is back the re-attempt builds the
    package, and it is archived with nobody's retry."""
    observe(config, opsdb)
    source = config.resolve_root("sites/ccat/instruments")
    elsewhere = source.with_name("instruments.unmounted")
    source.rename(elsewhere)
    source.mkdir()  # the empty mount point
    try:
        report = run(config, instance, wait_s=0)
    finally:
        source.rmdir()
        elsewhere.rename(source)

    [package] = package_names(opsdb)
    assert report.failed and package_state(opsdb, package) != PackageState.FAILED
    with opsdb.session() as session:
        [stage] = [s for s in diagnose(session, config, package, utcnow())
                   if s.stage == "packaging"]
    assert "source disk not mounted" in stage.detail, stage.detail

    run(config, instance, wait_s=30)  # the disk is back: the re-attempt builds it
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_a_file_opsdb_does_not_know_at_the_package_path_is_never_replaced_by_the_build(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """The observatory buffer already holds other bytes under the package's tar name (a tar
    restored by hand, an OpsDB restored from a backup): the build leaves them as they are and
    fails, saying so; once they are moved away, the next automatic attempt builds the package
    and the lifecycle completes."""
    observe(config, opsdb)
    package = plan(config, opsdb, instance)
    with opsdb.session() as session:
        buffer = session.scalars(select(DataLocation).where(
            DataLocation.location_type == LocationType.BUFFER)).all()
        [root] = [b.root for b in buffer if b.site.short_name == config.settings.observatory]
        path = Path(root) / package_path(get_package(session, package))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(foreign := os.urandom(50_000))

    run(config, instance, wait_s=0)

    assert path.read_bytes() == foreign  # the storage: nothing renamed over it
    refused = [error or "" for status, error in operations(opsdb, OperationType.PACKAGING,
                                                           package)
               if status == OperationStatus.FAILED]
    assert refused and all("does not record there" in e for e in refused), refused
    assert all(p.is_file() for p in source_root(config).rglob("*.dat"))  # nothing purged

    path.rename(tmp_path / "moved-away")  # the person's part
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert (tmp_path / "moved-away").read_bytes() == foreign
    assert_safe(config, opsdb)


def test_concurrent_filing_of_one_directory_files_each_path_once(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """Two processes file the same directory at the same moment (both past every check when
    they write), then the same directory is filed again: one row per path, every call either
    succeeds or is refused with a message saying to retry."""
    directory = source_root(config) / "obs-0" / MODULE
    directory.mkdir(parents=True)
    for i in range(3):
        (directory / f"scan-{i}.dat").write_bytes(os.urandom(20_000 + i))
    start_observation(opsdb, "obs-0")

    racers = [spawn(child_argv(config, "file", "obs-0", MODULE, f"obs-0/{MODULE}",
                               barrier=str(tmp_path / "barrier"), parties=2)) for _ in range(2)]
    outcomes = [finish(process) for process in racers]

    assert sorted(o.returncode for o in outcomes) in ([0, 0], [0, 3]), \
        [o.stderr[-2000:] for o in outcomes]  # 3: a FilingError, never a traceback
    results = [o.result for o in outcomes]
    assert sum(r["result"]["filed"] for r in results if "result" in r) == 3
    for refused in [r for r in results if "error" in r]:
        assert "filed concurrently" in refused["error"] and "retry" in refused["error"]
    again = file_directory(opsdb, observation="obs-0", module=MODULE, directory=f"obs-0/{MODULE}")
    assert (again.filed, again.unchanged) == (0, 3)  # a duplicate filing is a no-op
    with opsdb.session() as session:
        paths = session.scalars(select(RawDataFile.relative_path)).all()
        copies = session.scalars(select(RawDataFileCopy.relative_path)).all()
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 3
    assert sorted(copies) == sorted(paths)

    finish_observation(opsdb, "obs-0")
    assert run(config, instance).failed == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


HOSTILE = ["-rf", "--help", "a b  c", "it's \"quoted\"", "x;rm -rf ~", "$(touch pwned)",
           "`id`", "*?[glob]", "tab\there", "line\nbreak", "ünïcødé-日本.dat",
           ".looks-like.tmp.part", "n" * 255, "é" * 127]


def test_hostile_file_names_travel_the_whole_lifecycle(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    written = observe(config, opsdb, names=HOSTILE, size=1000)
    assert len(os.fsencode(written[-2].name)) == 255

    assert run(config, instance).failed == []

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert not any(p.exists() for p in written)  # purged, each by its own name
    assert not (source_root(config).parent / "pwned").exists()
    assert not list(config.directory.rglob("pwned"))
    with opsdb.session() as session:
        lta = session.scalars(select(PackageCopy).join(PackageCopy.location).where(
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)).all()
        tars = [Path(c.location.root) / c.relative_path for c in lta]
    for tar in tars:  # each archive holds every name, byte for byte
        listed = {entry.path.rsplit("/", 1)[-1] for entry in read_manifest(tar)}
        assert listed == set(HOSTILE)


def test_a_name_packaging_cannot_carry_is_refused_at_filing(
        config: Config, opsdb: OpsDB) -> None:
    """Packaging refuses a backslash in a member name (non-canonical arcname); filing must not
    accept what packaging will refuse, or the whole package is stuck at the observatory."""
    with pytest.raises(FilingError) as refused:
        observe(config, opsdb, names=["back\\slash.dat", "fine.dat"], size=1000)
    assert "back\\slash.dat" in str(refused.value)
    with opsdb.session() as session:
        assert session.scalars(select(RawDataFile)).all() == []


def test_a_name_that_is_not_utf8_is_refused_and_changes_nothing(
        config: Config, opsdb: OpsDB) -> None:
    directory = source_root(config) / "obs-0" / MODULE
    directory.mkdir(parents=True)
    (directory / "good.dat").write_bytes(b"fine")
    bad = os.fsencode(str(directory)) + b"/scan-\xff\xfe.dat"
    with open(bad, "wb") as stream:
        stream.write(b"latin-1 named")
    start_observation(opsdb, "obs-0")

    with pytest.raises(FilingError) as refused:
        file_directory(opsdb, observation="obs-0", module=MODULE, directory=f"obs-0/{MODULE}")

    with opsdb.session() as session:  # the batch is atomic: not even the good file is filed
        assert session.scalars(select(RawDataFile)).all() == []
    assert os.path.exists(bad) and (directory / "good.dat").read_bytes() == b"fine"
    assert "scan-" in str(refused.value) and "UTF-8" in str(refused.value)


def test_symlinks_out_of_the_source_are_refused_or_left_alone(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "not-raw-data.txt"
    secret.write_bytes(b"must survive every purge")
    directory = source_root(config) / "obs-0" / MODULE
    directory.mkdir(parents=True)
    (directory / "scan-0.dat").write_bytes(os.urandom(5000))
    (directory / "escape.dat").symlink_to(secret)
    (source_root(config) / "obs-0" / "escape-dir").symlink_to(outside, target_is_directory=True)
    start_observation(opsdb, "obs-0")

    with pytest.raises(FilingError, match="outside source location"):
        file_raw_files(opsdb, observation="obs-0", module=MODULE,
                       files=[FileSpec(f"obs-0/{MODULE}/escape.dat")])
    with pytest.raises(FilingError, match="outside source location"):
        file_directory(opsdb, observation="obs-0", module=MODULE, directory="obs-0/escape-dir")
    filed = file_directory(opsdb, observation="obs-0", module=MODULE,
                           directory=f"obs-0/{MODULE}")
    assert filed.filed == 1  # the regular file; the symlink is not followed, not filed
    finish_observation(opsdb, "obs-0")

    assert run(config, instance).failed == []

    archived_everywhere(config, opsdb)
    assert secret.read_bytes() == b"must survive every purge"
    assert (directory / "escape.dat").is_symlink()  # never filed, so never deleted
    assert_safe(config, opsdb, expected_findings=[("dark", f"{MODULE}/escape.dat"),
                                                  ("dark", "obs-0/escape-dir")])


BROKEN_CONFIGS = {
    "not yaml": "sites: [ {short_name: ccat\n",
    "unknown key": None,  # filled in below from the embedded default
    "more copies than archives": None,
    "route to an unknown site": None,
}


def _contradictions() -> dict[str, dict[str, object]]:
    unknown = copy.deepcopy(EMBEDDED_DEFAULT)  # dict[str, object]: narrowed where changed
    policies = unknown["policies"]
    assert isinstance(policies, dict)
    unknown["policies"] = {**policies, "max_atempts": 5}
    too_many = copy.deepcopy(EMBEDDED_DEFAULT)
    policies = too_many["policies"]
    assert isinstance(policies, dict)
    too_many["policies"] = {**policies, "required_lta_copies": 3}
    no_site = copy.deepcopy(EMBEDDED_DEFAULT)
    routes = no_site["routes"]
    assert isinstance(routes, list)
    no_site["routes"] = [*routes,
                         {"origin": "ccat", "destination": "chajnantor", "transport": "local"}]
    return {"unknown key": unknown, "more copies than archives": too_many,
            "route to an unknown site": no_site}


@pytest.mark.parametrize("problem", list(BROKEN_CONFIGS))
def test_a_broken_configuration_is_refused_clearly_and_changes_nothing(
        config: Config, opsdb: OpsDB, tmp_path: Path, problem: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    observe(config, opsdb)
    text = BROKEN_CONFIGS[problem] or yaml.safe_dump(
        {**_contradictions()[problem], "opsdb_url": config.opsdb_url})
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    before = _snapshot(config, opsdb)

    for command in (["drive"], ["purge"], ["audit", "--repair"], ["migrate"],
                    ["file", "--observation", "obs-1", "--module", MODULE, "x.dat"]):
        with pytest.raises(SystemExit) as exit_status:
            cli.main(["--config", str(broken), *command])
        assert exit_status.value.code == 2, command
        error = capsys.readouterr().err
        assert error.startswith(f"ccat-dt: error: {broken}"), error  # names the file ...
        assert "Traceback" not in error

    key = {"not yaml": "not valid YAML", "unknown key": "policies.max_atempts",
           "more copies than archives": "required_lta_copies",
           "route to an unknown site": "chajnantor"}[problem]
    assert key in error  # ... and the key
    assert _snapshot(config, opsdb) == before


def _snapshot(config: Config, opsdb: OpsDB) -> tuple[object, ...]:
    with opsdb.session() as session:
        rows = tuple(tuple(tuple(row) for row in session.execute(select(table.__table__)))
                     for table in (RawDataFile, PhysicalCopy, Operation, RawDataPackage))
    files = tuple(sorted((str(p), p.stat().st_size) for p in config.directory.rglob("*")
                         if p.is_file() and "opsdb.sqlite" not in p.name))
    return rows, files


def test_two_archives_sharing_one_directory_is_refused(tmp_path: Path) -> None:
    """One disk must never count as two verified copies: the configuration is refused."""
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    sites[2]["locations"][1]["root"] = "sites/cologne/lta"  # type: ignore[index]
    with pytest.raises(ConfigError) as refused:
        deployment(tmp_path / "deploy", sites=sites)
    assert "sites/cologne/lta" in str(refused.value) and "overlap" in str(refused.value)
