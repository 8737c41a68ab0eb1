"""bbcp between sites: argv building, output parsing, failure classification and the transport.

What this relies on, read from bbcp 14.x source and the captured runs (fixtures/bbcp):
- options are parsed while a word starts with '-'; "--" is a no-op option, not an end of options,
  so only absolute paths ('/...' or 'host:/...') keep hostile names from being read as options;
- `-a [dir]` has an OPTIONAL argument: the next word is taken as the restart directory unless it
  starts with '-', so `-a` is always followed by a directory or by "--";
- with `-f` the target is unlinked and rewritten before `-a` is looked at, so `-f` defeats `-a`;
- `-a` and `-E csa=VALUE` are refused together: with `-a` we send `-E a32` (checked per buffer on
  the link) and the xxh3-128 check on arrival stays the authoritative one;
- `-S`/`-T` strings are split by bbcp on single spaces, with no quoting, and executed directly;
- file names reach the remote bbcp one per line: spaces survive (see multi-file), newlines cannot.

Hosts are checked harder than for plain ssh: bbcp substitutes the host part for %H as its own
argv word, so "user@-oProxyCommand=x" would become an ssh option. Checksums, renames, mkdir and
removal at the destination reuse `remote`, paths quoted; one ssh session (`session`) runs
beside bbcp: before bbcp it looks at the location marker, creates the directory and removes
what earlier attempts left of these files in staging directories, while bbcp runs it flushes
the landing files, after it every file is hashed where it landed, in parallel, and all are
renamed only if all match (or, bbcp having failed, what landed is removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from ccat_dt import progress as live
from ccat_dt.checksums import ALGORITHM
from ccat_dt.logfiles import prepare_directory, tell
from ccat_dt.transports.base import (
    DISK_READ_FAILED,
    PEER_FAILED,
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    TOO_LARGE,
    Endpoint,
    Occupied,
    SshSettings,
    TransferError,
    TransferResult,
    denied_source,
    exclusive_writer,
    one_by_one,
    temporary_name,
)
from ccat_dt.transports.remote import (
    CommandStalled,
    CommandTimeout,
    CompletedRun,
    Verdict,
    denied,
    read_back_failed,
    run,
)
from ccat_dt.transports.session import LocalSession, Session, discard, transfer_session

# A batch lands in a directory of its own beside the final names (same file system), named
# STAGING_DIR.HASH after its files (staging_directory): two sessions into one directory at once
# carry different packages (claims.py), so never share one, and one never removes the other's.
STAGING_DIR = ".bbcp-incoming"
RUNNER_TIMEOUT_S = 48 * 3600.0
_TIMEOUT_MARK = "ccat-dt: bbcp killed by the runner timeout"
_STALL_MARK = "ccat-dt: bbcp stopped by the stall watchdog"
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_HOST = re.compile(r"(?:[A-Za-z0-9_.][A-Za-z0-9_.-]*@)?[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_PROGRAM = re.compile(r"[A-Za-z0-9_/~.+][A-Za-z0-9_/.+-]*")  # passes through the remote shell


@dataclass(frozen=True)
class BbcpOptions:
    """One route's bbcp settings, validated up front so bad config fails before any transfer."""

    streams: int = 4
    window: str | None = None  # -w, e.g. "8M" ("=8M" fixes it, no autotuning)
    progress_interval_s: int | None = 10
    # bbcp's data streams have no idle timeout: a link gone silent would hold the transfer
    # until RUNNER_TIMEOUT_S. No bytes moved (as -P shows) for this long stops it, retryably.
    stall_timeout_s: int | None = 600
    rate_limit: str | None = None  # -x, e.g. "60M"
    time_limit_s: int | None = None
    port_range: str | None = None  # -Z, e.g. "5031:5039"
    remote_bbcp: str = "bbcp"
    checksum: Literal["a32", "c32", "md5"] | None = "a32"
    append: bool = True  # -a: resume a partial landing file left by an interrupted run
    restart_dir: str | None = None  # -a's restart-record directory on the target ($HOME/.bbcp)
    keep_partial: bool = True  # -k: keep the partial file so that -a can resume it
    force: bool = False  # -f: rewrite an existing landing file; exclusive with append
    verbose: bool = True  # -v: per-file byte counts and rates

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.streams <= 64, "streams must be 1..64"),
            (self.window is None or re.fullmatch(r"=?\d+[kKmMgG]?", self.window), "window"),
            (self.rate_limit is None or re.fullmatch(r"\d+[kKmMgG]?", self.rate_limit),
             "rate_limit"),
            (self.port_range is None or re.fullmatch(r"\d{1,5}(:\d{1,5})?", self.port_range),
             "port_range"),
            (all(v is None or v >= 1 for v in (self.progress_interval_s, self.time_limit_s)),
             "progress_interval_s and time_limit_s must be >= 1"),
            (self.stall_timeout_s is None or (self.progress_interval_s is not None
                                              and self.stall_timeout_s
                                              >= 2 * self.progress_interval_s),
             "stall_timeout_s needs progress lines (progress_interval_s) at least twice in it"),
            (_PROGRAM.fullmatch(self.remote_bbcp), "remote_bbcp must be a plain program path"),
            (self.restart_dir is None or _PROGRAM.fullmatch(self.restart_dir), "restart_dir"),
            (self.checksum in (None, "a32", "c32", "md5"), "checksum must be a32, c32 or md5"),
            (not (self.append and self.force), "force (-f) truncates and defeats append (-a)"),
        ]
        bad = [message for ok, message in checks if not ok]
        if bad:
            raise ValueError("invalid bbcp options: " + "; ".join(bad))


def _spec(endpoint: Endpoint) -> str:
    path = str(endpoint.path)
    if not endpoint.path.is_absolute():
        raise ValueError(f"bbcp paths must be absolute, got {path!r}")
    if "\0" in path or "\n" in path:
        raise ValueError(f"bbcp cannot carry NUL or newline in a path: {path!r}")
    return f"{_checked_host(endpoint.host)}:{path}" if endpoint.host else path


def _checked_host(host: str) -> str:
    if not _HOST.fullmatch(host):
        raise ValueError(f"invalid ssh host {host!r}")
    return host


def _start_command(ssh: SshSettings, host: str | None, program: str) -> str:
    """How bbcp starts itself over ssh; `-l %U` only when the route names a user."""
    words = [*ssh.ssh_command(), "-x", "-a"]
    for word in words:
        if not word or any(c.isspace() for c in word) or re.fullmatch(r"%.", word):
            raise ValueError(f"ssh word {word!r} cannot pass through bbcp -S/-T "
                             "(bbcp splits them on spaces and has no quoting)")
    return " ".join([*words, *(["-l", "%U"] if host and "@" in host else []), "%H", program])


def bbcp_command(sources: Sequence[Endpoint], destination: Endpoint, options: BbcpOptions,
                 ssh: SshSettings, *, expected_adler32: str | None = None) -> list[str]:
    """The bbcp argv for one session; several sources land in `destination` as a directory."""
    if not sources or len({s.host for s in sources}) != 1:
        raise ValueError("bbcp needs one or more sources, all on the same host")
    argv = ["bbcp", "-s", str(options.streams)]
    for flag, value in (("-w", options.window), ("-P", options.progress_interval_s),
                        ("-x", options.rate_limit), ("-t", options.time_limit_s),
                        ("-Z", options.port_range)):
        if value is not None:
            argv += [flag, str(value)]
    if options.checksum:
        spec: str = options.checksum
        if expected_adler32 is not None:
            value = expected_adler32.lower()
            if not re.fullmatch(r"[0-9a-f]{8}", value) or len(sources) > 1:
                raise ValueError(f"expected adler32 {expected_adler32!r} must be 8 hex digits "
                                 "for a single source")
            if options.checksum == "a32" and not options.append:
                spec = f"a32={value}"
        argv += ["-E", spec]
    if options.append:
        argv += ["-a", options.restart_dir or "--"]
    argv += [flag for flag, on in (("-k", options.keep_partial), ("-f", options.force),
                                   ("-v", options.verbose)) if on]
    argv += ["-S", _start_command(ssh, sources[0].host, options.remote_bbcp),
             "-T", _start_command(ssh, destination.host, options.remote_bbcp)]
    target = _spec(destination)
    return [*argv, *map(_spec, sources), target + ("/" if len(sources) > 1 else "")]


@dataclass(frozen=True)
class Progress:
    percent: int
    rate_bytes_per_s: float  # bbcp's "MB" is 2**20 bytes
    raw: str


@dataclass(frozen=True)
class FileStat:
    path: str
    bytes: int  # bytes moved in this run: a resumed file reports only the appended tail
    rate_bytes_per_s: float


@dataclass(frozen=True)
class ReportedChecksum:
    algorithm: str
    value: str
    host: str
    path: str


@dataclass(frozen=True)
class Summary:
    bytes: int
    seconds: float | None  # bytes / effective rate (bbcp prints no elapsed time)
    rate_bytes_per_s: float | None
    files: tuple[FileStat, ...]
    checksums: tuple[ReportedChecksum, ...]
    progress: tuple[Progress, ...]

    @property
    def rate_mb_per_s(self) -> float | None:
        return None if self.rate_bytes_per_s is None else self.rate_bytes_per_s / _SCALE["M"]


_RATE = r"([\d.]+) ([KMGT]?)B/s"
_PROGRESS = re.compile(r"bbcp: \d{6} \d\d:\d\d:\d\d\s+(\d{1,3})% done; " + _RATE)
_FILE = re.compile(r"File (.+) created; (\d+) bytes at " + _RATE)
_TOTAL = re.compile(r"(\d+) files? copied at effectively " + _RATE)
_CHECKSUM = re.compile(r"Checksum: (\w+) ([0-9a-fA-F]+) (\[[^\]]+\]|[^:\s]+):(.+)")
_STARTING = re.compile(r"bbcp: (?:Creating (.+)|Appending to (.+) at offset (\d+))")


def _rate(value: str, unit: str) -> float:
    return float(value) * _SCALE[unit]


def parse_progress(line: str) -> Progress | None:
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    return Progress(int(match[1]), _rate(match[2], match[3]), line.strip())


def parse_checksums(text: str) -> tuple[ReportedChecksum, ...]:
    """`Checksum: md5 HEX host:path` lines, from stderr or an `-E %md5=FILE` report."""
    found = (_CHECKSUM.fullmatch(line.strip()) for line in text.splitlines())
    return tuple(ReportedChecksum(m[1], m[2].lower(), m[3], m[4]) for m in found if m)


def parse_summary(stdout: str, stderr: str) -> Summary:
    """What bbcp reported about a run; bbcp writes all of it to stderr, stdout stays empty."""
    lines = [line.strip() for line in (stdout + "\n" + stderr).splitlines()]
    files = tuple(FileStat(m[1], int(m[2]), _rate(m[3], m[4]))
                  for m in map(_FILE.fullmatch, lines) if m)
    totals = [m for m in map(_TOTAL.fullmatch, lines) if m]
    rate = _rate(totals[-1][2], totals[-1][3]) if totals else None
    moved = sum(f.bytes for f in files)
    progress = tuple(p for p in map(parse_progress, lines) if p)
    return Summary(moved, moved / rate if rate else None, rate, files,
                   parse_checksums("\n".join(lines)), progress)


class LiveProgress:
    """Reads bbcp's lines as they come into a ccat_dt.progress.Progress: the files done
    (`File X created`, with -v) plus the current file's (`Creating X`) share from `-P` lines.
    A resumed file (`Appending to X at offset N`) has its N bytes already, and bbcp's share
    is then of the rest, not of the file."""

    def __init__(self, progress: live.Progress, sizes: dict[str, int]) -> None:
        self.progress, self.sizes = progress, sizes  # target file name -> size, where known
        self.current: str | None = next(iter(sizes)) if len(sizes) == 1 else None
        self.kept = 0  # the current file's bytes there before this run
        self.finished = 0

    def __call__(self, line: str) -> None:
        line = line.strip()
        if starting := _STARTING.fullmatch(line):
            self.current = PurePosixPath(starting[1] or starting[2]).name
            self.kept = int(starting[3] or 0)
        elif done := _FILE.fullmatch(line):
            name = PurePosixPath(done[1]).name
            self.finished += self.sizes.get(name, int(done[2]))
            self.current, self.kept = None, 0
            self.progress.update(self.finished)
        elif (reached := parse_progress(line)) is not None:
            size = self.sizes.get(self.current or "")
            if size is None:  # a remote source: bbcp's share is all there is
                self.progress.update_percent(reached.percent,
                                             bytes_per_s=reached.rate_bytes_per_s)
            else:
                rest = (size - self.kept) * reached.percent // 100
                self.progress.update(self.finished + self.kept + rest,
                                     bytes_per_s=reached.rate_bytes_per_s)


class StallWatch:
    """Tells from bbcp's lines whether bytes still move. bbcp's data streams have no idle
    timeout, so a link gone silent (packets dropped, no reset) or a frozen end holds a
    transfer until the runner's 48 h. Bytes moved: a `-P` line whose interval rate is above
    zero (with -v; without it, whose percentage rose), or a file begun or ended. Nothing else
    counts: a frozen receiver prints nothing, and a receiver starved by a frozen sender floods
    lines of "-nan B/s" (hundreds a second, bbcp 14.04)."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self.clock = stall_s, clock
        self.moved_at = clock()
        self.percent: int | None = None

    def __call__(self, line: str) -> None:
        line = line.strip()
        reached = parse_progress(line)
        if reached is None:
            moved = bool(_STARTING.fullmatch(line) or _FILE.fullmatch(line))
        elif ", avg " in reached.raw:  # -v: the rate is this interval's, not the average
            moved = reached.rate_bytes_per_s > 0
        else:
            moved, self.percent = reached.percent != self.percent, reached.percent
        if moved:
            self.moved_at = self.clock()

    def stalled(self) -> str | None:
        if self.clock() - self.moved_at < self.stall_s:
            return None
        return f"no bytes moved for {self.stall_s:g} s: the link stalled (or the far end froze)"


class BbcpFailure(TransferError):
    """A classified bbcp failure; `resumable` says a partial landing file is worth keeping,
    `source` names the one source file it is about (one file of a batch), if any."""

    def __init__(self, message: str, *, retryable: bool, resumable: bool = False,
                 source: str | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.resumable, self.source = resumable, source


# bbcp's own data streams (TCP, not ssh) lost in the middle: the link, not the destination.
_DATA_LINK_LOST = (r"^bbcp: (.*(?:Connection reset by peer|Software caused connection abort|"
                   r"Connection timed out|No route to host|Network is unreachable).*)$")


def classify(rc: int, stderr: str, sources: Sequence[str] = (), *,
             describe: Callable[[str], str] | None = None) -> BbcpFailure | None:
    """Turn bbcp's exit status and messages into an operator-facing error, or None on success.
    `sources`: the session's source paths, to tell a source's failure from the target's;
    `describe`: what to say of one refused for lack of permission (remote.denied, which looks
    at its owner and mode), by default without a look."""
    if rc == 0:
        return None
    text = stderr.replace("\r", "")

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, text, re.MULTILINE)

    # A source refused for lack of permission: "bbcp: Permission denied opening SRC" (the file),
    # "... processing SRC" (a directory on its path; bbcp 14.04.14.00.0, exit 2 or 128). The
    # source's fault, not the destination's, and not retried within the run: a person grants
    # the permission, the next automatic attempt reads it (or another verified copy).
    for refused in re.finditer(r"^bbcp: (?:Permission denied|Operation not permitted) "
                               r"(?:opening|processing|reading|writing) (.+)$", text,
                               re.MULTILINE):
        if refused[1] in sources:
            return BbcpFailure(f"{(describe or _not_looked_at)(refused[1])} (bbcp exited {rc}: "
                               f"{refused[0].strip()})", retryable=False, source=refused[1])
    if m := find(r"^bbcp: (.+) target checksum (\w+) does not match (\w+)$"):
        return BbcpFailure(f"data corrupted in flight: {m[1]} checksum {m[3]} does not match "
                           f"expected {m[2]}", retryable=True)
    if m := find("^" + _STALL_MARK + r": (.+)$"):
        return BbcpFailure(f"{m[1]}; bbcp was stopped, the next attempt resumes the partial "
                           "file", retryable=True, resumable=True)
    if find(r"Time limit exceeded|" + _TIMEOUT_MARK):
        return BbcpFailure("bbcp time limit exceeded; with -k -a the next attempt resumes",
                           retryable=True, resumable=True)
    # The destination takes no file this big (TOO_LARGE, as for local and rsync copies): its
    # writing process's file-size limit (`ulimit -f`, limits.conf's fsize) kills it with
    # SIGXFSZ ("Copy process N was killed via signal 25", exit 255, bbcp 14.04.14.00.1 under
    # `prlimit --fsize` on the target), or, that signal ignored or the file system's own
    # largest file, EFBIG ("File too large writing LANDING", exit 229). Not a cut: appending
    # can never complete it, so not retried within the run and its partial file removed;
    # that file's, not the location's (smaller files still go there).
    if (killed := find(rf"^bbcp: Copy process \d+ was killed via signal {signal.SIGXFSZ}$")) \
            or rc == -signal.SIGXFSZ or (killed := find(rf"^bbcp: {TOO_LARGE} .+$")):
        words = killed[0].strip() if killed else f"killed by signal {signal.SIGXFSZ}"
        return BbcpFailure(f"{TOO_LARGE} at the destination: it takes no file this big (a "
                           f"file-size limit of the user bbcp writes as, or of its file "
                           f"system) (bbcp exited {rc}: {words}); its partial file is removed",
                           retryable=False)
    if lost := find(r"unexpectedly terminated on (\S+)"):
        host = lost[1]
        if m := find(r"^(?!bbcp:).*?(\S+): (?:No such file or directory|(?:command )?not found)$"):
            return BbcpFailure(f"bbcp not installed on target {host} at {m[1]}", retryable=False)
        if m := find(r"^(.*(?:Permission denied|Host key verification failed).*)$"):
            return BbcpFailure(f"ssh to {host} refused: {m[1]}", retryable=False)
        detail = next((ln for ln in text.splitlines() if ln and not ln.startswith("bbcp:")), "")
        return BbcpFailure(f"connection to {host} failed: {detail or lost[0]}",
                           retryable=True, resumable=True)
    if rc < 0 or rc == 255 or find(r"^bbcp: Copy process \d+ was killed via signal \d+$"):
        # Cut in the middle (fixtures interrupted-*): the link dropped, ssh or one of the bbcp
        # processes was killed (a killed copy process may also end bbcp with exit 128, as
        # SENDER_KILLED in tests/test_bbcp.py). The partial landing file stays (-k) and -a
        # resumes it.
        how = f"killed by signal {-rc}" if rc < 0 else "exit 255"
        last = [ln for ln in text.splitlines() if ln.strip()]
        said = [ln for ln in last if not _PROGRESS.match(ln.strip())
                and not ln.startswith("bbcp: Appending to")]
        reached = [p.percent for p in map(parse_progress, last) if p]
        where = f" at {reached[-1]}%" if reached else ""
        return BbcpFailure(f"transfer interrupted{where} ({how}): "
                           f"{said[-1].strip() if said else 'no message'}; the next attempt "
                           "resumes the partial file", retryable=True, resumable=True)
    rules = [
        (r"^bbcp: (Insufficient space.*|No space left on device.*)$", "destination disk full: {}"),
        (r"^bbcp: File (.+) already exists\.$", "target {} already exists and -f is off"),
        (r"^bbcp: Target directory (.+) not found$", "destination directory missing for {}"),
        (r"^bbcp: No such file or directory processing (.+)$", SOURCE_MISSING + ": {}"),
        (r"^bbcp: No such file or directory opening (.+)$",
         "cannot create target {}: its directory does not exist"),
    ]
    for pattern, message in rules:
        if m := find(pattern):
            return BbcpFailure(message.format(m[1]), retryable=False,
                               source=m[1] if message.startswith(SOURCE_MISSING) else None)
    # A source read short or long (it changed size while sent; "No data available": shrunk
    # below what bbcp had read, SOURCE_SHRUNK in tests/test_bbcp.py): the source's fault, not
    # the destination's; retried, the next attempt's checksum tells a bad source from a
    # passing change (replicas re-hashes the source on a mismatch).
    if (m := find(r"^bbcp: (?:Error -?\d+|No data available) (?:reading|writing) (.+)$")) \
            and m[1] in sources:
        return BbcpFailure(f"{SOURCE_UNREADABLE}: {m[1]} changed size while it was sent "
                           f"({m[0].strip()})", retryable=True, source=m[1])
    # The source's disk failed a read (a bad sector): the reader names the errno and the
    # source, "bbcp: Input/output error writing SRC" (exit 128, bbcp 14.04.14.00.0 reading a
    # file on a disk that fails its reads). The source copy's fault, not the destination's;
    # retried, from another verified copy where there is one (routing.unreadable_copies).
    for m in re.finditer(r"^bbcp: (.+?) (?:reading|writing) (.+)$", text, re.MULTILINE):
        if m[2] in sources and not re.fullmatch(r"Error -?\d+|No data available", m[1]):
            return BbcpFailure(f"{SOURCE_UNREADABLE}: {m[2]}: {DISK_READ_FAILED}: "
                               f"{m[1]} (bbcp exited {rc}: {m[0].strip()})", retryable=True,
                               source=m[2])
    if m := find(_DATA_LINK_LOST):
        return BbcpFailure(f"data link lost mid-transfer ({m[1]}); the next attempt resumes "
                           "the partial file", retryable=True, resumable=True)
    if m := find(r"^bbcp: (.*(?:append not possible|Cannot append to).*)$"):
        return BbcpFailure(f"stale partial file cannot be resumed: {m[1]}", retryable=True)
    tail = " | ".join(text.strip().splitlines()[-3:]) or "no output"
    return BbcpFailure(f"bbcp failed (exit {rc}): {tail}", retryable=False)


def _not_looked_at(path: str) -> str:
    return denied_source(path, None, "the user ccat-dt reads it as")


class Runner(Protocol):
    def __call__(self, argv: list[str], pass_fds: Sequence[int] = (), *,
                 on_line: Callable[[str], None] | None = None,
                 stall_s: float | None = None) -> CompletedRun: ...


def run_subprocess(argv: list[str], pass_fds: Sequence[int] = (), *,
                   on_line: Callable[[str], None] | None = None, stall_s: float | None = None,
                   timeout_s: float = RUNNER_TIMEOUT_S) -> CompletedRun:
    """Run argv without a shell (remote.run: own process group, stopped whole on timeout),
    each output line to `on_line` as it comes; stopped too once its lines show no bytes moved
    for `stall_s` (StallWatch). A timeout or a stall comes back as a failed run so its output
    still reaches the log and classify()."""
    if shutil.which(argv[0]) is None:
        raise TransferError(f"{argv[0]} is not installed on this host", retryable=False)
    watch = StallWatch(stall_s) if stall_s is not None else None

    def read(line: str) -> None:
        if watch is not None:
            watch(line)
        if on_line is not None:
            on_line(line)

    try:
        return run(argv, timeout_s=timeout_s, pass_fds=pass_fds,
                   on_line=read if watch is not None or on_line is not None else None,
                   stalled=watch.stalled if watch is not None else None)
    except CommandStalled as exc:
        return CompletedRun(124, exc.stdout, f"{exc.stderr}\n{_STALL_MARK}: {exc.why}\n")
    except CommandTimeout as exc:
        return CompletedRun(124, exc.stdout, f"{exc.stderr}\n{_TIMEOUT_MARK} ({timeout_s:g} s)\n")


def staging_directory(names: Sequence[str]) -> str:
    """The staging directory's name for a batch of files with these names: the same for the
    same files (a retry of the very batch appends to what landed), another for any other."""
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
    return f"{STAGING_DIR}.{digest}"


def staged_final(relative: str) -> str | None:
    """The final name a file a batch landed at `relative` (DIR/STAGING_DIR.../NAME, or an
    older version's DIR/STAGING_DIR/NAME) is bound for, DIR/NAME; None for any other path."""
    parts = relative.split("/")
    if len(parts) < 2 or not parts[-2].startswith(STAGING_DIR):
        return None
    return "/".join([*parts[:-2], parts[-1]])


class BbcpTransport:
    """Pushes packages with bbcp: land under a temporary name, verify xxh3-128, then rename."""

    name = "bbcp"

    def __init__(self, options: BbcpOptions, ssh: SshSettings, log_dir: Path,
                 runner: Runner = run_subprocess) -> None:
        self.options, self.ssh, self.log_dir, self._run = options, ssh, Path(log_dir), runner

    def copy(self, source: Endpoint, destination: Endpoint, expected_checksum: str, *,
             expected_adler32: str | None = None) -> TransferResult:
        started = time.monotonic()
        landing = Endpoint(temporary_name(destination.path), destination.host)
        argv = bbcp_command([source], landing, self.options, self.ssh,
                            expected_adler32=expected_adler32)
        log_path, [landed] = self._session(
            argv, destination, Endpoint(destination.path.parent, destination.host),
            [(landing, destination, expected_checksum)], destination, [source], staged=False)
        if isinstance(landed, TransferError):
            raise landed
        return _result(landed, time.monotonic() - started, self.options.streams, log_path)

    def copy_many(self, pairs: Sequence[tuple[Endpoint, Endpoint, str]]
                  ) -> list[TransferResult | TransferError]:
        """One bbcp session for files bound for one directory, landing in a staging directory
        of its own; all verify or none is renamed. Whatever becomes of the session, nothing of
        it is left beside the final names but a verified file whose final name was taken
        (Occupied, which says where it waits): a failed session removes what landed (the
        pipeline sends a failed batch's packages each on its own, never as this batch again),
        and the staging directory goes once empty."""
        if len(pairs) <= 1:
            return one_by_one(self, pairs)
        first = pairs[0][1]
        if any((d.host, d.path.parent) != (first.host, first.path.parent) for _, d, _ in pairs):
            raise ValueError("copy_many needs destinations in one directory on one host")
        if len({s.path.name for s, _, _ in pairs}) != len(pairs):
            raise ValueError("copy_many sources must have distinct file names")
        started = time.monotonic()
        staging = Endpoint(first.path.parent / staging_directory(
            [s.path.name for s, _, _ in pairs]), first.host)
        landings = [Endpoint(staging.path / s.path.name, first.host) for s, _, _ in pairs]
        argv = bbcp_command([s for s, _, _ in pairs], staging, self.options, self.ssh)
        items = [(landing, destination, expected)
                 for landing, (_, destination, expected) in zip(landings, pairs, strict=True)]
        try:
            log_path, checked = self._session(argv, first, staging, items,
                                              Endpoint(first.path.parent / "batch", first.host),
                                              [s for s, _, _ in pairs], staged=True)
        except BbcpFailure as failure:
            if failure.source is None or failure.source not in {str(s.path) for s, _, _ in pairs}:
                raise
            # One file's own failure refused the whole session: it is that file's; the others
            # were not sent, through no fault of theirs (the next attempt sends them).
            return [failure if str(source.path) == failure.source else TransferError(
                f"not sent: {PEER_FAILED} ({failure.source}); the next attempt sends this "
                "file", retryable=True) for source, _, _ in pairs]
        seconds = time.monotonic() - started
        return [landed if isinstance(landed, TransferError) else
                _result(landed, seconds, self.options.streams, log_path) for landed in checked]

    def _session(self, argv: list[str], destination: Endpoint, directory: Endpoint,
                 items: list[tuple[Endpoint, Endpoint, str]], log_name: Endpoint,
                 sources: list[Endpoint], *, staged: bool
                 ) -> tuple[Path, list[Verdict | TransferError]]:
        """bbcp inside one ssh session on the target (transfer_session): bbcp starts once the
        marker was found, `directory` made and earlier attempts' leftovers of these files in
        staging directories removed; the session flushes the landing files while bbcp writes
        them, then hashes every one and renames them all, or none. A failed bbcp's landing
        files are removed (in the session), except one copy's partial file that -a resumes;
        `staged`: a batch in a staging directory, whose files no later attempt resumes."""
        landings = [landing for landing, _, _ in items]
        with transfer_session(self.ssh, destination, [directory], items, all_or_none=True,
                              leftovers=STAGING_DIR) as session:
            try:
                log_path = self._bbcp(argv, log_name, landings, sources)
            except BbcpFailure as failure:
                if staged or not (failure.resumable and self.options.keep_partial):
                    # A cut bbcp's stragglers may write on for seconds: once they are gone
                    # (their lock), else the next attempt removes what they leave.
                    with contextlib.suppress(TransferError), (
                            exclusive_writer(self.log_dir / ".writers", landings)
                            if failure.resumable else contextlib.nullcontext()):
                        session.discard()
                raise
            return log_path, self._verify_and_rename(session, items, staged)

    def _bbcp(self, argv: list[str], destination: Endpoint, landings: list[Endpoint],
              sources: list[Endpoint]) -> Path:
        sizes = {landing.path.name: size for landing, source in zip(landings, sources,
                                                                   strict=True)
                 if (size := _local_size(source)) is not None}
        progress = live.Progress("transfer", destination.path.name if len(landings) == 1
                                 else f"{len(landings)} files to {destination.path.parent}",
                                 sum(sizes.values()) if len(sizes) == len(landings) else None)
        # bbcp's children can outlive a killed bbcp and finish its copy (interrupted-local-
        # killed): never start an attempt while any process of an earlier one may still write.
        with exclusive_writer(self.log_dir / ".writers", landings) as lock:
            done = self._run(argv, (lock,), on_line=LiveProgress(progress, sizes),
                             stall_s=self.options.stall_timeout_s)
        if done.rc == 0:
            progress.finish(progress.total_bytes)
        log_path = self._write_log(argv, done, destination)
        by_path = {str(source.path): source for source in sources}
        failure = classify(done.rc, done.stderr, list(by_path),
                           describe=lambda path: denied(self.ssh, by_path[path]))
        if failure is not None:
            raise failure
        return log_path

    def _verify_and_rename(self, session: Session | LocalSession,
                           items: list[tuple[Endpoint, Endpoint, str]], staged: bool
                           ) -> list[Verdict | TransferError]:
        """Hash every landed file where it lies (in parallel) and, only if all match, rename
        them into place -- within the session, no round trip of its own. A file that does not
        match is removed, and so is, in a batch (`staged`), every file not renamed (no later
        attempt takes it up), in one round trip. Per file its Verdict, or Occupied for one
        whose final name was taken (it waits where it landed)."""
        try:
            found = session.verify()
        except ValueError as exc:
            raise TransferError(f"cannot checksum {items[0][0]}: {exc}", retryable=True) from exc
        failed = []
        for (landing, _, expected), verdict in zip(items, found, strict=True):
            if verdict.unreadable is not None:  # the disk's failure, not the file's
                failed.append(f"{read_back_failed(landing, verdict.unreadable)}; removed")
            elif (actual := verdict.digest) != expected:
                failed.append(f"checksum mismatch at {landing}: expected {ALGORITHM} "
                              f"{expected}, got {actual or 'nothing readable'}; removed")
        discard(self.ssh, [item for item, verdict in zip(items, found, strict=True)
                           if verdict.digest != item[2] or staged and not (
                               verdict.renamed or verdict.occupied)])
        if failed and len(items) == 1:
            raise TransferError(failed[0], retryable=True)
        if failed:
            raise TransferError(f"{len(failed)} of {len(items)} files failed verification: "
                                + "; ".join(failed), retryable=True)
        if not all(verdict.renamed or verdict.occupied for verdict in found):
            raise TransferError(f"verified but not renamed on {items[0][1].host}: "
                                f"{[str(final) for _, final, _ in items]}", retryable=True)
        return [Occupied(final, landing) if verdict.occupied else verdict
                for (landing, final, _), verdict in zip(items, found, strict=True)]

    def _write_log(self, argv: list[str], done: CompletedRun, destination: Endpoint) -> Path:
        """The command and its output, for a person; a log disk full or read-only loses them,
        never the transfer."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", destination.path.name)[:80].lstrip(".")
        path = self.log_dir / f"{stamp}-bbcp-{label or 'transfer'}.log"
        prepare_directory(path)
        try:
            path.write_text(f"$ {shlex.join(argv)}\nexit status {done.rc}\n--- stdout\n"
                            f"{done.stdout}\n--- stderr\n{done.stderr}", encoding="utf-8")
        except OSError as exc:
            tell(path.parent, exc, "transfers' command output is not kept")
        return path


def _result(verdict: Verdict, seconds: float, streams: int, log_path: Path) -> TransferResult:
    return TransferResult(verdict.size or 0, seconds, verdict.digest or "", streams,
                          str(log_path), verdict.inode, verdict.mtime_ns)


def _local_size(source: Endpoint) -> int | None:
    """Size of a local source (bbcp pushes from the local buffer); None when not known here."""
    if source.host is not None:
        return None
    try:
        return os.stat(source.path).st_size
    except OSError:
        return None
