"""Copying packages with rsync over ssh, resumable and verified end to end.

Every file lands under its temporary name (`temporary_name(destination)`), never under the
final one. rsync runs with `--partial --append-verify`, so an interrupted transfer leaves the
temporary file behind and the next attempt appends to it instead of starting over (packages are
immutable, so a shorter temporary file can only be a prefix of the source; if it is not, the
checksum below catches it and the next attempt starts clean). After rsync the xxh3-128 of the
temporary file is computed where it lies and compared with the checksum recorded in OpsDB; only
a match is renamed to the final name (one ssh command does both: remote_verify_and_rename; for
a batch's files, one command for all, hashing them in parallel: remote_verify_and_rename_many).
With SshSettings.control_persist_s, rsync's ssh and that command share one connection.

Remote to remote: rsync cannot copy between two remote hosts in one command, so it is run ON the
source host (over ssh) and pushes to the destination host. This assumes, as in this deployment,
that every host reaches every other with the same SshSettings (port, key and known_hosts files
at the same paths, rsync and xxhsum installed everywhere).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from ccat_dt.checksums import ALGORITHM
from ccat_dt.logfiles import prepare_directory, tell
from ccat_dt.progress import Progress
from ccat_dt.transports.base import (
    DISK_READ_FAILED,
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    TOO_LARGE,
    Endpoint,
    Occupied,
    SshSettings,
    TransferError,
    TransferResult,
    blocker_said,
    denied_here,
    denied_source,
    exclusive_writer,
    in_the_way_sh,
    not_a_directory,
    temporary_name,
    unmarked,
)
from ccat_dt.transports.remote import (
    SHORT_TIMEOUT_S,
    UNMARKED,
    CommandTimeout,
    CompletedRun,
    check_argument,
    check_host,
    check_path,
    classify_ssh,
    denied,
    inodes_out_there,
    read_back_failed,
    remote_command,
    remote_prepare,
    remote_remove,
    remote_verify_and_rename,
    remote_verify_and_rename_many,
    run,
)
from ccat_dt.transports.session import discard

# rsync EXIT VALUES (man rsync): network, protocol-stream, timeouts, signals, crashes.
_RETRYABLE_EXIT = {10, 12, 13, 14, 15, 16, 19, 20, 21, 22, 30, 35, 255}
_MISSING_SOURCE = ("No such file or directory", "symlink has no referent", "vanished")
_PERMANENT_TEXT = ("No space left on device", "Disk quota exceeded", "Permission denied",
                   "Read-only file system", "Host key verification failed",
                   "REMOTE HOST IDENTIFICATION HAS CHANGED", TOO_LARGE)
_NOT_INSTALLED = ("rsync: command not found", "rsync: not found")
# The sender could not read a file it was given (a bad sector: EIO); rsync fills what it could
# not read with zeros, fails the file's verification and keeps that partial (--partial):
#   rsync: [sender] read errors mapping "PATH": Input/output error (5)
#   rsync: [sender] send_files failed to open "PATH": Input/output error (5)
_READ_FAILED = re.compile(r'(?:read errors mapping|failed to open) "(.+)": (.+?)(?: \(\d+\))?$',
                          re.MULTILINE)
# The sender refused a file it was given for lack of permission (EACCES, EPERM):
#   rsync: [sender] send_files failed to open "PATH": Permission denied (13)
#   rsync: [sender] link_stat "PATH" failed: Permission denied (13)   (a directory on its path)
_DENIED = re.compile(r'(?:failed to open "(.+)"|link_stat "(.+)" failed): '
                     r'(?:Permission denied|Operation not permitted) \(\d+\)', re.MULTILINE)
_NO_SPACE = "No space left on device"
_USELESS_PARTIAL = (SOURCE_MISSING, SOURCE_UNREADABLE, _NO_SPACE,
                    "Disk quota exceeded", TOO_LARGE)  # the last: it can never be completed
# `--info=progress2` lines: "  1,234,567  45%  1.23MB/s    0:00:02 (xfr#1, to-chk=0/1)"
_PROGRESS2 = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+([\d.]+)([kMGT]?)B/s\b")
_UNIT = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def progress_reporter(progress: Progress) -> Callable[[str], None]:
    """A `run(on_line=...)` callback feeding rsync's `--info=progress2` lines to `progress`."""
    def on_line(line: str) -> None:
        match = _PROGRESS2.match(line)
        if match:
            done, percent = int(match[1].replace(",", "")), int(match[2])
            total = round(done * 100 / percent) if percent else None
            progress.update(done, bytes_per_s=float(match[3]) * _UNIT[match[4]],
                            total_bytes=total)
    return on_line


def without_progress(stdout: str) -> str:
    """rsync's stdout without its progress meter (kept out of the transfer log)."""
    return "\n".join(line for line in re.split(r"[\r\n]", stdout)
                     if line.strip() and not _PROGRESS2.match(line))
_GLOB = re.compile(r"[*?\[]")
# Constant script; the (source, link name) pairs arrive as positional parameters, never as code.
_STAGE_SCRIPT = ('d=$(mktemp -d "${TMPDIR:-/tmp}/ccat-rsync.XXXXXX") || exit 1; '
                 'while [ "$#" -gt 1 ]; do '
                 'ln -s -- "$1" "$d/$2" || { rm -rf -- "$d"; exit 1; }; shift 2; done; '
                 'printf "%s\\n" "$d"')


def _marker_guard(marker: PurePosixPath | None) -> str:
    """Shell text that stops the remote command (exit 3, UNMARKED on stderr) unless the
    location marker is there; nothing without a marker."""
    if marker is None:
        return ""
    return f"[ -f {shlex.quote(check_path(marker))} ] || {{ echo {UNMARKED} >&2; exit 3; }}; "


# Landing files synced at once by the receiving side's flusher, at most (the rsync-path is
# part of one ssh command line); a larger batch is flushed by the sync before its renames.
FLUSH_MAX_FILES = 64


def _flusher_sh(files: Sequence[PurePosixPath]) -> str:
    """Shell text, run on the receiving side before its rsync: a background loop syncing
    `files` (rsync writes them in place: --append-verify implies --inplace) every 0.2 s, for
    as long as the shell that runs rsync ($$: that shell, or rsync itself when the shell execs
    it) is there. Without it the whole file is still in the page cache when rsync ends and
    the sync before the rename writes it all then (0.3-0.5 s for 512 MiB here, measured
    interleaved, against ~0.2 s with it); with it that sync has a fraction of a second of data
    left. `sync -f` (syncfs, the file system's): Linux reports a write-back error once, to the
    first fsync of the file; the verification's must be that one, else a copy whose bytes
    never reached the disk would pass it. A file not there yet is skipped (sync says so, to
    /dev/null). Nothing for no files or more than FLUSH_MAX_FILES."""
    if not files or len(files) > FLUSH_MAX_FILES:
        return ""
    names = " ".join(shlex.quote(check_path(path)) for path in files)
    return ("( while sleep 0.2 || sleep 1; kill -0 $$ 2>/dev/null; do "
            f"sync -f -- {names}; done ) < /dev/null > /dev/null 2>&1 & ")


def classify_rsync(rc: int, stderr: str, sources: Mapping[str, Endpoint] | None = None, *,
                   describe: Callable[[Endpoint], str] | None = None) -> TransferError:
    """Whether a failed rsync is worth retrying, from its exit value and what it printed.
    `sources`: the source endpoint each path given to rsync stands for (a staging link's),
    to tell the sender's failed read of one (the source's fault) from anything else.
    `describe`: what to say of a source refused for lack of permission (remote.denied, which
    looks at its owner and mode); by default, without a look at a remote one."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    message = f"rsync exited {rc}: {' | '.join(lines[-6:]) or '(no output)'}"
    if any(text in stderr for text in _NOT_INSTALLED):
        return TransferError(f"{message}; install the Debian package rsync on every host",
                             retryable=False)
    if (refused := _source_denied(rc, stderr, sources, describe or _not_looked_at)) \
            and not any(text in _DENIED.sub("", stderr) for text in _PERMANENT_TEXT):
        return refused
    if any(text in stderr for text in _PERMANENT_TEXT):
        return TransferError(message, retryable=False)
    if rc in (23, 24) and any(text in stderr for text in _MISSING_SOURCE):
        return TransferError(f"{SOURCE_MISSING}: {message}", retryable=False)
    if unreadable := _source_unreadable(rc, stderr, sources):
        return unreadable
    if rc in _RETRYABLE_EXIT or rc == 11:  # 11: file I/O, when not a full disk (above)
        return TransferError(message, retryable=True)
    return TransferError(message, retryable=False)  # 1-5 usage/protocol, 23-25 other, unknown


def _source_denied(rc: int, stderr: str, sources: Mapping[str, Endpoint] | None,
                   describe: Callable[[Endpoint], str]) -> TransferError | None:
    """The sender refused the open (or the look-up) of a file it was given for lack of
    permission: the source's fault, not the destination's (health.location_failure), nor
    one to retry within the run (a person grants the permission). Only a path given to rsync
    counts: the receiver refused a write on the destination's disk is the destination's."""
    for match in _DENIED.finditer(stderr):
        if (source := (sources or {}).get(match[1] or match[2])) is not None:
            return TransferError(f"{describe(source)} (rsync exited {rc}: {match[0].strip()})",
                                 retryable=False)
    return None


def _not_looked_at(source: Endpoint) -> str:
    if source.host is None:
        return denied_here(source.path)
    return denied_source(f"{source.path} on {source.host}", None,
                         f"the user ccat-dt logs in as on {source.host}")


def _source_unreadable(rc: int, stderr: str,
                       sources: Mapping[str, Endpoint] | None) -> TransferError | None:
    """The sender's failed read of a file it was given (a bad sector): the source copy's
    fault, not the destination's (health.location_failure), told as the local transport tells
    it. Only a path given to rsync counts: the receiver reads the partial file it appends to,
    on the destination's disk."""
    for match in _READ_FAILED.finditer(stderr):
        if (source := (sources or {}).get(match[1])) is not None:
            where = f"{source.path} on {source.host}" if source.host else str(source.path)
            return TransferError(f"{SOURCE_UNREADABLE}: {where}: {DISK_READ_FAILED}: "
                                 f"{match[2]} (rsync exited {rc}; its partial copy is removed)",
                                 retryable=True)
    return None


def rsync_source_argument(endpoint: Endpoint) -> str:
    """`host:path` for a remote source. With -s the remote rsync glob-expands source names, so
    `a[1].tar` would fetch `a1.tar`: escape the glob characters (rsync honours backslashes only
    when the name has a glob character, and cannot combine the two at all)."""
    path = check_path(endpoint.path)
    if endpoint.host is None:
        return path
    if _GLOB.search(path):
        if "\\" in path:
            raise ValueError(f"rsync cannot name a remote file with both a backslash and "
                             f"glob characters: {path!r}")
        path = re.sub(r"([*?\[])", r"\\\1", path)
    return f"{check_host(endpoint.host)}:{path}"


def rsync_destination_argument(endpoint: Endpoint, *, directory: bool = False) -> str:
    path = check_path(endpoint.path) + ("/" if directory else "")
    return f"{check_host(endpoint.host)}:{path}" if endpoint.host else path


def log_literal_data(log: _Log, stats: str) -> None:
    """Note from `--stats` how much was sent, which shows when a partial file was resumed."""
    numbers = {}
    for key in ("Total file size", "Literal data"):
        if match := re.search(rf"^{key}: ([\d,.']+) bytes", stats, re.MULTILINE):
            numbers[key] = int(re.sub(r"\D", "", match.group(1)))
    if len(numbers) == 2 and numbers["Total file size"] > 0:
        total, literal = numbers["Total file size"], numbers["Literal data"]
        resumed = f"; {total - literal} bytes were already there (resumed)" \
            if literal < total else ""
        log.write(f"rsync sent {literal} of {total} bytes{resumed}")


def _log_name(destination: PurePosixPath) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", destination.name).lstrip(".")[:80] or "transfer"
    return f"{stamp}-{safe}-{uuid.uuid4().hex[:8]}.log"


class _Log:
    """Everything one transfer ran and printed, for the operator reading a failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        prepare_directory(path)
        with contextlib.suppress(OSError):  # told by the first write that fails
            path.touch()

    def write(self, text: str) -> None:
        """Appended; a log disk full or read-only loses the text, never the transfer."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        try:
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(f"[{stamp}] {text.rstrip()}\n")
        except OSError as exc:
            tell(self.path, exc, "transfers' command output is not kept")

    def command(self, argv: Sequence[str], done: CompletedRun, seconds: float) -> None:
        self.write(f"$ {shlex.join(argv)}\nexit {done.rc} after {seconds:.2f} s\n"
                   f"--- stdout\n{done.stdout.rstrip()}\n--- stderr\n{done.stderr.rstrip()}\n---")


@dataclass(frozen=True)
class _Item:
    source: Endpoint
    destination: Endpoint
    expected_checksum: str

    @property
    def temporary(self) -> Endpoint:
        return Endpoint(temporary_name(self.destination.path), self.destination.host,
                        marker=self.destination.marker)


class RsyncTransport:
    """rsync over ssh: resumable transfers, verified by xxh3-128 where the bytes landed."""

    name = "rsync"

    def __init__(self, ssh: SshSettings, log_dir: Path, *, timeout_s: int = 6 * 3600,
                 bandwidth_limit_kbps: int | None = None, stall_timeout_s: int = 600) -> None:
        for argument in ssh.ssh_command(shared=False):
            check_argument(argument)
        self.ssh = ssh
        self.log_dir = Path(log_dir)
        self.timeout_s = timeout_s
        self.bandwidth_limit_kbps = bandwidth_limit_kbps
        self.stall_timeout_s = stall_timeout_s

    # -- commands -----------------------------------------------------------------------------

    def rsync_options(self, *, make_directory: PurePosixPath | None = None,
                      marker: PurePosixPath | None = None, elsewhere: bool = False,
                      flush: Sequence[PurePosixPath] = ()) -> list[str]:
        """rsync and its options, up to and including `--`. `make_directory` is created on the
        remote receiving side first (saving an ssh round trip; works with any rsync version,
        unlike --mkpath), after finding the location `marker` there (saving another).
        `flush`: the landing files, which the receiving side then syncs to disk every 0.2 s
        while its rsync runs (_flusher_sh), so that the sync before the rename has little left
        to write. `elsewhere`: this rsync runs on another host, so its ssh does not use our
        connection sharing (whose socket directory is on this host)."""
        # rsync splits -e itself, honouring quotes: shlex.join's output round-trips (checked
        # for spaces, quotes, backslashes and empty arguments). Built per command: whether
        # connection sharing is usable is decided when the command runs.
        rsh = shlex.join(check_argument(argument)
                         for argument in self.ssh.ssh_command(shared=not elsewhere))
        options = ["rsync", "-s", "--partial", "--append-verify", "--copy-links", "--stats",
                   "--info=progress2",  # live progress on stdout, read while rsync runs
                   f"--timeout={self.stall_timeout_s}", "-e", rsh]
        if self.bandwidth_limit_kbps:
            options.append(f"--bwlimit={self.bandwidth_limit_kbps}")
        if make_directory is not None:
            # The receiving side's shell runs this; the directory is quoted for it.
            quoted = shlex.quote(check_path(make_directory))
            options.append(f"--rsync-path={_marker_guard(marker)}d={quoted}; mkdir -p -- "
                           f'"$d" || {in_the_way_sh("d")}; {_flusher_sh(flush)}rsync')
        return [*options, "--"]

    def command(self, sources: Sequence[Endpoint], destination: Endpoint, *,
                into_directory: bool = False,
                flush: Sequence[PurePosixPath] = ()) -> list[str]:
        """The local argv copying `sources` (all on one host) to `destination`: a file name
        for one source, or a directory (`into_directory`) that receives them under their own
        names. A remote destination's directory is created as needed; a local one is not.
        `flush`: the landing files a remote receiving side syncs while rsync runs."""
        hosts = {source.host for source in sources}
        if len(hosts) != 1:
            raise ValueError(f"one rsync session reads from one host, not {hosts}")
        source_host = hosts.pop()
        directory = destination.path if into_directory else destination.path.parent
        target = rsync_destination_argument(destination, directory=into_directory)
        marker = destination.marker
        if source_host is None or destination.host is None:
            make = directory if destination.host is not None else None
            return [*self.rsync_options(make_directory=make, marker=marker,
                                        flush=flush if make is not None else ()),
                    *map(rsync_source_argument, sources), target]
        # Remote to remote: run rsync on the source host; it pushes to the destination host.
        local_sources = [check_path(source.path) for source in sources]
        if destination.host != source_host:
            return remote_command(self.ssh, source_host, [
                *self.rsync_options(make_directory=directory, marker=marker, elsewhere=True,
                                    flush=flush),
                *local_sources, target])
        # Both on one host: a local copy there, after finding the marker, creating the directory.
        target = rsync_destination_argument(Endpoint(destination.path),
                                            directory=into_directory)
        return remote_command(self.ssh, source_host, [
            "sh", "-c", _marker_guard(marker) + 'mkdir -p -- "$1" || ' + in_the_way_sh("1")
            + '; shift && exec "$@"', "sh",
            str(directory), *self.rsync_options(elsewhere=True), *local_sources, target])

    # -- transfers ----------------------------------------------------------------------------

    def copy(self, source: Endpoint, destination: Endpoint,
             expected_checksum: str) -> TransferResult:
        """Copy one file; raises TransferError (with the log's path) when it did not arrive."""
        [result] = self._session([_Item(source, destination, expected_checksum)])
        if isinstance(result, TransferError):
            raise result
        return result

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> list[TransferResult | TransferError]:
        """Copy several files, one rsync session per (source host, destination directory),
        then one verification round trip for its files; each file is judged on its own, so
        one bad file fails only itself. Results are in the order of `pairs`."""
        items = [_Item(*pair) for pair in pairs]
        destinations = [str(item.destination) for item in items]
        if len(set(destinations)) != len(destinations):
            raise ValueError("copy_many got the same destination twice")
        groups: dict[tuple[str | None, str | None, PurePosixPath], list[int]] = {}
        for index, item in enumerate(items):
            key = (item.source.host, item.destination.host, item.destination.path.parent)
            groups.setdefault(key, []).append(index)
        results: list[TransferResult | TransferError | None] = [None] * len(items)
        for indices in groups.values():
            for index, result in zip(indices, self._session([items[i] for i in indices]),
                                     strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    def _after_rsync(self, temporary: Endpoint) -> None:
        """Called between rsync and verification; nothing to do here (tests use it to corrupt
        bytes in flight, which must then be caught)."""

    def _session(self, items: list[_Item]) -> list[TransferResult | TransferError]:
        for item in items:
            if not item.expected_checksum:
                raise ValueError(f"no expected {ALGORITHM} checksum for {item.source}")
            check_path(item.destination.path)
            if not item.destination.path.is_absolute() or not item.source.path.is_absolute():
                raise ValueError(f"rsync needs absolute paths: {item.source} -> "
                                 f"{item.destination}")
        log = _Log(self.log_dir / _log_name(items[0].destination.path))
        log.write(f"{self.name}: " + "; ".join(
            f"{item.source} -> {item.destination} ({ALGORITHM} {item.expected_checksum})"
            for item in items))
        try:
            results = self._transfer(items, log)
        except TransferError as exc:
            log.write(f"FAILED: {exc} (retryable={exc.retryable})")
            results = [exc] * len(items)
        # "No space" with bytes free: what the disk lacks, which `df -h` does not show
        lack = (inodes_out_there(self.ssh, items[0].destination)
                if any(isinstance(result, TransferError) and _NO_SPACE in str(result)
                       for result in results) else "")
        if lack:
            log.write(lack)

        def said(error: TransferError) -> str:
            return f"{error}; {lack}" if lack and _NO_SPACE in str(error) else str(error)

        return [result if isinstance(result, TransferResult) else
                TransferError(f"{said(result)} [log: {log.path}]", retryable=result.retryable)
                for result in results]

    def _transfer(self, items: list[_Item], log: _Log
                  ) -> list[TransferResult | TransferError]:
        started = time.monotonic()
        destination = items[0].destination
        if destination.host is None:  # remote: rsync's remote command does it
            remote_prepare(self.ssh, destination, Endpoint(destination.path.parent))
        staging: _Staging | None = None
        try:
            landing = [item.temporary.path for item in items]
            if len(items) == 1:
                sent = [items[0].source]
                argv = self.command(sent, items[0].temporary, flush=landing)
            else:
                staging = _Staging.create(self, items, log)
                sent = staging.links
                argv = self.command(sent, Endpoint(destination.path.parent, destination.host,
                                                   marker=destination.marker),
                                    into_directory=True, flush=landing)
            try:  # wait out any process a killed earlier attempt left writing these files
                with exclusive_writer(self.log_dir / ".writers",
                                      [item.temporary for item in items]) as lock:
                    progress = Progress("transfer", items[0].destination.path.name
                                        if len(items) == 1 else
                                        f"{len(items)} files to {destination.path.parent}")
                    done = run(argv, timeout_s=self.timeout_s, pass_fds=(lock,),
                               on_line=progress_reporter(progress))
                    done = CompletedRun(done.rc, without_progress(done.stdout), done.stderr)
                    progress.finish()
            except CommandTimeout as exc:  # partial files stay for the next attempt
                log.command(argv, CompletedRun(-1, exc.stdout, exc.stderr),
                            time.monotonic() - started)
                raise
            log.command(argv, done, time.monotonic() - started)
            log_literal_data(log, done.stdout)
        finally:
            if staging is not None:
                staging.remove(self, log)
        rsync_seconds = time.monotonic() - started
        if done.rc != 0 and UNMARKED in done.stderr:
            raise unmarked(destination)
        if done.rc != 0 and (blocker := blocker_said(done.stderr)) is not None:
            raise not_a_directory(str(destination.path.parent), blocker, destination.host)
        given = {check_path(name.path): item.source
                 for name, item in zip(sent, items, strict=True)}
        looked: dict[Endpoint, str] = {}  # a refused source's owner and mode, looked at once

        def describe(source: Endpoint) -> str:
            if source not in looked:
                looked[source] = denied(self.ssh, source)
            return looked[source]

        failed = classify_rsync(done.rc, done.stderr, given,
                                describe=describe) if done.rc != 0 else None
        if failed is not None and (done.rc not in (23, 24) or len(items) == 1):
            # The session as a whole failed: keep partial files for a retry to resume from,
            # unless they can never be completed or are what fills the disk.
            if any(text in str(failed) for text in _USELESS_PARTIAL):
                self._discard(items, log)
            raise failed
        results: dict[int, TransferResult | TransferError] = {}
        for index, (item, name) in enumerate(zip(items, sent, strict=True)):
            complaints = [line for line in done.stderr.splitlines()
                          if f'"{name.path}"' in line or f"'{name.path}'" in line]
            if failed is not None and complaints:
                error = classify_rsync(done.rc, "\n".join(complaints), given,
                                       describe=describe)
                log.write(f"{item.source}: not transferred: {error}")
                if SOURCE_UNREADABLE in str(error):  # its partial: zeros where it failed
                    self._discard([item], log)
                results[index] = error
        landed = [index for index in range(len(items)) if index not in results]
        if len(landed) == 1:
            results[landed[0]] = self._verify(items[landed[0]], log, rsync_seconds)
        elif landed:
            results.update(zip(landed, self._verify_all([items[i] for i in landed], log,
                                                        rsync_seconds), strict=True))
        return [results[index] for index in range(len(items))]

    def _verify(self, item: _Item, log: _Log,
                rsync_seconds: float) -> TransferResult | TransferError:
        """Checksum the temporary file where it landed and rename it into place only on a match,
        in one ssh round trip."""
        started = time.monotonic()
        temporary = item.temporary
        try:
            self._after_rsync(temporary)
            landed = remote_verify_and_rename(self.ssh, temporary, item.destination,
                                              item.expected_checksum, record=log.command)
            actual, size = landed.digest, landed.size
            if actual != item.expected_checksum:  # not renamed
                remote_remove(self.ssh, temporary)
                error = TransferError(
                    f"checksum mismatch on arrival at {item.destination}: expected {ALGORITHM} "
                    f"{item.expected_checksum}, got {actual}; removed {temporary.path}",
                    retryable=True)
                log.write(str(error))
                return error
        except TransferError as exc:
            log.write(f"{item.destination}: verification failed: {exc}")
            return exc
        log.write(f"{item.destination}: verified {ALGORITHM} {actual}, {size} bytes, renamed")
        return TransferResult(bytes=size, seconds=rsync_seconds + time.monotonic() - started,
                              checksum=actual, streams=1, log_path=str(log.path),
                              inode=landed.inode, mtime_ns=landed.mtime_ns)

    def _verify_all(self, items: list[_Item], log: _Log,
                    rsync_seconds: float) -> list[TransferResult | TransferError]:
        """_verify for the files of a batch, all on one host, in one round trip, hashed in
        parallel there: a batch of small packages over a long link costs one handshake, not
        one per file. A file that does not match is removed (one round trip for all)."""
        started = time.monotonic()
        for item in items:
            self._after_rsync(item.temporary)
        triples = [(item.temporary, item.destination, item.expected_checksum) for item in items]
        try:
            verdicts = remote_verify_and_rename_many(self.ssh, triples, all_or_none=False,
                                                     record=log.command)
        except TransferError as exc:
            log.write(f"verification of {len(items)} files failed: {exc}")
            return [exc] * len(items)
        seconds = rsync_seconds + time.monotonic() - started
        results: list[TransferResult | TransferError] = []
        for item, verdict in zip(items, verdicts, strict=True):
            if verdict.digest is None:  # kept, as _verify keeps it: the next attempt looks
                error = TransferError(read_back_failed(item.temporary, verdict.unreadable)
                                      if verdict.unreadable is not None else
                                      f"cannot read {item.temporary} to verify it",
                                      retryable=True)
            elif verdict.digest != item.expected_checksum:
                error = TransferError(
                    f"checksum mismatch on arrival at {item.destination}: expected {ALGORITHM} "
                    f"{item.expected_checksum}, got {verdict.digest}; removed "
                    f"{item.temporary.path}", retryable=True)
            elif verdict.occupied:
                error = Occupied(item.destination, item.temporary)
            elif not verdict.renamed:
                error = TransferError(f"verified but not renamed: {item.destination}",
                                      retryable=True)
            else:
                log.write(f"{item.destination}: verified {ALGORITHM} {verdict.digest}, "
                          f"{verdict.size} bytes, renamed")
                results.append(TransferResult(
                    bytes=verdict.size or 0, seconds=seconds, checksum=verdict.digest,
                    streams=1, log_path=str(log.path), inode=verdict.inode,
                    mtime_ns=verdict.mtime_ns))
                continue
            log.write(f"{item.destination}: {error}")
            results.append(error)
        discard(self.ssh, [triple for triple, verdict in zip(triples, verdicts, strict=True)
                           if verdict.digest not in (None, triple[2])])
        return results

    def _discard(self, items: list[_Item], log: _Log) -> None:
        """Best effort: partial files that no retry can use should not take space."""
        for item in items:
            try:
                remote_remove(self.ssh, item.temporary)
            except TransferError as exc:
                log.write(f"could not remove {item.temporary}: {exc}")


@dataclass
class _Staging:
    """A directory of symlinks, on the source host, named like the destination's temporary
    files, so that one rsync session (`--copy-links`) lands every file under its temporary
    name in the destination directory."""

    host: str | None
    directory: PurePosixPath
    links: list[Endpoint]

    @classmethod
    def create(cls, transport: RsyncTransport, items: list[_Item], log: _Log) -> _Staging:
        host = items[0].source.host
        names = [item.temporary.path.name for item in items]
        if host is None:
            local = Path(tempfile.mkdtemp(prefix="ccat-rsync."))
            for item, name in zip(items, names, strict=True):
                (local / name).symlink_to(check_path(item.source.path))
            directory = PurePosixPath(local)
        else:
            arguments: list[str] = []
            for item, name in zip(items, names, strict=True):
                arguments += [check_path(item.source.path), name]
            argv = remote_command(transport.ssh, host,
                                  ["sh", "-c", _STAGE_SCRIPT, "sh", *arguments])
            started = time.monotonic()
            done = run(argv, timeout_s=SHORT_TIMEOUT_S)
            log.command(argv, done, time.monotonic() - started)
            directory = PurePosixPath(done.stdout.strip())
            if done.rc != 0 or not directory.is_absolute() or "ccat-rsync." not in directory.name:
                raise classify_ssh(done.rc, done.stderr, what=f"staging links on {host}")
        return cls(host, directory, [Endpoint(directory / name, host) for name in names])

    def remove(self, transport: RsyncTransport, log: _Log) -> None:
        if self.host is None:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        argv = remote_command(transport.ssh, self.host, ["rm", "-rf", "--", str(self.directory)])
        try:
            done = run(argv, timeout_s=SHORT_TIMEOUT_S)
        except TransferError as exc:
            log.write(f"could not remove staging directory {self.directory}: {exc}")
            return
        if done.rc != 0:
            log.command(argv, done, 0.0)
