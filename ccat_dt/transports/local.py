"""Copying between directories on one machine: the embedded default's transport."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ccat_dt.checksums import CHUNK_SIZE, hash_file
from ccat_dt.transports.base import (
    Endpoint,
    TransferError,
    TransferResult,
    claim_temporary,
    fsync_directory,
    temporary_name,
)

_PERMANENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


class LocalTransport:
    """Streams the file into a temporary name, verifies what landed, renames it into place."""

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

    def _landed(self, temporary: Path) -> None:
        """Called between writing and verification; nothing to do here (tests use it to corrupt
        or cut short the landed bytes, which must then be caught)."""

    def copy_file(self, source: Path, destination: Path, expected_checksum: str) -> TransferResult:
        """Stream into the temporary name, re-read what landed there, rename only on a match.

        The checksum is taken from the file as it lies on the destination disk, not from the
        bytes handed to write(): a copy is verified by what arrived, not by what was sent."""
        started = time.monotonic()
        partial = Path(temporary_name(PurePosixPath(destination)))
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as reader, claim_temporary(partial) as writer:
                try:
                    while chunk := reader.read(CHUNK_SIZE):
                        writer.write(chunk)
                    writer.flush()
                    os.fsync(writer.fileno())
                    self._landed(partial)
                    actual, size = hash_file(partial)
                    if actual != expected_checksum:
                        raise TransferError(
                            f"checksum mismatch on arrival at {destination}: expected "
                            f"{expected_checksum}, got {actual} ({size} bytes landed)",
                            retryable=True)
                    os.replace(partial, destination)
                except BaseException:
                    partial.unlink(missing_ok=True)  # ours to remove: we hold its lock
                    raise
            fsync_directory(destination.parent)
        except OSError as exc:
            raise TransferError(f"local copy {source} -> {destination} failed: {exc}",
                                retryable=exc.errno not in _PERMANENT) from exc
        return TransferResult(bytes=size, seconds=time.monotonic() - started, checksum=actual)
