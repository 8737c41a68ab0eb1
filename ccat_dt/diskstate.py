"""Whether the disk holding a file is full or read-only, told in words for an error line.

SQLite says "database or disk is full", "disk I/O error" (no room for its shared-memory
file) or "unable to open database file" whatever the cause; the disk itself says which."""

from __future__ import annotations

import os
from pathlib import Path

FULL_BELOW = 1 << 20  # bytes free under which a disk counts as full (a few pages left)


def _statvfs(path: Path) -> os.statvfs_result | None:
    """The file system holding `path` (or its nearest existing directory); None when it cannot
    be looked at."""
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return os.statvfs(here)
    except OSError:
        return None


def disk_trouble(path: Path) -> str | None:
    """"full (N KB free)", "out of inodes" or "read-only" for the disk holding `path` (or its
    nearest existing directory); None when it looks writable with room, or cannot be looked
    at."""
    if (info := _statvfs(path)) is None:
        return None
    if info.f_flag & os.ST_RDONLY:
        return "read-only"
    if info.f_bavail * info.f_frsize < FULL_BELOW:
        return f"full ({info.f_bavail * info.f_frsize // 1024} KB free)"
    if info.f_files and info.f_favail == 0:
        return "out of inodes"
    return None


def inodes_out(bytes_free: int, inodes: int, inodes_free: int) -> str:
    """What a disk that refused a write with ENOSPC ("No space left on device") lacks when it
    is not bytes: its inodes, all used (by many small files, say) while bytes are free, which
    `df -h` does not show; "" while it has inodes left (or counts none: btrfs)."""
    if inodes and inodes_free == 0:
        return (f"no inode left ({bytes_free // 1024} KB free: room for bytes, none for another "
                "file; `df -i`)")
    return ""


def inodes_out_here(path: Path) -> str:
    """inodes_out for the disk holding `path` on this machine; "" when it cannot be looked at."""
    if (info := _statvfs(path)) is None:
        return ""
    return inodes_out(info.f_bavail * info.f_frsize, info.f_files, info.f_favail)


def next_step(trouble: str) -> str:
    """What a person does about `disk_trouble`'s answer."""
    if trouble == "read-only":
        return ("remount it read-write (a disk remounted read-only after errors: check "
                "`dmesg` first), then run the command again")
    return "free space on it, then run the command again (nothing needs retrying by hand)"
