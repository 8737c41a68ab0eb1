"""The deletion invariant read from the storage alone: every filed byte is in a good copy.

OpsDB says which raw files were filed (path, checksum) and where the locations are; whether
their bytes still exist is decided only by reading files: the source file hashes to the filed
checksum, or a package tar in some long-term archive hashes to the package checksum and its
own manifest lists the file with the filed checksum.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from sqlalchemy import select

from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, LocationType, RawDataFile
from ccat_dt.packages import package_path
from ccat_dt.tarball import PackagingError, read_manifest


def _digest(path: Path) -> str | None:
    try:
        return hash_file(path)[0] if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def lost_filed_files(config: Config, opsdb: OpsDB) -> list[str]:
    """One line per filed raw file whose bytes are nowhere on the storage."""
    with opsdb.session() as session:
        archives = [Path(root) for root in session.scalars(select(DataLocation.root).where(
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE))]
        files = [(Path(f.source_location.root) / f.relative_path, f.relative_path, f.checksum,
                  package_path(f.package) if f.package else None,
                  f.package.checksum if f.package else None)
                 for f in session.scalars(select(RawDataFile).order_by(RawDataFile.id))]
    archived: dict[str, set[tuple[str, str]]] = {}
    lost = []
    for source, relative, checksum, tar, package_checksum in files:
        if _digest(source) == checksum:
            continue
        if tar is not None and tar not in archived:
            archived[tar] = set()
            for root in archives:
                if package_checksum is not None and _digest(root / tar) == package_checksum:
                    with contextlib.suppress(OSError, PackagingError):
                        archived[tar] |= {(e.path, e.checksum) for e in read_manifest(root / tar)}
        if tar is None or (relative, checksum) not in archived[tar]:
            lost.append(f"{relative} ({checksum}) is neither at its source nor in any good "
                        "LTA tar")
    return lost


def good_archive_sites(config: Config, opsdb: OpsDB) -> dict[str, set[str]]:
    """For each source path (absolute), the LTA locations whose tar of its package is good on
    the storage right now (hashes to the package checksum and lists the file)."""
    with opsdb.session() as session:
        archives = [(loc.label, Path(loc.root)) for loc in session.scalars(
            select(DataLocation).where(
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE))]
        files = [(str(Path(f.source_location.root) / f.relative_path), f.relative_path,
                  f.checksum, package_path(f.package), f.package.checksum)
                 for f in session.scalars(select(RawDataFile)) if f.package is not None]
    good: dict[str, set[str]] = {}
    listed: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for source, relative, checksum, tar, package_checksum in files:
        good[source] = set()
        for label, root in archives:
            if (label, tar) not in listed:
                listed[(label, tar)] = set()
                if package_checksum is not None and _digest(root / tar) == package_checksum:
                    with contextlib.suppress(OSError, PackagingError):
                        listed[(label, tar)] = {(e.path, e.checksum)
                                                for e in read_manifest(root / tar)}
            if (relative, checksum) in listed[(label, tar)]:
                good[source].add(label)
    return good
