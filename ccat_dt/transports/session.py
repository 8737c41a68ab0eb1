"""One ssh session around a transfer to a host: before it, the location marker looked at and
the directories created; while it runs, the landing files flushed to disk five times a
second; after it, every landed file hashed (in parallel) and renamed only if it matches.

Two ssh commands (remote.remote_prepare, then remote.remote_verify_and_rename_many) cost two
connections' set-up and leave the whole flush to the end; one session started before the
transfer and told "go" when it ended costs neither (docs/benchmarks.md, section 4b). The
transfer starts only after the session said "ready": the marker is always looked at before
anything is written. A session lost during the transfer (the link dropped) is replaced by
remote_verify_and_rename_many: the verdict is the same, only slower."""

from __future__ import annotations

import contextlib
import glob
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from ccat_dt.transports import remote
from ccat_dt.transports.base import (
    Endpoint,
    SshSettings,
    TransferError,
    blocker_said,
    in_the_way_sh,
    not_a_directory,
    unmarked,
)
from ccat_dt.transports.remote import (
    HASH_TIMEOUT_S,
    SHORT_TIMEOUT_S,
    UNMARKED,
    VERIFY_AND_RENAME_MANY_SCRIPT,
    CompletedRun,
    Verdict,
    check_argument,
    check_path,
    classify_ssh,
    many_arguments,
    parse_verified,
    remote_command,
    remote_prepare,
    remote_verify_and_rename_many,
)

Verified = list[Verdict]

# Constant script, one line; $1 the location marker ("" for none), $2 the name prefix of the
# directories earlier attempts landed these files in beside their final names ("" for none),
# $3 how many directories follow, the directories, then what VERIFY_AND_RENAME_MANY_SCRIPT takes
# ($1 all-or-none, then landed, final, expected, replaced file per file). Before "ready": a
# file found landed in such a directory under its final name's name (not this attempt's
# landing) is an earlier attempt's leftover of that very package, which this attempt holds
# (claims.py): it is removed, and its directory once empty. A flusher syncs the landing files'
# file system (`sync -f`, syncfs: a write-back error stays for the verification's own fsync of
# the file, which a `sync FILE` here would take; tests/faults/test_disk_errors.py) every 0.2 s
# until a line arrives on
# stdin, so that what is left to flush after the transfer is a fraction of a second of its
# data even when the link is as fast as the disk (every second: up to two seconds' worth,
# which the verification then waited for); "go" verifies and renames, "discard" removes every
# landed file, anything else (or EOF) leaves them. Then landing directories of their own (not
# a final name's: a batch's staging directory) are removed once empty.
_SESSION_SCRIPT = (
    '[ -z "$1" ] || [ -f "$1" ] || { echo ' + UNMARKED + ' >&2; exit 3; }; '
    'lp=$2; n=$3; shift 3; '
    'while [ "$n" -gt 0 ]; do mkdir -p -- "$1" || ' + in_the_way_sh("1") + '; '
    'shift; n=$((n-1)); done; '
    'k=0; [ -z "$lp" ] || for a in "$@"; do case $((k % 4)) in 1) l=$a;; '
    '2) for f in "${a%/*}/$lp"*/"${a##*/}"; do [ "$f" != "$l" ] && [ -f "$f" ] '
    '&& [ ! -L "$f" ] && [ ! -L "${f%/*}" ] && rm -f -- "$f" && rmdir -- "${f%/*}" 2>/dev/null; '
    'done;; esac; k=$((k+1)); done; '
    'echo ready; '
    '( n=$#; k=0; for a in "$@"; do [ $((k % 4)) -eq 1 ] && set -- "$@" "$a"; k=$((k+1)); '
    'done; shift "$n"; [ "$#" -gt 0 ] || exit 0; '
    'while sleep 0.2 || sleep 1; do sync -f -- "$@"; done '
    ') < /dev/null > /dev/null 2>&1 & flusher=$!; '
    'IFS= read -r go; kill "$flusher" 2>/dev/null; wait "$flusher" 2>/dev/null; '
    'case $go in go) ( ' + VERIFY_AND_RENAME_MANY_SCRIPT + ' ); r=$?;; '
    'discard) r=0; k=0; for a in "$@"; do [ $((k % 4)) -eq 1 ] && rm -f -- "$a"; k=$((k+1)); '
    'done;; *) r=0;; esac; '
    'k=0; for a in "$@"; do case $((k % 4)) in 1) l=${a%/*};; '
    '2) [ "$l" = "${a%/*}" ] || rmdir -- "$l" 2>/dev/null;; esac; k=$((k+1)); done; exit "$r"')

# Constant script: $1 how many files follow, the files, then directories: the files removed,
# then the directories once empty.
_DISCARD_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do rm -f -- "$1"; shift; n=$((n-1)); '
                   'done; for d in "$@"; do rmdir -- "$d" 2>/dev/null; done; exit 0')


def own_directories(items: Sequence[tuple[Endpoint, Endpoint, str]]) -> list[PurePosixPath]:
    """The landing directories that are not a final name's (a batch's staging directory)."""
    return sorted({landed.path.parent for landed, final, _ in items
                   if landed.path.parent != final.path.parent})


def discard(ssh: SshSettings, items: Sequence[tuple[Endpoint, Endpoint, str]]) -> None:
    """Remove the landed files of `items` and their own landing directories once empty, in
    one round trip (best effort: a file that cannot be removed is left to the next attempt)."""
    if not items:
        return
    host = items[0][0].host
    landed = [check_path(landed.path) for landed, _, _ in items]
    directories = [check_path(d) for d in own_directories(items)]
    if host is None:
        for path in landed:
            with contextlib.suppress(OSError):
                Path(path).unlink(missing_ok=True)
        _remove_empty(directories)
        return
    with contextlib.suppress(TransferError):
        remote.run(remote_command(ssh, host, ["sh", "-c", _DISCARD_SCRIPT, "sh",
                                              str(len(landed)), *landed, *directories]),
                   timeout_s=SHORT_TIMEOUT_S)


def _remove_empty(directories: Sequence[str]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _remove_leftovers_here(items: Sequence[tuple[Endpoint, Endpoint, str]],
                           prefix: str) -> None:
    """_SESSION_SCRIPT's removal of earlier attempts' leftovers, for this machine."""
    for landed, final, _ in items:
        for found in Path(final.path.parent).glob(f"{glob.escape(prefix)}*/"
                                                  f"{glob.escape(final.path.name)}"):
            if (PurePosixPath(found) != landed.path and not found.is_symlink()
                    and not found.parent.is_symlink() and found.is_file()):
                with contextlib.suppress(OSError):
                    found.unlink()
                    found.parent.rmdir()


class Session:
    """Started by `transfer_session`; `verify()` once the transfer succeeded."""

    def __init__(self, ssh: SshSettings, host: str,
                 items: Sequence[tuple[Endpoint, Endpoint, str]], all_or_none: bool,
                 process: subprocess.Popen[bytes]) -> None:
        self.ssh, self.host, self.items, self.all_or_none = ssh, host, items, all_or_none
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[bytes] = []
        self.threads = [threading.Thread(target=self._read_lines, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.decode("utf-8", errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr.append(self.process.stderr.read())

    def _stderr_text(self) -> str:
        return b"".join(self.stderr).decode("utf-8", errors="replace")

    def wait_ready(self, destination: Endpoint, directories: Sequence[str]) -> None:
        what = f"mkdir {' '.join(directories)}"
        try:
            line = self.lines.get(timeout=SHORT_TIMEOUT_S)
        except queue.Empty:
            raise TransferError(f"{what} on {self.host}: no answer in {SHORT_TIMEOUT_S} s",
                                retryable=True) from None
        if line == "ready":
            return
        rc = self._finish(SHORT_TIMEOUT_S)
        stderr = self._stderr_text()
        if rc == 3 and UNMARKED in stderr:
            raise unmarked(destination)
        if (blocker := blocker_said(stderr)) is not None:
            raise not_a_directory(" ".join(directories), blocker, self.host)
        raise classify_ssh(rc or 255, stderr, what=f"{what} on {self.host}")

    def verify(self, timeout_s: float = HASH_TIMEOUT_S) -> Verified:
        """Hash every landed file where it lies and rename them (all or none, as asked)."""
        if not self._tell("go\n"):  # the session was lost while the transfer ran
            self.close()
            return remote_verify_and_rename_many(self.ssh, self.items,
                                                 all_or_none=self.all_or_none)
        rc = self._finish(timeout_s)
        out: list[str] = []
        while (line := self.lines.get()) is not None:
            out.append(line)
        done = CompletedRun(rc, "\n".join(out), self._stderr_text())
        if rc == 255 and not out:  # the connection dropped as "go" was sent: ask again
            return remote_verify_and_rename_many(self.ssh, self.items,
                                                 all_or_none=self.all_or_none)
        return parse_verified(done, self.host, len(self.items))

    def _tell(self, text: str) -> bool:
        stdin = self.process.stdin
        if stdin is None or self.process.poll() is not None:
            return False
        try:
            stdin.write(text.encode())
            stdin.close()
        except (BrokenPipeError, OSError):
            return False
        return True

    def _finish(self, timeout_s: float) -> int:
        try:
            rc = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise TransferError(f"session on {self.host} gave no answer in {timeout_s:g} s",
                                retryable=True) from None
        for thread in self.threads:
            thread.join(timeout=5)
        return rc

    def discard(self) -> None:
        """End the session removing every landed file (and a landing directory of their own,
        once empty); by a command of its own when the session was lost (best effort)."""
        if self._tell("discard\n"):
            with contextlib.suppress(TransferError):
                if self._finish(SHORT_TIMEOUT_S) == 0:
                    return
        self.close()
        discard(self.ssh, self.items)

    def close(self) -> None:
        """End the session without renaming anything (EOF instead of "go")."""
        stdin: IO[bytes] | None = self.process.stdin
        with contextlib.suppress(OSError):
            if stdin is not None and not stdin.closed:
                stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class LocalSession:
    """The same for a destination on this machine: prepared at once, verified locally."""

    def __init__(self, items: Sequence[tuple[Endpoint, Endpoint, str]],
                 all_or_none: bool) -> None:
        self.items, self.all_or_none = items, all_or_none

    def verify(self, timeout_s: float = HASH_TIMEOUT_S) -> Verified:
        return remote_verify_and_rename_many(SshSettings(), self.items,
                                             all_or_none=self.all_or_none)

    def discard(self) -> None:
        discard(SshSettings(), self.items)


@contextmanager
def transfer_session(ssh: SshSettings, destination: Endpoint, directories: Sequence[Endpoint],
                     items: Sequence[tuple[Endpoint, Endpoint, str]], *,
                     all_or_none: bool, leftovers: str = "") -> Iterator[Session | LocalSession]:
    """Yields once `destination`'s marker was found and `directories` exist (TransferError
    otherwise, as remote_prepare), and what earlier attempts left of these files in
    directories named `leftovers`* beside their final names was removed; `verify()` it after
    the transfer, or `discard()` what landed. Leaving the block without either renames and
    removes nothing."""
    hosts = {destination.host} | {e.host for landed, final, _ in items for e in (landed, final)}
    if len(hosts) != 1:
        raise ValueError(f"a session works on one host, not {hosts}")
    host = destination.host
    if host is None:
        remote_prepare(ssh, destination, *directories)
        if leftovers:
            _remove_leftovers_here(items, leftovers)
        try:
            yield LocalSession(items, all_or_none)
        finally:
            _remove_empty([str(d) for d in own_directories(items)])
        return
    marker = "" if destination.marker is None else check_path(destination.marker)
    arguments = [marker, check_argument(leftovers), str(len(directories)),
                 *(check_path(d.path) for d in directories), *many_arguments(all_or_none, items)]
    argv = remote_command(ssh, host, ["sh", "-c", _SESSION_SCRIPT, "sh", *arguments])
    session = Session(ssh, host, items, all_or_none, remote.spawn(argv, stdin=subprocess.PIPE))
    try:
        session.wait_ready(destination, arguments[3:3 + len(directories)])
        yield session
    finally:
        session.close()
