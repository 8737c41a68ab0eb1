"""Moving bytes between locations: the interface every transport (local, rsync, bbcp) keeps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TransferError(Exception):
    """A transfer failed; `retryable` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    seconds: float
    checksum: str  # xxh3-128 of the bytes that landed at the destination


class Transport(Protocol):
    name: str

    def copy(self, source: Path, destination: Path, expected_checksum: str) -> TransferResult:
        """Copy `source` to `destination`: land under a temporary name, verify against
        `expected_checksum`, then rename; a mismatch leaves nothing at `destination`."""
        ...


def temporary_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.part")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
