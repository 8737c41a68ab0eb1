"""Moving bytes between locations: the interface every transport (local, rsync, bbcp) keeps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol


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
