"""Random histories of packages, copies, integrity failures, time and disk pressure, purged
cycle by cycle on a real SQLite OpsDB with real files: the deletion invariants always hold.

After every cycle, checked from OpsDB and the disk against a model kept by the test:
(a) observatory copies (SOURCE raw files, the observatory buffer tar) go only with the
    required verified LTA copies at distinct sites, as the model knows them, certified;
    an archive site's buffer copy only with that site's own verified LTA copy;
(b) a package that had a verified copy of its bytes (or its raw files at SOURCE) still has one;
(c) LTA copies are never deleted;
(d) a cycle deletes at most purge_budget_bytes;
(e) nothing of a package with a CORRUPT copy is deleted;
(f) a copy younger than its retention goes only from a location above its high watermark;
plus: exactly the planned copies go, deleted files are gone from disk and no others, and a
cycle that deletes nothing had nothing deletable within the budget.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    Operation,
    OperationStatus,
    OperationType,
    PhysicalCopy,
    utcnow,
)
from ccat_dt.purge_cycle import DiskUsage, plan_cycle
from ccat_dt.reaper import certificate_problems, purge_package
from tests.test_purge_cycle import add_copy, add_package, deploy, tar_of

BUDGET = 1500  # bytes per cycle: a package is up to ~750 bytes per copy, so it binds
REQUIRED = 2  # the default: both archive sites
WATERMARKS = {"high_watermark_pct": 80, "low_watermark_pct": 50}
LOCATIONS = {"ccat/instruments": {"retention_hours": 24, **WATERMARKS},
             "ccat/buffer": {"retention_hours": 24, **WATERMARKS},
             "cologne/buffer": {"retention_hours": 12},
             "us/buffer": {"retention_hours": 0}}
RETENTION = {label: timedelta(hours=fields["retention_hours"])
             for label, fields in LOCATIONS.items()}
HIGH, LOW = DiskUsage(total=4000, used=3600), DiskUsage(total=4000, used=400)
OBSERVATORY = ("ccat/instruments", "ccat/buffer")
LTA = ("cologne/lta", "us/lta")


@dataclass
class Copy:
    id: int
    package: str
    label: str  # site/location
    kind: str  # "package" or "raw_file"
    created_at: datetime
    verified_at: datetime | None
    path: Path
    data: bytes  # what the file should hold
    status: CopyStatus = CopyStatus.PRESENT
    missing: bool = False  # the file was removed behind OpsDB's back (and found CORRUPT)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def site(self) -> str:
        return self.label.split("/")[0]

    @property
    def verified(self) -> bool:
        return (self.status == CopyStatus.PRESENT and self.verified_at is not None
                and self.verified_at >= self.created_at)

    def intact(self) -> bool:
        return self.path.is_file() and self.path.read_bytes() == self.data


class History:
    """The deployment under test and the test's own model of every copy."""

    def __init__(self, root: Path) -> None:
        self.config = deploy(root / "deploy", LOCATIONS, purge_budget_bytes=BUDGET)
        self.opsdb = OpsDB(self.config.opsdb_url)
        # Simulated time, far enough in the past that every verification predates the real
        # wall-clock start of the deletion operations that rely on it.
        self.now = utcnow().replace(microsecond=0) - timedelta(days=120)
        self.usage = {label: LOW for label in OBSERVATORY}
        self.packages: list[str] = []
        self.tars: dict[str, bytes] = {}
        self.copies: dict[int, Copy] = {}
        self.log: list[list[tuple[str, str, bool]]] = []  # per cycle: deleted (package,
        # location, early)

    def of(self, package: str) -> list[Copy]:
        return [c for c in self.copies.values() if c.package == package]

    def pick(self, index: int) -> str | None:
        return self.packages[index % len(self.packages)] if self.packages else None

    def set_status(self, copy: Copy, status: CopyStatus, **values: Any) -> None:
        with self.opsdb.session() as s:
            row = s.get_one(PhysicalCopy, copy.id)
            row.status = status
            for name, value in values.items():
                setattr(row, name, value)
                setattr(copy, name, value)
        copy.status = status

    # --- events ----------------------------------------------------------------------------

    def apply(self, event: tuple[Any, ...]) -> None:
        getattr(self, f"on_{event[0]}")(*event[1:])

    def on_package(self, sizes: list[int]) -> None:
        n = len(self.packages)
        name = f"pkg{n}"
        files = {f"f{i}.dat": bytes([33 + (7 * n + i) % 90]) * size
                 for i, size in enumerate(sizes)}
        raw_ids = add_package(self.opsdb, name, files, self.now)
        self.packages.append(name)
        self.tars[name] = tar_of(files)
        with self.opsdb.session() as s:
            for copy_id in raw_ids:
                row = s.get_one(PhysicalCopy, copy_id)
                path = Path(row.location.root) / row.relative_path
                self.copies[copy_id] = Copy(copy_id, name, "ccat/instruments", "raw_file",
                                            self.now, row.verified_at, path, path.read_bytes())
        self._add(name, "ccat/buffer", verified_at=self.now)

    def _add(self, name: str, label: str, verified_at: datetime | None,
             created_at: datetime | None = None) -> None:
        site, location = label.split("/")
        created_at = created_at or self.now
        suffix = f"-{len(self.copies)}"
        copy_id = add_copy(self.opsdb, name, site, location, created_at,
                           verified_at=verified_at, verified=verified_at is not None,
                           data=self.tars[name], suffix=suffix)
        path = Path(self.config.resolve_root(
            self.config.location(site, location).root)) / f"packages/{name}{suffix}.tar"
        self.copies[copy_id] = Copy(copy_id, name, label, "package", created_at, verified_at,
                                    path, self.tars[name])

    def on_site_buffer(self, index: int, site: str, verified: bool) -> None:
        if (name := self.pick(index)) is not None:
            self._add(name, f"{site}/buffer", self.now if verified else None)

    def on_lta(self, index: int, site: str, verification: str) -> None:
        if (name := self.pick(index)) is None:
            return
        created = self.now - timedelta(minutes=10)
        verified_at = {"after": self.now - timedelta(minutes=5),
                       "before": created - timedelta(hours=1), "none": None}[verification]
        self._add(name, f"{site}/lta", verified_at, created_at=created)

    def on_archive(self, index: int, site: str) -> None:
        """The package reaches a site's buffer and its LTA, both verified."""
        self.on_site_buffer(index, site, True)
        self.on_lta(index, site, "after")

    def on_verify(self, index: int, which: int) -> None:
        """A later successful verification of an unverified (or mis-verified) present copy."""
        if (name := self.pick(index)) is None:
            return
        todo = [c for c in self.of(name) if c.kind == "package"
                and c.status == CopyStatus.PRESENT and not c.verified]
        if todo:
            copy = todo[which % len(todo)]
            assert copy.intact()
            self.set_status(copy, CopyStatus.PRESENT, verified_at=self.now)

    def on_corrupt(self, index: int, which: int) -> None:
        """An integrity check finds a copy's bytes changed."""
        if (name := self.pick(index)) is None:
            return
        live = [c for c in self.of(name) if c.status == CopyStatus.PRESENT]
        if live:
            copy = live[which % len(live)]
            copy.path.write_bytes(b"X" + copy.data[1:])
            self.set_status(copy, CopyStatus.CORRUPT)

    def on_damage_lta(self, index: int, which: int, how: str) -> None:
        """An LTA copy's file goes missing or changes; the integrity check marks it CORRUPT."""
        if (name := self.pick(index)) is None:
            return
        lta = [c for c in self.of(name) if c.label in LTA and c.status == CopyStatus.PRESENT]
        if lta:
            copy = lta[which % len(lta)]
            if how == "missing":
                copy.path.unlink()
                copy.missing = True
            else:
                copy.path.write_bytes(copy.data[::-1] + b"!")
            self.set_status(copy, CopyStatus.CORRUPT)

    def on_repair(self, index: int, which: int) -> None:
        """A CORRUPT copy is rewritten from a good copy and verified again."""
        if (name := self.pick(index)) is None:
            return
        bad = [c for c in self.of(name) if c.status == CopyStatus.CORRUPT]
        if bad:
            copy = bad[which % len(bad)]
            copy.path.write_bytes(copy.data)
            copy.missing = False
            self.set_status(copy, CopyStatus.PRESENT, verified_at=self.now)

    def on_advance(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    def on_usage(self, label: str, high: bool) -> None:
        self.usage[label] = HIGH if high else LOW

    # --- the model's view ------------------------------------------------------------------

    def lta_sites(self, name: str) -> set[str]:
        return {c.site for c in self.of(name) if c.label in LTA and c.verified}

    def safe(self, name: str) -> bool:
        """A verified, intact copy of the package's bytes, or all its raw files at SOURCE."""
        copies = self.of(name)
        raw = [c for c in copies if c.kind == "raw_file"]
        return (any(c.kind == "package" and c.verified and c.intact() for c in copies)
                or all(c.status == CopyStatus.PRESENT and c.intact() for c in raw))

    def under_pressure(self, label: str) -> bool:
        return self.usage.get(label) == HIGH

    def eligible(self, copy: Copy, frozen: set[str], early: bool) -> bool:
        """What the rules allow for `copy` now, worked out from the model alone."""
        if copy.status != CopyStatus.PRESENT or copy.label in LTA or copy.package in frozen:
            return False
        if copy.label in OBSERVATORY:
            if len(self.lta_sites(copy.package)) < REQUIRED:
                return False
        elif copy.site not in self.lta_sites(copy.package):
            return False
        old_enough = self.now >= copy.created_at + RETENTION[copy.label]
        return old_enough or (early and self.under_pressure(copy.label))

    def _usage(self, location: DataLocation) -> DiskUsage | None:
        return self.usage.get(location.label)

    # --- a purge cycle, then the invariants ------------------------------------------------

    def on_cycle(self) -> None:
        run_id = f"cycle-{len(self.log) + 1}"
        frozen = {n for n in self.packages  # a raw file changed at its source keeps only itself
                  if any(c.kind == "package" and c.status == CopyStatus.CORRUPT
                         for c in self.of(n))}
        lta_before = {n: self.lta_sites(n) for n in self.packages}
        verified_lta_ids = {c.id for c in self.copies.values()
                            if c.label in LTA and c.verified}
        safe_before = {n: self.safe(n) for n in self.packages}
        normal = [c for c in self.copies.values() if self.eligible(c, frozen, early=False)]

        with self.opsdb.session() as s:
            plan = plan_cycle(s, self.config, self.now, usage=self._usage)
        planned = {d.copy_id: d for _, d in plan.deletions}
        for name, (copy_ids, early_ids) in plan.by_package().items():
            report = purge_package(self.opsdb, self.config, name, now=self.now, run_id=run_id,
                                   copy_ids=copy_ids, early_ids=early_ids, usage=self._usage)
            assert report.failures == []

        with self.opsdb.session() as s:
            status = {c.id: c.status for c in s.scalars(select(PhysicalCopy))}
            ops = {op.copy_id: op for op in s.scalars(select(Operation).where(
                Operation.run_id == run_id))}
        assert set(status) == set(self.copies)
        gone = {i for i, st in status.items()
                if st == CopyStatus.DELETED and self.copies[i].status != CopyStatus.DELETED}
        changed = {i for i, st in status.items() if st != self.copies[i].status}
        assert changed == gone, "a cycle only ever turns copies DELETED"
        assert gone == set(planned), "exactly the planned copies are deleted"
        assert set(ops) == gone
        for op in ops.values():
            assert op.operation_type == OperationType.DELETION
            assert op.status == OperationStatus.COMPLETED and op.error is None

        # (d) the byte budget
        assert sum(self.copies[i].size for i in gone) <= BUDGET
        assert sum(op.bytes or 0 for op in ops.values()) <= BUDGET
        assert plan.bytes <= BUDGET
        # (c) LTA copies are never deleted
        assert not any(self.copies[i].label in LTA for i in gone)
        for i in gone:
            copy, op = self.copies[i], ops[i]
            # (e) a CORRUPT package copy freezes its package
            assert copy.package not in frozen
            # (a) the LTA copies the deletion rests on, by the model and in its certificate
            assert op.evidence is not None
            cited = [entry["copy_id"] for entry in op.evidence["copies"]]
            assert set(cited) <= verified_lta_ids
            sites = {self.copies[c].site for c in cited}
            assert all(self.copies[c].package == copy.package for c in cited)
            assert all(datetime.fromisoformat(entry["verified_at"]) <= self.now
                       for entry in op.evidence["copies"])
            if copy.label in OBSERVATORY:
                assert len(lta_before[copy.package]) >= REQUIRED
                assert len(sites) >= REQUIRED and op.evidence["required"] == REQUIRED
            else:
                assert copy.site in lta_before[copy.package] and copy.site in sites
            # (f) early only under pressure, and only from where the pressure is
            assert self.eligible(copy, frozen, early=planned[i].early)
            if self.now < copy.created_at + RETENTION[copy.label]:
                assert planned[i].early and self.under_pressure(copy.label)
        if not gone:  # nothing deleted: nothing was deletable within the budget
            assert not [c for c in normal if c.size <= BUDGET]

        for i in gone:
            self.copies[i].status = CopyStatus.DELETED
        self.log.append(sorted((self.copies[i].package, self.copies[i].label, planned[i].early)
                               for i in gone))
        # every deletion is certified
        for name in self.packages:
            assert certificate_problems(self.opsdb, self.config, name) == []
        # (b) no package loses its last verified copy
        for name in self.packages:
            if safe_before[name]:
                assert self.safe(name), f"{name} lost its last verified copy"
        # the disk agrees with OpsDB
        for copy in self.copies.values():
            if copy.status == CopyStatus.DELETED:
                assert not copy.path.exists()
            elif copy.status == CopyStatus.PRESENT:
                assert copy.intact()
            else:
                assert copy.path.exists() != copy.missing


PACKAGE = st.integers(0, 5)
SITE = st.sampled_from(["cologne", "us"])
ARCHIVE = st.tuples(st.just("archive"), PACKAGE, SITE)
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([1, 6, 11, 13, 23, 25, 49]))
USAGE = st.tuples(st.just("usage"), st.sampled_from(OBSERVATORY), st.booleans())
CYCLE = st.tuples(st.just("cycle"))
NEW_PACKAGE = st.tuples(st.just("package"), st.lists(st.integers(50, 250), min_size=1,
                                                     max_size=3))
EVENTS = st.tuples(NEW_PACKAGE, st.lists(st.one_of(  # repeats weigh the steps of a real flow
    NEW_PACKAGE,
    st.tuples(st.just("site_buffer"), PACKAGE, SITE, st.booleans()),
    st.tuples(st.just("lta"), PACKAGE, SITE, st.sampled_from(["after", "before", "none"])),
    ARCHIVE, ARCHIVE, ARCHIVE,
    st.tuples(st.just("verify"), PACKAGE, st.integers(0, 9)),
    st.tuples(st.just("corrupt"), PACKAGE, st.integers(0, 9)),
    st.tuples(st.just("damage_lta"), PACKAGE, st.integers(0, 3),
              st.sampled_from(["missing", "changed"])),
    st.tuples(st.just("repair"), PACKAGE, st.integers(0, 9)),
    ADVANCE, ADVANCE,
    USAGE, USAGE,
    CYCLE, CYCLE, CYCLE,
), min_size=10, max_size=40)).map(lambda pair: [pair[0], *pair[1]])

# pkg0: old, archived at both sites; pkg1: young, its us LTA copy verified before it was
# written; pkg2: young, archived at both sites. The budget splits pkg0 across two cycles;
# pressure takes young copies early; a CORRUPT raw file keeps only itself until it is repaired
# and a missing LTA file freezes pkg0.
ARCHIVED_AND_PRESSED = [
    ("package", [200, 250, 150]), ("site_buffer", 0, "cologne", True),
    ("lta", 0, "cologne", "after"), ("lta", 0, "us", "after"), ("advance", 25),
    ("package", [100, 100]), ("lta", 1, "cologne", "after"), ("lta", 1, "us", "before"),
    ("package", [60, 60]), ("archive", 2, "cologne"), ("archive", 2, "us"),
    ("cycle",),
    ("usage", "ccat/buffer", True), ("cycle",),
    ("verify", 1, 0), ("corrupt", 1, 0), ("cycle",),
    ("repair", 1, 0), ("usage", "ccat/instruments", True), ("cycle",),
    ("site_buffer", 0, "us", True), ("damage_lta", 0, 0, "missing"), ("advance", 49),
    ("cycle",),
]


def run(root: Path, events: list[tuple[Any, ...]]) -> History:
    history = History(root)
    try:
        for event in events:
            history.apply(event)
        history.on_cycle()
    finally:
        history.opsdb.dispose()
    return history


# database=None: nothing is written into the checkout; a failure prints its falsifying history.
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS)
@example(events=ARCHIVED_AND_PRESSED)
def test_random_histories_keep_the_deletion_invariants(events: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), events)


def test_the_worked_example_deletes_normally_within_budget_and_early_under_pressure(
        tmp_path: Path) -> None:
    history = run(tmp_path, ARCHIVED_AND_PRESSED)

    obs = ("ccat/buffer", "ccat/instruments", "ccat/instruments", "ccat/instruments")
    assert history.log == [
        # pkg0 is old enough: 1200 B of it; its 600 B cologne buffer copy would pass the 1500 B
        # budget, pkg2's 120 B us buffer copy (retention 0h) does not
        [("pkg0", label, False) for label in obs] + [("pkg2", "us/buffer", False)],
        # the rest of pkg0; ccat/buffer above its high watermark: pkg2's young tar goes early,
        # pkg1's does not (1 of 2 verified LTA copies)
        [("pkg0", "cologne/buffer", False), ("pkg2", "ccat/buffer", True)],
        # pkg1's us LTA copy is verified now: its young tar goes early; its raw file changed at
        # the source (CORRUPT) keeps only itself, not the package
        [("pkg1", "ccat/buffer", True)],
        # repaired; ccat/instruments under pressure too: young raw files go early
        [("pkg1", "ccat/instruments", True),
         ("pkg1", "ccat/instruments", True), ("pkg2", "ccat/instruments", True),
         ("pkg2", "ccat/instruments", True)],
        # 49h later pkg2's cologne buffer copy is past its 12h; pkg0 is frozen by its missing
        # cologne LTA file, so its new us buffer copy stays
        [("pkg2", "cologne/buffer", False)],
        [],
    ]
    [kept] = [c for c in history.copies.values() if c.label == "us/buffer" and c.package == "pkg0"]
    assert kept.status == CopyStatus.PRESENT and kept.intact()
