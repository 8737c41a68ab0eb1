"""Moving bytes between locations: the interface every transport (local, rsync, bbcp) keeps."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol


class TransferError(Exception):
    """A transfer failed; `retryable` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Endpoint:
    """A file at a location: on this machine (host None) or on an ssh-reachable host."""

    path: PurePosixPath
    host: str | None = None  # ssh destination, e.g. "ccat@buffer.ccat.cl"

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else str(self.path)


@dataclass(frozen=True)
class SshSettings:
    """How to reach remote hosts; every ssh, rsync and bbcp invocation uses the same."""

    port: int = 22
    identity_file: str | None = None
    known_hosts_file: str | None = None
    connect_timeout_s: int = 20
    options: tuple[str, ...] = field(default_factory=tuple)  # extra "-o Key=Value" values

    def ssh_command(self) -> list[str]:
        command = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
                   "-o", f"ConnectTimeout={self.connect_timeout_s}"]
        if self.identity_file:
            command += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts_file:
            command += ["-o", f"UserKnownHostsFile={self.known_hosts_file}",
                        "-o", "StrictHostKeyChecking=yes"]
        for option in self.options:
            command += ["-o", option]
        return command


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    seconds: float
    checksum: str  # xxh3-128 of the bytes that landed at the destination
    streams: int = 1
    log_path: str | None = None  # full command output, for DataTransferLog-style references


class Transport(Protocol):
    name: str

    def copy(self, source: Endpoint, destination: Endpoint,
             expected_checksum: str) -> TransferResult:
        """Copy `source` to `destination`: land under a temporary name, verify against
        `expected_checksum`, then rename; a mismatch leaves nothing at `destination`."""
        ...

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> Sequence[TransferResult | TransferError]:
        """Several files (source, destination, checksum) in one session, each verified on
        its own; an error for one file is returned in its place (or raised for all)."""
        ...


def temporary_name(destination: PurePosixPath) -> PurePosixPath:
    return destination.with_name(f".{destination.name}.part")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def claim_temporary(path: Path) -> Iterator[BinaryIO]:
    """Open the temporary file `path` for writing, empty, and held with an exclusive lock
    until the block ends (rename it into place inside the block).

    Two runs of one step write the same temporary name: without the lock their bytes would
    interleave in one file, and one could rename the other's half-written file into place.
    A file left by a killed writer carries no lock (the kernel dropped it) and is reused.
    Raises OSError(EBUSY) while another process is writing `path` (retrying later helps)."""
    for _ in range(10):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EBUSY, f"another process is writing {path}") from None
        try:
            current = os.stat(path)
            held = os.fstat(fd)
            ours = (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)  # its writer renamed it into place meanwhile: never write to that file
    else:
        raise OSError(errno.EBUSY, f"{path} keeps being replaced by another process")
    os.ftruncate(fd, 0)
    with os.fdopen(fd, "wb") as stream:
        yield stream
