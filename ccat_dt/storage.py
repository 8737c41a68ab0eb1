"""What is on the storage now: the look an irreversible step takes before it acts.

OpsDB records what was verified, possibly days ago; a deletion must rest on what is there at
the moment it happens. Everything here reads the storage itself:
- a file is reached from its location root without following any symlink below the root
  (openat with O_NOFOLLOW per component; remotely, `[ -L ]` per component), so a directory
  replaced by a symlink cannot redirect a deletion or a check into another observation;
- a location root must hold the marker `ccat-dt init` writes (MARKER): an unmounted disk's
  empty mount point has none, so nothing is counted, written or deleted there;
- remote files are looked at in one ssh round trip per location and batch (a long list in
  chunks that each fit one command line), hashed on their host with `xxhsum -H2` (no bytes
  cross the link).
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ccat_dt import pagecache
from ccat_dt.checksums import CACHED_CHUNK_SIZE, new_hasher
from ccat_dt.marker import (
    LABEL,
    MARKER,
    another_location,
    label_in,
    marked_label,
    marker_text,
    root_problem,
    write_marker,
)
from ccat_dt.transports.base import (
    DENIED_ERRNO,
    UNREADABLE,
    Endpoint,
    SshSettings,
    TransferError,
    denied_here,
    refused_source,
)
from ccat_dt.transports.remote import (
    HASH_TIMEOUT_S,
    STAT_IDENTITY,
    argument_chunks,
    check_host,
    check_path,
    classify_ssh,
    denied,
    parse_identity,
    parse_xxhsum,
    read_error_sh,
    remote_command,
    run,
)


@dataclass(frozen=True)
class Seen:
    """One file as found on its storage just now."""

    relative_path: str
    problem: str | None  # None: a regular file, reached without symlinks, root marked
    size: int | None = None
    inode: int | None = None
    mtime_ns: int | None = None
    checksum: str | None = None  # only when it was hashed now
    # An object store keeps the checksum it was written with (our metadata) beside the object;
    # it is read with every look (no bytes move), unlike `checksum`.
    stored_checksum: str | None = None
    device: int | None = None  # of a file on a disk: with `inode`, which file it is

    @property
    def missing(self) -> bool:
        return self.problem is not None and self.problem.startswith("missing")

    @property
    def unreadable(self) -> bool:
        """The file is there but its storage failed to read it (an I/O error, a bad sector):
        nothing is known of its bytes, which are not proved bad by it (it may pass)."""
        return self.problem is not None and self.problem.startswith(UNREADABLE)

    @property
    def refused(self) -> bool:
        """Unreadable because the file (or a directory on its way) is refused to ccat-dt's
        user for lack of permission: a person grants it; the disk is not at fault."""
        return self.unreadable and refused_source(self.problem or "")


@dataclass(frozen=True)
class Wanted:
    """A file to look at, and whether its content must be hashed now."""

    relative_path: str
    rehash: bool


class StorageUnavailable(Exception):
    """The location cannot be looked at (root unmarked, host unreachable): nothing is known.
    `transient`: the host could not be reached (a retry may help); otherwise a person must
    mount the disk."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def mark_location_root(root: str, host: str | None, ssh: SshSettings,
                       label: str | None = None, *, create: bool = True) -> str | None:
    """Create a location root that does not exist yet and mark it; returns a problem or None.
    Without `create` only a root already marked is touched (its marker gets the location's
    name): an empty mount point is not the disk.

    Run at set-up (`ccat-dt init`, `migrate`) with every disk mounted: from then on only a
    root with the marker is written to, counted or deleted from."""
    if host is None:
        if not create and not (Path(root) / MARKER).is_file():
            return f"location root {root} has no {MARKER} marker"
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            write_marker(Path(root), label)
        except OSError as exc:
            return f"cannot prepare location root {root}: {exc}"
        return None
    # As write_marker: written unless it holds its last line (naming the location) already.
    lines = marker_text(label).splitlines()
    script = ('m=$1/$2; if [ "$3" = create ]; then mkdir -p -- "$1" || exit 1; '
              'elif [ ! -f "$m" ]; then echo "location root $1 has no $2 marker" >&2; exit 1; '
              'fi; shift 3; grep -qxF -- "$1" "$m" 2>/dev/null || '
              '{ shift; printf "%s\\n" "$@" > "$m"; }')
    argv = ["sh", "-c", script, "sh", check_path(root), MARKER,
            "create" if create else "existing", lines[-1], *lines]
    try:  # a set-up command: no shared connection is left behind for later commands
        done = run([*ssh.ssh_command(shared=False), "--", check_host(host), shlex.join(argv)],
                   timeout_s=60)
    except TransferError as exc:
        return f"cannot prepare location root {root} on {host}: {exc}"
    if done.rc != 0:
        return f"cannot prepare location root {root} on {host}: {done.stderr.strip()}"
    return None


def marked_label_at(root: str, host: str | None, ssh: SshSettings) -> str | None:
    """The location a disk root's marker names (marker.marked_label, read over ssh for a
    remote root); None: none named, no marker, or the host not reached."""
    if host is None:
        return marked_label(Path(root))
    argv = ["cat", "--", f"{check_path(root)}/{MARKER}"]
    try:  # a set-up command, as mark_location_root
        done = run([*ssh.ssh_command(shared=False), "--", check_host(host), shlex.join(argv)],
                   timeout_s=60)
    except TransferError:
        return None
    return label_in(done.stdout) if done.rc == 0 else None


def _parts(relative_path: str) -> tuple[str, ...]:
    parts = PurePosixPath(relative_path).parts
    if (not parts or PurePosixPath(relative_path).is_absolute()
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"not a plain relative path: {relative_path!r}")
    return parts


def open_parent(root: Path, relative_path: str) -> tuple[int, str]:
    """A directory fd for the parent of `relative_path` under `root`, reached without following
    any symlink below the root, and the final name. OSError(ELOOP/ENOTDIR) on a symlink."""
    *directories, name = _parts(relative_path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in directories:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _hash_at(directory: int, name: str) -> tuple[str, int, os.stat_result]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    try:
        hasher, size = new_hasher(), 0
        buffer = bytearray(CACHED_CHUNK_SIZE)
        view = memoryview(buffer)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
            while count := stream.readinto(buffer):
                hasher.update(view[:count])
                size += count
        pagecache.release(fd)
        return hasher.hexdigest(), size, os.fstat(fd)
    finally:
        os.close(fd)


def _symlink_problem(exc: OSError, relative_path: str) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return f"path {relative_path} passes through a symlink or a non-directory"
    if exc.errno == errno.ENOENT:
        return f"missing: {relative_path} is not on the storage"
    code = errno.errorcode.get(exc.errno or 0)
    return f"{UNREADABLE} {relative_path}: {exc.strerror or exc}" + (f" ({code})" if code else "")


def _denied(root: Path, rel: str) -> str:
    """Seen.problem of a file refused to this process (Seen.refused): the file, its owner and
    mode (or the directory that cannot be entered) and whom to make it readable by; a copy
    looked at, not a source read ("cannot read REL: PATH: permission denied (...): make it
    readable by ...")."""
    return f"{UNREADABLE} {rel}: {denied_here(root / rel, what=None)}"


def look_local(root: Path, wanted: Wanted) -> Seen:
    """Stat (and when asked, hash) one file under a local root without following symlinks."""
    rel = wanted.relative_path
    try:
        directory, name = open_parent(root, rel)
    except OSError as exc:
        return Seen(rel, _denied(root, rel) if exc.errno in DENIED_ERRNO
                    else _symlink_problem(exc, rel))
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            return Seen(rel, f"{rel} is a symlink, not the file that was recorded")
        if not stat.S_ISREG(info.st_mode):
            return Seen(rel, f"{rel} is not a regular file")
        checksum = None
        if wanted.rehash:
            checksum, size, info = _hash_at(directory, name)
            if size != info.st_size:
                return Seen(rel, f"{rel} changed while it was read")
        return Seen(rel, None, info.st_size, info.st_ino, info.st_mtime_ns, checksum,
                    device=info.st_dev)
    except OSError as exc:
        return Seen(rel, _denied(root, rel) if exc.errno in DENIED_ERRNO
                    else _symlink_problem(exc, rel))
    finally:
        os.close(directory)


def look(root: str, host: str | None, ssh: SshSettings, wanted: Sequence[Wanted],
         label: str | None = None) -> list[Seen]:
    """Look at several files of one location (`label`, when given: a root whose marker names
    another location is another location's disk); raises StorageUnavailable when the location
    itself cannot be trusted or reached (then nothing is known about any of them)."""
    if host is None:
        problem = root_problem(Path(root), label)
        if problem:
            raise StorageUnavailable(problem)
        return [look_local(Path(root), item) for item in wanted]
    return _look_remote(root, host, ssh, wanted, label)


# Constant script; the root, then (flag, relative path) pairs arrive as positional parameters.
# First the marker's line naming its location ("MARKED" and the line, if any); then per file
# one line "INDEX STATUS SIZE INODE MTIME DEVICE" and, when hashed, the xxhsum line
# of stdin (so no name to escape). SIZE INODE MTIME as transports/remote.STAT_IDENTITY prints
# them.
_LOOK_SCRIPT = """
LC_ALL=C; export LC_ALL;
root=$1; shift;
[ -f "$root/.ccat-dt-location" ] || { echo UNMARKED; exit 0; };
echo "MARKED $(grep -m1 '^LABEL' "$root/.ccat-dt-location")";
i=0;
while [ $# -gt 0 ]; do
  hash=$1; rel=$2; shift 2;
  p=$root; bad=; set -f; saved=$IFS; IFS=/;
  for part in $rel; do p=$p/$part; if [ -L "$p" ]; then bad=symlink; break; fi; done;
  IFS=$saved; set +f;
  if [ -n "$bad" ]; then echo "$i symlink";
  elif ! e=$(stat -c %i -- "$p" 2>&1 >/dev/null); then
    case $e in *"ermission denied"*|*"not permitted"*) echo "$i denied";;
    *) echo "$i missing";; esac;
  elif [ ! -f "$p" ]; then echo "$i notfile";
  else
    echo "$i ok $(stat -c 'STAT_IDENTITY %d' -- "$p")";
    if [ "$hash" = 1 ]; then
      if e=$( (: < "$p") 2>&1); then xxhsum -H2 < "$p" ||
        { e=$(READ_ERROR_SH | tail -n 1); echo "$i unreadable ${e##*: }"; };
      else case $e in *"ermission denied"*|*"not permitted"*) echo "$i denied";;
      *) echo "$i unreadable";; esac; fi;
    fi;
  fi;
  i=$((i+1));
done""".strip().replace(  # ssh arguments cannot carry line breaks
    "\n", " ").replace("STAT_IDENTITY", STAT_IDENTITY).replace("LABEL", LABEL).replace(
    "READ_ERROR_SH", read_error_sh('"$p"'))


def _marked_remote(root: str, host: str, first: str, label: str | None) -> None:
    """Raise StorageUnavailable unless the look script's first line (the marker's line naming
    its location) names `label` (or none, or `label` is None)."""
    if not first.startswith("MARKED"):
        raise StorageUnavailable(f"unexpected answer from {host} looking at {root}: {first!r}")
    marked = label_in(first.removeprefix("MARKED").strip())
    if label is not None and (wrong := another_location(f"{root} on {host}", label, marked)):
        raise StorageUnavailable(wrong)


def _look_remote(root: str, host: str, ssh: SshSettings, wanted: Sequence[Wanted],
                 label: str | None) -> list[Seen]:
    """One ssh round trip per chunk of `wanted` that fits a remote command line (thousands of
    files of a package purged at once would not), the marker looked at in each."""
    return [seen for chunk in argument_chunks(wanted, _look_arguments)
            for seen in _look_remote_chunk(root, host, ssh, chunk, label)]


def _look_arguments(item: Wanted) -> list[str]:
    _parts(item.relative_path)
    return ["1" if item.rehash else "0", check_path(item.relative_path)]


def _look_remote_chunk(root: str, host: str, ssh: SshSettings, wanted: Sequence[Wanted],
                       label: str | None) -> list[Seen]:
    arguments = [check_path(root)]
    for item in wanted:
        arguments += _look_arguments(item)
    try:
        done = run(remote_command(ssh, host, ["sh", "-c", _LOOK_SCRIPT, "sh", *arguments]),
                   timeout_s=HASH_TIMEOUT_S)
    except TransferError as exc:
        raise StorageUnavailable(f"cannot reach {host}: {exc}",
                                 transient=exc.retryable) from exc
    if done.rc != 0:
        error = classify_ssh(done.rc, done.stderr, what=f"looking at {root} on {host}")
        raise StorageUnavailable(str(error), transient=error.retryable)
    lines = done.stdout.splitlines()
    if lines[:1] == ["UNMARKED"]:
        raise StorageUnavailable(f"location root {root} on {host} has no {MARKER} marker: not "
                                 "the disk `ccat-dt init` prepared (is it mounted?)")
    _marked_remote(root, host, lines[0] if lines else "", label)
    seen: list[Seen] = []
    position = 1
    for index, item in enumerate(wanted):
        rel = item.relative_path
        words = lines[position].split() if position < len(lines) else []
        position += 1
        if words[:1] != [str(index)] or len(words) < 2:
            raise StorageUnavailable(f"unexpected answer from {host} for {rel}: {words}")
        status = words[1]
        refused = f"{UNREADABLE} {rel} on {host}: " + denied(
            ssh, Endpoint(PurePosixPath(root) / rel, host), None) if status == "denied" else ""
        if refused:  # a directory on its way cannot be entered (Seen.refused)
            seen.append(Seen(rel, refused))
        elif status == "symlink":
            seen.append(Seen(rel, f"path {rel} passes through a symlink or a non-directory"))
        elif status == "missing":
            seen.append(Seen(rel, f"missing: {rel} is not on the storage"))
        elif status == "notfile":
            seen.append(Seen(rel, f"{rel} is not a regular file"))
        else:
            size, inode, mtime_ns = parse_identity(words[2:5])
            device = int(words[5]) if len(words) > 5 and words[5].isdigit() else None
            checksum = None
            if item.rehash:
                line = lines[position] if position < len(lines) else ""
                position += 1
                if line.startswith(f"{index} unreadable"):  # and the system's words, if any
                    why = line.removeprefix(f"{index} unreadable").strip()
                    seen.append(Seen(rel, f"{UNREADABLE} {rel} on {host}"
                                     + (f": {why}" if why else "")))
                    continue
                if line.startswith(f"{index} denied"):  # its open refused (Seen.refused)
                    seen.append(Seen(rel, f"{UNREADABLE} {rel} on {host}: " + denied(
                        ssh, Endpoint(PurePosixPath(root) / rel, host), None)))
                    continue
                checksum = parse_xxhsum(line)
            seen.append(Seen(rel, None, size, inode, mtime_ns, checksum, device=device))
    return seen


@dataclass(frozen=True)
class Entry:
    """A file or symlink found below a location root by `listing` (directories are walked)."""

    relative_path: str  # "/"-separated, below the root
    symlink: bool
    size: int  # of the name itself, not following a symlink (a symlink's own length)
    mtime: float  # seconds since the epoch, of the name itself
    target: str = ""  # a symlink's target


@dataclass
class Listing:
    """Every file below a root, and the directories that could not be listed (with why)."""

    entries: list[Entry] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # ("dir/", problem)
    # Object stores: multipart uploads begun and neither completed nor aborted (the object
    # store's temporary files), as entries with the key's relative path and start time.
    uploads: list[Entry] = field(default_factory=list)


def listing(root: str, host: str | None, ssh: SshSettings, skip: Collection[str] = (),
            label: str | None = None) -> Listing:
    """Every file and symlink below a location root, without following symlinks, except the
    root's marker and the directories `skip` (relative, e.g. nested location roots, which are
    audited on their own). A remote root is listed in one ssh round trip (GNU find).

    Raises StorageUnavailable when the root is unmarked, missing or marked for another
    location than `label` (when given), or the host unreachable."""
    if host is None:
        problem = root_problem(Path(root), label)
        if problem:
            raise StorageUnavailable(problem)
        return _listing_local(root, set(skip))
    return _listing_remote(root, host, ssh, set(skip), label)


def _listing_local(root: str, skip: set[str]) -> Listing:
    found = Listing()
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                children = list(entries)
        except OSError as exc:
            found.unreadable.append((prefix, f"cannot list directory: {exc}"))
            continue
        for child in children:
            relative = f"{prefix}{child.name}"
            if relative == MARKER:
                continue
            try:
                if child.is_dir(follow_symlinks=False):
                    if relative not in skip:
                        stack.append((f"{relative}/", child.path))
                    continue
                info = child.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the directory was listed
            symlink = stat.S_ISLNK(info.st_mode)
            target = ""
            if symlink:
                try:
                    target = os.readlink(child.path)
                except OSError:
                    target = "?"
            found.entries.append(Entry(relative, symlink, info.st_size, info.st_mtime, target))
    return found


# Constant script, one line (ssh arguments cannot carry line breaks); the root arrives as $1.
# Per file or symlink: "TYPE SIZE MTIME\0RELATIVE\0TARGET\0" -- NUL cannot occur in a name.
# LC_ALL=C keeps find's complaints about unreadable directories parseable.
_LIST_SCRIPT = (
    '[ -f "$1/.ccat-dt-location" ] || { echo UNMARKED; exit 0; }; '
    f'echo "MARKED $(grep -m1 \'^{LABEL}\' "$1/.ccat-dt-location")"; '
    'cd -- "$1" || exit 3; echo LISTING; '
    "LC_ALL=C exec find . -mindepth 1 \\( -type f -o -type l \\) "
    "-printf '%y %s %T@\\0%P\\0%l\\0'")
_FIND_ERROR = re.compile(r"^find: '\./(.*)': (.*)$")


def _listing_remote(root: str, host: str, ssh: SshSettings, skip: set[str],
                    label: str | None) -> Listing:
    try:
        done = run(remote_command(ssh, host, ["sh", "-c", _LIST_SCRIPT, "sh", check_path(root)]),
                   timeout_s=HASH_TIMEOUT_S)
    except TransferError as exc:
        raise StorageUnavailable(f"cannot reach {host}: {exc}",
                                 transient=exc.retryable) from exc
    head, _, body = done.stdout.partition("\n")
    if done.rc == 0 and head == "UNMARKED":
        raise StorageUnavailable(f"location root {root} on {host} has no {MARKER} marker: not "
                                 "the disk `ccat-dt init` prepared (is it mounted?)")
    if head.startswith("MARKED"):
        _marked_remote(root, host, head, label)
        head, _, body = body.partition("\n")
    found = Listing()
    if done.rc != 0:  # find exits 1 when a directory could not be read; anything else: unknown
        for line in done.stderr.splitlines():
            if match := _FIND_ERROR.match(line):
                found.unreadable.append((f"{match.group(1)}/", match.group(2)))
        if done.rc != 1 or head != "LISTING" or not found.unreadable:
            # as _look_remote: the host not reached (ssh gave up on a silent link) is
            # transient, not a disk for a person to mount
            error = classify_ssh(done.rc, done.stderr, what=f"listing {root} on {host}")
            raise StorageUnavailable(str(error), transient=error.retryable)
    elif head != "LISTING":
        raise StorageUnavailable(f"unexpected answer from {host} listing {root}: {head!r}")
    fields = body.split("\0")
    for start in range(0, len(fields) - 2, 3):
        kind, size, mtime = fields[start].split(" ", 2)
        relative, target = fields[start + 1], fields[start + 2]
        if relative == MARKER or any(relative.startswith(f"{d}/") for d in skip):
            continue
        found.entries.append(Entry(relative, kind == "l", int(size), float(mtime), target))
    return found


def files_under(root: Path) -> list[Path]:
    """Every regular file below a local location root, except the root's marker."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not (p.name == MARKER and p.parent == root))
