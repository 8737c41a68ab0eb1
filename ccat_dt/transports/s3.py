"""Copies to and from an object store (S3-compatible), verified like every other hop.

Up (archiving): a multipart upload in parallel parts, each part checked by the store itself
(its additional checksums, e.g. CRC32C), our xxh3-128 of the whole package stored as object
metadata; then the object is read back from the store, streamed and hashed, and only a match
counts (a mismatch removes the never-recorded object). A failed upload is aborted, and the
next attempt first aborts whatever a killed attempt left, so no parts are orphaned.
Down (replication from an S3 copy, staging): parallel ranged reads into the temporary name,
the landed file hashed, renamed into place only on a match.

The other end is a file on the machine running the step.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from ccat_dt.checksums import hash_file
from ccat_dt.objectstore import ObjectStore, SourceReadFailed, Stores
from ccat_dt.progress import Progress
from ccat_dt.storage import StorageUnavailable
from ccat_dt.transports.base import (
    DENIED_ERRNO,
    DISK_READ_FAILED,
    PERMANENT_ERRNO,
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    Endpoint,
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
)


def _counter(progress: Progress) -> Callable[[int], None]:
    """boto3 reports byte increments from several threads; Progress wants the running total."""
    lock = threading.Lock()
    done = [0]

    def add(count: int) -> None:
        with lock:
            done[0] += count
            progress.update(done[0])

    return add


class S3Transport:
    name = "s3"

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def copy(self, source: Endpoint, destination: Endpoint,
             expected_checksum: str) -> TransferResult:
        if source.store and destination.store:
            raise TransferError(f"{source} -> {destination}: copying between two object "
                                "stores is not supported; route it through a disk location",
                                retryable=False)
        local = destination if source.store else source
        if local.host is not None or not (source.store or destination.store):
            raise TransferError(f"{source} -> {destination}: an object store is read and "
                                "written from the machine running the step; the other end must "
                                "be a local path there", retryable=False)
        try:
            if destination.store:
                return self._upload(Path(source.path), destination, expected_checksum)
            return self._download(source, destination, expected_checksum)
        except StorageUnavailable as exc:
            raise TransferError(str(exc), retryable=exc.transient) from exc

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> list[TransferResult | TransferError]:
        return one_by_one(self, pairs)

    def _upload(self, source: Path, destination: Endpoint, expected: str) -> TransferResult:
        started = time.monotonic()
        store = self.stores.of_endpoint(destination)
        relative = str(destination.path)
        try:
            size = source.stat().st_size
        except OSError as exc:  # the source's, not the store's (health.location_failure)
            if exc.errno in DENIED_ERRNO:  # a directory on its path that cannot be entered
                raise TransferError(denied_here(source), retryable=False) from exc
            what = SOURCE_MISSING if exc.errno == errno.ENOENT else SOURCE_UNREADABLE
            raise TransferError(f"{what}: {source}: {exc.strerror or exc}",
                                retryable=exc.errno not in PERMANENT_ERRNO) from exc
        progress = Progress("transfer", PurePosixPath(relative).name, size)
        try:
            store.upload(source, relative, expected, _counter(progress),
                         replaces=destination.replaces)
        except SourceReadFailed as exc:  # the source's fault, not the store's: nothing kept
            if exc.errno in DENIED_ERRNO:  # refused its open: a person grants it
                raise TransferError(f"{denied_here(source)} (the upload to {destination} was "
                                    "aborted: nothing was kept there)", retryable=False) from exc
            raise TransferError(f"{SOURCE_UNREADABLE}: {source}: {DISK_READ_FAILED}: "
                                f"{exc.strerror or exc} (the upload to {destination} was "
                                "aborted: nothing was kept there)",
                                retryable=exc.errno not in PERMANENT_ERRNO) from exc
        except FileExistsError:
            # Refused for an object at the key: perhaps our own, written by a request whose
            # answer was lost, which botocore then sent again (If-None-Match: * fails against
            # it). The package's bytes, re-read now, are the copy; anything else is left alone.
            if destination.replaces is not None:
                raise Occupied(destination) from None
            actual, landed, _ = self._read_back(store, relative)
            if actual != expected:
                raise Occupied(destination) from None
        else:
            actual, landed, etag = self._read_back(store, relative)
            if actual != expected:
                store.remove_unverified(relative, etag)
                raise TransferError(f"checksum mismatch on re-reading {destination}: expected "
                                    f"{expected}, read {actual} ({landed} bytes)",
                                    retryable=True)
        progress.finish()
        return TransferResult(bytes=landed, seconds=time.monotonic() - started, checksum=actual,
                              streams=store.settings.max_concurrency)

    @staticmethod
    def _read_back(store: ObjectStore, relative: str) -> tuple[str, int, str]:
        try:
            return store.read_back(relative)
        except FileNotFoundError as exc:  # gone right after the upload: try again
            raise TransferError(f"{store.root}/{relative}: {exc}", retryable=True) from exc

    def _download(self, source: Endpoint, final: Endpoint, expected: str) -> TransferResult:
        started = time.monotonic()
        destination = Path(final.path)
        store = self.stores.of_endpoint(source)
        relative = str(source.path)
        partial = Path(temporary_name(PurePosixPath(destination)))
        progress = Progress("transfer", destination.name)
        try:
            make_directory(destination.parent)
            with claim_temporary(partial) as writer:
                try:
                    try:
                        store.download(relative, writer, _counter(progress))
                    except FileNotFoundError as exc:
                        # The source copy is gone from its bucket, as a file from its disk
                        # (local.py): said so, the caller re-reads and quarantines it and the
                        # next attempt reads another copy. Before: "missing: ..." alone, taken
                        # for the store's fault, tried again until the horizon.
                        raise TransferError(f"{SOURCE_MISSING}: {source}: {exc}",
                                            retryable=False) from None
                    except PermissionError as exc:  # that object refused to the key: a person
                        # grants it; the next attempt reads another copy (routing.py)
                        raise TransferError(str(exc), retryable=False) from None
                    writer.flush()
                    os.fsync(writer.fileno())
                    actual, size = hash_file(partial)  # what landed, read back
                    if actual != expected:
                        raise TransferError(
                            f"checksum mismatch on arrival at {destination} from {source}: "
                            f"expected {expected}, got {actual} ({size} bytes)", retryable=True)
                    rename_into_place(str(partial), str(destination), replaces=final.replaces)
                except FileExistsError:
                    partial.unlink(missing_ok=True)
                    raise Occupied(final) from None
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
            fsync_directory(destination.parent)
        except OSError as exc:
            raise TransferError(f"copy {source} -> {destination} failed: {exc}",
                                retryable=exc.errno not in PERMANENT_ERRNO) from exc
        progress.finish()
        return TransferResult(bytes=size, seconds=time.monotonic() - started, checksum=actual,
                              streams=store.settings.max_concurrency)
