"""The safety invariants every fault test ends with, read from OpsDB and the files on disk.

1. Every filed raw byte is in a verified copy somewhere: the raw file's SOURCE copy is PRESENT
   with its filed size on disk, or its package (whose manifest lists the file with its filed
   checksum) has a verified LTA copy whose bytes hash to the package checksum. Verified LTA
   copies at different sites are different files (two archives sharing one directory would
   let one physical copy count twice).
2. No copy is DELETED without a certificate (`certificate_problems` is empty for every package).
3. No file under a final name holds other bytes than OpsDB records: every PRESENT copy hashes to
   its recorded checksum (package copies to the package checksum), a package path at any
   location holds the package's bytes or nothing, no two live copies share a location and path,
   and (once the pipeline is idle) no temporary `.NAME.part` file is left anywhere.
4. The audit, re-reading every checksum, finds OpsDB and the disks in agreement.

Once the pipeline is idle (`settled`), no operation is left IN_PROGRESS either: an attempt
whose process died must have been closed by whatever finished the work after it.

The test deployments reach their "remote" hosts through an sshd on this machine, so every
location root is also a local path and is read directly.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from ccat_dt.audit import AuditReport, Finding, audit, is_temporary
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
)
from ccat_dt.packages import package_path
from ccat_dt.reaper import certificate_problems

LIVE = (CopyStatus.PRESENT, CopyStatus.STAGED)


@dataclass(frozen=True)
class Safety:
    """What `check_safety` found; `violations` are broken invariants, each one sentence."""

    violations: list[str]
    audit: AuditReport


def _digest(path: Path) -> str | None:
    try:
        return hash_file(path)[0]
    except OSError:
        return None


def _verified_lta_bytes(package: RawDataPackage) -> list[str]:
    """Labels of the package's verified LTA copies whose bytes on disk are the package's."""
    good = []
    for copy in package.copies:
        if (copy.location.location_type == LocationType.LONG_TERM_ARCHIVE and copy.is_verified
                and copy.checksum == package.checksum and package.checksum is not None
                and _digest(Path(copy.location.root) / copy.relative_path) == package.checksum):
            good.append(copy.location.label)
    return good


def _raw_bytes_kept(config: Config, opsdb: OpsDB, tampered: tuple[str, ...]) -> list[str]:
    problems = []
    with opsdb.session() as session:
        files = session.scalars(select(RawDataFile).order_by(RawDataFile.id)).all()
        lta_cache: dict[int, list[str]] = {}
        for raw in files:
            source = [c for c in raw.copies if c.location.location_type == LocationType.SOURCE
                      and c.status == CopyStatus.PRESENT]
            path = Path(raw.source_location.root) / raw.relative_path
            if source and path.is_file() and path.stat().st_size == raw.size:
                continue
            if source and tampered and str(path).endswith(tampered):
                continue  # the test changed the filed bytes at the source itself
            package = raw.package
            if package is not None:
                if package.id not in lta_cache:
                    lta_cache[package.id] = _verified_lta_bytes(package)
                listed = {(e.get("path"), e.get("checksum"))
                          for e in (package.manifest or {}).get("files", [])}
                if lta_cache[package.id] and (raw.relative_path, raw.checksum) in listed:
                    continue
            state = ", ".join(f"{c.location.label} {c.status.value}" for c in raw.copies)
            problems.append(f"raw file {raw.relative_path!r} ({raw.size} bytes) is in no "
                            f"verified copy: source copies [{state}], package "
                            f"{package.name if package else None} has no verified LTA copy "
                            "holding it")
    return problems


def _distinct_archives(opsdb: OpsDB) -> list[str]:
    problems = []
    with opsdb.session() as session:
        copies = session.scalars(select(PackageCopy).join(DataLocation).where(
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
            PackageCopy.status == CopyStatus.PRESENT).order_by(PackageCopy.id)).all()
        seen: dict[tuple[int, int], PackageCopy] = {}
        for copy in copies:
            try:
                info = (Path(copy.location.root) / copy.relative_path).stat()
            except OSError:
                continue  # reported by the other checks
            first = seen.setdefault((info.st_dev, info.st_ino), copy)
            if first is not copy:
                problems.append(f"LTA copies {first.id} ({first.location.label}) and {copy.id} "
                                f"({copy.location.label}) of {copy.package.name} are one file")
    return problems


def _certificates(config: Config, opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        names = session.scalars(select(RawDataPackage.name).order_by(RawDataPackage.id)).all()
    return [f"{name}: {problem}" for name in names
            for problem in certificate_problems(opsdb, config, name)]


def _final_names(opsdb: OpsDB, allow_partial: bool, tampered: tuple[str, ...]) -> list[str]:
    problems = []
    with opsdb.session() as session:
        locations = session.scalars(select(DataLocation).order_by(DataLocation.id)).all()
        packages = session.scalars(select(RawDataPackage).where(
            RawDataPackage.checksum.is_not(None))).all()
        copies = session.scalars(select(PhysicalCopy).order_by(PhysicalCopy.id)).all()
        for copy in copies:
            if copy.status not in LIVE:
                continue
            path = Path(copy.location.root) / copy.relative_path
            if tampered and str(path).endswith(tampered):
                continue  # changed by the test on purpose; the audit must report it
            actual = _digest(path)
            expected = {copy.checksum}
            if isinstance(copy, PackageCopy):
                expected.add(copy.package.checksum or "")
            elif isinstance(copy, RawDataFileCopy):
                expected.add(copy.raw_data_file.checksum)
            if actual is None:
                problems.append(f"copy {copy.id} at {copy.location.label} is {copy.status.value}"
                                f" but {path} cannot be read")
            elif expected != {actual}:
                problems.append(f"copy {copy.id} at {copy.location.label} is {copy.status.value}"
                                f" but {path} hashes to {actual}, recorded {sorted(expected)}")
        live = Counter((c.location_id, os.path.normpath(c.relative_path)) for c in copies
                       if c.status not in (CopyStatus.DELETED,))
        problems += [f"{n} live copies recorded for the same file at location {loc}: {rel}"
                     for (loc, rel), n in live.items() if n > 1]
        for package in packages:
            relative = package_path(package)
            for location in locations:
                path = Path(location.root) / relative
                if path.exists():
                    actual = _digest(path)
                    if actual != package.checksum:
                        problems.append(f"{path} ({location.label}) is under the final name of "
                                        f"{package.name} but hashes to {actual}, not "
                                        f"{package.checksum}")
        roots = [Path(location.root) for location in locations  # we never write at a source
                 if location.location_type != LocationType.SOURCE]
    if not allow_partial:
        for root in roots:
            for directory, _dirs, names in os.walk(root):
                problems += [f"temporary file left behind: {Path(directory) / name}"
                             for name in names if is_temporary(name)]
    return problems


def _unsettled(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        left = session.scalars(select(Operation).where(
            Operation.status == OperationStatus.IN_PROGRESS).order_by(Operation.id)).all()
        return [f"operation {op.id} ({op.operation_type.value}, package {op.package_id}) is "
                f"still in progress" for op in left]


def check_safety(config: Config, opsdb: OpsDB, *, allow_partial: bool = False,
                 tampered: tuple[str, ...] = (), settled: bool = True) -> Safety:
    """`tampered`: path suffixes of files a test changed on purpose after they were recorded
    (invariant 3 does not hold for them by construction; the audit must find them)."""
    violations = _raw_bytes_kept(config, opsdb, tampered)
    violations += _distinct_archives(opsdb)
    violations += _certificates(config, opsdb)
    violations += _final_names(opsdb, allow_partial, tampered)
    if settled:
        violations += _unsettled(opsdb)
    report = audit(opsdb, checksums=True, config=config)
    return Safety(violations, report)


def describe(findings: Iterable[Finding]) -> list[str]:
    return [f"{f.kind} {f.location} {f.path}: {f.detail}" for f in findings]


def assert_safe(config: Config, opsdb: OpsDB, *, allow_partial: bool = False,
                settled: bool = True,
                expected_findings: Iterable[tuple[str, str]] = ()) -> Safety:
    """All four invariants, and (`settled`) nothing left in progress; `expected_findings` are
    (kind, path suffix) audit findings a test caused on purpose (e.g. a source file changed
    after filing), which must be found. Right after a kill, pass settled=False."""
    expected = list(expected_findings)
    safety = check_safety(config, opsdb, allow_partial=allow_partial, settled=settled,
                          tampered=tuple(suffix for kind, suffix in expected if kind == "changed"))
    assert safety.violations == [], "\n".join(safety.violations)
    unexpected = [f for f in safety.audit.problems
                  if not any(f.kind == kind and f.path.endswith(suffix)
                             for kind, suffix in expected)]
    assert unexpected == [], "\n".join(describe(unexpected))
    for kind, suffix in expected:
        assert any(f.kind == kind and f.path.endswith(suffix) for f in safety.audit.problems), \
            f"the audit did not report {kind} {suffix}"
    return safety
