"""What assets hand each other: a small reference to a verified copy, never the bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ccat_dt.opsdb.models import PackageCopy, StorageType
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
    store: str | None = None  # an object store's root (s3://bucket/prefix); path is below it

    @property
    def endpoint(self) -> Endpoint:
        if self.store:
            return Endpoint(PurePosixPath(self.path.removeprefix(f"{self.store}/")),
                            store=self.store)
        return Endpoint(PurePosixPath(self.path), self.host)

    @classmethod
    def of(cls, copy: PackageCopy) -> CopyRef:
        location = copy.location
        store = location.root if location.storage_type == StorageType.S3 else None
        return cls(package=copy.package.name, copy_id=copy.id,
                   site=location.site.short_name, location=location.name,
                   path=(f"{store}/{copy.relative_path}" if store
                         else str(Path(location.root) / copy.relative_path)),
                   size=copy.size, checksum=copy.checksum, host=location.host, store=store)


@dataclass(frozen=True)
class Placement:
    """A request to put a package at a site's location of some type, from a verified copy."""

    package: str
    site: str
    source: CopyRef
