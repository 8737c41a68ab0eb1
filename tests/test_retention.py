from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ccat_assets.status import print_status
from ccat_dt import reaper
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.notify import Problem, current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    ExecutedObsUnit,
    InstrumentModule,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    utcnow,
)
from ccat_dt.reaper import certificate_problems, purge_package
from ccat_dt.retention import Action, Decision, plan_deletions
from ccat_dt.topology import get_location, get_site
from tests.helpers import checksum, run_cli, write

T0 = utcnow().replace(microsecond=0) - timedelta(days=3)  # when every copy in these tests was made
PKG = "obs1-primecam-f280-0"
TAR = b"tar bytes of the package " * 40
FILES = {"obs1/f280/a.dat": b"a" * 100, "obs1/f280/sub/b.dat": b"b" * 250}


def make_package(opsdb: OpsDB, files: dict[str, bytes] = FILES) -> None:
    """An observation's raw files filed at ccat/instruments and packaged at ccat/buffer."""
    with opsdb.session() as s:
        source = get_location(s, "ccat", "instruments")
        obs = ExecutedObsUnit(name="obs1")
        module = s.scalars(select(InstrumentModule).where(InstrumentModule.name == "f280")).one()
        package = RawDataPackage(name=PKG, observation=obs, module=module, size=len(TAR),
                                 primary_site=get_site(s, "cologne"), checksum=checksum(TAR))
        s.add(package)
        for rel, data in files.items():
            digest = hash_file(write(Path(source.root) / rel, data))[0]
            f = RawDataFile(source_location=source, relative_path=rel, size=len(data),
                            checksum_algorithm="xxh3_128", checksum=digest, observation=obs,
                            module=module, package=package)
            s.add(RawDataFileCopy(raw_data_file=f, location=source, relative_path=rel,
                                  size=len(data), checksum=digest, created_at=T0,
                                  verified_at=T0 + timedelta(minutes=1)))
    add_copy(opsdb, "ccat", "buffer")


def add_copy(opsdb: OpsDB, site: str, location: str, *, verified: bool = True,
             status: CopyStatus = CopyStatus.PRESENT, data: bytes = TAR) -> int:
    with opsdb.session() as s:
        loc = get_location(s, site, location)
        package = s.scalars(select(RawDataPackage).where(RawDataPackage.name == PKG)).one()
        rel = f"packages/{PKG}.tar"
        copy = PackageCopy(package=package, location=loc, relative_path=rel, size=len(data),
                           checksum=hash_file(write(Path(loc.root) / rel, data))[0], status=status,
                           created_at=T0,
                           verified_at=T0 + timedelta(minutes=5) if verified else None)
        s.add(copy)
        s.flush()
        return copy.id


def archived(opsdb: OpsDB, *sites: str) -> None:
    """Copies in the named archive sites' buffers and verified in their LTAs."""
    for site in sites:
        add_copy(opsdb, site, "buffer")
        add_copy(opsdb, site, "lta")


def copies(opsdb: OpsDB) -> dict[tuple[str, str, str], PhysicalCopy]:
    """(site/location, kind, relative path) -> copy, for every copy in OpsDB."""
    with opsdb.session() as s:
        rows = s.scalars(select(PhysicalCopy)).all()
        return {(c.location.label, c.kind, c.relative_path): c for c in rows}


def path_of(config: Config, site: str, location: str, rel: str) -> Path:
    root = next(loc.root for loc in config.settings.site(site).locations if loc.name == location)
    return config.resolve_root(root) / rel


def status_by_label(opsdb: OpsDB) -> dict[str, set[CopyStatus]]:
    out: dict[str, set[CopyStatus]] = {}
    for (label, _, _), c in copies(opsdb).items():
        out.setdefault(label, set()).add(c.status)
    return out


def operations(opsdb: OpsDB) -> list[Operation]:
    with opsdb.session() as s:
        return list(s.scalars(select(Operation).order_by(Operation.id)).all())


def with_settings(config: Config, **update: Any) -> Config:
    return Config(settings=config.settings.model_copy(update=update), path=config.path)


def with_retention(config: Config, hours: float) -> Config:
    sites = [site.model_copy(update={"locations": [
        loc.model_copy(update={"retention_hours": hours}) for loc in site.locations]})
        for site in config.settings.sites]
    return with_settings(config, sites=sites)


def kept_reasons(report: reaper.PurgeReport) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in report.kept:
        out.setdefault(f"{d.site}/{d.location}", []).append(d.reason)
    return out


SOURCE_FILES = [("ccat", "instruments", rel) for rel in FILES]
OBS_TAR = ("ccat", "buffer", f"packages/{PKG}.tar")


def test_no_lta_copy_refuses_and_deletes_nothing(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)

    report = purge_package(opsdb, config, PKG)

    assert (report.deleted, report.deleted_bytes, report.failures) == (0, 0, [])
    assert all(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    reasons = kept_reasons(report)
    assert len(reasons["ccat/instruments"]) == 2 and len(reasons["ccat/buffer"]) == 1
    assert all("0 of 2 required verified LTA copies" in r
               for r in reasons["ccat/instruments"] + reasons["ccat/buffer"])
    assert status_by_label(opsdb) == {"ccat/instruments": {CopyStatus.PRESENT},
                                      "ccat/buffer": {CopyStatus.PRESENT}}
    assert operations(opsdb) == []


def test_one_of_two_lta_copies_keeps_observatory_but_frees_that_sites_buffer(
        config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne")
    add_copy(opsdb, "us", "buffer")  # arrived at us, not yet in its LTA

    report = purge_package(opsdb, config, PKG)

    assert report.deleted == 1 and report.deleted_bytes == len(TAR) and report.failures == []
    assert not path_of(config, "cologne", "buffer", OBS_TAR[2]).exists()
    assert all(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    reasons = kept_reasons(report)
    assert all(r.startswith("1 of 2 required verified LTA copies (cologne)")
               for r in reasons["ccat/instruments"] + reasons["ccat/buffer"])
    assert reasons["us/buffer"] == ["no verified LTA copy at us yet"]
    assert status_by_label(opsdb)["cologne/buffer"] == {CopyStatus.DELETED}
    [op] = operations(opsdb)
    assert op.status == OperationStatus.COMPLETED and op.evidence is not None
    assert [c["site"] for c in op.evidence["copies"]] == ["cologne"]
    assert certificate_problems(opsdb, config, PKG) == []


def test_required_copies_satisfied_deletes_and_certifies(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    lta_ids = {c.id for (label, _, _), c in copies(opsdb).items() if label.endswith("/lta")}

    report = purge_package(opsdb, config, PKG, run_id="run-1")

    assert report.failures == []
    assert report.deleted == 5  # 2 source files, observatory tar, 2 archive buffer tars
    assert report.deleted_bytes == sum(map(len, FILES.values())) + 3 * len(TAR)
    assert not any(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    source_root = path_of(config, "ccat", "instruments", "")
    assert source_root.is_dir() and not (source_root / "obs1").exists()  # emptied dirs pruned
    for site in ("cologne", "us"):
        assert path_of(config, site, "lta", OBS_TAR[2]).read_bytes() == TAR
    assert status_by_label(opsdb) == {
        "ccat/instruments": {CopyStatus.DELETED}, "ccat/buffer": {CopyStatus.DELETED},
        "cologne/buffer": {CopyStatus.DELETED}, "us/buffer": {CopyStatus.DELETED},
        "cologne/lta": {CopyStatus.PRESENT}, "us/lta": {CopyStatus.PRESENT}}
    ops = operations(opsdb)
    assert len(ops) == 5
    for op in ops:
        assert op.operation_type == OperationType.DELETION and op.run_id == "run-1"
        assert op.status == OperationStatus.COMPLETED and op.finished_at is not None
        assert op.bytes is not None and op.bytes > 0 and op.error is None
        assert op.evidence is not None
    observatory_ops = [op for op in ops if op.evidence and op.evidence["required"] == 2]
    assert len(observatory_ops) == 3
    for op in observatory_ops:
        assert op.evidence is not None
        assert {c["copy_id"] for c in op.evidence["copies"]} == lta_ids
        assert {c["site"] for c in op.evidence["copies"]} == {"cologne", "us"}
    assert certificate_problems(opsdb, config, PKG) == []


def test_unverified_lta_copy_does_not_count(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne")
    add_copy(opsdb, "us", "buffer")
    add_copy(opsdb, "us", "lta", verified=False)

    report = purge_package(opsdb, config, PKG)

    assert all(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    assert path_of(config, "us", "buffer", OBS_TAR[2]).exists()
    reasons = kept_reasons(report)
    assert all(r.startswith("1 of 2") for r in reasons["ccat/instruments"])
    assert reasons["us/buffer"] == ["no verified LTA copy at us yet"]
    assert report.deleted == 1  # only the cologne buffer copy


def test_lta_copy_verified_before_it_was_written_does_not_count(
        config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    with opsdb.session() as s:
        for c in s.scalars(select(PackageCopy)):
            if c.location.label == "us/lta":
                c.verified_at = T0 - timedelta(hours=1)
        package = s.scalars(select(RawDataPackage)).one()
        plan = plan_deletions(s, config, package, utcnow())
    assert {d.action for d in plan if d.site == "ccat"} == {Action.KEEP}


@pytest.mark.parametrize("corrupt", ["cologne/buffer", "us/lta"])
def test_corrupt_copy_anywhere_blocks_everything(config: Config, opsdb: OpsDB,
                                                 corrupt: str) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    with opsdb.session() as s:
        victim = next(c for c in s.scalars(select(PhysicalCopy)) if c.location.label == corrupt)
        victim.status = CopyStatus.CORRUPT

    report = purge_package(opsdb, config, PKG)

    assert (report.deleted, report.failures) == (0, [])
    assert operations(opsdb) == []
    assert all(c.status != CopyStatus.DELETED for c in copies(opsdb).values())
    assert all(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    for d in report.kept:
        if d.location_type != LocationType.LONG_TERM_ARCHIVE:
            assert d.reason == (f"integrity check failed for {corrupt} copy; "
                                "nothing is purged until it is repaired")


def test_a_source_file_changed_since_filing_keeps_only_itself(config: Config,
                                                              opsdb: OpsDB) -> None:
    """Its new bytes are in no archive: kept. The package's other files and its tar are in
    both archives, verified: purged as usual."""
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    changed, kept_too = SOURCE_FILES
    path_of(config, *changed).write_bytes(b"rewritten by the instrument")
    with opsdb.session() as s:
        victim = next(c for c in s.scalars(select(RawDataFileCopy))
                      if c.relative_path == changed[2])
        victim.status = CopyStatus.CORRUPT  # as the reaper's re-check or an audit marks it

    report = purge_package(opsdb, config, PKG)

    assert path_of(config, *changed).read_bytes() == b"rewritten by the instrument"
    assert not path_of(config, *kept_too).exists() and not path_of(config, *OBS_TAR).exists()
    assert report.failures == []
    [kept] = [d for d in report.kept if d.location_type == LocationType.SOURCE]
    assert "changed at its source since filing" in kept.reason


def test_retention_period_is_respected(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    config = with_retention(config, 24)

    early = purge_package(opsdb, config, PKG, now=T0 + timedelta(hours=1))

    assert early.deleted == 0 and operations(opsdb) == []
    deadline = (T0 + timedelta(hours=24)).isoformat()
    for reasons in kept_reasons(early).values():
        assert all(r in (f"retention 24h not reached: deletable after {deadline}",
                         "long-term archive copies are never deleted automatically")
                   for r in reasons)

    late = purge_package(opsdb, config, PKG, now=T0 + timedelta(hours=25))

    assert late.deleted == 5 and late.failures == []
    assert not any(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])


def test_stale_plan_is_rechecked_at_deletion_time(config: Config, opsdb: OpsDB,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    plans: list[list[Decision]] = []

    def plan_then_corrupt(*args: Any) -> list[Decision]:
        plan = plan_deletions(*args)
        plans.append(plan)
        with opsdb.session() as s:  # an integrity check elsewhere finds the us LTA copy bad
            for c in s.scalars(select(PackageCopy)):
                if c.location.label == "us/lta":
                    c.status = CopyStatus.CORRUPT
        return plan

    monkeypatch.setattr(reaper, "plan_deletions", plan_then_corrupt)
    report = purge_package(opsdb, config, PKG)

    assert sum(d.action == Action.DELETE for d in plans[0]) == 5  # the plan said delete
    assert (report.deleted, report.failures) == (0, [])
    assert operations(opsdb) == []
    assert all(path_of(config, *where).exists() for where in [*SOURCE_FILES, OBS_TAR])
    rechecked = [d for d in report.kept if "us/lta" in d.reason]
    assert len(rechecked) == 5


def test_purging_twice_is_idempotent(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    assert purge_package(opsdb, config, PKG).deleted == 5

    again = purge_package(opsdb, config, PKG)

    assert (again.deleted, again.deleted_bytes, again.failures) == (0, 0, [])
    assert {d.location for d in again.kept} == {"lta"}
    assert len(operations(opsdb)) == 5


def test_file_already_missing_is_deleted_with_a_note(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    path_of(config, *OBS_TAR).unlink()

    report = purge_package(opsdb, config, PKG)

    assert report.deleted == 5 and report.failures == []
    [noted] = [op for op in operations(opsdb) if op.error]
    assert noted.error is not None and "already missing" in noted.error
    assert noted.status == OperationStatus.COMPLETED


def test_failed_unlink_is_recorded_and_not_retried_blindly(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str]) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    obs_tar = path_of(config, *OBS_TAR)
    obs_tar.unlink()
    obs_tar.mkdir()  # unlink() of a directory raises OSError

    report = purge_package(opsdb, config, PKG)

    assert report.deleted == 4 and len(report.failures) == 1
    [failed] = [op for op in operations(opsdb) if op.status == OperationStatus.FAILED]
    assert failed.error and str(obs_tar) in report.failures[0]
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETION_FAILED}
    again = purge_package(opsdb, config, PKG)
    assert again.deleted == 0
    [reason] = kept_reasons(again)["ccat/buffer"]
    assert reason.startswith("deletion refused") and f"operation {failed.id}" in reason
    # `purge --plan`, of the cycle and of the package, says so too (the package's only copy
    # left outside the archives is the refused one)
    for package in ([], ["--package", PKG]):
        capsys.readouterr()
        assert run_cli("--config", str(config.path), "purge", "--plan", *package) == 0
        plan = capsys.readouterr().out
        assert f"keep   {PKG}" in plan and "deletion refused" in plan, plan


def refused(config: Config, opsdb: OpsDB) -> list[Problem]:
    with opsdb.session() as session:
        return [p for p in current_problems(session, config, utcnow())
                if p.kind == "deletion_refused"]


def test_a_refused_deletion_tells_a_person_and_closes_once_the_file_is_taken_away(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str]) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    obs_tar = path_of(config, *OBS_TAR)
    obs_tar.unlink()
    obs_tar.mkdir()  # something else took the path: not the recorded file
    (obs_tar / "theirs.dat").write_bytes(b"not ours")
    purge_package(opsdb, config, PKG)

    [problem] = refused(config, opsdb)
    assert str(obs_tar) in problem.subject and f"purge --package {PKG}" in problem.detail
    capsys.readouterr()
    print_status(opsdb, config)  # `ccat-dt status` says so: where, and what to do
    out = capsys.readouterr().out
    assert "deletions REFUSED: 1" in out and str(obs_tar) in out
    assert f"`ccat-dt purge --package {PKG}`" in out
    before = len(operations(opsdb))

    # Purged again while it is still there: left alone, nothing recorded, still told.
    assert purge_package(opsdb, config, PKG).failures == []
    assert (obs_tar / "theirs.dat").read_bytes() == b"not ours"
    assert len(operations(opsdb)) == before and len(refused(config, opsdb)) == 1

    # The person takes it away; the next purge of the package records the copy deleted, under
    # the certificate that allowed the deletion, and the notice is resolved.
    (obs_tar / "theirs.dat").unlink()
    obs_tar.rmdir()
    assert purge_package(opsdb, config, PKG).failures == []
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETED}
    assert certificate_problems(opsdb, config, PKG) == []
    assert refused(config, opsdb) == []
    print_status(opsdb, config)
    assert "REFUSED" not in capsys.readouterr().out


def test_a_refused_deletion_closes_once_the_recorded_bytes_are_back(
        config: Config, opsdb: OpsDB) -> None:
    """The other way a person settles a refusal: the recorded bytes put back at the path. The
    copy is then decided afresh and deleted; other bytes of the same size stay refused."""
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    obs_tar = path_of(config, *OBS_TAR)
    recorded = obs_tar.read_bytes()
    obs_tar.unlink()
    obs_tar.write_bytes(bytes(len(recorded)))  # the same size, other bytes: not the copy
    purge_package(opsdb, config, PKG)
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETION_FAILED}
    assert len(refused(config, opsdb)) == 1

    assert purge_package(opsdb, config, PKG).failures == []  # still other bytes: left alone
    assert obs_tar.read_bytes() == bytes(len(recorded))
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETION_FAILED}

    obs_tar.write_bytes(recorded)
    report = purge_package(opsdb, config, PKG)

    assert report.failures == [] and report.deleted == 1
    assert not obs_tar.exists()  # the storage
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETED}
    assert certificate_problems(opsdb, config, PKG) == []
    assert refused(config, opsdb) == []


def test_processing_copies_outside_a_staging_request_are_left_alone(config: Config,
                                                                   opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    add_copy(opsdb, "ramses", "processing")

    report = purge_package(opsdb, config, PKG)

    assert kept_reasons(report)["ramses/processing"] == ["not part of a staging request"]
    assert path_of(config, "ramses", "processing", OBS_TAR[2]).exists()


def test_last_verified_copy_of_the_bytes_is_kept(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    with opsdb.session() as s:
        s.scalars(select(RawDataPackage)).one().checksum = None  # nothing to compare against
    add_copy(opsdb, "cologne", "buffer")
    add_copy(opsdb, "cologne", "lta", data=b"different bytes")  # verified, but not these bytes
    with opsdb.session() as s:
        for c in s.scalars(select(PackageCopy)):
            if c.location.label == "ccat/buffer":
                c.verified_at = None  # the cologne buffer copy is now the only verified one

    report = purge_package(opsdb, config, PKG)

    assert kept_reasons(report)["cologne/buffer"] == ["last verified copy"]
    assert report.deleted == 0


def test_certificate_problems_reports_uncertified_deletions(config: Config,
                                                            opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    purge_package(opsdb, config, PKG)
    assert certificate_problems(opsdb, config, PKG) == []
    with opsdb.session() as s:
        cologne_lta = next(c for c in s.scalars(select(PackageCopy))
                           if c.location.label == "cologne/lta")
        for op in s.scalars(select(Operation)):
            copy = s.get_one(PhysicalCopy, op.copy_id)
            assert op.evidence is not None
            if copy.location.label == "ccat/buffer":  # certificate relying on one site only
                op.evidence = {**op.evidence, "copies": [
                    c for c in op.evidence["copies"] if c["copy_id"] == cologne_lta.id]}
            elif copy.relative_path == "obs1/f280/a.dat":
                s.delete(op)  # a deletion with no operation at all
        rogue = RawDataFileCopy(raw_data_file=s.scalars(select(RawDataFile)).first(),
                                location=get_location(s, "ccat", "instruments"),
                                relative_path="elsewhere/a.dat", size=1, checksum="x",
                                status=CopyStatus.DELETED, created_at=T0)
        s.add(rogue)

    problems = certificate_problems(opsdb, config, PKG)

    assert len(problems) == 3
    assert sum("without a completed deletion operation" in p for p in problems) == 2
    assert any("ccat/buffer" in p and "1 site(s) (cologne); 2 required" in p for p in problems)


def test_certificate_must_predate_the_operation(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    purge_package(opsdb, config, PKG)
    with opsdb.session() as s:
        op = s.scalars(select(Operation).order_by(Operation.id)).first()
        assert op is not None and op.evidence is not None
        later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        op.evidence = {**op.evidence, "copies": [
            {**c, "verified_at": later} for c in op.evidence["copies"]]}

    [problem] = certificate_problems(opsdb, config, PKG)
    assert "0 site(s)" in problem


def test_planning_twice_in_one_session_sees_fresh_state(config: Config, opsdb: OpsDB) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    with opsdb.session() as s:
        package = s.scalars(select(RawDataPackage)).one()
        assert len(package.copies) == 5  # loaded into this session and held on to
        before = plan_deletions(s, config, package, utcnow())
        other = OpsDB(config.opsdb_url)
        with other.session() as s2:  # another process starts a deletion meanwhile
            for c in s2.scalars(select(PackageCopy)):
                if c.location.label == "ccat/buffer":
                    c.status = CopyStatus.DELETION_IN_PROGRESS
        other.dispose()
        after = plan_deletions(s, config, package, utcnow())
    [obs_before] = [d for d in before if f"{d.site}/{d.location}" == "ccat/buffer"]
    [obs_after] = [d for d in after if f"{d.site}/{d.location}" == "ccat/buffer"]
    assert obs_before.action == Action.DELETE
    assert obs_after.action == Action.KEEP
    assert obs_after.reason.startswith("previous deletion did not finish")


def test_a_refused_deletion_is_not_closed_while_its_disk_is_not_mounted(
        config: Config, opsdb: OpsDB) -> None:
    from ccat_dt.marker import MARKER

    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    obs_tar = path_of(config, *OBS_TAR)
    obs_tar.unlink()
    obs_tar.mkdir()  # not the recorded file: refused
    purge_package(opsdb, config, PKG)
    obs_tar.rmdir()
    root = path_of(config, "ccat", "buffer", "")
    (root / MARKER).rename(root / "away")  # the disk as if unmounted: an empty path proves nothing

    purge_package(opsdb, config, PKG)
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETION_FAILED}

    (root / "away").rename(root / MARKER)
    purge_package(opsdb, config, PKG)
    assert status_by_label(opsdb)["ccat/buffer"] == {CopyStatus.DELETED}


def test_a_location_marker_filed_by_mistake_is_never_deleted(config: Config,
                                                              opsdb: OpsDB) -> None:
    """Filing refuses the marker now; one filed before that is kept by the purge, which deletes
    the package's other source files."""
    from ccat_dt.marker import MARKER, MARKER_TEXT

    make_package(opsdb, {**FILES, MARKER: MARKER_TEXT.encode()})
    archived(opsdb, "cologne", "us")
    report = purge_package(opsdb, config, PKG)
    root = path_of(config, "ccat", "instruments", "")
    assert (root / MARKER).read_text() == MARKER_TEXT
    assert not any((root / rel).exists() for rel in FILES)
    assert any("location marker" in d.reason for d in report.kept) or report.failures
