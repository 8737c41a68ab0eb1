"""What a staging request's files are on their disk now, against what was staged: the
storage is the truth, a STAGED record only says what was put there. Light on imports: `why`
looks too."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ccat_dt.checksums import hash_file
from ccat_dt.marker import root_problem
from ccat_dt.opsdb.models import RawDataFileCopy

# The staging step's scratch under a request's directory: the package's tar (and the
# transport's `.NAME.part` of it) and the directory it is unpacked in; names a job does not use.
SCRATCH = ".ccat-dt-staging."


def scratch_names(root: Path, request: str, package: str) -> tuple[Path, Path]:
    """(the tar, the unpacking directory) of one package's staging."""
    return (root / request / f"{SCRATCH}{package}.tar", root / request / f"{SCRATCH}{package}")


def clear_scratch(root: Path, request: str) -> None:
    """Remove what a killed staging step left of its scratch in the request's directory (a
    partial tar can be as large as a package): once the request has ended, no step of it
    runs again to remove it. Only the scratch names, then the directory if that left it empty;
    nothing through a symlink."""
    directory = root / request
    if root_problem(root) or directory.is_symlink():
        return  # not the processing disk here (not mounted, or on another host)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # nothing there, or not readable: nothing of ours to take
    for entry in entries:
        if not entry.name.lstrip(".").startswith(SCRATCH.lstrip(".")):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        directory.rmdir()  # the request's own, if nothing else is in it now


@dataclass(frozen=True)
class Damage:
    """Staged files of a request that are not what was staged, as seen on the disk now."""

    missing: list[RawDataFileCopy]
    changed: list[RawDataFileCopy]

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed)


def through_symlink(root: Path, relative: str) -> bool:
    """Whether a directory on the way from `root` to `relative` is a symlink (or not a
    directory): a staged name there is not under the processing location any more."""
    path = root
    for part in Path(relative).parts[:-1]:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return True
    return False


def look_at_staged(copies: list[RawDataFileCopy], *, rehash: bool) -> Damage:
    """Each STAGED copy looked at on its disk: gone, or changed since it was staged (its size,
    inode or mtime differ; with `rehash`, only if its bytes no longer hash to the filed
    checksum: one merely touched is then recorded with its new identity)."""
    missing, changed = [], []
    for copy in copies:
        path = Path(copy.location.root) / copy.relative_path
        if through_symlink(Path(copy.location.root), copy.relative_path):
            changed.append(copy)  # never looked at, nor written, through a symlink
            continue
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            missing.append(copy)
            continue
        except OSError:
            changed.append(copy)  # cannot look: not known to be what was staged
            continue
        if (stat.S_ISREG(info.st_mode)
                and (info.st_size, info.st_ino, info.st_mtime_ns)
                == (copy.size, copy.inode, copy.mtime_ns)):
            continue
        if rehash and stat.S_ISREG(info.st_mode):
            try:
                actual, size = hash_file(path)
            except OSError:
                actual, size = "", -1
            if actual == copy.raw_data_file.checksum and size == copy.size:
                copy.inode, copy.mtime_ns = info.st_ino, info.st_mtime_ns
                continue
        changed.append(copy)
    return Damage(missing, changed)
