"""Small disks for fault tests: a tmpfs of a few KB mounted at a location root (needs root;
skipped otherwise), which the kernel fills (ENOSPC) or a remount makes read-only (EROFS).
A plugin of the root conftest: the fixture `mount_disk`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from ccat_dt.config import Config
from ccat_dt.marker import write_marker
from tests.services import unavailable


@dataclass
class Disk:
    """A tmpfs of a few KB mounted at a location root, marked as that location's disk."""

    root: Path

    def enlarge(self) -> None:
        """Remounted larger, with inodes to spare: the data stays."""
        subprocess.run(["mount", "-o", "remount,size=4m,nr_inodes=1000", str(self.root)],
                       check=True, capture_output=True)

    def remount(self, mode: str) -> None:
        """Remounted `ro` (writes and unlinks refused with EROFS, the data kept) or `rw`."""
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.root)], check=True,
                       capture_output=True)

    def fill(self, leave: int) -> Path:
        """Another file takes all but `leave` bytes (`leave` a multiple of 4 KB)."""
        filler = self.root / "filler"
        info = os.statvfs(self.root)
        with open(filler, "wb") as out:
            out.write(b"\0" * (info.f_bavail * info.f_frsize - leave))
        return filler


class MountDisk(Protocol):
    def __call__(self, config: Config, label: str, size: int, **options: str) -> Disk: ...


@pytest.fixture
def mount_disk() -> Iterator[MountDisk]:
    """mount_disk(config, "site/location", size) -> Disk; every disk unmounted afterwards."""
    mounted: list[Path] = []

    def mount(config: Config, label: str, size: int, **options: str) -> Disk:
        site, name = label.split("/")
        [location] = [loc for s in config.settings.sites if s.short_name == site
                      for loc in s.locations if loc.name == name]
        root = Path(config.location_root(location))
        root.mkdir(parents=True, exist_ok=True)
        extra = "".join(f",{key}={value}" for key, value in options.items())
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{extra}", "tmpfs",
                               str(root)], capture_output=True, text=True)
        if done.returncode != 0:
            unavailable("a small tmpfs", f"cannot mount one (needs root): {done.stderr.strip()}")
        mounted.append(root)
        write_marker(root, label)  # the disk `ccat-dt init` prepared
        return Disk(root)

    yield mount
    for root in reversed(mounted):
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
