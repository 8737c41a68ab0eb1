"""What assets hand each other: a small reference to a verified copy, never the bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ccat_dt.opsdb.models import PackageCopy
from ccat_dt.transports.base import Endpoint


@dataclass(frozen=True)
class CopyRef:
    package: str
    copy_id: int
    site: str
    location: str
    path: str
    size: int
    checksum: str
    host: str | None = None  # None: on the machine running the step

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(PurePosixPath(self.path), self.host)

    @classmethod
    def of(cls, copy: PackageCopy) -> CopyRef:
        return cls(package=copy.package.name, copy_id=copy.id,
                   site=copy.location.site.short_name, location=copy.location.name,
                   path=str(Path(copy.location.root) / copy.relative_path),
                   size=copy.size, checksum=copy.checksum, host=copy.location.host)


@dataclass(frozen=True)
class Placement:
    """A request to put a package at a site's location of some type, from a verified copy."""

    package: str
    site: str
    source: CopyRef
