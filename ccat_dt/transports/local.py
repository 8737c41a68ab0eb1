"""Copying between directories on one machine: the embedded default's transport."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ccat_dt.checksums import CHUNK_SIZE, new_hasher
from ccat_dt.transports.base import (
    Endpoint,
    TransferError,
    TransferResult,
    fsync_directory,
    temporary_name,
)

_PERMANENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


class LocalTransport:
    """Streams the file once, hashing the bytes as they are written."""

    name = "local"

    def copy(self, source: Endpoint, destination: Endpoint,
             expected_checksum: str) -> TransferResult:
        if source.host or destination.host:
            raise TransferError(f"local transport cannot reach {source} -> {destination}; "
                                "configure an rsync or bbcp route", retryable=False)
        return self.copy_file(Path(source.path), Path(destination.path), expected_checksum)

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> list[TransferResult | TransferError]:
        out: list[TransferResult | TransferError] = []
        for source, destination, checksum in pairs:
            try:
                out.append(self.copy(source, destination, checksum))
            except TransferError as exc:
                out.append(exc)
        return out

    def copy_file(self, source: Path, destination: Path, expected_checksum: str) -> TransferResult:
        started = time.monotonic()
        partial = Path(temporary_name(PurePosixPath(destination)))
        hasher = new_hasher()
        size = 0
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as reader, open(partial, "wb") as writer:
                while chunk := reader.read(CHUNK_SIZE):
                    writer.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            if hasher.hexdigest() != expected_checksum:
                raise TransferError(f"checksum mismatch on arrival at {destination}: expected "
                                    f"{expected_checksum}, got {hasher.hexdigest()}",
                                    retryable=True)
            os.replace(partial, destination)
            fsync_directory(destination.parent)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise TransferError(f"local copy {source} -> {destination} failed: {exc}",
                                retryable=exc.errno not in _PERMANENT) from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return TransferResult(bytes=size, seconds=time.monotonic() - started,
                              checksum=hasher.hexdigest())

