"""Purge cycles: the byte budget, oldest first; disk pressure deleting early down to the low
watermark but never past any other rule; and `ccat-dt purge [--plan]`."""

from __future__ import annotations

import copy as copylib
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ccat_assets.cli import main
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.marker import write_marker
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    ExecutedObsUnit,
    InstrumentModule,
    Operation,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    Site,
    utcnow,
)
from ccat_dt.purge_cycle import CyclePlan, DiskUsage, measure, plan_cycle
from ccat_dt.reaper import certificate_problems, purge_package
from ccat_dt.retention import Action, Decision, plan_deletions
from ccat_dt.topology import get_location, get_site, prepare_opsdb
from tests.faults.disks import MountDisk
from tests.helpers import checksum, write

NOW = utcnow().replace(microsecond=0) - timedelta(hours=1)  # simulated "now", in the past


# --- building deployments and OpsDB state with real small files ------------------------------

def deploy(directory: Path, locations: dict[str, dict[str, Any]] | None = None,
           **policies: Any) -> Config:
    """The embedded default with per-location settings ("site/location" -> fields) and policies,
    written to `directory`, migrated and its topology synced."""
    sites = copylib.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    for label, fields in (locations or {}).items():
        site_name, location_name = label.split("/")
        [site] = [s for s in sites if s["short_name"] == site_name]
        [location] = [loc for loc in site["locations"] if loc["name"] == location_name]
        location.update(fields)
    base = EMBEDDED_DEFAULT["policies"]
    assert isinstance(base, dict)
    config = load_config(write_default_config(
        directory, overrides={"sites": sites, "policies": {**base, **policies}}))
    prepare_opsdb(config)
    return config


def tar_of(files: dict[str, bytes]) -> bytes:
    """Stand-in bytes for the package tar (only its checksum and size matter here)."""
    return b"".join(files[rel] for rel in sorted(files))


def add_package(opsdb: OpsDB, name: str, files: dict[str, bytes], created_at: datetime,
                module: str = "f280") -> list[int]:
    """A package of raw files filed (and verified) at ccat/instruments; the raw-file copy ids."""
    ids = []
    with opsdb.session() as s:
        source = get_location(s, "ccat", "instruments")
        obs = ExecutedObsUnit(name=f"obs-{name}")
        mod = s.scalars(select(InstrumentModule).where(InstrumentModule.name == module)).one()
        tar = tar_of(files)
        package = RawDataPackage(name=name, observation=obs, module=mod, size=len(tar),
                                 primary_site=get_site(s, "cologne"), checksum=checksum(tar))
        s.add(package)
        for rel, data in files.items():
            path = f"{name}/{rel}"
            digest = hash_file(write(Path(source.root) / path, data))[0]
            raw = RawDataFile(source_location=source, relative_path=path, size=len(data),
                              checksum_algorithm="xxh3_128", checksum=digest, observation=obs,
                              module=mod, package=package)
            copy = RawDataFileCopy(raw_data_file=raw, location=source, relative_path=path,
                                   size=len(data), checksum=digest, created_at=created_at,
                                   verified_at=created_at + timedelta(minutes=1))
            s.add(copy)
            s.flush()
            ids.append(copy.id)
    return ids


def add_copy(opsdb: OpsDB, name: str, site: str, location: str, created_at: datetime, *,
             verified_at: datetime | None = None, verified: bool = True,
             data: bytes | None = None, suffix: str = "") -> int:
    """A copy of package `name`'s tar at site/location (verified a minute after it was written
    unless `verified_at` or verified=False says otherwise); its id."""
    with opsdb.session() as s:
        loc = get_location(s, site, location)
        package = s.scalars(select(RawDataPackage).where(RawDataPackage.name == name)).one()
        tar = data if data is not None else tar_of(files_of(s, package))
        rel = f"packages/{name}{suffix}.tar"
        if verified and verified_at is None:
            verified_at = created_at + timedelta(minutes=1)
        copy = PackageCopy(package=package, location=loc, relative_path=rel, size=len(tar),
                           checksum=hash_file(write(Path(loc.root) / rel, tar))[0],
                           created_at=created_at,
                           verified_at=verified_at if verified else None)
        s.add(copy)
        s.flush()
        return copy.id


def files_of(s: Any, package: RawDataPackage) -> dict[str, bytes]:
    prefix = f"{package.name}/"
    return {f.relative_path.removeprefix(prefix):
            (Path(f.source_location.root) / f.relative_path).read_bytes() for f in package.files}


def path_of(opsdb: OpsDB, copy_id: int) -> Path:
    with opsdb.session() as s:
        copy = s.get_one(PhysicalCopy, copy_id)
        return Path(copy.location.root) / copy.relative_path


def statuses(opsdb: OpsDB) -> dict[int, CopyStatus]:
    with opsdb.session() as s:
        return {c.id: c.status for c in s.scalars(select(PhysicalCopy))}


def labels(opsdb: OpsDB) -> dict[int, str]:
    with opsdb.session() as s:
        return {c.id: c.location.label for c in s.scalars(select(PhysicalCopy))}


def owners(opsdb: OpsDB) -> dict[int, str]:
    """copy id -> the name of the package it is a copy of (or a raw file of)."""
    with opsdb.session() as s:
        out = {c.id: c.package.name for c in s.scalars(select(PackageCopy))}
        out |= {c.id: c.raw_data_file.package.name for c in s.scalars(select(RawDataFileCopy))
                if c.raw_data_file.package is not None}
        return out


def deletions(opsdb: OpsDB) -> list[Operation]:
    with opsdb.session() as s:
        return list(s.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION).order_by(Operation.id)))


def package_names(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as s:
        return list(s.scalars(select(RawDataPackage.name).order_by(RawDataPackage.id)))


def cycle_plan(opsdb: OpsDB, config: Config, now: datetime,
               usage: Callable[[DataLocation], DiskUsage | None] | None = None) -> CyclePlan:
    with opsdb.session() as s:
        if usage is None:
            return plan_cycle(s, config, now)
        return plan_cycle(s, config, now, usage=usage)


def execute(opsdb: OpsDB, config: Config, plan: CyclePlan, now: datetime,
            run_id: str = "cycle",
            usage: Callable[[DataLocation], DiskUsage | None] = measure) -> int:
    """Carry out a cycle's plan as the purge job does; the bytes freed."""
    freed = 0
    for package, (copy_ids, early_ids) in plan.by_package().items():
        report = purge_package(opsdb, config, package, now=now, run_id=run_id,
                               copy_ids=copy_ids, early_ids=early_ids, usage=usage)
        assert report.failures == []
        freed += report.deleted_bytes
    return freed


def archived_package(opsdb: OpsDB, name: str, base: datetime, files: dict[str, bytes]) -> None:
    """Filed at `base`, then (an hour apart each) in the observatory buffer, at cologne
    (buffer + verified LTA) and at us (buffer + verified LTA)."""
    add_package(opsdb, name, files, base)
    add_copy(opsdb, name, "ccat", "buffer", base + timedelta(hours=1))
    for offset, site in ((2, "cologne"), (3, "us")):
        add_copy(opsdb, name, site, "buffer", base + timedelta(hours=offset))
        add_copy(opsdb, name, site, "lta", base + timedelta(hours=offset))


def key(d: Decision) -> tuple[datetime, int]:
    return d.created_at, d.copy_id


# --- the byte budget -----------------------------------------------------------------------

def test_budget_takes_oldest_copies_first_and_never_exceeds_it(tmp_path: Path) -> None:
    size = 256
    budget = 10 * size  # 2.5 packages' worth: four deletable copies of `size` per package
    config = deploy(tmp_path / "deploy", purge_budget_bytes=budget)
    opsdb = OpsDB(config.opsdb_url)
    # The oldest package is not archived anywhere: its copies must not use up the budget.
    add_package(opsdb, "p0", {"a.dat": b"0" * size}, NOW - timedelta(days=10))
    add_copy(opsdb, "p0", "ccat", "buffer", NOW - timedelta(days=10))
    for day in (4, 3, 2, 1):  # p1 is the oldest archived package
        archived_package(opsdb, f"p{5 - day}", NOW - timedelta(days=day),
                         {"a.dat": bytes([48 + day]) * size})

    plan = cycle_plan(opsdb, config, NOW)

    with opsdb.session() as s:  # what the planner would delete without a budget
        deletable = sorted((d for p in s.scalars(select(RawDataPackage))
                            for d in plan_deletions(s, config, p, NOW)
                            if d.action == Action.DELETE), key=key)
    assert len(deletable) == 16 and all(d.size == size for d in deletable)
    assert plan.budget_bytes == budget
    assert plan.bytes <= budget
    planned = [d.copy_id for _, d in plan.deletions]
    assert planned == [d.copy_id for d in deletable[:10]]  # oldest first, up to the budget
    assert plan.bytes + deletable[10].size > budget  # the budget is what stopped it
    assert {p for p, _ in plan.deletions} == {"p1", "p2", "p3"}
    assert not any(d.site == "ccat" and p == "p0" for p, d in plan.deletions)
    by_package = plan.by_package()
    assert sorted(by_package) == ["p1", "p2", "p3"]
    assert all(early == [] for _, early in by_package.values())
    assert len(by_package["p3"][0]) == 2  # p3's source file and observatory tar, by age
    by_site = plan.by_site()  # one run per package and site, on that site's worker
    assert sorted(by_site) == sorted({(p, d.site) for p, d in plan.deletions})
    for (package, site), (copy_ids, _, locations) in by_site.items():
        mine = [d for p, d in plan.deletions if (p, d.site) == (package, site)]
        assert copy_ids == [d.copy_id for d in mine]
        assert locations == list(dict.fromkeys(d.location for d in mine))
    assert len(by_site[("p3", "ccat")][2]) == 2  # source and buffer: two locations, one run
    over = {d.copy_id for d in deletable[10:]}
    over_kept = [d for _, d in plan.kept if d.copy_id in over]
    assert {d.copy_id for d in over_kept} == over
    for d in over_kept:  # shown as kept, not as deleted, with the reason
        assert d.action == Action.KEEP
        assert d.reason.startswith(f"not in this purge cycle's budget ({budget} bytes); ")
    paths = {d.copy_id: Path(d.path) for d in deletable}
    assert all(path.exists() for path in paths.values())  # planning changes nothing
    assert deletions(opsdb) == []

    freed = execute(opsdb, config, plan, NOW)

    after = statuses(opsdb)
    deleted = {i for i, status in after.items() if status == CopyStatus.DELETED}
    assert deleted == set(planned)
    assert freed == plan.bytes <= budget
    assert sum(op.bytes or 0 for op in deletions(opsdb)) == freed
    assert {op.copy_id for op in deletions(opsdb)} == set(planned)
    for copy_id, path in paths.items():
        assert path.exists() == (copy_id not in deleted)
    for name in package_names(opsdb):
        assert certificate_problems(opsdb, config, name) == []

    # The next cycle picks up where the budget stopped: the rest of p3, then p4.
    second = cycle_plan(opsdb, config, NOW)
    assert [d.copy_id for _, d in second.deletions] == [d.copy_id for d in deletable[10:]]
    execute(opsdb, config, second, NOW)
    assert {i for i, st in statuses(opsdb).items() if st == CopyStatus.DELETED} == \
        {d.copy_id for d in deletable}
    opsdb.dispose()


# --- disk pressure -------------------------------------------------------------------------

PRESSURED = {"ccat/buffer": {"retention_hours": 24, "high_watermark_pct": 80,
                             "low_watermark_pct": 50},
             "ccat/instruments": {"retention_hours": 24},
             "cologne/buffer": {"retention_hours": 24}, "us/buffer": {"retention_hours": 24}}
TAR_SIZES = [300, 500, 400, 300, 200]  # the observatory tars, oldest first
TOTAL, USED = 4000, 3400  # 85% used; the low watermark (50%) is 1400 bytes away


def young_archived_packages(opsdb: OpsDB) -> list[int]:
    """Five packages archived at both sites within the last 10 hours (inside the 24h
    retention); the ids of their observatory buffer copies, oldest first."""
    ids = []
    for i, size in enumerate(TAR_SIZES):
        name, written = f"y{i}", NOW - timedelta(hours=10 - 2 * i)
        add_package(opsdb, name, {"a.dat": bytes([65 + i]) * (size // 2),
                                  "b.dat": bytes([97 + i]) * (size - size // 2)}, written)
        ids.append(add_copy(opsdb, name, "ccat", "buffer", written))
        for site in ("cologne", "us"):
            add_copy(opsdb, name, site, "buffer", written)
            add_copy(opsdb, name, site, "lta", written)
    return ids


def pressure_at(label: str, used: int, total: int = TOTAL
                ) -> Callable[[DataLocation], DiskUsage | None]:
    def usage(location: DataLocation) -> DiskUsage | None:
        return DiskUsage(total=total, used=used) if location.label == label else None
    return usage


def test_without_pressure_young_copies_are_kept_for_retention(tmp_path: Path) -> None:
    config = deploy(tmp_path / "deploy", PRESSURED)
    opsdb = OpsDB(config.opsdb_url)
    young_archived_packages(opsdb)

    plan = cycle_plan(opsdb, config, NOW, pressure_at("ccat/buffer", used=3000))  # 75% < 80%

    assert plan.deletions == [] and plan.pressure == []
    non_lta = [d for _, d in plan.kept if d.location != "lta"]
    assert len(non_lta) == 5 * 5  # two source files and three buffer tars per package
    for d in non_lta:
        deadline = (d.created_at + timedelta(hours=24)).isoformat()
        assert d.reason == f"retention 24h not reached: deletable after {deadline}"
        assert d.action == Action.KEEP and d.early
    execute(opsdb, config, plan, NOW)
    assert set(statuses(opsdb).values()) == {CopyStatus.PRESENT}
    opsdb.dispose()


def test_pressure_deletes_oldest_young_copies_down_to_the_low_watermark(tmp_path: Path) -> None:
    config = deploy(tmp_path / "deploy", PRESSURED)
    opsdb = OpsDB(config.opsdb_url)
    buffer_ids = young_archived_packages(opsdb)

    plan = cycle_plan(opsdb, config, NOW, pressure_at("ccat/buffer", used=USED))

    need = USED - 0.50 * TOTAL
    chosen = [d for _, d in plan.deletions]
    assert [d.copy_id for d in chosen] == buffer_ids[:4]  # oldest first: 300+500+400+300
    assert all(f"{d.site}/{d.location}" == "ccat/buffer" and d.early for d in chosen)
    assert all(d.action == Action.DELETE and "disk pressure" in d.reason for d in chosen)
    assert plan.bytes >= need  # enough to reach the low watermark ...
    assert plan.bytes - chosen[-1].size < need  # ... and not one copy more
    [pressure] = plan.pressure
    assert pressure.location == "ccat/buffer"
    assert (pressure.before_pct, pressure.high_pct, pressure.low_pct) == (85.0, 80, 50)
    assert pressure.after_pct == pytest.approx(100 * (USED - plan.bytes) / TOTAL)
    assert pressure.after_pct <= 50
    assert {p: early for p, (_, early) in plan.by_package().items()} == {
        f"y{i}": [buffer_ids[i]] for i in range(4)}
    [spared] = [d for _, d in plan.kept if d.copy_id == buffer_ids[4]]
    assert spared.reason.startswith("retention 24h not reached") and spared.early
    before = statuses(opsdb)

    freed = execute(opsdb, config, plan, NOW, usage=pressure_at("ccat/buffer", used=USED))

    after = statuses(opsdb)
    assert freed == plan.bytes
    assert {i for i, st in after.items() if st == CopyStatus.DELETED} == set(buffer_ids[:4])
    assert {i: st for i, st in after.items() if i not in buffer_ids[:4]} == \
        {i: st for i, st in before.items() if i not in buffer_ids[:4]}
    for copy_id in buffer_ids:
        assert path_of(opsdb, copy_id).exists() == (copy_id == buffer_ids[4])
    ops = deletions(opsdb)
    assert [op.copy_id for op in ops] == buffer_ids[:4]
    for op in ops:
        assert op.reason is not None and "disk pressure" in op.reason
        assert op.evidence is not None and op.evidence["required"] == 2
        assert {c["site"] for c in op.evidence["copies"]} == {"cologne", "us"}
    for name in package_names(opsdb):
        assert certificate_problems(opsdb, config, name) == []
    opsdb.dispose()


def test_pressure_gone_by_the_deletion_keeps_young_copies_for_retention(tmp_path: Path) -> None:
    """A cycle planned under pressure, carried out (or its run re-executed) once the disk has
    room again: the young copies wait for their retention age."""
    config = deploy(tmp_path / "deploy", PRESSURED)
    opsdb = OpsDB(config.opsdb_url)
    buffer_ids = young_archived_packages(opsdb)
    plan = cycle_plan(opsdb, config, NOW, pressure_at("ccat/buffer", used=USED))
    assert len(plan.deletions) == 4

    freed = execute(opsdb, config, plan, NOW, usage=pressure_at("ccat/buffer", used=1000))

    assert freed == 0
    assert all(path_of(opsdb, i).exists() for i in buffer_ids)
    assert deletions(opsdb) == []
    [report] = [purge_package(opsdb, config, "y0", now=NOW, early_ids=buffer_ids[:1],
                              usage=pressure_at("ccat/buffer", used=1000))]
    [kept] = [d for d in report.kept if d.copy_id == buffer_ids[0]]
    assert kept.reason == ("disk pressure at ccat/buffer is over (25.0% used, low watermark "
                           "50%): kept for its retention age")
    # Nor does a disk that cannot be measured now count as pressed.
    report = purge_package(opsdb, config, "y0", now=NOW, early_ids=buffer_ids[:1],
                           usage=lambda location: None)
    assert report.deleted == 0 and path_of(opsdb, buffer_ids[0]).exists()
    opsdb.dispose()


def test_pressure_never_makes_an_ineligible_copy_eligible(tmp_path: Path) -> None:
    watermarks = {"retention_hours": 24, "high_watermark_pct": 80, "low_watermark_pct": 50}
    config = deploy(tmp_path / "deploy", {"ccat/buffer": watermarks,
                                          "ccat/instruments": watermarks})
    opsdb = OpsDB(config.opsdb_url)
    ids: list[int] = []
    for i in range(3):
        name, written = f"q{i}", NOW - timedelta(hours=5 - i)
        ids += add_package(opsdb, name, {"a.dat": bytes([65 + i]) * 300}, written)
        ids.append(add_copy(opsdb, name, "ccat", "buffer", written))
        add_copy(opsdb, name, "cologne", "lta", written)  # verified
        add_copy(opsdb, name, "us", "lta", written, verified=False)  # 1 of 2 verified
    full = DiskUsage(total=TOTAL, used=int(0.99 * TOTAL))

    plan = cycle_plan(opsdb, config, NOW, lambda location: full)

    assert not [d for _, d in plan.deletions if d.site == "ccat"]
    assert plan.deletions == []
    assert sorted(p.location for p in plan.pressure) == ["ccat/buffer", "ccat/instruments"]
    assert all(p.before_pct == p.after_pct == 99.0 for p in plan.pressure)
    observatory = [d for _, d in plan.kept if d.site == "ccat"]
    assert sorted(d.copy_id for d in observatory) == sorted(ids)
    for d in observatory:
        assert d.reason.startswith("1 of 2 required verified LTA copies (cologne)")
        assert not d.early
    # Nor does the reaper let a caller force them out as "early".
    for name in package_names(opsdb):
        report = purge_package(opsdb, config, name, now=NOW, early_ids=ids)
        assert report.deleted == 0
    assert set(statuses(opsdb).values()) == {CopyStatus.PRESENT}
    assert deletions(opsdb) == []
    assert all(path_of(opsdb, i).exists() for i in ids)
    opsdb.dispose()


def test_a_buffer_out_of_inodes_is_under_pressure_though_its_bytes_are_free(
        tmp_path: Path, mount_disk: MountDisk, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The observatory buffer is a real tmpfs of 4 MB with 20 inodes, 85% of them used (the
    young tars and many small files of something else) while 1% of its bytes are: full for
    every new file (ENOSPC), so above its high watermark (80%). Before, the watermarks compared
    bytes only: nothing went early, and the next package could not be written. Now the fill
    is the higher of the two: `purge --plan` says the inodes are why, and the purge deletes
    the oldest young tars early, one inode each, until 70% (the low watermark) of the inodes
    are used; none past any other rule (certificates hold)."""
    monkeypatch.delenv("CCAT_DT_CONFIG", raising=False)
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    config = deploy(tmp_path / "deploy", {**PRESSURED, "ccat/buffer": {
        "retention_hours": 24, "high_watermark_pct": 80, "low_watermark_pct": 70}})
    disk = mount_disk(config, "ccat/buffer", 4096 * 1024, nr_inodes="20")
    opsdb = OpsDB(config.opsdb_url)
    buffer_ids = young_archived_packages(opsdb)
    (disk.root / "other").mkdir()
    for i in range(20):  # another program's small files, up to 17 of the 20 inodes
        info = os.statvfs(disk.root)
        if info.f_files - info.f_ffree >= 17:
            break
        (disk.root / "other" / str(i)).write_bytes(b"x")
    info = os.statvfs(disk.root)
    assert (info.f_files, info.f_files - info.f_ffree) == (20, 17)
    others = sorted((disk.root / "other").iterdir())
    assert (info.f_blocks - info.f_bfree) / info.f_blocks < 0.05  # its bytes: room to spare

    main(["--config", str(config.path), "purge", "--plan"])

    out = capsys.readouterr().out
    assert ("disk pressure at ccat/buffer: 85.0% of its inodes used -> 70.0% (high 80%, "
            "low 70%)") in out.splitlines(), out
    early = [line for line in out.splitlines() if line.startswith("DELETE ")]
    assert [line.split()[-1] for line in early] == [
        str(path_of(opsdb, i)) for i in buffer_ids[:3]], out  # oldest first, 3 inodes
    assert out.count("disk pressure at ccat/buffer (85.0% of its inodes used, high watermark "
                     "80%): deleting early; would have been deletable after") == 3, out
    assert all(path_of(opsdb, i).exists() for i in buffer_ids)  # the plan deletes nothing

    main(["--config", str(config.path), "purge"])

    for copy_id in buffer_ids:  # on the disk: the three oldest tars gone, the others kept
        assert path_of(opsdb, copy_id).exists() == (copy_id in buffer_ids[3:])
    info = os.statvfs(disk.root)
    assert info.f_files - info.f_ffree == 14  # 70% of its inodes: the low watermark
    assert sorted((disk.root / "other").iterdir()) == others  # not ccat-dt's to delete
    after = statuses(opsdb)
    assert {i for i, st in after.items() if st == CopyStatus.DELETED} == set(buffer_ids[:3])
    for name in package_names(opsdb):
        assert certificate_problems(opsdb, config, name) == []
    opsdb.dispose()


# --- ccat-dt purge [--plan] ----------------------------------------------------------------

def test_purge_plan_shows_and_changes_nothing_then_purge_deletes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_CONFIG", raising=False)
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    size = 200
    config = deploy(tmp_path / "deploy", purge_budget_bytes=6 * size)
    opsdb = OpsDB(config.opsdb_url)
    archived_package(opsdb, "old", NOW - timedelta(days=3), {"a.dat": b"o" * size})
    archived_package(opsdb, "new", NOW - timedelta(days=2), {"a.dat": b"n" * size})
    add_package(opsdb, "waiting", {"a.dat": b"w" * size}, NOW - timedelta(days=4))
    add_copy(opsdb, "waiting", "ccat", "buffer", NOW - timedelta(days=4))
    before = statuses(opsdb)
    paths = {i: path_of(opsdb, i) for i in before}
    where, owner = labels(opsdb), owners(opsdb)

    main(["--config", str(config.path), "purge", "--plan"])

    out = capsys.readouterr().out
    assert statuses(opsdb) == before and deletions(opsdb) == []
    assert all(path.exists() for path in paths.values())
    lines = out.splitlines()
    assert lines[0].startswith("purge cycle: 6 deletion(s), 0.0 MB (budget 0 MB)")
    shown: dict[str, list[tuple[str, str]]] = {}  # path -> [(verb line, why line)]
    for line, why in zip(lines, lines[1:], strict=False):
        if line.startswith(("DELETE ", "keep ")):
            assert why.strip().startswith("why: ")
            path = line.split()[-1]
            shown.setdefault(path, []).append((line, why.strip().removeprefix("why: ")))
    assert sorted(shown) == sorted(str(p) for p in paths.values())
    deleted_paths = {path for path, entries in shown.items()
                     if any(line.startswith("DELETE") for line, _ in entries)}
    # The oldest archived package fully (4 copies), then the next one's source file and tar.
    expected = {i for i, label in where.items()
                if (owner[i] == "old" and not label.endswith("/lta"))
                or (owner[i] == "new" and label in ("ccat/instruments", "ccat/buffer"))}
    assert deleted_paths == {str(paths[i]) for i in expected}
    for path in deleted_paths:
        [(line, why)] = shown[path]
        assert " MB " in line and "retention 0h passed" in why
        assert why.startswith(("2 of 2 required verified LTA copies (cologne, us)",
                               "verified LTA copy at"))
    for i, label in where.items():
        entries = shown[str(paths[i])]
        if label.endswith("/lta"):
            assert entries[0][1] == "long-term archive copies are never deleted automatically"
        elif owner[i] == "waiting":
            assert entries[0][0].startswith("keep ")
            assert entries[0][1].startswith("0 of 2 required verified LTA copies (none)")
    over_budget = {str(paths[i]) for i, label in where.items()
                   if owner[i] == "new" and label in ("cologne/buffer", "us/buffer")}
    for path in over_budget:  # deletable, but not in this cycle: shown as kept, and why
        [(line, why)] = shown[path]
        assert line.startswith("keep ")
        assert why.startswith("not in this purge cycle's budget (1200 bytes); ")

    main(["--config", str(config.path), "purge"])

    out = capsys.readouterr().out
    assert "old: deleted 4 copies" in out and "new: deleted 2 copies" in out
    after = statuses(opsdb)
    assert {i for i, st in after.items() if st == CopyStatus.DELETED} == expected
    assert {i: st for i, st in after.items() if i not in expected} == \
        {i: st for i, st in before.items() if i not in expected}
    for i, copy_path in paths.items():  # `path` above: the plan's printed str
        assert copy_path.exists() == (i not in expected)
    for name in package_names(opsdb):
        assert certificate_problems(opsdb, config, name) == []
    opsdb.dispose()


def test_purge_of_one_package_deletes_nothing_of_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_CONFIG", raising=False)
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    config = deploy(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    archived_package(opsdb, "old", NOW - timedelta(days=3), {"a.dat": b"o" * 200})
    archived_package(opsdb, "new", NOW - timedelta(days=2), {"a.dat": b"n" * 200})
    paths, owner, where = ({i: path_of(opsdb, i) for i in statuses(opsdb)}, owners(opsdb),
                           labels(opsdb))

    main(["--config", str(config.path), "purge", "--package", "new"])

    out = capsys.readouterr().out
    assert "new: deleted 4 copies" in out
    # its headline says what this command does, not the whole cycle's figures first
    assert out.startswith("purge of new: 4 deletion(s) in the cycle's plan, 0.0 MB; the whole "
                          "cycle: 8 deletion(s)"), out.splitlines()[0]
    for i, path in paths.items():  # on the disks: only "new"'s source and buffer copies gone
        assert path.exists() == (owner[i] == "old" or where[i].endswith("/lta")), where[i]
    opsdb.dispose()


def test_a_remote_disk_is_not_measured_by_this_hosts_file_system(tmp_path: Path) -> None:
    """A remote buffer's root often exists here too (/data on both hosts): this host's disk
    at that path says nothing about the remote one, so it puts no pressure on its copies."""
    site = Site(name="Cologne", short_name="cologne")
    here = DataLocation(name="buffer", root=str(tmp_path), host=None, site=site)
    there = DataLocation(name="buffer", root=str(tmp_path), host="cologne-archive", site=site)
    assert measure(here) is None  # nor is an empty mount point: the system disk under it
    write_marker(tmp_path, "cologne/buffer")
    assert measure(here) is not None
    assert measure(there) is None
