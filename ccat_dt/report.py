"""What an operator asks first: where is everything, and does OpsDB agree with the disks?"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFileCopy,
    Site,
)
from ccat_dt.opsdb.totals import read as read_totals

if TYPE_CHECKING:
    from ccat_dt.transports.base import SshSettings

LIVE = (CopyStatus.PRESENT, CopyStatus.STAGED)  # on disk there
TYPE_ORDER = {LocationType.SOURCE: 0, LocationType.BUFFER: 1,
              LocationType.LONG_TERM_ARCHIVE: 2, LocationType.PROCESSING: 3}


def printable(text: str) -> str:
    """`text` with its unprintable characters (line breaks, tabs, terminal escapes, bidi
    overrides) written as Python escapes: a file name must not break or fake a line of what
    an operator reads. Spaces, quotes and non-ASCII letters stay as they are."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


@dataclass(frozen=True)
class LocationLine:
    location: str  # site/location
    kind: str
    present: int
    present_bytes: int
    deleted: int
    corrupt: int


@dataclass(frozen=True)
class Summary:
    files: int
    file_bytes: int
    packages: dict[str, int]  # by state
    package_bytes: int
    locations: list[LocationLine]
    deletions: int
    deleted_bytes: int
    failed_operations: int
    refused_deletions: int = 0  # copies DELETION_FAILED: the file there is not the copy


def summarize(opsdb: OpsDB) -> Summary:
    """Read from the totals the database keeps (ccat_dt/opsdb/totals.py): a few rows, however
    many files and copies there are."""
    with opsdb.session() as s:
        kept = read_totals(s.connection())
        every = s.execute(select(DataLocation.id, Site.short_name, DataLocation.name,
                                 DataLocation.location_type)
                          .select_from(DataLocation).join(Site)).all()
    files = file_bytes = package_bytes = failed = 0
    states: dict[str, int] = {}
    counts: dict[tuple[int, str], int] = {}
    live_bytes: dict[int, int] = {}
    for (subject, location_id, status), (items, nbytes) in kept.items():
        if subject == "raw_file":
            files, file_bytes = files + items, file_bytes + nbytes
        elif subject == "package":
            if items:
                states[status] = items
            package_bytes += nbytes
        elif subject == "copy":
            counts[(location_id, status)] = items
            if status in LIVE:
                live_bytes[location_id] = live_bytes.get(location_id, 0) + nbytes
        elif subject == "operation" and status.endswith(f"/{OperationStatus.FAILED.value}"):
            failed += items
    deletions, deleted_bytes = kept.get(
        ("operation", 0, f"{OperationType.DELETION.value}/{OperationStatus.COMPLETED.value}"),
        (0, 0))
    # One row per location, also those holding nothing yet, grouped by location type in
    # lifecycle order; "present" is what is on disk there: filed raw files at a source,
    # packages at buffers and archives, staged files at a processing location.
    names = {location_id: f"{site}/{name}" for location_id, site, name, _ in every}
    lines: dict[str, LocationLine] = {
        f"{site}/{name}": LocationLine(f"{site}/{name}", kind.value, 0, 0, 0, 0)
        for _, site, name, kind in sorted(every, key=lambda r: (TYPE_ORDER.get(r[3], 9), r[1],
                                                                 r[2]))}
    for (location_id, status), count in counts.items():
        key = names[location_id]
        line = lines[key]
        if status in LIVE:
            line = replace(line, present=line.present + count,
                           present_bytes=live_bytes.get(location_id, 0))
        elif status == CopyStatus.DELETED:
            line = replace(line, deleted=count)
        elif status == CopyStatus.CORRUPT:
            line = replace(line, corrupt=count)
        lines[key] = line
    return Summary(
        files=files, file_bytes=file_bytes, packages=states, package_bytes=package_bytes,
        locations=list(lines.values()), deletions=deletions, deleted_bytes=deleted_bytes,
        failed_operations=failed,
        refused_deletions=sum(n for (_, status), n in counts.items()
                              if status == CopyStatus.DELETION_FAILED))


def refused_deletions(opsdb: OpsDB, limit: int = 5) -> list[tuple[str, str, str]]:
    """(location, path, package) of copies whose deletion was refused (DELETION_FAILED: the
    file at the path is not the recorded copy), oldest first; looked up per location, so the
    (location, status) index answers it however many copies there are."""
    with opsdb.session() as s:
        locations = s.scalars(select(DataLocation.id)).all()
        copies = s.scalars(select(PhysicalCopy).where(
            PhysicalCopy.location_id.in_(locations),
            PhysicalCopy.status == CopyStatus.DELETION_FAILED)
            .order_by(PhysicalCopy.id).limit(limit)).all()
        out = []
        for copy in copies:
            package = (copy.package if isinstance(copy, PackageCopy)
                       else copy.raw_data_file.package if isinstance(copy, RawDataFileCopy)
                       else None)
            out.append((copy.location.label, f"{copy.location.root}/{copy.relative_path}",
                        package.name if package is not None else "?"))
        return out


def disagreements(opsdb: OpsDB, ssh: SshSettings | None = None) -> list[str]:
    """Copies whose OpsDB status the disk contradicts: PRESENT but missing or of another size,
    DELETED but still there. Remote locations are asked over ssh (skipped without `ssh`);
    object stores are left to the audit (it has their credentials)."""
    from ccat_dt.objectstore import is_object_root  # here: `status` looks at no storage
    from ccat_dt.transports.base import Endpoint, SshSettings
    from ccat_dt.transports.remote import remote_size

    problems = []
    with opsdb.session() as s:
        rows = s.execute(select(PhysicalCopy.id, PhysicalCopy.status, PhysicalCopy.size,
                                DataLocation.root, DataLocation.host,
                                PhysicalCopy.relative_path).join(DataLocation)).all()
    on_disk = (CopyStatus.PRESENT, CopyStatus.STAGED)
    present = {(host, root, relative) for _, status, _, root, host, relative in rows
               if status in on_disk}
    for copy_id, status, size, root, host, relative in rows:
        if (host is not None and ssh is None) or is_object_root(root):
            continue
        where = Endpoint(PurePosixPath(root) / relative, host)
        if status in on_disk:
            actual = remote_size(ssh or SshSettings(), where)
            if actual is None:
                problems.append(f"copy {copy_id}: {where} recorded present, missing on disk")
            elif actual != size:
                problems.append(f"copy {copy_id}: {where} is {actual} bytes, recorded {size}")
        elif (status == CopyStatus.DELETED and (host, root, relative) not in present
              and remote_size(ssh or SshSettings(), where) is not None):
            problems.append(f"copy {copy_id}: {where} recorded deleted, still on disk")
    return problems


@dataclass(frozen=True)
class LinkThroughput:
    link: str  # origin site -> destination site
    transfers: int
    bytes: int
    seconds: float  # summed transfer time

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def throughput(opsdb: OpsDB, since: datetime) -> list[LinkThroughput]:
    """Completed transfers per link since `since` (what moved, and how fast while moving)."""
    origin, destination = aliased(DataLocation), aliased(DataLocation)
    origin_site, destination_site = aliased(Site), aliased(Site)
    with opsdb.session() as s:
        rows = s.execute(
            select(origin_site.short_name, destination_site.short_name, func.count(),
                   func.coalesce(func.sum(Operation.bytes), 0),
                   func.coalesce(func.sum(Operation.duration_s), 0.0))
            .join(origin, Operation.source_location_id == origin.id)
            .join(origin_site, origin.site_id == origin_site.id)
            .join(destination, Operation.destination_location_id == destination.id)
            .join(destination_site, destination.site_id == destination_site.id)
            .where(Operation.operation_type == OperationType.TRANSFER,
                   Operation.status == OperationStatus.COMPLETED,
                   Operation.finished_at >= since)
            .group_by(origin_site.short_name, destination_site.short_name)
            .order_by(origin_site.short_name, destination_site.short_name)).all()
    return [LinkThroughput(f"{o}->{d}", n, int(b), float(t)) for o, d, n, b, t in rows]
