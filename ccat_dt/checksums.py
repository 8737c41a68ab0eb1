"""The canonical checksum: xxh3-128, streamed, so that no file is ever read whole into memory."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import xxhash

from ccat_dt import pagecache

ALGORITHM = "xxh3_128"
CHUNK_SIZE = 8 * 1024 * 1024
# One chunk that stays in the CPU's L2 cache while it is copied and hashed several times; with
# 8 MiB chunks hash_file was ~20% and build_package 2x slower (docs/benchmarks.md).
CACHED_CHUNK_SIZE = 1024 * 1024


class ChecksumMismatch(Exception):
    """Bytes on disk differ from what OpsDB recorded."""

    def __init__(self, path: Path | str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {path}: expected {ALGORITHM} {expected}, got {actual}")
        self.path = str(path)
        self.expected = expected
        self.actual = actual


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


class LandedHash:
    """The checksum of a file as it lands, read back from it (`fd`, open for reading) while its
    writer goes on: each `read_back` starts the write-back of what was written since the last
    one and hashes the file from where the last read ended to its end. Every byte that landed
    is read once, bytes past what the writer wrote included; the reads find the pages the
    writes just made, and the disk writes meanwhile."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hasher = new_hasher()
        self._buffer = bytearray(CACHED_CHUNK_SIZE)
        self.size = 0  # bytes read back so far

    def read_back(self, written: int) -> None:
        """`written`: how far the writer has written the file."""
        pagecache.start_writeback(self._fd, self.size, max(written - self.size, 0))
        view = memoryview(self._buffer)
        while count := os.preadv(self._fd, [self._buffer], self.size):
            self._hasher.update(view[:count])
            self.size += count

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def hash_stream(stream: BinaryIO) -> tuple[str, int]:
    """Checksum and byte count of everything left in `stream`."""
    hasher = new_hasher()
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


class NotRegularFile(OSError):
    """What is at a path to be read is not a regular file (a FIFO, a socket, a device)."""


def open_regular(path: Path | str) -> io.FileIO:
    """`path` open for unbuffered reading, if it is a regular file. Looked at through the open
    file itself, not by name beforehand: a FIFO put at the name since (an instrument's) would
    block a plain open until a writer came, for ever, and a device would never end; O_NONBLOCK
    changes nothing for a regular file. NotRegularFile otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file (a FIFO, socket or device is "
                                 "at its name); it was not read")
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def hash_file(path: Path) -> tuple[str, int]:
    """Read into one reused buffer that stays in the CPU cache between the read and the hash
    (a fresh 8 MiB bytes object per chunk made this ~20% slower than `xxhsum -H2`, see
    docs/benchmarks.md); unbuffered, so each read is one read(2) straight into it. Only a
    regular file is read (open_regular)."""
    hasher = new_hasher()
    size = 0
    buffer = bytearray(CACHED_CHUNK_SIZE)
    view = memoryview(buffer)
    with open_regular(path) as stream:
        while count := stream.readinto(buffer):
            hasher.update(view[:count])
            size += count
        pagecache.release(stream.fileno())
    return hasher.hexdigest(), size


def verify_file(path: Path, expected: str) -> int:
    """Re-read `path`; raise ChecksumMismatch unless it matches. Returns its size."""
    actual, size = hash_file(path)
    if actual != expected:
        raise ChecksumMismatch(path, expected, actual)
    return size
