"""Whether the disk holding a file is full or read-only, told in words for an error line.

SQLite says "database or disk is full", "disk I/O error" (no room for its shared-memory
file) or "unable to open database file" whatever the cause; the disk itself says which."""

from __future__ import annotations

import os
from pathlib import Path

FULL_BELOW = 1 << 20  # bytes free under which a disk counts as full (a few pages left)


def disk_trouble(path: Path) -> str | None:
    """"full (N KB free)", "out of inodes" or "read-only" for the disk holding `path` (or its
    nearest existing directory); None when it looks writable with room, or cannot be looked
    at."""
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        info = os.statvfs(here)
    except OSError:
        return None
    if info.f_flag & os.ST_RDONLY:
        return "read-only"
    if info.f_bavail * info.f_frsize < FULL_BELOW:
        return f"full ({info.f_bavail * info.f_frsize // 1024} KB free)"
    if info.f_files and info.f_favail == 0:
        return "out of inodes"
    return None


def next_step(trouble: str) -> str:
    """What a person does about `disk_trouble`'s answer."""
    if trouble == "read-only":
        return ("remount it read-write (a disk remounted read-only after errors: check "
                "`dmesg` first), then run the command again")
    return "free space on it, then run the command again (nothing needs retrying by hand)"
