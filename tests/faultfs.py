"""A disk that fails: a passthrough FUSE file system over a real directory that answers chosen
operations on chosen files with an errno (EIO by default), as a disk with a bad sector or a
failing controller does. The pipeline's own processes see the kernel's error.

The server runs in a process of its own (`python -m tests.faultfs BACKING MOUNT CONTROL`);
the test steers it through a rules file in CONTROL (`FaultyDisk.fail`, `heal`), and reads in
CONTROL which faults it injected (`hits`). A rule: an operation (`read`, `write`, `fsync`,
`open`, `truncate`, `getattr`: the look-up of a name, as a directory that cannot be entered
refuses it for every name below it), a glob on the path below the mount (`*` crosses
directories), how many times (None: until healed), an errno (`code`: EIO, EACCES for a file
refused to its reader), and for `fsync` whether the writes since the last fsync are `lost`:
"fsyncgate", the kernel drops the dirty pages that failed to reach the disk, fsync says EIO
once, and a later fsync succeeds though the bytes never landed.

Every read goes to the server (direct_io: no page cache in between), so a read fault hits
however recently the file was read; inode numbers are the backing file system's (use_ino)."""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccat_dt.config import Config
from ccat_dt.marker import write_marker
from tests.services import unavailable

RULES = "rules.json"
HITS = "hits.log"


def _missing() -> str | None:
    """Why no faulty disk can be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mounting a FUSE file system over a location root needs root"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the package found no libfuse
        return f"the Python package mfusepy or libfuse3 (Debian: fuse3) is missing: {exc}"
    return None


# -- the server (its own process) -------------------------------------------------------------

def serve(backing: str, mount: str, control: str) -> None:
    import mfusepy

    libc = ctypes.CDLL(None, use_errno=True)

    class Faulty(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.mutex = threading.Lock()
            self.rules: list[dict[str, Any]] = []
            self.version: tuple[int, int] | None = None
            self.used: dict[str, int] = {}  # rule id -> faults it injected
            self.unsynced: dict[int, list[tuple[int, int]]] = {}  # fh -> written ranges
            self.paths: dict[int, str] = {}  # fh -> the path it was opened at (or renamed to)

        def init_with_config(self, conn: Any, config: Any) -> None:
            # a file unlinked while open is still read through its fh; the operations on an
            # open file get no path then, but the one it was opened at (self.paths)
            config.nullpath_ok = 1

        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def _fault(self, op: str, path: str | None) -> int | None:
            """The errno a rule answers `op` on `path` with (counting it), or None."""
            path = path or ""
            with self.mutex:
                rules_path = os.path.join(control, RULES)
                try:
                    info = os.stat(rules_path)
                    version = (info.st_mtime_ns, info.st_ino)
                except FileNotFoundError:
                    version = None
                if version != self.version:
                    self.version = version
                    self.rules = json.loads(Path(rules_path).read_text()) if version else []
                for rule in self.rules:
                    used = self.used.get(rule["id"], 0)
                    if rule["op"] == op and used != rule["times"] and fnmatch.fnmatchcase(
                            path.lstrip("/"), rule["path"]):
                        self.used[rule["id"]] = used + 1
                        with open(os.path.join(control, HITS), "a") as hits:
                            hits.write(f"{op} {path.lstrip('/')}\n")
                        return int(rule["errno"]) if not rule.get("lost") else -1
            return None

        def _raise(self, op: str, path: str | None) -> None:
            code = self._fault(op, path)
            if code is not None:
                raise mfusepy.FuseOSError(errno.EIO if code < 0 else code)

        # files
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if fh is None:
                self._raise("getattr", path)
            info = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
            keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                    "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
            out = {key.removesuffix("_ns"): getattr(info, key) for key in keys}
            out["st_blocks"], out["st_blksize"] = info.st_blocks, info.st_blksize
            return out

        def open(self, path: str, flags: int) -> int:
            self._raise("open", path)
            fh = os.open(self._real(path), flags)
            self.paths[fh] = path
            return fh

        def create(self, path: str, mode: int, flags: int) -> int:
            self._raise("open", path)
            fh = os.open(self._real(path), flags | os.O_CREAT, mode)
            self.paths[fh] = path
            return fh

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            self._raise("read", self.paths.get(fh))
            return os.pread(fh, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            self._raise("write", self.paths.get(fh))
            written = os.pwrite(fh, data, offset)
            self.unsynced.setdefault(fh, []).append((offset, written))
            return written

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            code = self._fault("fsync", self.paths.get(fh))
            if code is not None and code < 0:  # the unsynced writes never reach the disk
                for offset, length in self.unsynced.pop(fh, []):
                    os.pwrite(fh, b"\0" * length, offset)
            if code is not None:
                raise mfusepy.FuseOSError(errno.EIO if code < 0 else code)
            self.unsynced.pop(fh, None)
            os.fsync(fh)
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            self.unsynced.pop(fh, None)
            self.paths.pop(fh, None)
            os.close(fh)
            return 0

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            self._raise("truncate", path or self.paths.get(fh or -1))
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._real(path or ""), length)
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._real(path))
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            if libc.renameat2(-100, os.fsencode(self._real(old)), -100,
                              os.fsencode(self._real(new)), flags) != 0:
                raise mfusepy.FuseOSError(ctypes.get_errno())
            for fh, opened in list(self.paths.items()):
                if opened == old:
                    self.paths[fh] = new
            return 0

        def link(self, target: str, source: str) -> int:
            os.link(self._real(source), self._real(target))
            return 0

        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, self._real(target))
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self._real(path))

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._real(path), mode, follow_symlinks=False)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._real(path), uid, gid, follow_symlinks=False)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            if times is None:
                os.utime(self._real(path), follow_symlinks=False)
            else:
                os.utime(self._real(path), ns=times, follow_symlinks=False)
            return 0

        # directories and the disk
        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._real(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._real(path))
            return 0

        def opendir(self, path: str) -> int:
            fh = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
            self.paths[fh] = path
            return fh

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            self._raise("fsync", self.paths.get(fh))
            os.fsync(fh)
            return 0

        def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
            # with use_ino an entry needs its inode: one of 0 is skipped by readdir(3)
            entries = [(e.name, e.inode(), e.stat(follow_symlinks=False).st_mode)
                       for e in os.scandir(fh)]
            here = os.fstat(fh)
            return [(name, {"st_ino": ino, "st_mode": mode}, 0) for name, ino, mode in
                    [(".", here.st_ino, here.st_mode), ("..", here.st_ino, here.st_mode),
                     *entries]]

        def releasedir(self, path: str | None, fh: int) -> int:
            self.paths.pop(fh, None)
            os.close(fh)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            info = os.statvfs(self._real(path))
            return {key: getattr(info, key) for key in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                "f_favail", "f_namemax")}

    class Mount(mfusepy.FUSE):  # type: ignore[misc]
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            # mfusepy drops the file handle: an ftruncate has no path (nullpath_ok)
            return int(self.operations.truncate(None if path is None else os.fsdecode(path),
                                                length, fip.contents.fh if fip else None))

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            # mfusepy drops the flags: RENAME_NOREPLACE would silently replace a file
            return int(self.operations.rename(os.fsdecode(old), os.fsdecode(new), flags))

    Mount(Faulty(), mount, foreground=True, nothreads=True, use_ino=True, direct_io=True,
          hard_remove=True, attr_timeout=0, entry_timeout=0, negative_timeout=0,
          fsname="faultfs", debug=bool(os.environ.get("FAULTFS_DEBUG")))


# -- the test's side ---------------------------------------------------------------------------

@dataclass
class FaultyDisk:
    """A location root served by the fault-injecting file system; the bytes lie in `backing`."""

    root: Path
    backing: Path
    control: Path
    process: subprocess.Popen[bytes]

    def fail(self, op: str, path: str = "*", *, times: int | None = None,
             code: int = errno.EIO, lost: bool = False) -> None:
        """From now on, answer `op` on files matching `path` with `code`, `times` times (None:
        until healed); `lost` (fsync): drop the writes since the file's last fsync."""
        rules = self._rules() + [{"id": f"{time.time_ns()}", "op": op, "path": path,
                                  "times": times, "errno": code, "lost": lost}]
        self._write(rules)

    def heal(self) -> None:
        """Every operation succeeds again (the disk replaced, the cable reseated)."""
        self._write([])

    def hits(self) -> list[str]:
        """`OP PATH` for each fault injected so far."""
        path = self.control / HITS
        return path.read_text().splitlines() if path.exists() else []

    def _rules(self) -> list[dict[str, Any]]:
        path = self.control / RULES
        return list(json.loads(path.read_text())) if path.exists() else []

    def _write(self, rules: list[dict[str, Any]]) -> None:
        temporary = self.control / f".{RULES}.{time.monotonic_ns()}"
        temporary.write_text(json.dumps(rules))
        os.replace(temporary, self.control / RULES)  # a new inode: the server reloads

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def mount_faulty(root: Path, scratch: Path, label: str | None = None) -> FaultyDisk:
    """Mount a faulty disk at `root` (whose files move onto it), marked for `label`."""
    problem = _missing()
    if problem is not None:
        unavailable("A fault-injecting FUSE disk", problem)
    backing, control = scratch / "backing", scratch / "control"
    backing.mkdir(parents=True)
    control.mkdir()
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        shutil.move(entry, backing / entry.name)
    log = (scratch / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faultfs", str(backing), str(root), str(control)],
        cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    disk = FaultyDisk(root, backing, control, process)
    deadline = time.monotonic() + 20
    while not os.path.ismount(root):
        if process.poll() is not None or time.monotonic() > deadline:
            disk.unmount()
            unavailable("A fault-injecting FUSE disk", f"did not mount at {root}: "
                        f"{(scratch / 'server.log').read_text()[-2000:]}")
        time.sleep(0.02)
    if label is not None:
        write_marker(root, label)
    return disk


class MountFaulty:
    """mount(config, "site/location") -> FaultyDisk at that location's root."""

    def __init__(self, scratch: Path) -> None:
        self.scratch, self.disks = scratch, list[FaultyDisk]()

    def __call__(self, config: Config, label: str) -> FaultyDisk:
        site, name = label.split("/")
        [location] = [loc for s in config.settings.sites if s.short_name == site
                      for loc in s.locations if loc.name == name]
        disk = mount_faulty(Path(config.location_root(location)),
                            self.scratch / label.replace("/", "-"), label)
        self.disks.append(disk)
        return disk


@pytest.fixture
def faulty_disk(tmp_path: Path) -> Iterator[MountFaulty]:
    """faulty_disk(config, "site/location") -> FaultyDisk; all unmounted afterwards."""
    mount = MountFaulty(tmp_path / "faultfs")
    yield mount
    for disk in reversed(mount.disks):
        disk.unmount()


if __name__ == "__main__":
    serve(*sys.argv[1:4])
