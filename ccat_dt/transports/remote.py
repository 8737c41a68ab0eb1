"""Small file operations on an endpoint that may be on an ssh host: checksum, size, rename,
remove, mkdir. Remote commands go through the remote user's login shell, so every argument is
quoted with shlex (a POSIX shell is assumed) and every path is passed after `--`.

The remote side needs only coreutils and the Debian package `xxhash` (for `xxhsum`)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, TypeVar

from ccat_dt.checksums import hash_file
from ccat_dt.diskstate import inodes_out, inodes_out_here
from ccat_dt.transports.base import (
    PERMANENT_ERRNO,
    SOURCE_UNREADABLE,
    TOO_LARGE,
    Endpoint,
    Occupied,
    SshSettings,
    TransferError,
    blocker_said,
    denied_here,
    denied_source,
    fsync_directory,
    in_the_way_sh,
    make_directory,
    not_a_directory,
    owner_and_mode,
    rename_into_place,
    temporary_name,
    unmarked,
)

SHORT_TIMEOUT_S = 300  # mkdir/stat/mv/rm: slow only when the link is down
HASH_TIMEOUT_S = 3 * 3600  # reading a multi-GB package back from a busy disk
_KILL_GRACE_S = 5
_WATCH_S = 1.0  # how often a running command's `stalled` is asked

# ssh exits 255 for its own errors; these texts say the network, not the setup, failed.
_TRANSIENT = ("Connection refused", "Connection timed out", "No route to host",
              "Connection reset", "Could not resolve", "Network is unreachable",
              "Connection closed by", "connection unexpectedly closed", "Broken pipe",
              "Temporary failure in name resolution", "kex_exchange_identification")
# Retrying cannot fix these; a person must (keys, disk space, missing files, host keys, a
# file-size limit).
_PERMANENT = ("Permission denied", "No space left on device", "Disk quota exceeded",
              "No such file or directory", "Host key verification failed",
              "REMOTE HOST IDENTIFICATION HAS CHANGED", "Read-only file system",
              "command not found", TOO_LARGE)

# Local failures that retrying cannot fix (as in LocalTransport).

_GNU_LINE = re.compile(r"^\\?([0-9a-fA-F]{32}) [ *](.*)$")
_BSD_LINE = re.compile(r"^\\?XXH128 \((.*)\) = ([0-9a-fA-F]{32})$")


@dataclass(frozen=True)
class CompletedRun:
    rc: int
    stdout: str
    stderr: str


def _local_error(message: str, exc: OSError) -> TransferError:
    return TransferError(f"{message}: {exc}", retryable=exc.errno not in PERMANENT_ERRNO)


def check_host(host: str) -> str:
    """Reject hosts that ssh/rsync would read as an option or that split into words."""
    if not host or host.startswith("-") or any(c.isspace() or ord(c) < 32 for c in host) \
            or "/" in host:
        raise ValueError(f"unsafe ssh host {host!r}")
    return host


def check_argument(text: str) -> str:
    """Reject what no quoting carries intact through ssh and rsync: NUL and line breaks."""
    if "\0" in text or "\n" in text or "\r" in text:
        raise ValueError(f"unsafe argument {text!r}")
    return text


def check_path(path: PurePosixPath | str) -> str:
    text = str(path)
    if not text:
        raise ValueError("empty path")
    return check_argument(text)


# A remote command travels as ONE string: ssh's own argument here, then the argument of the
# remote login shell's `-c`. Linux refuses a single argument over 128 KiB (MAX_ARG_STRLEN:
# "Argument list too long"), every time, so a list of files is sent in chunks well under it.
REMOTE_ARGUMENT_CHARS = 60_000

T = TypeVar("T")


def argument_chunks(items: Sequence[T], arguments: Callable[[T], Sequence[str]]
                    ) -> list[list[T]]:
    """`items` in order, in chunks whose remote `arguments` (quoted, as remote_command joins
    them) stay within REMOTE_ARGUMENT_CHARS, so one remote command per chunk fits the kernel's
    limit; one chunk (empty) for no items."""
    chunks: list[list[T]] = [[]]
    chars = 0
    for item in items:
        size = len(shlex.join(arguments(item))) + 1
        if chunks[-1] and chars + size > REMOTE_ARGUMENT_CHARS:
            chunks.append([])
            chars = 0
        chunks[-1].append(item)
        chars += size
    return chunks


def remote_command(ssh: SshSettings, host: str, argv: Sequence[str]) -> list[str]:
    """Local argv that runs `argv` on `host`; the remote shell sees each argument quoted."""
    check_host(host)
    for argument in argv:
        check_argument(argument)
    return [*ssh.ssh_command(), "--", host, shlex.join(argv)]


class CommandTimeout(TransferError):
    """A command ran past its time limit and was stopped; what it printed is kept for the log."""

    def __init__(self, message: str, argv: Sequence[str], stdout: str, stderr: str) -> None:
        super().__init__(message, retryable=True)
        self.argv = list(argv)
        self.stdout = stdout
        self.stderr = stderr


class CommandStalled(CommandTimeout):
    """A command stopped before its time limit because it made no progress; `why` says so."""

    def __init__(self, message: str, argv: Sequence[str], stdout: str, stderr: str,
                 why: str) -> None:
        super().__init__(message, argv, stdout, stderr)
        self.why = why


def run(argv: Sequence[str], *, timeout_s: float, pass_fds: Sequence[int] = (),
        on_line: Callable[[str], None] | None = None,
        stalled: Callable[[], str | None] | None = None) -> CompletedRun:
    """Run without a shell in a process group of its own, so that a timeout also ends the
    ssh children rsync started (they would otherwise keep the pipes and the transfer open).
    After a failure, whatever is left of the group is stopped too: a retry must never race a
    straggler of this attempt. `pass_fds` are inherited (see base.exclusive_writer).

    A timeout raises CommandTimeout (retryable), a program that cannot start TransferError.
    With `on_line`, each line of stdout and of stderr (split at '\\n' and '\\r', as progress
    meters write; rsync's meter is on stdout, bbcp's on stderr) is handed to it while the
    program runs. `stalled` (with `on_line`), asked every second, says why the program makes
    no progress (a link gone silent, which no timeout of the program itself notices): it is
    then stopped as on a timeout, and CommandStalled says why."""
    process = spawn(argv, pass_fds=pass_fds)
    try:
        if on_line is not None:
            stdout, stderr = _communicate_live(process, timeout_s, on_line, stalled)
        else:
            stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as timeout:
        stdout, stderr = ((timeout.output or b"", timeout.stderr or b"")
                          if isinstance(timeout, _LiveTimeout) else _stop(process))
        _kill_group(process)  # a stopped (frozen) child outlives the SIGTERM its leader obeyed
        if isinstance(timeout, _LiveTimeout) and timeout.why:
            raise CommandStalled(f"{argv[0]} stopped: {timeout.why}", argv, _text(stdout),
                                 _text(stderr), timeout.why) from None
        raise CommandTimeout(f"{argv[0]} timed out after {timeout_s:g} s and was stopped; "
                             f"stderr: {_tail(_text(stderr))}", argv, _text(stdout),
                             _text(stderr)) from None
    except BaseException:
        _stop(process)
        raise
    if process.returncode != 0:
        _kill_group(process)
    return CompletedRun(process.returncode, _text(stdout), _text(stderr))


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of the process group of a failed command."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def spawn(argv: Sequence[str], *, stdin: int = subprocess.DEVNULL,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start argv without a shell, in a process group of its own, its output piped; every
    ssh, rsync and bbcp command starts here. TransferError if it cannot start."""
    try:
        return subprocess.Popen(list(argv), stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=tuple(pass_fds))
    except OSError as exc:
        raise _local_error(f"cannot run {argv[0]}", exc) from exc


def _communicate_live(process: subprocess.Popen[bytes], timeout_s: float,
                      on_line: Callable[[str], None],
                      stalled: Callable[[], str | None] | None = None) -> tuple[bytes, bytes]:
    """communicate(), except that the lines of both streams go to `on_line` as they come. On a
    timeout, or once `stalled` says why, the threads keep reading until the process group is
    stopped."""
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def pump(stream: Any, key: str) -> None:
        pending = b""
        for block in iter(lambda: stream.read1(65536), b""):
            chunks[key].append(block)
            *complete, pending = re.split(rb"[\r\n]", pending + block)
            for line in complete:
                if line.strip():
                    with contextlib.suppress(Exception):  # a reporter must not stop the copy
                        on_line(line.decode("utf-8", errors="replace"))

    threads = [threading.Thread(target=pump, args=(process.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(process.stderr, "err"), daemon=True)]
    for thread in threads:
        thread.start()
    deadline, why = time.monotonic() + timeout_s, None
    while True:
        try:
            process.wait(timeout=max(0.0, min(_WATCH_S, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            why = stalled() if stalled is not None else None
            if why is None and time.monotonic() < deadline:
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):  # as _stop(), without communicate()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=_KILL_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
        for thread in threads:
            thread.join(timeout=_KILL_GRACE_S)
        raise _LiveTimeout(process.args, timeout_s, b"".join(chunks["out"]),
                           b"".join(chunks["err"]), why)
    for thread in threads:
        thread.join()
    return b"".join(chunks["out"]), b"".join(chunks["err"])


class _LiveTimeout(subprocess.TimeoutExpired):
    """A timeout (or, with `why`, a stall) of _communicate_live: the process group is stopped,
    its output collected."""

    def __init__(self, cmd: Any, timeout: float, output: bytes, stderr: bytes,
                 why: str | None) -> None:
        super().__init__(cmd, timeout, output, stderr)
        self.why = why


def _stop(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """SIGTERM the process group (rsync then exits cleanly, keeping its partial file), SIGKILL
    it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            return process.communicate(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    return process.communicate()


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(empty)"


def classify_ssh(rc: int, stderr: str, *, what: str = "ssh command") -> TransferError:
    """Turn a failed ssh invocation into a TransferError that says whether retrying helps."""
    message = f"{what} failed (exit {rc}): {_tail(stderr)}"
    if any(text in stderr for text in _PERMANENT):
        return TransferError(message, retryable=False)
    if any(text in stderr for text in _TRANSIENT):
        return TransferError(message, retryable=True)
    # Unexplained 255 is ssh's own failure (network, remote sshd overloaded): worth retrying.
    return TransferError(message, retryable=rc == 255)


def _remote(ssh: SshSettings, host: str, argv: Sequence[str], *, what: str,
            timeout_s: float = SHORT_TIMEOUT_S) -> CompletedRun:
    done = run(remote_command(ssh, host, argv), timeout_s=timeout_s)
    if done.rc != 0:
        raise classify_ssh(done.rc, done.stderr, what=f"{what} on {host}")
    return done


def parse_xxhsum(output: str) -> str:
    """The one XXH128 digest in `xxhsum -H2` output, GNU (`hex  name`) or BSD
    (`XXH128 (name) = hex`) style; names may hold spaces, so only the digest is trusted."""
    digests = []
    for line in output.splitlines():
        if match := _GNU_LINE.match(line):
            digests.append(match.group(1))
        elif match := _BSD_LINE.match(line):
            digests.append(match.group(2))
    if len(digests) != 1:
        raise TransferError(f"cannot read an XXH128 digest from xxhsum output {output!r}",
                            retryable=False)
    return digests[0].lower()


def remote_xxh128(ssh: SshSettings, endpoint: Endpoint, *,
                  timeout_s: float = HASH_TIMEOUT_S) -> str:
    """xxh3-128 of the file at `endpoint`, computed where the file is (no bytes cross the link).

    `xxhsum -H2` prints XXH128 as the same hex as python-xxhash's xxh3_128().hexdigest()."""
    path = check_path(endpoint.path)
    if endpoint.host is None:
        return _hash_local(path)[0]
    done = run(remote_command(ssh, endpoint.host, ["xxhsum", "-H2", "--", path]),
               timeout_s=timeout_s)
    _check_xxhsum(done, endpoint.host, path)
    return parse_xxhsum(done.stdout)


def _hash_local(path: str) -> tuple[str, int]:
    try:
        return hash_file(Path(path))
    except OSError as exc:
        raise _local_error(f"cannot checksum {path}", exc) from exc


def _check_xxhsum(done: CompletedRun, host: str, path: str) -> None:
    if done.rc == 127 or ("xxhsum" in done.stderr and "not found" in done.stderr):
        raise TransferError(f"xxhsum not found on {host}: install the Debian package "
                            f"xxhash on {host}", retryable=False)
    if done.rc != 0:
        raise classify_ssh(done.rc, done.stderr, what=f"xxhsum {path} on {host}")


def _same_host(first: Endpoint, second: Endpoint) -> str | None:
    if first.host != second.host:
        raise ValueError(f"cannot rename across hosts: {first} -> {second}")
    return first.host


# How a remote file's size and identity are printed (GNU stat): size, inode, and the mtime to
# the nanosecond, so a later look or deletion can tell the very file that was verified.
STAT_IDENTITY = "%s %i %.9Y"


def parse_identity(words: Sequence[str]) -> tuple[int, int | None, int | None]:
    """(size, inode, mtime_ns) from STAT_IDENTITY's words. ValueError without a size; inode
    and mtime None when the host's stat did not print them so (then the identity is unknown,
    and whoever relies on it re-hashes instead)."""
    size = int(words[0])
    try:
        seconds, _, fraction = words[2].partition(".")
        if not fraction.isdigit():
            raise ValueError(words[2])
        return size, int(words[1]), int(seconds) * 10**9 + int(fraction[:9].ljust(9, "0"))
    except (IndexError, ValueError):
        return size, None, None


class Landed(NamedTuple):
    """What remote_verify_and_rename found of the landed file."""

    digest: str
    size: int
    inode: int | None = None  # remote only: the final name's identity (a local one is
    mtime_ns: int | None = None  # looked at by whoever records the copy)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_umask()  # what a file created now gets; see _NEW_FILE_MODE


def _rename_local(landed: Endpoint, final: Endpoint) -> None:
    """Durably move a verified file to its final name: flush the file, rename (never over a
    file there but the quarantined one `final.replaces` names), flush the directory, so a crash
    cannot leave a short file under the name."""
    source, target = str(landed.path), str(final.path)
    try:
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(source, NEW_FILE_MODE)
        rename_into_place(source, target, replaces=final.replaces)
        fsync_directory(Path(final.path.parent))
    except FileExistsError:
        raise Occupied(final, landed) from None
    except OSError as exc:
        raise _local_error(f"cannot rename {source} -> {target}", exc) from exc


# A landed file gets the mode a file created now would get (0666 less the umask): rsync writes
# its partial file 0600, and one resumed after a cut kept that mode into every archive.
_NEW_FILE_MODE = 'chmod "$(printf %o $((0666 & ~$(umask))))"'


# The move into place on a remote host, a constant fragment; $1 the landed file, $2 its final
# name, $5 the identity (Identity.text) of the quarantined file a repair replaces, or empty.
# Only while that very file is at the final name (looked at just before) is it replaced;
# otherwise `mv -n` (renameat2's RENAME_NOREPLACE where the file system has it, else a look just
# before) never replaces: when the landed file is still there and the final name is taken, it
# prints "occupied" and fails.
_MOVE = (_NEW_FILE_MODE + ' -- "$1"; '
         '{ if [ -n "$5" ] && [ "$(stat -c %s:%i:%.9Y -- "$2" 2>/dev/null)" = "$5" ]; then '
         'mv -f -- "$1" "$2"; else mv -n -- "$1" "$2"; '
         '[ ! -e "$1" ] || { { [ -e "$2" ] || [ -L "$2" ]; } && echo occupied; exit 1; }; fi; }')


def read_error_sh(path: str = '"$1"') -> str:
    """Shell text for after a failed hash of `path` (a quoted shell word): xxhsum says only "a
    failure occurred reading the input file", so the file is read once more and the system's
    own words ("cat: FILE: Input/output error") printed on stdout, so that a disk failing its
    reads is told as one, not as a bad or unknown file."""
    return f'cat -- {path} 2>&1 > /dev/null'

# Constant script; $1 the landed file, $2 its final name, $3 the final directory, $4 the
# expected digest, $5 the quarantined file a repair replaces (_MOVE) arrive as positional
# parameters, never as code. It prints the size and the `xxhsum -H2` line (of stdin, so no
# file name to escape), then only on an exact match moves the file into place (_MOVE), flushes
# the directory and prints "renamed". The file is flushed to disk while it is hashed (both only
# read it; the disk writes while the CPU hashes), and renamed only after both succeeded (a
# failed flush is never retried: see VERIFY_AND_RENAME_MANY_SCRIPT). A failed hash
# exits with xxhsum's status, the system's error on stderr (read_error_sh).
_VERIFY_AND_RENAME_SCRIPT = (
    'sync -- "$1" < /dev/null > /dev/null & flushing=$!; '
    'size=$(stat -L -c "' + STAT_IDENTITY + '" -- "$1") || exit; '
    'sum=$(xxhsum -H2 < "$1") || { r=$?; { ' + read_error_sh() + '; } >&2; exit "$r"; }; '
    'printf "%s\\n%s\\n" "$size" "$sum"; '
    '[ "${sum%% *}" = "$4" ] || exit 0; '
    'wait "$flushing" && { ' + _MOVE + '; } && sync -- "$3" && echo renamed')

Recorder = Callable[[Sequence[str], CompletedRun, float], None]


def _run_recorded(argv: Sequence[str], timeout_s: float,
                  record: Recorder | None) -> CompletedRun:
    """`run`, its output handed to `record` (the operation's log) even when it timed out."""
    started = time.monotonic()
    try:
        done = run(argv, timeout_s=timeout_s)
    except CommandTimeout as exc:
        if record is not None:
            record(argv, CompletedRun(-1, exc.stdout, exc.stderr), time.monotonic() - started)
        raise
    if record is not None:
        record(argv, done, time.monotonic() - started)
    return done


def _replaces(final: Endpoint) -> str:
    """The quarantined file a repair replaces at `final`, as the remote scripts compare it."""
    return final.replaces.text() if final.replaces is not None else ""


def remote_verify_and_rename(ssh: SshSettings, landed: Endpoint, final: Endpoint,
                             expected: str, *, record: Recorder | None = None,
                             timeout_s: float = HASH_TIMEOUT_S) -> Landed:
    """xxh3-128 and size of the file `landed`, and, only if that digest is `expected`, the
    durable rename of `landed` to `final` -- in one ssh round trip instead of two (each costs a
    handshake over a long-latency link). Returns what landed: the file was renamed exactly
    when the digest equals `expected`; on a mismatch `landed` is left as it is, for the caller
    to deal with. Never renamed over a file at `final` (but `final.replaces`): that is the
    `occupied` TransferError, `landed` kept. `record(argv, completed, seconds)` sees the ssh
    command."""
    host = _same_host(landed, final)
    source, target = check_path(landed.path), check_path(final.path)
    directory = str(final.path.parent)
    if host is None:
        digest, size = _hash_local(source)
        if digest == expected:
            _rename_local(landed, final)
        return Landed(digest, size)
    argv = remote_command(ssh, host, ["sh", "-c", _VERIFY_AND_RENAME_SCRIPT, "sh", source,
                                      target, directory, expected,
                                      _replaces(final)])
    done = _run_recorded(argv, timeout_s, record)
    lines = done.stdout.splitlines()
    if done.rc != 0:
        if lines[2:] == ["occupied"]:
            raise Occupied(final, landed)
        if len(lines) >= 2:  # verified (both lines printed): sync or mv failed
            raise classify_ssh(done.rc, done.stderr,
                               what=f"rename {source} -> {target} on {host}")
        _check_xxhsum(done, host, source)
    size_line = lines[0] if lines else ""
    try:
        size, inode, mtime_ns = parse_identity(size_line.split())
    except (IndexError, ValueError):
        raise TransferError(f"stat {source} on {host} printed {size_line!r}",
                            retryable=False) from None
    digest = parse_xxhsum("\n".join(lines[1:2]))
    renamed = lines[2:] == ["renamed"]
    if renamed != (digest == expected):
        raise TransferError(f"verifying {source} on {host}: xxhsum printed {lines[1:2]}, "
                            f"expected {expected}, {'' if renamed else 'not '}renamed; the "
                            "remote comparison disagrees with ours", retryable=False)
    return Landed(digest, size, inode, mtime_ns)


def remote_remove(ssh: SshSettings, endpoint: Endpoint) -> None:
    """Delete a file if it exists."""
    path = check_path(endpoint.path)
    if endpoint.host is None:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as exc:
            raise _local_error(f"cannot remove {path}", exc) from exc
        return
    _remote(ssh, endpoint.host, ["rm", "-f", "--", path], what=f"rm {path}")


def remote_size(ssh: SshSettings, endpoint: Endpoint) -> int | None:
    """Size in bytes of the file at `endpoint`, None if there is none."""
    path = check_path(endpoint.path)
    if endpoint.host is None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _local_error(f"cannot stat {path}", exc) from exc
    done = run(remote_command(ssh, endpoint.host, ["stat", "-L", "-c", "%s", "--", path]),
               timeout_s=SHORT_TIMEOUT_S)
    if done.rc != 0:
        if done.rc != 255 and "No such file or directory" in done.stderr:
            return None
        raise classify_ssh(done.rc, done.stderr, what=f"stat {path} on {endpoint.host}")
    try:
        return int(done.stdout.strip())
    except ValueError:
        raise TransferError(f"stat {path} on {endpoint.host} printed {done.stdout!r}",
                            retryable=False) from None


# The refused path's owner and mode (uid, name, octal mode), or, when a directory on its path
# cannot be entered, the deepest one that can be looked at; then that path, and who logs in.
_REFUSAL_SCRIPT = ('p=$1; while ! s=$(stat -L -c "%u %U %a" -- "$p" 2>/dev/null); do '
                   '[ "$p" = / ] && exit 1; p=$(dirname -- "$p"); done; '
                   'printf "%s\\n%s\\n" "$s" "$p"; id -u; id -un')
REFUSAL_TIMEOUT_S = 30  # a look on the failure path: the link just carried the transfer


def denied(ssh: SshSettings, source: Endpoint, what: str | None = SOURCE_UNREADABLE) -> str:
    """denied_source for a source file (`what` None: a copy re-read) refused to ccat-dt's
    user where it lies: on this machine, or on its ssh host, whose owner and mode (and login
    user) are looked at there, best effort (a failed look leaves them out)."""
    path = check_path(source.path)
    if source.host is None:
        return denied_here(path, what=what)
    host = check_host(source.host)
    user, found = f"the user ccat-dt logs in as on {host}", None
    with contextlib.suppress(TransferError, ValueError, OSError):
        done = run(remote_command(ssh, host, ["sh", "-c", _REFUSAL_SCRIPT, "sh", path]),
                   timeout_s=REFUSAL_TIMEOUT_S)
        lines = done.stdout.splitlines()
        if done.rc == 0 and len(lines) >= 4:
            uid, name, mode = lines[0].split(" ", 2)
            found = owner_and_mode(int(uid), int(mode, 8),
                                   "" if name == "UNKNOWN" else name)
            if lines[1] != path:
                found = f"its directory {lines[1]} cannot be entered: {found}"
            user += f" ({lines[3]}, uid {int(lines[2])})"
    return denied_source(f"{path} on {host}", found, user, what)


# The disk holding a path (its nearest existing directory): blocks available, block size,
# inodes, inodes free (GNU stat).
_STATFS_SCRIPT = ('d=$1; while [ ! -e "$d" ] && [ "$d" != / ]; do d=$(dirname -- "$d"); done; '
                  'exec stat -f -c "%a %S %c %d" -- "$d"')


def inodes_out_there(ssh: SshSettings, endpoint: Endpoint) -> str:
    """diskstate.inodes_out for the disk `endpoint` is written to, on this machine or looked
    at over ssh, best effort on the failure path: "" when it cannot be looked at."""
    directory = check_path(endpoint.path.parent)
    if endpoint.host is None:
        return inodes_out_here(Path(directory))
    with contextlib.suppress(TransferError, ValueError, OSError):
        done = run(remote_command(ssh, check_host(endpoint.host),
                                  ["sh", "-c", _STATFS_SCRIPT, "sh", directory]),
                   timeout_s=REFUSAL_TIMEOUT_S)
        if done.rc == 0:
            available, block, inodes, free = (int(word) for word in done.stdout.split())
            return inodes_out(available * block, inodes, free)
    return ""


def remote_mkdir(ssh: SshSettings, endpoint_dir: Endpoint) -> None:
    """Create a directory and its parents; fine if it exists."""
    path = check_path(endpoint_dir.path)
    if endpoint_dir.host is None:
        try:
            make_directory(path)
        except OSError as exc:
            raise _local_error(f"cannot create {path}", exc) from exc
        return
    done = run(remote_command(ssh, endpoint_dir.host, ["sh", "-c", _MKDIR_SCRIPT, "sh", path]),
               timeout_s=SHORT_TIMEOUT_S)
    if (blocker := blocker_said(done.stderr)) is not None:
        raise not_a_directory(path, blocker, endpoint_dir.host)
    if done.rc != 0:
        raise classify_ssh(done.rc, done.stderr, what=f"mkdir {path} on {endpoint_dir.host}")


# Constant script: mkdir -p of each argument, naming a file on the way (in_the_way_sh).
_MKDIR_SCRIPT = 'for d in "$@"; do mkdir -p -- "$d" || ' + in_the_way_sh("d") + '; done'


# Constant script; $1 the location marker ("" for none), then the directories to create. The
# marker is looked for first: on an unmounted disk, mkdir -p would write onto the mount point.
UNMARKED = "ccat-dt:location-unmarked"  # what the remote side says when the marker is missing
_PREPARE_SCRIPT = ('[ -z "$1" ] || [ -f "$1" ] || { echo ' + UNMARKED + ' >&2; exit 3; }; '
                   'shift; ' + _MKDIR_SCRIPT)


def remote_prepare(ssh: SshSettings, destination: Endpoint, *directories: Endpoint) -> None:
    """Before writing `destination`: its location marker is there (when it has one) and the
    `directories` (on its host) exist -- one ssh round trip. TransferError otherwise (not
    retryable for a missing marker: a person mounts the disk)."""
    marker = "" if destination.marker is None else check_path(destination.marker)
    paths = [check_path(d.path) for d in directories]
    if destination.host is None:
        if marker and not os.path.isfile(marker):
            raise unmarked(destination)
        for path in paths:
            try:
                make_directory(path)
            except OSError as exc:
                raise _local_error(f"cannot create {path}", exc) from exc
        return
    done = run(remote_command(ssh, destination.host, ["sh", "-c", _PREPARE_SCRIPT, "sh",
                                                      marker, *paths]),
               timeout_s=SHORT_TIMEOUT_S)
    if done.rc == 3 and UNMARKED in done.stderr:
        raise unmarked(destination)
    if done.rc != 0 and (blocker := blocker_said(done.stderr)) is not None:
        raise not_a_directory(" ".join(paths), blocker, destination.host)
    if done.rc != 0:
        raise classify_ssh(done.rc, done.stderr, what=f"mkdir {' '.join(paths)} on "
                           f"{destination.host}")


# Constant script, one line; $1 is 1 to rename all or none, then per file its landed name,
# final name, expected digest and the quarantined file a repair replaces there (as _MOVE), as
# positional parameters (never code; no line breaks, see check_argument). The files are hashed
# in parallel (xargs -P, one per core of the host), each flushed to disk while it is hashed;
# per file one line "INDEX SIZE:INODE:MTIME DIGEST" ("-" for what could not be read; the
# identity as STAT_IDENTITY prints it), and for a file whose read failed "unreadable INDEX"
# and the system's error (read_error_sh, its last words: "Input/output error"); then the
# matching files (all, or none when $1 is 1 and one differs) are renamed, none if the flush of
# one failed (an fsync is never retried: Linux reports a lost write-back once, a second fsync
# succeeds though the bytes never reached the disk; sync's error on stderr, exit 1: the disk
# is failing, the batch is sent again), and their directories flushed, printing "renamed
# INDEX" each; one whose final name is
# taken is left where it landed (mv -n, as _MOVE), printing "occupied INDEX". A file renamed
# from elsewhere than its final name's `.NAME.part` (a bbcp batch's staging directory) has that
# `.NAME.part` removed, if one is there: an earlier single attempt's partial (kept for -a to
# resume), of no use once the package's copy is verified (stale_partial_name).
VERIFY_AND_RENAME_MANY_SCRIPT = r"""
t=$(mktemp -d "${TMPDIR:-/tmp}/ccat-verify.XXXXXX") || exit 1;
trap 'rm -rf -- "$t"' EXIT;
p=$(nproc 2>/dev/null || echo 2); all=$1; shift; i=0; k=0;
for a in "$@"; do
  if [ $((k % 4)) -eq 0 ]; then printf '%s\0%s\0' "$a" "$t/$i"; i=$((i+1)); fi;
  k=$((k+1));
done | xargs -0 -r -n 2 -P "$p" sh -c
  '{ sync -- "$1" < /dev/null > /dev/null && : > "$2.synced"; } & f=$!;
   stat -L -c %s:%i:%.9Y -- "$1" > "$2.size" && { xxhsum -H2 < "$1" > "$2" ||
   { rm -f -- "$2"; { READ_ERROR_SH; } > "$2.err"; }; }; wait "$f"; exit 0'
  sh;
i=0; bad=0;
while [ $# -ge 4 ]; do
  s=$(cat "$t/$i.size" 2>/dev/null); h=$(cat "$t/$i" 2>/dev/null); h=${h%% *};
  echo "$i ${s:--} ${h:--}";
  [ -n "$h" ] || [ ! -s "$t/$i.err" ] ||
  { e=$(tail -n 1 "$t/$i.err"); echo "unreadable $i ${e##*: }"; };
  if [ -n "$h" ] && [ "$h" = "$3" ]; then printf '%s\n%s\n%s\n%s\n' "$i" "$1" "$2" "$4" >> "$t/ok";
  else bad=$((bad+1)); fi;
  i=$((i+1)); shift 4;
done;
if [ "$all" = 1 ] && [ "$bad" -gt 0 ]; then exit 0; fi;
[ -f "$t/ok" ] || exit 0;
while IFS= read -r i && IFS= read -r f && IFS= read -r d && IFS= read -r o; do
  [ -e "$t/$i.synced" ] || exit 1;
done < "$t/ok";
while IFS= read -r i && IFS= read -r f && IFS= read -r d && IFS= read -r o; do
  NEW_FILE_MODE -- "$f";
  if [ -n "$o" ] && [ "$(stat -c %s:%i:%.9Y -- "$d" 2>/dev/null)" = "$o" ]; then
    mv -f -- "$f" "$d" || exit 1;
  else mv -n -- "$f" "$d";
    if [ -e "$f" ]; then
      { [ -e "$d" ] || [ -L "$d" ]; } || exit 1; echo "occupied $i"; continue;
    fi;
  fi;
  dirname -- "$d" >> "$t/dirs"; echo "renamed $i";
  q="${d%/*}/.${d##*/}.part";
  if [ "$q" != "$f" ] && [ -f "$q" ] && [ ! -L "$q" ]; then rm -f -- "$q"; fi;
done < "$t/ok";
[ -f "$t/dirs" ] || exit 0;
sort -u "$t/dirs" | while IFS= read -r d; do sync -- "$d" || exit 1; done
""".strip().replace("\n", " ").replace(  # ssh arguments cannot carry line breaks
    "NEW_FILE_MODE", _NEW_FILE_MODE).replace("READ_ERROR_SH", read_error_sh())


class Verdict(NamedTuple):
    """What verify-and-rename found for one landed file."""

    digest: str | None  # None: the landed file could not be read
    size: int | None
    renamed: bool
    occupied: bool = False  # verified, but the final name was taken: left where it landed
    inode: int | None = None  # of the landed (then final) file, when the host's stat said
    mtime_ns: int | None = None
    unreadable: str | None = None  # why the read failed, in the system's words, when it did


def read_back_failed(landed: Endpoint, why: str) -> str:
    """What a transfer says when the file it landed could not be read back to be verified:
    the destination disk's failure (health.location_failure), not the file's."""
    return f"reading back {landed} to verify it failed: {why}"


def many_arguments(all_or_none: bool, items: Sequence[tuple[Endpoint, Endpoint, str]]
                   ) -> list[str]:
    """VERIFY_AND_RENAME_MANY_SCRIPT's positional parameters for `items`."""
    arguments = ["1" if all_or_none else "0"]
    for landed, final, expected in items:
        arguments += [check_path(landed.path), check_path(final.path), expected,
                      _replaces(final)]
    return arguments


def remote_verify_and_rename_many(ssh: SshSettings,
                                  items: Sequence[tuple[Endpoint, Endpoint, str]], *,
                                  all_or_none: bool, record: Recorder | None = None,
                                  timeout_s: float = HASH_TIMEOUT_S) -> list[Verdict]:
    """remote_verify_and_rename for several (landed, final, expected) files on one host, in
    one ssh round trip, hashing them in parallel (as many at once as the host has cores).
    A Verdict per file. `all_or_none`: rename nothing unless every file matches."""
    hosts = {h for landed, final, _ in items for h in (landed.host, final.host)}
    if len(hosts) != 1:
        raise ValueError(f"verify and rename on one host at a time, not {hosts}")
    [host] = hosts
    if host is None:
        return _verify_and_rename_local(items, all_or_none=all_or_none)
    argv = remote_command(ssh, host, ["sh", "-c", VERIFY_AND_RENAME_MANY_SCRIPT, "sh",
                                      *many_arguments(all_or_none, items)])
    return parse_verified(_run_recorded(argv, timeout_s, record), host, len(items))


def parse_verified(done: CompletedRun, host: str, count: int) -> list[Verdict]:
    """What VERIFY_AND_RENAME_MANY_SCRIPT answered about `count` files, a Verdict per file;
    TransferError if it failed or said something else."""
    if done.rc == 127 or "xxhsum: not found" in done.stderr or (
            "xxhsum" in done.stderr and "command not found" in done.stderr):
        raise TransferError(f"xxhsum not found on {host}: install the Debian package xxhash "
                            f"on {host}", retryable=False)
    if done.rc != 0:
        raise classify_ssh(done.rc, done.stderr, what=f"verify and rename of {count} "
                           f"file(s) on {host}")
    found: dict[int, tuple[str | None, tuple[int | None, int | None, int | None]]] = {}
    said: dict[str, set[int]] = {"renamed": set(), "occupied": set()}
    unreadable: dict[int, str] = {}
    for line in done.stdout.splitlines():
        words = line.split()
        if words[:1] in (["renamed"], ["occupied"]) and len(words) == 2 and words[1].isdigit():
            said[words[0]].add(int(words[1]))
        elif words[:1] == ["unreadable"] and len(words) >= 3 and words[1].isdigit():
            unreadable[int(words[1])] = line.split(maxsplit=2)[2]
        elif len(words) == 3 and words[0].isdigit():
            digest = words[2].lower()
            try:
                identity: tuple[int | None, int | None, int | None] = parse_identity(
                    words[1].split(":"))
            except ValueError:
                identity = (None, None, None)
            found[int(words[0])] = (None if digest == "-" else digest, identity)
    if sorted(found) != list(range(count)):
        raise TransferError(f"verifying {count} file(s) on {host}: unexpected answer "
                            f"{done.stdout[-300:]!r}", retryable=True)
    return [Verdict(digest, size, i in said["renamed"], i in said["occupied"], inode, mtime_ns,
                    unreadable.get(i) if digest is None else None)
            for i, (digest, (size, inode, mtime_ns)) in sorted(found.items())]


def _verify_and_rename_local(items: Sequence[tuple[Endpoint, Endpoint, str]], *,
                             all_or_none: bool) -> list[Verdict]:
    def hashed(path: PurePosixPath) -> tuple[str | None, int | None, str | None]:
        try:
            return (*hash_file(Path(path)), None)
        except OSError as exc:
            return None, None, f"{path}: {exc.strerror or exc}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        found = list(pool.map(hashed, [landed.path for landed, _, _ in items]))
    matches = [digest == expected for (digest, _, _), (_, _, expected) in zip(found, items,
                                                                               strict=True)]
    rename = all(matches) if all_or_none else True
    out = []
    for (digest, size, why), match, (landed, final, _) in zip(found, matches, items,
                                                              strict=True):
        taken = False
        if rename and match:
            try:
                _rename_local(landed, final)
            except Occupied:
                taken = True
        renamed = rename and match and not taken
        if renamed and (stale := stale_partial_name(landed, final)) is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(stale).st_mode):
                    os.unlink(stale)
        out.append(Verdict(digest, size, renamed, taken, unreadable=why))
    return out


def stale_partial_name(landed: Endpoint, final: Endpoint) -> str | None:
    """The `.NAME.part` beside `final` that an earlier attempt may have left (a cut single
    copy's, kept to resume), when this attempt landed elsewhere (a batch's staging directory):
    once `final` is verified and in place, nothing will resume it."""
    partial = temporary_name(final.path)
    return None if partial == landed.path else check_path(partial)
