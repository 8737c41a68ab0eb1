"""How archive data moves through the kernel's page cache: as a stream, not kept.

A package is written once, read back at once to verify it, read once more by the next hop, and
then not for months. So a writer keeps its pages for the next hop (starting each slice's write-
back early), and each reader lets go of what it has read through (a copy, of its source slice by
slice as it goes): the cache holds what is in flight between two hops, not the archive, and the
pages a copy lets go of are taken again at once for its next slice. Kept instead, the archive
evicts what is reused (OpsDB, the programs), and every new page must first be found somewhere:
on this project's virtual machines, which give memory free for a few seconds back to the host
(free page reporting) and fault it in again on first touch, the local copies ran at ~600 MB/s
with two cores busy in the kernel while a copy let its source go only at its end, and at the
disk's ~1.7 GB/s once it let each slice go as it was copied (4 GiB end to end: 22.5-26 s, then
17-18 s). Writers letting go as well made the next hop read from disk: slower again."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_SYNC_FILE_RANGE_WRITE = 2


def _find_start_writeback() -> Callable[[int, int, int], object] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without
    waiting. Elsewhere None: the final fsync then does all the writing."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return lambda fd, offset, length: function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_sync_file_range = _find_start_writeback()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing this range of the file to disk, without waiting, so that
    the fsync at the end finds most of it written (writing overlaps the work that produced it)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length)


def release(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the file's clean cached pages go (after its fsync, or after reading it through),
    all of them or those of one range (0: to the end): its bytes stay on disk; only a later
    read of them goes to the disk again."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
