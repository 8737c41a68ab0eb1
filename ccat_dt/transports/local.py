"""Copying between directories on one machine: the embedded default's transport.

The copy runs in the kernel (copy_file_range, as `cp` does) in slices; as each slice lands, its
write-back to disk is started and the slice is read back from the destination file and hashed
while the disk writes. Copying, verifying and the disk's write-back thus overlap, instead of
following each other as in `cp; sync; xxhsum` (docs/benchmarks.md, section 3)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ccat_dt import pagecache
from ccat_dt.checksums import CACHED_CHUNK_SIZE, LandedHash
from ccat_dt.diskstate import inodes_out_here
from ccat_dt.progress import Progress
from ccat_dt.transports.base import (
    DENIED_ERRNO,
    DISK_READ_FAILED,
    PERMANENT_ERRNO,
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    Endpoint,
    Identity,
    Occupied,
    TransferError,
    TransferResult,
    claim_temporary,
    denied_here,
    fsync_directory,
    make_directory,
    one_by_one,
    rename_into_place,
    temporary_name,
    unmarked,
)

SLICE_SIZE = 64 * 1024 * 1024
# copy_file_range refuses some pairs of file systems and some file systems altogether.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class _SourceReadFailed(OSError):
    """The source file's disk failed a read (a bad sector): the source copy's fault, not the
    destination's, which is not marked failing for it (health.location_failure)."""


def _source_fails(source: int, length: int, buffer: bytearray) -> OSError | None:
    """The error reading the source's next `length` bytes gives now, or None: copy_file_range
    fails alike for a read and a write, so which side failed is asked of the source."""
    offset = os.lseek(source, 0, os.SEEK_CUR)
    try:
        while length > 0 and (count := os.preadv(source, [memoryview(buffer)[:min(
                length, len(buffer))]], offset)):
            offset, length = offset + count, length - count
    except OSError as exc:
        return exc
    return None


def _copy_slice(source: int, destination: int, length: int, buffer: bytearray) -> int:
    """Copy up to `length` bytes at the current offsets; 0 at the source's end. A failed read
    of the source raises _SourceReadFailed."""
    try:
        return os.copy_file_range(source, destination, length)
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            if (failed := _source_fails(source, length, buffer)) is not None:
                raise _SourceReadFailed(failed.errno, failed.strerror) from exc
            raise
    try:
        count = os.readv(source, [memoryview(buffer)[:min(length, len(buffer))]])
    except OSError as exc:
        raise _SourceReadFailed(exc.errno, exc.strerror) from exc
    view = memoryview(buffer)[:count]
    while view:
        view = view[os.write(destination, view):]
    return count


class LocalTransport:
    """Streams the file into a temporary name, verifies what landed, renames it into place."""

    name = "local"

    def copy(self, source: Endpoint, destination: Endpoint,
             expected_checksum: str) -> TransferResult:
        if source.host or destination.host:
            raise TransferError(f"local transport cannot reach {source} -> {destination}; "
                                "configure an rsync or bbcp route", retryable=False)
        if destination.marker is not None and not os.path.isfile(destination.marker):
            raise unmarked(destination)
        return self.copy_file(Path(source.path), Path(destination.path), expected_checksum,
                              replaces=destination.replaces)

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> list[TransferResult | TransferError]:
        return one_by_one(self, pairs)

    def _landed(self, temporary: Path) -> None:
        """Called after each slice is written, before it is read back; nothing to do here (tests
        use it to corrupt or cut short the landed bytes, which must then be caught)."""

    def _copy_and_hash(self, source: int, destination: int, landed: Path) -> tuple[str, int]:
        """Checksum and size of what landed in `landed` (open as `destination`), fsynced."""
        progress = Progress("transfer", landed.name.removeprefix(".").removesuffix(".part"),
                            os.fstat(source).st_size)
        back = LandedHash(destination)
        buffer = bytearray(CACHED_CHUNK_SIZE)
        written = 0
        while True:
            start = written
            while written - start < SLICE_SIZE:
                count = _copy_slice(source, destination, SLICE_SIZE - (written - start), buffer)
                if not count:
                    break
                written += count
            if written == start:
                break
            # The source's slice is read: its pages go now, to be taken again at once for the
            # next slice's landing pages (pagecache.py).
            pagecache.release(source, start, written - start)
            self._landed(landed)
            progress.update(written)
            back.read_back(written)
        os.fsync(destination)
        back.read_back(written)  # anything past what was read (changed behind our back)
        pagecache.release(source)  # the rest of its pages; this copy's stay for the next hop
        progress.finish()
        return back.hexdigest(), back.size

    def copy_file(self, source: Path, destination: Path, expected_checksum: str, *,
                  replaces: Identity | None = None) -> TransferResult:
        """Copy into the temporary name, hash what landed there, rename only on a match, and
        never over a file at `destination` but the one `replaces` names (a repair of a
        quarantined copy, still there at the moment of the rename).

        The checksum is taken from the file as it lies on the destination, read back slice by
        slice, not from the bytes handed to the kernel: a copy is verified by what arrived."""
        started = time.monotonic()
        partial = Path(temporary_name(PurePosixPath(destination)))
        try:
            reader = open(source, "rb")  # noqa: SIM115  # its errors are the source's own
        except OSError as exc:
            if exc.errno in DENIED_ERRNO:  # a person grants it; the next attempt reads it
                raise TransferError(denied_here(source), retryable=False) from exc
            what = SOURCE_MISSING if exc.errno == errno.ENOENT else SOURCE_UNREADABLE
            raise TransferError(f"{what}: {source}: {exc.strerror or exc}",
                                retryable=exc.errno not in PERMANENT_ERRNO
                                and exc.errno != errno.ENOENT) from exc
        try:
            with reader:
                make_directory(destination.parent)
                with claim_temporary(partial) as writer:
                    try:
                        actual, size = self._copy_and_hash(reader.fileno(), writer.fileno(),
                                                           partial)
                        if actual != expected_checksum:
                            raise TransferError(
                                f"checksum mismatch on arrival at {destination}: expected "
                                f"{expected_checksum}, got {actual} ({size} bytes landed)",
                                retryable=True)
                        rename_into_place(str(partial), str(destination), replaces=replaces)
                    except FileExistsError:
                        partial.unlink(missing_ok=True)
                        raise Occupied(Endpoint(PurePosixPath(destination))) from None
                    except BaseException:
                        partial.unlink(missing_ok=True)  # ours to remove: we hold its lock
                        raise
            fsync_directory(destination.parent)
        except _SourceReadFailed as exc:  # not the destination's fault: nothing was kept there
            raise TransferError(f"{SOURCE_UNREADABLE}: {source}: {DISK_READ_FAILED}: "
                                f"{exc.strerror or exc} (nothing was kept at {destination})",
                                retryable=exc.errno not in PERMANENT_ERRNO) from exc
        except OSError as exc:
            # "No space" with bytes free: say what the disk lacks, which `df -h` does not show
            lack = inodes_out_here(destination.parent) if exc.errno == errno.ENOSPC else ""
            raise TransferError(f"local copy {source} -> {destination} failed: {exc}"
                                + (f"; {lack}" if lack else ""),
                                retryable=exc.errno not in PERMANENT_ERRNO) from exc
        return TransferResult(bytes=size, seconds=time.monotonic() - started, checksum=actual)
