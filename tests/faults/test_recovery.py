"""Recovery paths (issue 13, item 4): a corrupt observatory buffer tar is told from a bad
transit and rebuilt from the intact raw files; a changed raw file is taken out of its package
(`ccat-dt exclude`) so the rest goes. Each ends with a plain drive (no `retry`) and checks the
invariant on the storage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets import cli
from ccat_dt import packages as packaging_stage
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    RawDataFile,
    RawDataPackage,
    utcnow,
)
from ccat_dt.packages import package_path
from ccat_dt.replicas import BadSource, place, plan_placement
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    observe,
    package_names,
    package_state,
    plan,
    run,
    source_root,
)
from tests.faults.storage_truth import good_archive_sites, lost_filed_files


def _package(opsdb: OpsDB, name: str) -> tuple[str, str]:
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None and package.checksum is not None
        return package_path(package), package.checksum


@pytest.mark.parametrize(("found_by", "sources"), [("check", "untouched"),
                                                   ("transfer", "touched")])
def test_corrupt_buffer_tar_is_rebuilt_from_intact_sources(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, found_by: str,
        sources: str) -> None:
    """Found by the buffer copy's check in the packaging run, or by a transfer whose landed
    hash mismatches (the source is then re-hashed: a bad source, not a bad transit)."""
    files = observe(config, opsdb)
    name = plan(config, opsdb, instance)
    packaging_stage.ensure_built(opsdb, config, name)
    relative, first_checksum = _package(opsdb, name)
    tar = config.resolve_root("sites/ccat/buffer") / relative
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF  # bit rot in the observatory buffer, inside the first member
    tar.write_bytes(bytes(data))
    if sources == "touched":  # same bytes, newer mtime: the rebuilt tar differs
        stat = files[0].stat()
        os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))

    if found_by == "transfer":  # the transfer out, as its run would make it
        placement = plan_placement(opsdb, config, name, "cologne", LocationType.BUFFER)
        with pytest.raises(BadSource, match="a bad source, not a bad transit") as failed:
            place(opsdb, config, placement, LocationType.BUFFER)
        assert not failed.value.retryable
        # which copy, for its stage's check (packages: the observatory's buffer tar)
        assert (failed.value.package, failed.value.site, failed.value.kind,
                failed.value.observatory) == (name, "ccat", LocationType.BUFFER, True)
        assert not list(config.resolve_root("sites/cologne/buffer").rglob("*.tar"))

    run(config, instance)  # a plain drive, nothing else

    archived_everywhere(config, opsdb)
    _, checksum = _package(opsdb, name)
    assert (checksum == first_checksum) == (sources == "untouched")
    for site in ("cologne", "us"):  # the storage: every LTA tar is the package on record
        assert hash_file(config.resolve_root(f"sites/{site}/lta") / relative)[0] == checksum
    assert all(len(sites) == 2 for sites in good_archive_sites(config, opsdb).values())
    assert lost_filed_files(config, opsdb) == []
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None
        # The bad tar was found by re-hashing the source, quarantined, then superseded by
        # the rebuild; no copy row anywhere holds the old checksum as good.
        observatory = [c for c in package.copies if c.location.site.short_name == "ccat"]
        assert [c.status for c in observatory] == [CopyStatus.DELETED, CopyStatus.DELETED]
        assert all(c.checksum == checksum for c in package.copies
                   if c.status != CopyStatus.DELETED)
        verification = session.scalars(select(Operation).where(
            Operation.copy_id == observatory[0].id,
            Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.FAILED)).all()
        assert verification and "checksum mismatch" in (verification[-1].error or "")
        builds = session.scalars(select(Operation).where(
            Operation.package_id == package.id,
            Operation.operation_type == OperationType.PACKAGING,
            Operation.status == OperationStatus.COMPLETED)).all()
        assert len(builds) == 2
    assert_safe(config, opsdb)


@pytest.mark.parametrize("fault", ["rotted", "removed"])
def test_the_only_copy_that_left_the_observatory_lost_before_archiving_is_sent_again(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, fault: str) -> None:
    """The package reached Cologne's buffer, and that copy rotted (or was removed) before
    any archive held the package: no LTA copy anywhere to repair from. The observatory's
    buffer still holds the verified tar, so the primary site is fed from it again (the
    observatory link used twice for this package, rather than never archiving it)."""
    observe(config, opsdb)
    name = plan(config, opsdb, instance)
    packaging_stage.ensure_built(opsdb, config, name)
    place(opsdb, config, plan_placement(opsdb, config, name, "cologne", LocationType.BUFFER),
          LocationType.BUFFER)
    relative, checksum = _package(opsdb, name)
    sent = config.resolve_root("sites/cologne/buffer") / relative
    if fault == "rotted":
        data = bytearray(sent.read_bytes())
        data[len(data) // 2] ^= 0x01
        sent.write_bytes(bytes(data))
    else:
        sent.unlink()

    run(config, instance)  # a plain drive, nothing else

    archived_everywhere(config, opsdb)
    for site in ("cologne", "us"):  # the storage: every LTA tar is the package on record
        assert hash_file(config.resolve_root(f"sites/{site}/lta") / relative)[0] == checksum
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def _exclude(config: Config, *args: str) -> tuple[int, str]:
    try:
        cli.main(["--config", str(config.path), "exclude", *args])
    except SystemExit as exc:
        return int(exc.code or 0), ""
    return 0, ""


def test_changed_raw_file_taken_out_lets_the_rest_go(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        capsys: pytest.CaptureFixture[str]) -> None:
    files = observe(config, opsdb, files=4)
    victim = files[1]
    original = victim.read_bytes()
    changed = original[:7] + bytes([original[7] ^ 0x80]) + original[8:]
    victim.write_bytes(changed)  # rewritten after filing: the package is quarantined
    run(config, instance)
    [name] = package_names(opsdb)
    assert package_state(opsdb, name) == PackageState.FAILED
    relative = victim.relative_to(source_root(config)).as_posix()

    assert _exclude(config, "no/such/file.dat", "--reason", "x")[0] == 2
    assert "no filed raw file" in capsys.readouterr().err
    assert _exclude(config, relative, "--reason", "detector glitch: rewritten by the DAQ",
                    "--by", "night-operator")[0] == 0
    assert "taken out of" in capsys.readouterr().out

    run(config, instance)  # a plain drive: rebuilt without it, sent, archived, purged

    archived_everywhere(config, opsdb)
    assert victim.read_bytes() == changed  # the excluded file is still there, untouched
    others = [p for p in files if p != victim]
    assert not any(p.exists() for p in others)  # purged: each in two verified LTA tars ...
    good = good_archive_sites(config, opsdb)
    assert all(good[str(p)] == {"cologne/lta", "us/lta"} for p in others)
    assert str(victim) not in good  # in no package any more
    lost = lost_filed_files(config, opsdb)  # ... and the excluded file only at its source,
    assert len(lost) == 1 and lost[0].startswith(relative)  # with other bytes than filed
    with opsdb.session() as session:
        raw = session.scalar(select(RawDataFile).where(RawDataFile.relative_path == relative))
        assert raw is not None and raw.package_id is None and raw.excluded_from == name
        assert (raw.excluded_by, raw.excluded_reason) == (
            "night-operator", "detector glitch: rewritten by the DAQ")
        assert [c.status for c in raw.copies] == [CopyStatus.PRESENT]
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        assert package is not None and len(package.files) == 3
        assert relative not in {f["path"] for f in (package.manifest or {})["files"]}
        stages = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert "night-operator" in stages["excluded"].detail
    assert "detector glitch" in stages["excluded"].detail

    # Once the package has left the observatory, nothing more is taken out of it.
    other = others[0].relative_to(source_root(config)).as_posix()
    assert _exclude(config, other, "--reason", "too late")[0] == 2
    assert "already left the observatory" in capsys.readouterr().err
    with opsdb.session() as session:
        raw = session.scalar(select(RawDataFile).where(RawDataFile.relative_path == other))
        assert raw is not None and raw.excluded_at is None and raw.package_id is not None
    assert _exclude(config, relative, "--reason", "again")[0] == 2  # already out
    assert "already taken out" in capsys.readouterr().err
    assert_safe(config, opsdb, expected_findings=[("changed", relative)])
    assert Path(victim).is_file()


def test_corrupt_tar_with_a_changed_source_is_quarantined_then_the_file_taken_out(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The tar rots at the observatory and one of its raw files was rewritten too: the rebuild
    fails on that file, so the package is quarantined (a person is needed); taking the file
    out lets the rest be rebuilt and go, with a plain drive."""
    files = observe(config, opsdb, files=3)
    name = plan(config, opsdb, instance)
    packaging_stage.ensure_built(opsdb, config, name)
    relative, _ = _package(opsdb, name)
    tar = config.resolve_root("sites/ccat/buffer") / relative
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    victim = files[2]
    changed = victim.read_bytes()[:-1] + b"!"
    victim.write_bytes(changed)

    run(config, instance)

    assert package_state(opsdb, name) == PackageState.FAILED
    with opsdb.session() as session:
        stages = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert stages["packaging"].state == "failed" and "exclude" in stages["packaging"].detail
    assert not list(config.resolve_root("sites/cologne/buffer").rglob("*.tar"))

    victim_path = victim.relative_to(source_root(config)).as_posix()
    assert _exclude(config, str(victim), "--reason", "rewritten after filing")[0] == 0
    capsys.readouterr()
    run(config, instance)

    archived_everywhere(config, opsdb)
    assert victim.read_bytes() == changed
    good = good_archive_sites(config, opsdb)
    assert all(good[str(p)] == {"cologne/lta", "us/lta"} for p in files if p != victim)
    assert [line.split(" ")[0] for line in lost_filed_files(config, opsdb)] == [victim_path]
    assert_safe(config, opsdb, expected_findings=[("changed", victim_path)])
