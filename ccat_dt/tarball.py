"""Tar packaging of raw files for the archives, with a manifest of xxh3-128 checksums.

Each source file is read exactly once: the per-file checksum and the checksums of the
tar stream itself are computed while the tar is written, so packaging many terabytes
costs one pass over the disks, not three. The tar is read back once, slice by slice while the
disk writes it, as the local transport reads back a copy: that read is its verification (the
packaging check reports it), and the tar's pages stay cached for the transfer that reads it
next.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tarfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from zlib_ng.zlib_ng import adler32

from ccat_dt import pagecache
from ccat_dt.checksums import (
    ALGORITHM,
    CACHED_CHUNK_SIZE,
    ChecksumMismatch,
    LandedHash,
    NotRegularFile,
    hash_file,
    new_hasher,
    open_regular,
)
from ccat_dt.progress import Progress
from ccat_dt.transports.base import (
    FOREIGN_FILE,
    Identity,
    claim_temporary,
    rename_into_place,
)

MANIFEST_NAME = "MANIFEST.json"
READ_BACK_SLICE = 64 * 1024 * 1024  # written, then its write-back started and read back


@dataclass(frozen=True)
class PackageMember:
    """One raw file to put in a package, with the size and checksum filed in OpsDB."""

    source: Path
    arcname: str
    size: int
    checksum: str


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    checksum: str


@dataclass(frozen=True)
class BuiltPackage:
    """A finished tar; checksum/adler32 cover the whole file so it can be verified in flight."""

    path: Path
    size: int
    checksum: str
    adler32: str
    manifest: list[ManifestEntry]
    # (st_ino, st_mtime_ns) per source path whose stat was the same before and after its bytes
    # were read and matched the filed checksum: a later deletion trusts an unchanged identity.
    identities: dict[str, tuple[int, int]] = field(default_factory=dict)


class PackagingError(Exception):
    """A package cannot be built or restored; the message names the file and the problem."""


class _TarWriter:
    """Writes the POSIX (pax) tar that tarfile writes, but moves each member's bytes through one
    reused buffer: tarfile's copy allocates a fresh bytes object per chunk, which made packaging
    ~25% slower (docs/benchmarks.md). Every byte of the tar passes once through the file and
    both of its checksums, and is read back once from the file (`raw`, open read-write)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hasher = new_hasher()
        self._adler = adler32(b"")
        self._buffer = bytearray(CACHED_CHUNK_SIZE)
        self.size = 0
        self.landed = LandedHash(raw.fileno())

    def _emit(self, data: bytes | memoryview) -> None:
        self._raw.write(data)
        self._hasher.update(data)
        self._adler = adler32(data, self._adler)
        self.size += len(data)
        if self.size - self.landed.size >= READ_BACK_SLICE:
            self.read_back()

    def read_back(self) -> None:
        """Hash what has landed of the tar so far (the rest, after its fsync)."""
        self._raw.flush()
        self.landed.read_back(self.size)

    def _pad(self, multiple: int) -> None:
        if remainder := self.size % multiple:
            self._emit(bytes(multiple - remainder))

    def add_file(self, member: PackageMember, mtime: int) -> ManifestEntry:
        """Append one source file, checksumming it on the way; it must still be the file
        OpsDB filed (same size and checksum), or nothing is renamed into place."""
        self._emit(_header(member.arcname, member.size, mtime))
        hasher = new_hasher()
        view = memoryview(self._buffer)
        copied = 0
        try:
            source = open_regular(member.source)  # a FIFO at its name since: never waited on
        except NotRegularFile:
            raise PackagingError(f"{member.source}: not a regular file") from None
        with source:
            while copied < member.size:
                with _reading(member.source):  # only the read: a write error is the tar's
                    count = source.readinto(view[:min(len(view), member.size - copied)])
                if not count:
                    raise PackagingError(
                        f"{member.source}: file shrank while packaging, "
                        f"read {copied} of {member.size} bytes")
                chunk = view[:count]
                hasher.update(chunk)
                self._emit(chunk)
                copied += count
            with _reading(member.source):
                grew = source.read(1)
            if grew:
                raise PackagingError(f"{member.source}: file grew beyond {member.size} bytes")
            pagecache.release(source.fileno())
        self._pad(tarfile.BLOCKSIZE)
        actual = hasher.hexdigest()
        if actual != member.checksum:
            raise ChecksumMismatch(member.source, member.checksum, actual)
        return ManifestEntry(path=member.arcname, size=member.size, checksum=actual)

    def add_bytes(self, name: str, body: bytes, mtime: int) -> None:
        self._emit(_header(name, len(body), mtime))
        self._emit(body)
        self._pad(tarfile.BLOCKSIZE)

    def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record, as tar
        writes it."""
        self._emit(bytes(2 * tarfile.BLOCKSIZE))
        self._pad(tarfile.RECORDSIZE)

    def checksum(self) -> str:
        return self._hasher.hexdigest()

    def adler32(self) -> str:
        return f"{self._adler:08x}"


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A read of the source file that fails names that file: a read error carries no file
    name, and was taken for one of the tar's, written to the buffer's disk."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _check_arcname(arcname: str) -> None:
    """Only canonical relative posix paths, so that manifest paths and tar names agree."""
    path = PurePosixPath(arcname)
    if (
        not arcname
        or path.is_absolute()
        or ".." in path.parts
        or str(path) != arcname
        or "\\" in arcname
        or "\x00" in arcname
    ):
        raise PackagingError(f"unsafe or non-canonical arcname {arcname!r}")
    if arcname == MANIFEST_NAME:
        raise PackagingError(f"arcname {arcname!r} is reserved for the package manifest")


def _stat_source(member: PackageMember) -> os.stat_result:
    try:
        st = os.stat(member.source)
    except FileNotFoundError:
        raise PackagingError(f"{member.source}: source file does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise PackagingError(f"{member.source}: not a regular file")
    if st.st_size != member.size:
        raise PackagingError(
            f"{member.source}: size on disk {st.st_size} != size filed in OpsDB {member.size}"
        )
    return st


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_json(package_name: str, manifest: Sequence[ManifestEntry]) -> bytes:
    """Deterministic manifest bytes, so equal packages carry byte-identical manifests."""
    files = [
        {"path": e.path, "size": e.size, "checksum": e.checksum}
        for e in sorted(manifest, key=lambda e: e.path)
    ]
    doc = {"package": package_name, "algorithm": ALGORITHM, "files": files}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def _same_bytes_there(destination: Path, built: str) -> None:
    """Return if `destination` holds the bytes just built; FileExistsError otherwise."""
    if not stat.S_ISREG(os.lstat(destination).st_mode):  # a directory, a symlink: not ours
        raise FileExistsError(
            errno.EEXIST, f"{destination} {FOREIGN_FILE} (not a regular file): nothing was "
            "renamed over it. Find out what made it and move it away; the next attempt then "
            "builds the package", str(destination))
    found, _ = hash_file(destination)
    if found != built:
        raise FileExistsError(
            errno.EEXIST, f"{destination} {FOREIGN_FILE} ({ALGORITHM} {found}; this build is "
            f"{built}): nothing was renamed over it. Find out what wrote it and move it away; "
            "the next attempt then builds the package", str(destination))


def build_package(
    members: Sequence[PackageMember], destination: Path, *, package_name: str,
    replaces: Identity | None = None,
) -> BuiltPackage:
    """Write a verified tar at `destination` atomically; nothing is left behind on failure.

    Never renamed over a file at `destination` but the quarantined tar `replaces` names, still
    there at the moment of the rename: one holding the same bytes (a build whose recording was
    cut short, or a concurrent one) is kept as the result; any other is left alone
    (FileExistsError)."""
    if not members:
        raise PackagingError(f"{destination}: refusing to build an empty package")
    ordered = sorted(members, key=lambda m: m.arcname)
    seen: set[str] = set()
    for member in ordered:
        _check_arcname(member.arcname)
        if member.arcname in seen:
            raise PackagingError(f"duplicate arcname {member.arcname!r} ({member.source})")
        seen.add(member.arcname)
    stats = [_stat_source(m) for m in ordered]  # fail before writing anything

    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(f".{destination.name}.part")
    manifest: list[ManifestEntry] = []
    # Held until renamed: another build of the same package gets OSError(EBUSY), not a share
    # of this file; a file left by a killed build is reused.
    with claim_temporary(part) as raw:
        try:
            writer = _TarWriter(raw)
            progress = Progress("packaging", package_name, sum(m.size for m in ordered))
            for member, st in zip(ordered, stats, strict=True):
                manifest.append(writer.add_file(member, int(st.st_mtime)))
                progress.update(progress.done_bytes + member.size)
            newest = max(int(st.st_mtime) for st in stats)
            writer.add_bytes(MANIFEST_NAME, manifest_json(package_name, manifest), newest)
            writer.finish()
            raw.flush()
            os.fsync(raw.fileno())
            writer.read_back()
            if (landed := writer.landed.hexdigest()) != writer.checksum():
                # per file and transient, as a transfer's mismatch on arrival (health.py)
                raise OSError(errno.EIO, f"checksum mismatch on read-back: {part} read "
                              f"{landed}, written {writer.checksum()}; the disk did not keep "
                              "what was written to it", str(part))
            try:
                rename_into_place(str(part), str(destination), replaces=replaces)
            except FileExistsError:
                _same_bytes_there(destination, writer.checksum())
                part.unlink()
            progress.finish()
        except BaseException:
            part.unlink(missing_ok=True)  # ours to remove: we hold its lock
            raise
    _fsync_dir(destination.parent)
    return BuiltPackage(
        path=destination,
        size=writer.size,
        checksum=writer.checksum(),
        adler32=writer.adler32(),
        manifest=manifest,
        identities=_unchanged(ordered, stats),
    )


def _unchanged(members: list[PackageMember], before: list[os.stat_result]
               ) -> dict[str, tuple[int, int]]:
    identities = {}
    for member, st in zip(members, before, strict=True):
        try:
            after = os.stat(member.source)
        except OSError:
            continue
        if (after.st_ino, after.st_mtime_ns, after.st_size) == (st.st_ino, st.st_mtime_ns,
                                                                 st.st_size):
            identities[str(member.source)] = (st.st_ino, st.st_mtime_ns)
    return identities


def _parse_manifest(tar_path: Path, tar: tarfile.TarFile) -> list[ManifestEntry]:
    try:
        stream = tar.extractfile(MANIFEST_NAME)
    except KeyError:
        raise PackagingError(f"{tar_path}: no {MANIFEST_NAME} in package") from None
    if stream is None:
        raise PackagingError(f"{tar_path}: {MANIFEST_NAME} is not a regular file")
    try:
        doc: Any = json.loads(stream.read())
        if doc["algorithm"] != ALGORITHM:
            raise ValueError(f"unsupported algorithm {doc['algorithm']!r}")
        entries = [ManifestEntry(f["path"], f["size"], f["checksum"]) for f in doc["files"]]
        for e in entries:
            if not (
                isinstance(e.path, str) and type(e.size) is int and isinstance(e.checksum, str)
            ):
                raise ValueError(f"bad entry {e!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise PackagingError(f"{tar_path}: invalid {MANIFEST_NAME}: {exc}") from exc
    return entries


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        raise PackagingError(f"{tar_path}: cannot open as tar: {exc}") from exc


def read_manifest(tar_path: Path) -> list[ManifestEntry]:
    """The manifest stored in a package, without extracting the data."""
    with _open_tar(tar_path) as tar:
        return _parse_manifest(tar_path, tar)


def extract_package(tar_path: Path, destination_dir: Path,
                    only: Collection[str] | None = None) -> list[ManifestEntry]:
    """Safely extract a package and prove every file matches its manifest checksum; with
    `only`, just those of its files (the rest of `destination_dir` is left as it is). Returns
    the manifest entries of the files extracted."""
    with _open_tar(tar_path) as tar:
        manifest = _parse_manifest(tar_path, tar)
        for entry in manifest:  # as packaging writes them: each below the destination
            try:
                _check_arcname(entry.path)
            except PackagingError as exc:
                raise PackagingError(f"{tar_path}: unsafe {MANIFEST_NAME} entry: {exc}; "
                                     "nothing was unpacked") from None
        listed = {e.path for e in manifest}
        data_members = [m for m in tar.getmembers() if m.name != MANIFEST_NAME]
        names = [m.name for m in data_members]
        odd = [m.name for m in data_members if not m.isreg()]
        if odd:
            raise PackagingError(f"{tar_path}: members that are not regular files: {odd}")
        if len(set(names)) != len(names) or len(listed) != len(manifest):
            raise PackagingError(f"{tar_path}: duplicate member or manifest paths")
        extra = sorted(set(names) - listed)
        if extra:
            raise PackagingError(f"{tar_path}: members not listed in {MANIFEST_NAME}: {extra}")
        if only is not None:
            unknown = sorted(set(only) - listed)
            if unknown:
                raise PackagingError(f"{tar_path}: not in its {MANIFEST_NAME}: {unknown}")
            manifest = [e for e in manifest if e.path in only]
            data_members = [m for m in data_members if m.name in only]
        destination_dir.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(destination_dir, members=data_members, filter="data")
        except tarfile.FilterError as exc:
            raise PackagingError(f"{tar_path}: unsafe member: {exc}") from exc
    for entry in manifest:
        target = destination_dir / entry.path
        if not target.is_file():
            raise PackagingError(f"{target}: listed in {tar_path} manifest but not extracted")
        actual, size = hash_file(target)
        if actual != entry.checksum:
            raise ChecksumMismatch(target, entry.checksum, actual)
        if size != entry.size:
            raise PackagingError(f"{target}: extracted size {size} != manifest size {entry.size}")
    return manifest


def split_into_packages(
    members: Sequence[PackageMember], max_bytes: int
) -> list[list[PackageMember]]:
    """Greedy grouping by arcname order; max_bytes bounds member data, not tar overhead.
    Files are never split: one bigger than max_bytes is a package of its own (the planner
    logs a warning for it)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    groups: list[list[PackageMember]] = []
    current: list[PackageMember] = []
    total = 0
    for member in sorted(members, key=lambda m: m.arcname):
        if current and total + member.size > max_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(member)
        total += member.size
    if current:
        groups.append(current)
    return groups
