"""Moving bytes between locations: the interface every transport (local, rsync, bbcp) keeps."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import pwd
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol


class TransferError(Exception):
    """A transfer failed; `retryable` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Identity:
    """A file as its storage tells it from another at the same name: size, inode and mtime (an
    object store's: size, ETag as a number, last-modified)."""

    size: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> Identity:
        return cls(info.st_size, info.st_ino, info.st_mtime_ns)

    def text(self) -> str:
        """As `stat -c %s:%i:%.9Y` prints it (GNU coreutils), to compare in a remote shell."""
        seconds, nanoseconds = divmod(self.mtime_ns, 10**9)
        return f"{self.size}:{self.inode}:{seconds}.{nanoseconds:09d}"


@dataclass(frozen=True)
class Endpoint:
    """A file at a location: on this machine (host None) or on an ssh-reachable host; or an
    object in an object store (`store`, its location's root s3://bucket/prefix, with `path`
    the key below it)."""

    path: PurePosixPath
    host: str | None = None  # ssh destination, e.g. "ccat@buffer.ccat.cl"
    # The file whose presence says the location's disk is there (its root's marker, written by
    # `ccat-dt init`): a transport writes to this endpoint only after finding it, in the same
    # round trip that creates the directory. None: no such check (scratch files, tests).
    marker: PurePosixPath | None = field(default=None, compare=False)
    store: str | None = None
    # The final name holds a quarantined copy (CORRUPT in OpsDB) that this transfer repairs, as
    # it was found there: the rename into place replaces that file, and only while it is still
    # the file there (looked at the moment of the rename). Otherwise nothing is replaced.
    replaces: Identity | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.store:
            return f"{self.store}/{self.path}"
        return f"{self.host}:{self.path}" if self.host else str(self.path)


@dataclass(frozen=True)
class SshSettings:
    """How to reach remote hosts; every ssh, rsync and bbcp invocation uses the same."""

    port: int = 22
    identity_file: str | None = None
    known_hosts_file: str | None = None
    connect_timeout_s: int = 20
    options: tuple[str, ...] = field(default_factory=tuple)  # extra "-o Key=Value" values
    # Connection sharing (ssh ControlMaster): the first command to a host leaves its connection
    # open this many seconds after the last use, and later commands to that host ride on it
    # instead of paying a handshake each (seconds over a long link). 0: no sharing.
    control_persist_s: int = 0
    control_dir: str | None = None  # where the sockets live; None: default_control_dir()

    def __post_init__(self) -> None:
        if self.control_dir is not None:
            check_control_dir(self.control_dir)

    def ssh_command(self, *, shared: bool = True) -> list[str]:
        """ssh and its options. `shared=False` leaves connection sharing out: for an ssh that
        runs on another host (rsync between two remote hosts), where our socket directory
        may not exist."""
        command = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
                   "-o", f"ConnectTimeout={self.connect_timeout_s}"]
        if self.identity_file:
            command += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts_file:
            command += ["-o", f"UserKnownHostsFile={self.known_hosts_file}",
                        "-o", "StrictHostKeyChecking=yes"]
        for option in self.options:
            command += ["-o", option]
        # After `options` (ssh keeps the first): a connection on a link gone silent (no reset)
        # would wait until TCP gives up (~15 min) or, idle, forever; with these ssh exits after
        # 5 intervals without an answer (2.5 min), and so does the command (a bbcp, a
        # verification) riding on it (tests/faults/test_ssh_link_black_hole.py).
        command += ["-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4"]
        if shared:
            command += self._sharing_options(command)  # after `options`: ssh keeps the first
        return command

    def _sharing_options(self, command: list[str]) -> list[str]:
        if self.control_persist_s <= 0:
            return []
        directory = self.control_dir or default_control_dir()
        if not usable_control_dir(directory):
            return []  # ssh would fail to connect at all if it could not create its socket
        # One master per host *and* settings: a master connected with another key or
        # known_hosts file must not serve these (ssh's %C hashes only host, port and users).
        tag = hashlib.sha256("\0".join(command).encode()).hexdigest()[:8]
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={directory}/{tag}-%C",
                # The master has ServerAlive too (ssh_command): on a dead link it exits, and
                # the next command connects afresh.
                "-o", f"ControlPersist={self.control_persist_s}"]


# A unix socket path holds at most 107 bytes; ssh appends "/<8>-<40 hex of %C>" (our tag and
# %C) and, while creating the socket, 17 more.
CONTROL_DIR_MAX_LEN = 107 - (1 + 8 + 1 + 40) - 17
_warned_control_dirs: set[str] = set()


def check_control_dir(directory: str) -> str:
    """Reject a socket directory ssh cannot use in a ControlPath (or bbcp cannot pass on)."""
    if not directory.startswith("/") or len(directory) > CONTROL_DIR_MAX_LEN \
            or "%" in directory or any(c.isspace() or ord(c) < 32 for c in directory):
        raise ValueError(f"ssh control_dir {directory!r} must be an absolute path of at most "
                         f"{CONTROL_DIR_MAX_LEN} characters without spaces or '%' (it names "
                         "unix sockets, whose paths are short)")
    return directory


def default_control_dir() -> str:
    """Private and short: under $XDG_RUNTIME_DIR (per user, mode 0700, on tmpfs) when there is
    one, else /tmp/ccat-dt-ssh-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    candidate = f"{runtime.rstrip('/')}/ccat-dt-ssh"
    if runtime.startswith("/") and os.path.isdir(runtime):
        with suppress(ValueError):
            return check_control_dir(candidate)
    return f"/tmp/ccat-dt-ssh-{os.geteuid()}"


def usable_control_dir(directory: str) -> bool:
    """Create `directory` (mode 0700) if needed; True if it is a directory of this user that no
    one else can enter and that can take sockets. Otherwise (read-only file system, another
    user's directory, a symlink) connection sharing is skipped, with one warning."""
    problem = ""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        status = os.lstat(directory)
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
            problem = "not a directory of this user"
        else:
            if stat.S_IMODE(status.st_mode) & 0o077:
                os.chmod(directory, 0o700)
            if not os.access(directory, os.W_OK | os.X_OK):
                problem = "not writable"
    except OSError as exc:
        problem = str(exc)
    if problem and directory not in _warned_control_dirs:
        _warned_control_dirs.add(directory)
        logging.getLogger(__name__).warning(
            "ssh connection sharing off: cannot use %s for control sockets (%s); every ssh "
            "command connects on its own", directory, problem)
    return not problem


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    seconds: float
    checksum: str  # xxh3-128 of the bytes that landed at the destination
    streams: int = 1
    log_path: str | None = None  # full command output, for DataTransferLog-style references
    # The copy's identity at its final name when the transport saw it there (remote hosts);
    # None: whoever records the copy looks (a local file) or does without.
    inode: int | None = None
    mtime_ns: int | None = None


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


# A write refused for one of these is the destination's state (full, read-only, no right, no
# directory, a file larger than it takes), not the link: retrying within the run cannot help.
PERMANENT_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                             errno.EROFS, errno.ENOENT, errno.EFBIG})
# What a write refused with EFBIG says (strerror, and rsync's and a shell's words for it): the
# file is larger than the destination takes, its file system's largest file (FAT: 4 GiB - 1)
# or the writing user's file-size limit (`ulimit -f`, an `fsize` line in limits.conf). That
# file's, not the location's: smaller files still go there (health.location_failure).
TOO_LARGE = "File too large"


# What a transfer says when a file (not a directory) sits on the way to its destination
# directory: "cannot create the destination directory D: P is not a directory (a file is
# there): move it away". That package's (its observation's directory), not the location's:
# other packages still go there (health.location_failure); only a person moves it (notify.py).
IN_THE_WAY = "is not a directory (a file is there)"
# What a remote shell says, before the path, when a directory cannot be created because a
# path on its way is not a directory (IN_THE_WAY_SH prints it).
NOT_A_DIRECTORY = "ccat-dt:not-a-directory"


def in_the_way_sh(variable: str) -> str:
    """Shell text to run after a failed `mkdir -p -- "$VARIABLE"` (as `mkdir ... || TEXT`):
    prints NOT_A_DIRECTORY and the deepest existing path on the way, when that is not a
    directory, on stderr, and exits with mkdir's status."""
    return ('{ r=$?; p=$' + variable + '; while [ ! -e "$p" ] && [ ! -L "$p" ]; do '
            'p=$(dirname -- "$p"); done; [ -d "$p" ] || echo ' + NOT_A_DIRECTORY
            + ' "$p" >&2; exit "$r"; }')


def not_a_directory(directory: str, blocker: str, host: str | None) -> TransferError:
    """The error for a destination directory that cannot be created because `blocker`, on its
    way, is a file: the destination's problem for that package, and a person's (not retried
    within the run)."""
    where = f" on {host}" if host else ""
    return TransferError(f"cannot create the destination directory {directory}{where}: "
                         f"{blocker} {IN_THE_WAY}: move it away; nothing was written",
                         retryable=False)


def blocker_said(stderr: str) -> str | None:
    """The path a remote `in_the_way_sh` named on `stderr`, if it did."""
    for line in stderr.splitlines():
        if line.startswith(NOT_A_DIRECTORY + " "):
            return line.removeprefix(NOT_A_DIRECTORY + " ")
    return None


def in_the_way(path: str | os.PathLike[str]) -> str | None:
    """The deepest path on the way to `path` (on this machine) that exists, if it is not a
    directory."""
    for candidate in (PurePosixPath(path), *PurePosixPath(path).parents):
        if os.path.lexists(candidate):
            return None if os.path.isdir(candidate) else str(candidate)
    return None


def make_directory(path: str | os.PathLike[str]) -> None:
    """`mkdir -p` on this machine: a file on the way raises `not_a_directory` (not retried);
    any other failure its OSError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        if (blocker := in_the_way(path)) is not None:
            raise not_a_directory(str(path), blocker, None) from exc
        raise


def one_by_one(transport: Transport, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
               ) -> list[TransferResult | TransferError]:
    """`copy_many` for a transport without a batch session: each file copied on its own, an
    error in its place."""
    out: list[TransferResult | TransferError] = []
    for source, destination, checksum in pairs:
        try:
            out.append(transport.copy(source, destination, checksum))
        except TransferError as exc:
            out.append(exc)
    return out


def unmarked(endpoint: Endpoint) -> TransferError:
    """The error for a destination whose location marker is missing: nothing was written."""
    where = f" on {endpoint.host}" if endpoint.host else ""
    return TransferError(f"location marker {endpoint.marker}{where} not found: not the disk "
                         "`ccat-dt init` prepared (is it mounted?); nothing was written to "
                         f"{endpoint.path.parent}", retryable=False)


# What a transfer says when its source file is not there (or cannot be opened): the source
# copy's fault, not the destination's (health.py), re-checked on its storage (replicas.py).
SOURCE_MISSING = "source missing"
SOURCE_UNREADABLE = "source unreadable"
# How a transfer says that its source file's disk failed the read (an I/O error: a bad sector):
# "source unreadable: PATH: its disk failed the read: ...". The copy is not proved bad by it; its
# location is marked and its disk told to a person (health.mark_unreadable_source).
DISK_READ_FAILED = "its disk failed the read"
# How a look at a file says its storage failed to read it (an I/O error): nothing is known of
# its bytes, which are not proved bad by that (storage.Seen.unreadable).
UNREADABLE = "cannot read"
# A source file refused to the user ccat-dt runs as (EACCES, EPERM: written 0600 by another
# user, in a directory it cannot enter, an ACL or SELinux refusal): SOURCE_UNREADABLE too, so
# the source's fault, never the destination's (health.location_failure), and passed over for
# another verified copy while there is one (routing.unreadable_copies). Not retried within the
# run: only a person grants the permission, and the next automatic attempt reads it then.
DENIED_ERRNO = frozenset({errno.EACCES, errno.EPERM})
PERMISSION_DENIED = "permission denied"
# What a deletion says of a copy that ccat-dt's user may not reach (a directory on its way it
# cannot enter): kept, neither gone nor changed; the next purge looks again (reaper.py, notify).
DELETION_DENIED = "cannot be reached by ccat-dt's user to be deleted (permission denied)"
READABLE_BY = "make it readable by"


def denied_source(where: str, found: str | None, user: str,
                  what: str | None = SOURCE_UNREADABLE) -> str:
    """What a transfer (or a packaging) says of a source file refused to `user`: `where` names
    it, `found` its owner and mode (or the directory that cannot be entered), if known. `what`
    None: a file that is not read as a source (a copy a check, the scrub or the purge re-reads:
    storage.look), said "PATH: permission denied ...: make it readable by USER"."""
    return ((f"{what}: " if what else "") + f"{where}: {PERMISSION_DENIED}"
            + (f" ({found})" if found else "") + f": {READABLE_BY} {user}")


def refused_source(text: str) -> bool:
    """Whether a failure says a file was refused for lack of permission (denied_source): a
    source file, or a copy re-read on its storage."""
    return f": {PERMISSION_DENIED}" in text and READABLE_BY in text


def disk_failed_read(text: str) -> bool:
    """Whether a failure says a source file's disk failed its read (an I/O error), not that
    the file was refused for lack of permission."""
    return (SOURCE_UNREADABLE in text and not refused_source(text)
            and (DISK_READ_FAILED in text or "input/output error" in text.lower()))


def _name_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def owner_and_mode(uid: int, mode: int, name: str | None = None) -> str:
    """"owner uid 1234 (obs), mode 0600"; the name looked up here when not given."""
    name = name if name is not None else _name_of(uid)
    return f"owner uid {uid}" + (f" ({name})" if name else "") + f", mode {mode:04o}"


def local_user() -> str:
    """Who a person must let read a source on this machine: this process's user."""
    uid = os.geteuid()
    name = _name_of(uid)
    return f"the user running ccat-dt ({f'{name}, ' if name else ''}uid {uid})"


def refusal_here(path: str | os.PathLike[str]) -> str | None:
    """The refused file's owner and mode, or, when a directory on its path cannot be entered,
    that directory's; None when neither can be looked at."""
    try:
        info = os.stat(path)
    except PermissionError:
        for parent in PurePosixPath(os.fspath(path)).parents:
            try:
                info = os.stat(parent)
            except OSError:
                continue
            return (f"its directory {parent} cannot be entered: "
                    + owner_and_mode(info.st_uid, stat.S_IMODE(info.st_mode)))
        return None
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    return owner_and_mode(info.st_uid, mode) + (
        "; its mode lets this user read it: an ACL or a security label (SELinux) refuses it"
        if _mode_lets_read(info.st_uid, info.st_gid, mode, os.geteuid(), os.getgroups()) else "")


def _mode_lets_read(uid: int, gid: int, mode: int, user: int, groups: list[int]) -> bool:
    """Whether the mode bits alone let `user` read: then they are not why it was refused."""
    if user == uid:
        return bool(mode & stat.S_IRUSR)
    if gid in groups or gid == os.getegid():
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


def denied_here(path: str | os.PathLike[str], where: str | None = None,
                what: str | None = SOURCE_UNREADABLE) -> str:
    """denied_source for a file on this machine, refused to this process."""
    return denied_source(where or os.fspath(path), refusal_here(path), local_user(), what)


# What a file of a batched session says when another file's own failure stopped the session:
# neither its fault nor the destination's (health.py); the next attempt sends it.
PEER_FAILED = "another file of its session failed"

# What a transfer says when its final name holds a file OpsDB does not record there (found
# before the transfer, or by the rename itself): nothing is written over it.
FOREIGN_FILE = "holds a file OpsDB does not record there"


class Occupied(TransferError):
    """A verified copy whose final name was taken while it travelled: nothing was renamed over
    the file there, and trying again cannot help until a person moves it away."""

    def __init__(self, final: Endpoint, landed: Endpoint | None = None) -> None:
        waits = f"; the verified bytes wait at {landed.path}" if landed is not None else ""
        super().__init__(f"{final} {FOREIGN_FILE} (it appeared while the package travelled): "
                         f"nothing was written over it{waits}. Find out what wrote it and move "
                         "it away; the next attempt then copies the package", retryable=False)


_NOREPLACE_FLAG = 1  # renameat2's RENAME_NOREPLACE
_AT_FDCWD = -100
_NO_NOREPLACE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _renameat2() -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    return function


_RENAMEAT2 = _renameat2()


def rename_into_place(source: str, target: str, *, replaces: Identity | None = None) -> None:
    """os.rename, but it never replaces a file at `target` (FileExistsError) other than the one
    `replaces` names, looked at just before: renameat2's RENAME_NOREPLACE makes the look and
    the rename one step. On a file system without it, a look just before the rename (as
    `mv -n` does)."""
    if replaces is not None and identity_at(target) == replaces:
        os.replace(source, target)
        return
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                      _NOREPLACE_FLAG) == 0:
            return
        code = ctypes.get_errno()
        if code not in _NO_NOREPLACE:
            raise OSError(code, os.strerror(code), target if code == errno.EEXIST else source)
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
    os.rename(source, target)


def identity_at(path: str) -> Identity | None:
    """The regular file at `path` (not followed if a symlink), or None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return Identity.of(info) if stat.S_ISREG(info.st_mode) else None


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
        # read-write: a writer reads back what landed through the very file it wrote
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
    try:
        os.ftruncate(fd, 0)
    except BaseException:  # (EIO) not kept open: its lock would refuse every later attempt
        os.close(fd)
        raise
    with os.fdopen(fd, "wb") as stream:
        yield stream


WRITER_WAIT_S = 60.0  # how long an attempt waits for a previous attempt's processes to exit


def _writer_lock(lock_dir: Path, name: str) -> int:
    """A descriptor of the lock file `name` in `lock_dir` (the log directory). That disk full
    or read-only must not fail the transfer: a lock file already there is opened read-only
    (flock needs no write access), and one that cannot be made there is made in the
    temporary directory (an earlier attempt that held one in `lock_dir` left it there; one
    that fell back as well holds it in the temporary directory too)."""
    path = lock_dir / name
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "ccat-dt-writers"
        fallback.mkdir(exist_ok=True)
        return os.open(fallback / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def exclusive_writer(lock_dir: Path, targets: Sequence[Endpoint],
                     wait_s: float = WRITER_WAIT_S) -> Iterator[int]:
    """Hold a lock for one transfer's landing files and yield its file descriptor, to be
    inherited by every process the transfer starts (`run(..., pass_fds=...)`).

    The kernel keeps an flock while any process holds the descriptor, so a run killed with
    SIGKILL leaves the lock held by its orphaned bbcp/rsync/ssh children, which may still be
    writing (bbcp's children finish a copy on their own). A retry waits here until they are
    gone instead of racing them; past `wait_s` it fails retryably, and a later attempt waits
    again."""
    key = "\n".join(sorted(f"{t.host or ''}:{t.path}" for t in targets))
    fd = _writer_lock(lock_dir, f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TransferError(
                        f"a previous attempt's transfer to {targets[0]} is still running "
                        f"after {wait_s:g} s; trying again later", retryable=True) from None
                time.sleep(0.5)
        yield fd
    finally:
        os.close(fd)
