"""bbcp transport: argv, parsing and classification against real captured bbcp output.

bbcp is not packaged for Debian, so the transport tests use a fake runner that writes real bytes
where bbcp would and answers with a captured run's stdout/stderr/rc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import xxhash

from ccat_dt import progress
from ccat_dt.health import location_failure
from ccat_dt.progress import ProgressEvent
from ccat_dt.transports.base import (
    Endpoint,
    Occupied,
    SshSettings,
    TransferError,
    TransferResult,
    exclusive_writer,
    temporary_name,
)
from ccat_dt.transports.bbcp import (
    STAGING_DIR,
    BbcpOptions,
    BbcpTransport,
    LiveProgress,
    StallWatch,
    bbcp_command,
    classify,
    parse_checksums,
    parse_progress,
    parse_summary,
    run_subprocess,
    staging_directory,
)
from ccat_dt.transports.remote import CompletedRun, parse_xxhsum, remote_verify_and_rename_many
from tests.sshd import SshServer
from tests.sshd import sshd as sshd_fixture  # noqa: F401 - registers the "sshd" fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "bbcp"
CASES = sorted(p.stem for p in FIXTURES.glob("*.rc")) if FIXTURES.is_dir() else []
MIB = 1 << 20

# case -> (retryable, a fact the operator message must contain)
FAILURES = {
    "conn-refused": (True, "Connection refused"),
    "remote-bbcp-missing": (False, "bbcp not installed on target 127.0.0.1 at /opt/missing/bbcp"),
    "source-missing": (False, "source missing: /data/ccat/buffer/nope.tar"),
    "dest-dir-missing": (False, "directory missing for /data/cologne/nodir/x/pkg.tar"),
    "exists-no-force": (False, "/data/cologne/buffer/pkg-0002.tar already exists"),
    "no-space": (False, "disk full"),
    "no-space-unchecked": (False, "disk full"),
    "checksum-verify-bad": (True, "corrupted in flight"),
    "time-limit-exceeded": (True, "time limit exceeded"),
    "append-interrupted": (True, "time limit exceeded"),
    "dest-relative-subdir": (False, "/data/cologne/buffer/src/pkg-0001.tar"),
    # cut in the middle: transient, and the partial landing file is kept for -a to resume
    "interrupted-connection-dropped": (True, "Connection to 127.0.0.1 closed by remote host"),
    "interrupted-local-killed": (True, "interrupted at 95% (killed by signal 9)"),
    "interrupted-remote-killed": (True, "interrupted at 14% (exit 255)"),
    "interrupted-ssh-killed": (True, "Copy process 2658 was killed via signal 9"),
}
RESUMABLE = {"conn-refused", "time-limit-exceeded", "append-interrupted",
             "interrupted-connection-dropped", "interrupted-local-killed",
             "interrupted-remote-killed", "interrupted-ssh-killed"}


def fixture(case: str) -> CompletedRun:
    if not FIXTURES.is_dir():
        if os.environ.get("CCAT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"bbcp fixtures missing at {FIXTURES}")
        pytest.skip(f"bbcp fixtures not found at {FIXTURES} (shared/fixtures/bbcp beside the repo)")
    return CompletedRun(int((FIXTURES / f"{case}.rc").read_text()),
                        (FIXTURES / f"{case}.stdout").read_text(),
                        (FIXTURES / f"{case}.stderr").read_text())


def test_fixtures_present() -> None:
    fixture("success-single")
    assert set(FAILURES) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_classify_every_fixture(case: str) -> None:
    run = fixture(case)
    error = classify(run.rc, run.stderr)
    if run.rc == 0:
        assert error is None
        return
    assert case in FAILURES, f"new failure fixture {case} needs an expected classification"
    retryable, fact = FAILURES[case]
    assert error is not None and error.retryable is retryable
    assert fact in str(error)
    assert error.resumable is (case in RESUMABLE)


def test_unknown_failure_is_permanent_and_quotes_stderr() -> None:
    error = classify(3, "bbcp: something\nbbcp: Unexpected thing happened\n")
    assert error is not None and not error.retryable
    assert "exit 3" in str(error) and "Unexpected thing happened" in str(error)


def test_stale_landing_file_and_runner_timeout_are_retryable() -> None:
    """Not captured: texts from bbcp's source (Xfr_Done) and from our own runner's timeout."""
    stale = classify(1, "bbcp: File /b/.x.tar.part changed since the copy completed; "
                        "append not possible.\n")
    assert stale is not None and stale.retryable and not stale.resumable
    run = run_subprocess(["sleep", "5"], timeout_s=0.2)
    timed_out = classify(run.rc, run.stderr)
    assert run.rc == 124 and timed_out is not None and timed_out.retryable and timed_out.resumable


# Captured from real bbcp 14.04.14.00.0 (not among the shared fixtures, captured with
# 14.04.14.00.1): the transport's own command pushing a 20 MiB file from a disk that fails its
# reads (EIO, tests/faultfs.py) to 127.0.0.1 over ssh, paths rewritten as in the fixtures;
# alike whether every read failed or one after 4 MiB had landed, and without -a -k.
SOURCE_READ_ERROR = CompletedRun(128, "", (
    "bbcp: Appending to /data/cologne/buffer/.pkg-0002.tar.part at offset 0\n"
    "bbcp: Input/output error writing /data/ccat/buffer/pkg-0002.tar\n"))


def test_a_source_its_disk_cannot_read_is_the_sources_fault_not_the_destinations() -> None:
    """A bad sector in the source (bbcp: "Input/output error writing SRC", exit 128) is the
    source copy's: SOURCE_UNREADABLE naming it, retried (before: a permanent "bbcp failed
    (exit 128)", taken for the destination's, which was marked failing)."""
    run = SOURCE_READ_ERROR
    error = classify(run.rc, run.stderr, ["/data/ccat/buffer/pkg-0002.tar"])
    assert error is not None and error.retryable and not error.resumable, error
    assert str(error).startswith("source unreadable: /data/ccat/buffer/pkg-0002.tar: its disk "
                                 "failed the read: Input/output error"), error
    assert error.source == "/data/ccat/buffer/pkg-0002.tar"
    assert not location_failure(error), error
    # the same words about a file that is not a source: not the source's
    other = classify(run.rc, run.stderr, ["/data/ccat/buffer/pkg-0001.tar"])
    assert other is not None and "source unreadable" not in str(other), other


# Captured from real bbcp 14.04.14.00.0 (tests/faults/test_bbcp_faults.py's "shrunk" case):
# the 32 MiB source truncated to exactly 8 MiB once more than 10 MiB had landed, i.e. below
# what bbcp had already read: its next read finds no data. Paths rewritten as in the fixtures;
# the same words when the source is emptied (truncated to 0) mid-transfer.
SOURCE_SHRUNK = CompletedRun(128, "", (
    "bbcp: Appending to /data/cologne/buffer/.pkg-0002.tar.part at offset 0\n"
    "bbcp: No data available writing /data/ccat/buffer/pkg-0002.tar\n"))


def test_a_source_that_shrank_below_what_was_read_is_the_sources_fault() -> None:
    """bbcp reading a source that was truncated below its read offset says "No data available
    writing SRC" (exit 128). The source changed size while sent: SOURCE_UNREADABLE naming it,
    retried (the next attempt's checksum tells a bad source from a passing change), not the
    destination's (before: a permanent "bbcp failed (exit 128)", the destination marked
    failing, a person needed)."""
    run = SOURCE_SHRUNK
    error = classify(run.rc, run.stderr, ["/data/ccat/buffer/pkg-0002.tar"])
    assert error is not None and error.retryable and not error.resumable, error
    assert str(error).startswith("source unreadable: /data/ccat/buffer/pkg-0002.tar changed "
                                 "size while it was sent"), error
    assert error.source == "/data/ccat/buffer/pkg-0002.tar"
    assert not location_failure(error), error


# Captured from real bbcp 14.04.14.00.0: the sending side's copy process (the bbcp that holds
# the source open) killed with SIGKILL mid-transfer. Most runs end with exit 255 (as the
# interrupted-ssh-killed fixture); about one in six with exit 128 and the same words.
SENDER_KILLED = CompletedRun(128, "", (
    "bbcp: Appending to /data/cologne/buffer/.pkg-0002.tar.part at offset 0\n"
    "bbcp: Copy process 5633 was killed via signal 9\n"))


def test_a_bbcp_killed_by_a_signal_is_an_interruption_whatever_the_exit_status() -> None:
    """A bbcp process of the transfer killed (the OOM killer, a person) is a cut in the
    middle, retried and resumed, not a permanent "bbcp failed (exit 128)" that marks the
    destination failing and waits for a person."""
    run = SENDER_KILLED
    error = classify(run.rc, run.stderr, ["/data/ccat/buffer/pkg-0002.tar"])
    assert error is not None and error.retryable and error.resumable, error
    assert "transfer interrupted" in str(error) and "killed via signal 9" in str(error), error


# Captured from real bbcp 14.04.14.00.1 (tests/faults/test_bbcp_faults.py's size-limited
# target: `prlimit --fsize` of 64 KiB on the ssh login, a 200 KB file): the target's copy
# process killed by SIGXFSZ, or, that signal ignored, its write refused with EFBIG. Paths
# rewritten as in the fixtures; the same words for a batch's staging directory.
TARGET_SIZE_LIMIT = CompletedRun(255, "", (
    "bbcp: Appending to /data/cologne/buffer/.pkg-0002.tar.part at offset 0\n"
    "bbcp: Copy process 26013 was killed via signal 25\n"))
TARGET_EFBIG = CompletedRun(229, "", (
    "bbcp: Appending to /data/cologne/buffer/.pkg-0002.tar.part at offset 0\n"
    "bbcp: File too large writing /data/cologne/buffer/.pkg-0002.tar.part\n"))


@pytest.mark.parametrize("run", [TARGET_SIZE_LIMIT, TARGET_EFBIG], ids=["SIGXFSZ", "EFBIG"])
def test_a_target_that_takes_no_file_this_big_is_told_as_local_and_rsync_copies_are(
        run: CompletedRun) -> None:
    """The destination's file-size limit (SIGXFSZ) or largest file (EFBIG): TOO_LARGE ("File
    too large ... takes no file this big"), not retried, not resumed (its partial is removed),
    not the location's failure. Before: the signal was a cut (retried, resumed: killed again
    at the same offset), EFBIG a bare "bbcp failed (exit 229)"."""
    error = classify(run.rc, run.stderr, ["/data/ccat/buffer/pkg-0002.tar"])
    assert error is not None and not error.retryable and not error.resumable, error
    assert str(error).startswith("File too large at the destination: it takes no file this "
                                 "big"), error
    assert not location_failure(error), error
    assert classify(-25, "", []) is not None and "File too large" in str(classify(-25, "", []))


def test_a_source_refused_for_lack_of_permission_is_the_sources_not_the_destinations() -> None:
    """A source refused to bbcp's user (captured from real bbcp 14.04.14.00.0: the file mode
    0600 of another user, "Permission denied opening SRC", exit 2; a directory it cannot
    enter, "... processing SRC") is the source's: SOURCE_UNREADABLE naming it and whom to make
    it readable by, not retried within the run (before: a permanent "bbcp failed (exit 2)",
    taken for the destination's, which was marked failing). The same words about the target
    (the destination's directory refusing the landing file) stay the destination's."""
    source = "/data/ccat/buffer/pkg-0002.tar"
    for rc, stderr in (
            (2, "bbcp: Appending to /data/lta/.pkg-0002.tar.part at offset 0\n"
                f"bbcp: Permission denied opening {source}\n"),
            (2, f"bbcp: Permission denied processing {source}\n"
                "bbcp: Broken pipe writing to stream.\n")):
        error = classify(rc, stderr, [source])
        assert error is not None and not error.retryable and not error.resumable, error
        assert str(error).startswith(f"source unreadable: {source}: permission denied: make "
                                     "it readable by "), error
        assert error.source == source and not location_failure(error), error
        told = classify(rc, stderr, [source], describe=lambda path: f"told of {path}")
        assert told is not None and str(told).startswith(f"told of {source} (bbcp exited 2: ")
    target = classify(2, "bbcp: Permission denied opening /data/lta/.pkg-0002.tar.part\n",
                      [source])
    assert target is not None and "source unreadable" not in str(target), target
    assert location_failure(target), target


def test_the_stall_watch_reads_bytes_moved_from_bbcps_lines() -> None:
    """bbcp's data streams have no idle timeout; only its `-P` lines say whether bytes move:
    with -v the interval's rate (bbcp prints 0.0 B/s for an interval without bytes, or -nan
    for one of no time), without -v a percentage that rises. A far end that froze prints
    nothing: silence is no bytes."""
    now = [0.0]
    watch = StallWatch(30, clock=lambda: now[0])

    def at(second: float, *lines: str) -> str | None:
        now[0] = second
        for line in lines:
            watch(line)
        return watch.stalled()

    [moving] = [ln for ln in fixture("success-single").stderr.splitlines() if ", avg " in ln]
    # as the receiving bbcp 14.04 printed them while the sending one was frozen
    idle = "bbcp: 261205 09:51:02  6% done; 0.0 B/s, avg 116.1 KB/s"
    nan = "bbcp: 261205 09:51:01  6% done; -nan B/s, avg 116.1 KB/s"
    assert at(29) is None  # starting (ssh, bbcp) counts from the start
    assert at(20, moving) is None and at(49, idle, nan, nan, "bbcp: something else") is None
    assert at(50, idle) == "no bytes moved for 30 s: the link stalled (or the far end froze)"
    assert at(51, "bbcp: Appending to /b/.pkg.tar.part at offset 5") is None  # a file begun
    assert at(80) is None and at(81) is not None  # silence
    plain = fixture("progress-rate-limited").stderr.splitlines()  # no -v: 25%, 43%, 81%
    assert at(90, *plain[1:3]) is None and at(119, plain[2]) is None
    assert at(120, plain[2]) is not None and at(121, plain[3]) is None


def test_a_run_that_moves_no_bytes_is_stopped_and_retryable() -> None:
    """A silent bbcp is stopped after the stall time, its group ended, the attempt retryable
    (the next one resumes); one whose lines show bytes moving runs past it."""
    started = time.monotonic()
    silent = run_subprocess(["sleep", "30"], stall_s=1)
    assert silent.rc == 124 and time.monotonic() - started < 10
    stalled = classify(silent.rc, silent.stderr)
    assert stalled is not None and stalled.retryable and stalled.resumable
    assert "no bytes moved for 1 s: the link stalled" in str(stalled), stalled
    line = "bbcp: 261121 23:58:43  8$i% done; 1.0 MB/s, avg 1.0 MB/s"
    moving = run_subprocess(["sh", "-c", f'for i in 1 2 3 4 5 6; do echo "{line}" >&2; '
                             "sleep 0.5; done"], stall_s=2)
    assert moving.rc == 0 and moving.stderr.count("done;") == 6


def test_progress_lines() -> None:
    run = fixture("progress-rate-limited")
    progress = [p for p in map(parse_progress, run.stderr.splitlines()) if p]
    assert [p.percent for p in progress] == [25, 43, 81]
    assert all(50 * MIB < p.rate_bytes_per_s < 60 * MIB for p in progress)  # -x 60M
    assert parse_progress("bbcp: Creating /data/cologne/buffer/big.tar") is None
    with_avg = parse_progress("bbcp: 261121 23:58:43  81% done; 1.0 GB/s, avg 150.4 MB/s")
    assert with_avg is not None and with_avg.rate_bytes_per_s == 1 << 30


def test_summary_single_and_multi_file() -> None:
    run = fixture("success-single")
    single = parse_summary(run.stdout, run.stderr)
    assert single.bytes == 300 * MIB
    assert single.rate_mb_per_s == pytest.approx(75.3)
    assert single.seconds is not None and single.seconds == pytest.approx(300 / 75.3)
    assert [f.path for f in single.files] == ["/data/cologne/buffer/pkg-0001.tar"]
    assert [p.percent for p in single.progress] == [81]

    run = fixture("multi-file")
    multi = parse_summary(run.stdout, run.stderr)
    assert multi.bytes == 20 * MIB + 5 * MIB
    assert multi.rate_bytes_per_s is not None and multi.rate_bytes_per_s > 0
    assert [(f.path, f.bytes) for f in multi.files] == [
        ("/data/cologne/buffer/pkg-0002.tar", 20 * MIB),
        ("/data/cologne/buffer/name with space.tar", 5 * MIB)]  # spaces survive bbcp
    assert all(f.rate_bytes_per_s > 0 for f in multi.files)


def test_reported_checksum() -> None:
    fixture("success-single")
    (reported,) = parse_checksums((FIXTURES / "md5-report.txt").read_text())
    assert (reported.algorithm, reported.value, reported.host, reported.path) == (
        "md5", "2a59c4210ce2ea68ef0c95c69f192c25", "127.0.0.1", "/data/cologne/buffer/c.tar")


SSH = SshSettings(port=2222, identity_file="/etc/ccat/id_ed25519",
                  known_hosts_file="/etc/ccat/known_hosts")


def test_exact_argv_for_a_configured_route() -> None:
    options = BbcpOptions(streams=8, window="8M", progress_interval_s=10, rate_limit="60M",
                          time_limit_s=3600, port_range="5031:5039",
                          remote_bbcp="/usr/local/bin/bbcp", append=False, force=True)
    argv = bbcp_command([Endpoint(PurePosixPath("/data/ccat/buffer/pkg-0001.tar"))],
                        Endpoint(PurePosixPath("/data/cologne/buffer/.pkg-0001.tar.part"),
                                 "ccat@buffer.cologne"), options, SSH, expected_adler32="0A1B2C3D")
    assert argv == [
        "bbcp", "-s", "8", "-w", "8M", "-P", "10", "-x", "60M", "-t", "3600",
        "-Z", "5031:5039", "-E", "a32=0a1b2c3d", "-k", "-f", "-v",
        "-S", "ssh -p 2222 -o BatchMode=yes -o ConnectTimeout=20 -i /etc/ccat/id_ed25519 "
              "-o IdentitiesOnly=yes -o UserKnownHostsFile=/etc/ccat/known_hosts "
              "-o StrictHostKeyChecking=yes -o ServerAliveInterval=30 "
              "-o ServerAliveCountMax=4 -x -a %H /usr/local/bin/bbcp",
        "-T", "ssh -p 2222 -o BatchMode=yes -o ConnectTimeout=20 -i /etc/ccat/id_ed25519 "
              "-o IdentitiesOnly=yes -o UserKnownHostsFile=/etc/ccat/known_hosts "
              "-o StrictHostKeyChecking=yes -o ServerAliveInterval=30 "
              "-o ServerAliveCountMax=4 -x -a -l %U %H /usr/local/bin/bbcp",
        "/data/ccat/buffer/pkg-0001.tar",
        "ccat@buffer.cologne:/data/cologne/buffer/.pkg-0001.tar.part",
    ]


def test_default_options_resume_and_keep_the_value_check_off() -> None:
    """-a excludes -E a32=VALUE and -f in bbcp; '--' stops -a from eating the next word."""
    argv = bbcp_command([Endpoint(PurePosixPath("/a/p1.tar")), Endpoint(PurePosixPath("/a/p2"))],
                        Endpoint(PurePosixPath("/b"), "buffer"), BbcpOptions(), SshSettings())
    assert argv == [
        "bbcp", "-s", "4", "-P", "10", "-E", "a32", "-a", "--", "-k", "-v",
        "-S", "ssh -p 22 -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=30 "
              "-o ServerAliveCountMax=4 -x -a %H bbcp",
        "-T", "ssh -p 22 -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=30 "
              "-o ServerAliveCountMax=4 -x -a %H bbcp",
        "/a/p1.tar", "/a/p2", "buffer:/b/"]
    restart = BbcpOptions(restart_dir="/var/lib/ccat/bbcp-restart")
    assert "-a /var/lib/ccat/bbcp-restart -k" in " ".join(
        bbcp_command([Endpoint(PurePosixPath("/a"))], Endpoint(PurePosixPath("/b")), restart,
                     SshSettings()))


@pytest.mark.parametrize("kwargs", [
    {"append": True, "force": True}, {"streams": 0}, {"window": "8 M"}, {"rate_limit": "-1"},
    {"port_range": "5031-5039"}, {"remote_bbcp": "bbcp; rm -rf /"}, {"remote_bbcp": "-x"},
    {"restart_dir": "/a dir"}, {"progress_interval_s": 0}, {"checksum": "sha1"},
    {"progress_interval_s": None}, {"progress_interval_s": 10, "stall_timeout_s": 15}])
def test_invalid_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BbcpOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["-rf.tar", "name with space.tar", "a;rm -rf ~.tar",
                                  "--help", "$(reboot).tar"])
def test_hostile_names_stay_single_absolute_words(name: str) -> None:
    source = Endpoint(PurePosixPath("/data/ccat/buffer") / name)
    destination = Endpoint(PurePosixPath("/data/cologne/buffer") / name, "ccat@buffer")
    argv = bbcp_command([source], destination, BbcpOptions(), SshSettings())
    assert argv[-2:] == [f"/data/ccat/buffer/{name}", f"ccat@buffer:/data/cologne/buffer/{name}"]
    assert not any(word.startswith("-") for word in argv[-2:])


def _ep(path: str, host: str | None = None) -> Endpoint:
    return Endpoint(PurePosixPath(path), host)


@pytest.mark.parametrize("source, destination", [
    (_ep("/a/x\n-f.tar"), _ep("/b/x.tar")),
    (_ep("/a/x\0.tar"), _ep("/b/x.tar")),
    (_ep("-rf.tar"), _ep("/b/x.tar")),
    (_ep("/a/x.tar"), _ep("b/x.tar", "host")),
    (_ep("/a/x.tar"), _ep("/b/x.tar", "-oProxyCommand=x")),
    (_ep("/a/x.tar"), _ep("/b/x.tar", "u@-oProxyCommand=x")),
    (_ep("/a/x.tar"), _ep("/b/x.tar", "host name")),
])
def test_rejected_paths_and_hosts(source: Endpoint, destination: Endpoint) -> None:
    with pytest.raises(ValueError):
        bbcp_command([source], destination, BbcpOptions(), SshSettings())


def test_ssh_words_bbcp_cannot_carry_are_rejected() -> None:
    """bbcp splits -S/-T on spaces without quoting: a spaced key path would break apart."""
    with pytest.raises(ValueError, match="no quoting"):
        bbcp_command([Endpoint(PurePosixPath("/a"))], Endpoint(PurePosixPath("/b"), "h"),
                     BbcpOptions(), SshSettings(identity_file="/keys/my key"))


def test_expected_adler32_must_be_8_hex_for_one_file() -> None:
    one, two = Endpoint(PurePosixPath("/a/1")), Endpoint(PurePosixPath("/a/2"))
    for sources, value in (([one], "xyz"), ([one], "123456789"), ([one, two], "0a1b2c3d")):
        with pytest.raises(ValueError):
            bbcp_command(sources, Endpoint(PurePosixPath("/b")), BbcpOptions(append=False),
                         SshSettings(), expected_adler32=value)


@pytest.mark.skipif(shutil.which("xxhsum") is None, reason="xxhsum (Debian package xxhash) absent")
def test_xxhsum_h2_matches_python_xxh3_128(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    target = tmp_path / "name with space;.tar"
    target.write_bytes(data)
    out = subprocess.run(["xxhsum", "-H2", "--", str(target)], capture_output=True, text=True,
                         check=True).stdout
    digest = xxhash.xxh3_128(data).hexdigest()
    assert out == f"{digest}  {target}\n"  # xxhsum 0.8.1: GNU style, same hex as python
    assert parse_xxhsum(out) == digest


# ---- the transport, with bbcp replaced by a function that writes real bytes ----

def _all_copied(results: Sequence[TransferResult | TransferError]) -> list[TransferResult]:
    """A batch expected to succeed file by file: any TransferError in a file's place fails here,
    named, rather than as a missing attribute further on."""
    errors = [r for r in results if not isinstance(r, TransferResult)]
    assert not errors, errors
    return [r for r in results if isinstance(r, TransferResult)]


def fake_runner(case: str, sources: dict[str, bytes], calls: list[list[str]], *,
                partial: bool = False):
    """Write what bbcp would have written (whole files, or half on failure), hand the captured
    lines to `on_line` as bbcp prints them, answer as `case`."""
    run = fixture(case)

    def runner(argv: list[str], pass_fds: Sequence[int] = (), *,
               on_line: Callable[[str], None] | None = None, **_: object) -> CompletedRun:
        calls.append(argv)
        target = argv[-1].split(":", 1)[-1]
        for source, data in sources.items():
            landing = Path(target) / Path(source).name if target.endswith("/") else Path(target)
            landing.write_bytes(data[: len(data) // 2] if partial else data)
        for line in (run.stdout + run.stderr).splitlines():
            if on_line is not None and line.strip():
                on_line(line)
        return run

    return runner


@pytest.fixture
def package(tmp_path: Path) -> tuple[Endpoint, bytes, str]:
    data = os.urandom(1_000_003)
    source = tmp_path / "src" / "pkg-0001.tar"
    source.parent.mkdir()
    source.write_bytes(data)
    return Endpoint(PurePosixPath(source)), data, xxhash.xxh3_128(data).hexdigest()


def test_copy_success_verifies_renames_and_logs(tmp_path: Path, package) -> None:
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    calls: list[list[str]] = []
    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs",
                              runner=fake_runner("success-single", {str(source.path): data}, calls))
    result = transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert final.read_bytes() == data
    assert not Path(temporary_name(PurePosixPath(final))).exists()
    assert calls[0][-1] == str(temporary_name(PurePosixPath(final)))
    assert (result.bytes, result.checksum, result.streams) == (len(data), checksum, 4)
    assert result.log_path is not None and Path(result.log_path).parent == tmp_path / "logs"
    log = Path(result.log_path).read_text()
    assert fixture("success-single").stderr in log and "exit status 0" in log


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_copy_failure_leaves_nothing_under_the_final_name(tmp_path: Path, package,
                                                          case: str) -> None:
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    transport = BbcpTransport(
        BbcpOptions(), SshSettings(), tmp_path / "logs",
        runner=fake_runner(case, {str(source.path): data}, [], partial=True))
    with pytest.raises(TransferError) as caught:
        transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert caught.value.retryable is FAILURES[case][0]
    assert not final.exists()
    # a partial landing file is kept only where -k -a can resume it
    assert Path(temporary_name(PurePosixPath(final))).exists() is (case in RESUMABLE)
    assert len(list((tmp_path / "logs").glob("*.log"))) == 1


def test_copy_checksum_mismatch_removes_the_landing_file(tmp_path: Path, package) -> None:
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    corrupted = bytes([data[0] ^ 1]) + data[1:]  # what landed is not what was sent
    transport = BbcpTransport(
        BbcpOptions(), SshSettings(), tmp_path / "logs",
        runner=fake_runner("success-single", {str(source.path): corrupted}, []))
    with pytest.raises(TransferError, match="checksum mismatch") as caught:
        transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert caught.value.retryable
    assert not final.exists() and not Path(temporary_name(PurePosixPath(final))).exists()


def test_remote_copy_verifies_and_renames_over_real_ssh(sshd: SshServer, package) -> None:
    """Only bbcp is faked (it writes where the sshd's files live); mkdir, xxhsum and mv run
    through a real sshd, with a name that a careless remote shell would execute."""
    source, data, checksum = package
    final = sshd.root / "dst dir" / "a;rm -rf ~ $(x).tar"
    calls: list[list[str]] = []
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=fake_runner("success-single", {str(source.path): data}, calls))
    result = transport.copy(source, sshd.endpoint(final), checksum)
    assert final.read_bytes() == data and (result.checksum, result.bytes) == (checksum, len(data))
    assert not Path(temporary_name(PurePosixPath(final))).exists()
    assert calls[0][-1] == f"{sshd.destination}:{temporary_name(PurePosixPath(final))}"


def test_copy_many_lands_in_staging_then_renames_all(tmp_path: Path) -> None:
    sources = {}
    pairs = []
    for name, size in (("pkg-0002.tar", 20_000), ("name with space.tar", 5_000)):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data := os.urandom(size))
        sources[str(path)] = data
        pairs.append((Endpoint(PurePosixPath(path)),
                      Endpoint(PurePosixPath(tmp_path / "dst" / name)),
                      xxhash.xxh3_128(data).hexdigest()))
    calls: list[list[str]] = []
    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs",
                              runner=fake_runner("multi-file", sources, calls))
    results = _all_copied(transport.copy_many(pairs))
    staging = tmp_path / "dst" / staging_directory(["pkg-0002.tar", "name with space.tar"])
    assert calls[0][-1] == f"{staging}/" and staging.name.startswith(f"{STAGING_DIR}.")
    assert [r.checksum for r in results] == [checksum for _, _, checksum in pairs]
    for (source, destination, _) in pairs:
        assert Path(destination.path).read_bytes() == Path(source.path).read_bytes()
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == [
        "name with space.tar", "pkg-0002.tar"]  # the staging directory gone with its files


def test_copy_many_renames_nothing_unless_all_verify(tmp_path: Path) -> None:
    pairs, sources = [], {}
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(name.encode())
        sources[str(tmp_path / name)] = name.encode()
        pairs.append((Endpoint(PurePosixPath(tmp_path / name)),
                      Endpoint(PurePosixPath(tmp_path / "dst" / name)),
                      xxhash.xxh3_128(b"a.tar").hexdigest()))  # wrong for b.tar
    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs",
                              runner=fake_runner("multi-file", sources, []))
    with pytest.raises(TransferError, match="1 of 2 files failed") as caught:
        transport.copy_many(pairs)
    assert caught.value.retryable
    # nothing renamed, and nothing kept: the pipeline sends each package on its own next
    assert list((tmp_path / "dst").iterdir()) == []


def test_missing_bbcp_is_a_permanent_error(tmp_path: Path, package, monkeypatch) -> None:
    source, _, checksum = package
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs")
    with pytest.raises(TransferError, match="bbcp is not installed on this host") as caught:
        transport.copy(source, Endpoint(PurePosixPath(tmp_path / "dst" / "x.tar")), checksum)
    assert not caught.value.retryable


@pytest.mark.skipif(shutil.which("bbcp") is None,
                    reason="bbcp is not installed (not packaged for Debian); "
                           "parse tests above use captured real output")
def test_real_bbcp_local_copy(tmp_path: Path, package) -> None:
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    transport = BbcpTransport(BbcpOptions(progress_interval_s=None, stall_timeout_s=None),
                              SshSettings(), tmp_path / "logs")
    result = transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert final.read_bytes() == data and result.checksum == checksum


def _holders(path: Path) -> list[int]:
    """The processes that have `path` open (as /proc shows their file descriptors)."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return pids


@pytest.mark.skipif(shutil.which("bbcp") is None,
                    reason="bbcp is not installed (not packaged for Debian); the cut cases "
                           "above replay captured real output")
def test_real_bbcp_cut_mid_transfer_is_resumed_by_the_next_attempt(
        sshd: SshServer, tmp_path: Path) -> None:
    """The receiving bbcp is killed while the bytes flow (as when the far end dies): the
    attempt fails retryable, keeps what landed, and the next one appends to it, so the file
    arrives whole and verified without a person."""
    data = os.urandom(48 * 2**20)
    source = tmp_path / "pkg-cut.tar"
    source.write_bytes(data)
    checksum = xxhash.xxh3_128(data).hexdigest()
    final = sshd.root / "cut-lta" / "pkg-cut.tar"
    destination = _marked(sshd, final.parent, final)
    landing = Path(temporary_name(PurePosixPath(final)))
    slow = BbcpTransport(BbcpOptions(rate_limit="16M"), sshd.ssh, tmp_path / "logs")
    killed: list[int] = []

    def kill_the_receiver_once_bytes_landed() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not killed:
            if landing.exists() and landing.stat().st_size > 4 * 2**20:
                for pid in _holders(landing):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_receiver_once_bytes_landed)
    killer.start()
    with pytest.raises(TransferError) as caught:
        slow.copy(Endpoint(PurePosixPath(source)), destination, checksum)
    killer.join()
    assert killed and caught.value.retryable
    assert not final.exists()
    kept = landing.stat().st_size
    assert 0 < kept < len(data)

    result = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs").copy(
        Endpoint(PurePosixPath(source)), destination, checksum)
    assert final.read_bytes() == data and result.checksum == checksum
    assert not landing.exists()
    log = Path(result.log_path or "").read_text()
    assert "Appending to" in log and "at offset 0" not in log.split("Appending to", 1)[1]


def test_progress_lines_are_reported_while_bbcp_runs(tmp_path: Path, package,
                                                     progress_events: list[ProgressEvent],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    source, data, checksum = package
    final = tmp_path / "dst" / "big.tar"
    replay = fake_runner("progress-rate-limited", {str(source.path): data}, [])
    while_running: list[ProgressEvent] = []

    def runner(argv: list[str], pass_fds: Sequence[int] = (), *,
               on_line: Callable[[str], None] | None = None, **_: object) -> CompletedRun:
        done = replay(argv, pass_fds, on_line=on_line)
        while_running.extend(progress_events)  # reported before bbcp ended
        return done

    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs", runner=runner)
    with caplog.at_level(logging.INFO, logger="ccat_dt.progress"):
        transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    expected = parse_summary(fixture("progress-rate-limited").stdout,
                             fixture("progress-rate-limited").stderr).progress
    assert len(while_running) == len(expected) >= 2
    assert [e.done_bytes for e in while_running] == [len(data) * p.percent // 100
                                                     for p in expected]
    assert [e.bytes_per_s for e in while_running] == [p.rate_bytes_per_s for p in expected]
    assert all(e.name == "big.tar" and e.total_bytes == len(data) and not e.finished
               for e in while_running)
    assert progress_events[-1].finished and progress_events[-1].done_bytes == len(data)
    messages = [r.getMessage() for r in caplog.records if r.name == "ccat_dt.progress"]
    assert messages[0].startswith("transfer big.tar: 25% ")  # Dagster's run log shows these


def test_a_batch_reports_each_file_done_and_a_remote_source_its_share(
        tmp_path: Path, progress_events: list[ProgressEvent]) -> None:
    names = {"pkg-0002.tar": 20_000, "name with space.tar": 5_000}  # as in multi-file
    progress_of = progress.Progress("transfer", "batch", sum(names.values()))
    read = LiveProgress(progress_of, names)
    for line in fixture("multi-file").stderr.splitlines():
        read(line)
    assert [e.done_bytes for e in progress_events] == [20_000, 25_000]
    remote = LiveProgress(progress.Progress("transfer", "big.tar"), {})
    for line in fixture("progress-rate-limited").stderr.splitlines():
        remote(line)
    assert [(e.done_bytes, e.percent) for e in progress_events[2:]] == [(0, 25), (0, 43), (0, 81)]


def test_a_resumed_file_reports_the_kept_bytes_plus_bbcps_share_of_the_rest(
        progress_events: list[ProgressEvent]) -> None:
    """On a resume (-a) bbcp's `N% done` is of the bytes still to send, not of the file: these
    lines are real bbcp 14.04 output, 45% done of the 14408960 bytes left after appending at
    offset 5591040 of 20000000 (that is 60% of the file, not 45%)."""
    size, offset = 20_000_000, 5_591_040
    read = LiveProgress(progress.Progress("transfer", "c.tar", size), {"c.tar": size})
    for line in ("bbcp: Will try to complete copying /d/c.tar",
                 f"bbcp: Appending to /d/c.tar at offset {offset}",
                 "bbcp: 261206 05:17:29  45% done; 4.0 MB/s, avg 4.0 MB/s",
                 f"File /d/c.tar created; {size - offset} bytes at 3.8 MB/s"):
        read(line)
    assert [e.done_bytes for e in progress_events] == [offset + (size - offset) * 45 // 100, size]


@pytest.mark.parametrize("cut", ["connection-dropped", "remote-killed", "ssh-killed"])
def test_cut_transfer_keeps_its_partial_file_and_the_same_command_resumes_it(
        tmp_path: Path, package, cut: str) -> None:
    """A cut in the middle is retried, not quarantined: the partial landing file stays and the
    next attempt sends the identical argv (-a appends from the kept size)."""
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    landing = Path(temporary_name(PurePosixPath(final)))
    calls: list[list[str]] = []
    cut_run = fake_runner(f"interrupted-{cut}", {str(source.path): data}, calls, partial=True)
    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs", runner=cut_run)
    with pytest.raises(TransferError) as caught:
        transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert caught.value.retryable and "interrupted" in str(caught.value)
    assert landing.stat().st_size == len(data) // 2 and not final.exists()

    resumed = fixture(f"resumed-{cut}")

    def resume(argv: list[str], pass_fds: Sequence[int] = (), **_: object) -> CompletedRun:
        calls.append(argv)
        with landing.open("ab") as partial:  # what bbcp -a does: append from the kept offset
            partial.write(data[landing.stat().st_size:])
        return resumed

    transport = BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs", runner=resume)
    transport.copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert calls[0] == calls[1] and "-a" in calls[1] and "-k" in calls[1]
    assert final.read_bytes() == data and not landing.exists()


def test_a_retry_waits_for_processes_left_by_a_killed_attempt(tmp_path: Path, package) -> None:
    """interrupted-local-killed: bbcp's children outlive the killed bbcp (and a killed run) and
    finish the copy. The next attempt must not start bbcp on the same file until they exit."""
    source, data, checksum = package
    final = tmp_path / "dst" / "pkg-0001.tar"
    landing = Path(temporary_name(PurePosixPath(final)))
    landing.parent.mkdir()
    orphans: list[subprocess.Popen[bytes]] = []

    def killed(argv: list[str], pass_fds: Sequence[int] = (), **_: object) -> CompletedRun:
        # the children carry on in their own session, holding what the attempt passed them
        orphans.append(subprocess.Popen(
            ["python3", "-c", "import sys, time; time.sleep(2); "
             "open(sys.argv[1], 'wb').write(open(sys.argv[2], 'rb').read())",
             str(landing), str(source.path)], pass_fds=tuple(pass_fds),
            start_new_session=True))
        return fixture("interrupted-local-killed")

    with pytest.raises(TransferError) as caught:
        BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs",
                      runner=killed).copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert caught.value.retryable and caught.value.resumable  # type: ignore[attr-defined]
    seen: list[int | None] = []

    def resumed(argv: list[str], pass_fds: Sequence[int] = (), **_: object) -> CompletedRun:
        seen.append(orphans[0].poll())  # the orphan must be gone before bbcp starts again
        return fixture("resumed-local-killed")

    BbcpTransport(BbcpOptions(), SshSettings(), tmp_path / "logs",
                  runner=resumed).copy(source, Endpoint(PurePosixPath(final)), checksum)
    assert seen == [0] and final.read_bytes() == data


def test_a_retry_that_cannot_wait_long_enough_fails_retryably(tmp_path: Path) -> None:
    target = Endpoint(PurePosixPath(tmp_path / "x.tar"))
    with exclusive_writer(tmp_path / "locks", [target]) as fd:
        holder = subprocess.Popen(["sleep", "30"], pass_fds=(fd,), start_new_session=True)
    try:
        with pytest.raises(TransferError, match="still running") as caught, \
                exclusive_writer(tmp_path / "locks", [target], wait_s=0.5):
            pass
        assert caught.value.retryable
    finally:
        holder.kill()
        holder.wait()
    with exclusive_writer(tmp_path / "locks", [target], wait_s=5):
        pass  # free again once the holder is gone


# ---- ssh: one session beside bbcp (marker and mkdir before it, verify and rename after) ----

@pytest.fixture
def ssh_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ssh command the transport's remote steps run (still run, only recorded)."""
    from ccat_dt.transports import remote

    seen: list[str] = []
    real = remote.spawn

    def recording(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        if argv[0] == "ssh":
            seen.append(argv[-1])
        return real(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(remote, "spawn", recording)
    return seen


def _marked(sshd: SshServer, directory: Path, final: Path) -> Endpoint:
    """`final` as a location's file: its root `directory` carries the marker."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".ccat-dt-location").write_text("marker\n")
    return Endpoint(PurePosixPath(final), sshd.destination,
                    marker=PurePosixPath(directory / ".ccat-dt-location"))


def test_one_copy_takes_one_ssh_session(sshd: SshServer, package,
                                       ssh_commands: list[str]) -> None:
    source, data, checksum = package
    final = sshd.root / "one-lta" / "obs" / "pkg-0001.tar"
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=fake_runner("success-single", {str(source.path): data}, []))
    transport.copy(source, _marked(sshd, sshd.root / "one-lta", final), checksum)
    assert final.read_bytes() == data
    assert len(ssh_commands) == 1, ssh_commands  # marker + mkdir, then verify + rename
    assert ".ccat-dt-location" in ssh_commands[0] and "mkdir -p" in ssh_commands[0]
    assert "xxhsum -H2" in ssh_commands[0] and "mv -f" in ssh_commands[0]


def test_a_session_of_twenty_files_takes_one_ssh_session(
        sshd: SshServer, tmp_path: Path, ssh_commands: list[str]) -> None:
    sources, pairs = {}, []
    for number in range(20):
        path = tmp_path / "src" / f"pkg-{number:04d}.tar"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data := os.urandom(3000 + number))
        sources[str(path)] = data
        pairs.append((Endpoint(PurePosixPath(path)),
                      _marked(sshd, sshd.root / "twenty", sshd.root / "twenty" / path.name),
                      xxhash.xxh3_128(data).hexdigest()))
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=fake_runner("multi-file", sources, []))
    results = _all_copied(transport.copy_many(pairs))
    assert [r.checksum for r in results] == [checksum for _, _, checksum in pairs]
    for source, destination, _ in pairs:
        assert Path(destination.path).read_bytes() == sources[str(source.path)]
    assert not list((sshd.root / "twenty").glob(f"{STAGING_DIR}*"))
    assert len(ssh_commands) == 1, ssh_commands


def test_a_session_with_one_bad_file_renames_none(
        sshd: SshServer, tmp_path: Path, ssh_commands: list[str]) -> None:
    sources, pairs = {}, []
    for name in ("a.tar", "b.tar", "c.tar"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
        sources[str(tmp_path / name)] = name.encode() * 1000
        expected = xxhash.xxh3_128(b"x" if name == "b.tar" else name.encode() * 1000)
        pairs.append((Endpoint(PurePosixPath(tmp_path / name)),
                      _marked(sshd, sshd.root / "one-bad", sshd.root / "one-bad" / name),
                      expected.hexdigest()))
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=fake_runner("multi-file", sources, []))
    with pytest.raises(TransferError, match="1 of 3 files failed") as caught:
        transport.copy_many(pairs)
    assert caught.value.retryable
    assert sorted(p.name for p in (sshd.root / "one-bad").iterdir()) == [
        ".ccat-dt-location"]  # nothing under a final name, nothing kept of the batch
    assert len(ssh_commands) == 2  # the session (renaming nothing), then remove all three


def test_an_unmarked_destination_is_never_written_to(sshd: SshServer, package,
                                                     ssh_commands: list[str]) -> None:
    """The archive disk is not mounted: its mount point lacks the marker. bbcp never runs,
    no directory is created, and the error says a person must act."""
    source, data, checksum = package
    mount_point = sshd.root / "unmounted-lta"
    mount_point.mkdir()
    calls: list[list[str]] = []
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=fake_runner("success-single", {str(source.path): data},
                                                 calls))
    destination = Endpoint(PurePosixPath(mount_point / "obs" / "pkg.tar"), sshd.destination,
                           marker=PurePosixPath(mount_point / ".ccat-dt-location"))
    with pytest.raises(TransferError, match="marker") as caught:
        transport.copy(source, destination, checksum)
    assert not caught.value.retryable
    assert list(mount_point.iterdir()) == [] and calls == []
    assert len(ssh_commands) == 1


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("host", ["remote", "local"])
def test_a_file_where_the_packages_directory_should_be_is_named_and_not_retried(
        sshd: SshServer, tmp_path: Path, host: str, batch: bool) -> None:
    """A regular file sits where the package's directory should be (`obs` at the location's
    root), so the directory cannot be created. The attempt fails before bbcp runs, as that
    package's problem at the destination (not the location's failure: other packages still go
    there) naming that file, and is not retried within the run (no retry storm: a person moves
    it away); the file is left as it is.
    Before: "mkdir ... failed (exit 1): mkdir: cannot create directory '...': File exists"
    (or "Not a directory", whichever path mkdir tripped on), and on this machine a retryable
    "[Errno 17] File exists" retried at once."""
    root = (sshd.root if host == "remote" else tmp_path) / f"blocked-{host}-{batch}"
    blocker = root / "obs"
    finals = [blocker / name for name in ("pkg-a.tar", "pkg-b.tar")[:2 if batch else 1]]
    destinations = [_marked(sshd, root, final) for final in finals]
    if host == "local":
        destinations = [Endpoint(d.path, None, marker=d.marker) for d in destinations]
    blocker.write_bytes(b"a file, not a directory")
    sources = {}
    for final in finals:
        (tmp_path / final.name).write_bytes(data := os.urandom(1000))
        sources[str(tmp_path / final.name)] = data
    calls: list[list[str]] = []
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs",
                              runner=fake_runner("multi-file", sources, calls))
    pairs = [(Endpoint(PurePosixPath(tmp_path / final.name)), destination,
              xxhash.xxh3_128(sources[str(tmp_path / final.name)]).hexdigest())
             for final, destination in zip(finals, destinations, strict=True)]
    with pytest.raises(TransferError) as caught:
        if batch:
            transport.copy_many(pairs)
        else:
            transport.copy(*pairs[0])
    message = str(caught.value)
    assert not caught.value.retryable, message
    assert f"{blocker} is not a directory" in message and "move it away" in message, message
    assert not location_failure(caught.value), message  # that package's, not the location's
    assert calls == []  # bbcp never ran
    assert blocker.read_bytes() == b"a file, not a directory"
    assert sorted(p.name for p in root.iterdir()) == [".ccat-dt-location", "obs"]


# ---- on the target: a session's files are hashed in parallel ----

# Stands in for xxhsum on the target: notes that it runs, waits (up to 5 s) until another
# hasher runs beside it, writes how many it saw, then hashes with the real xxhsum.
_WATCHING_XXHSUM = """#!/bin/sh
log={log}
touch "$log/running.$$"
n=0
while [ "$(ls "$log" | grep -c '^running\\.')" -lt 2 ] && [ $n -lt 50 ]; do
  sleep 0.1; n=$((n+1))
done
ls "$log" | grep -c '^running\\.' > "$log/saw.$$"
{real} "$@"; rc=$?
rm -f "$log/running.$$"
exit $rc
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the target hashes one file per core")
def test_a_sessions_files_are_hashed_in_parallel_on_the_target(tmp_path: Path) -> None:
    from tests.sshd import serve

    real = shutil.which("xxhsum")
    if real is None:
        pytest.skip("xxhsum is not installed")
    bin_dir, log = tmp_path / "bin", tmp_path / "hashers"
    bin_dir.mkdir()
    log.mkdir()
    fake = bin_dir / "xxhsum"
    fake.write_text(_WATCHING_XXHSUM.format(log=log, real=real))
    fake.chmod(0o755)
    path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    with serve(tmp_path / "sshd", [f"SetEnv PATH={path}"]) as server:
        items = []
        for name in ("a.tar", "b.tar", "c.tar"):
            landed = server.root / STAGING_DIR / name
            landed.parent.mkdir(exist_ok=True)
            landed.write_bytes(data := os.urandom(100_000))
            items.append((server.endpoint(landed), server.endpoint(server.root / name),
                          xxhash.xxh3_128(data).hexdigest()))
        found = remote_verify_and_rename_many(server.ssh, items, all_or_none=True)
    assert [verdict.renamed for verdict in found] == [True, True, True]
    saw = [int(p.read_text()) for p in log.glob("saw.*")]
    assert len(saw) == 3  # the watching xxhsum hashed every file
    assert max(saw) >= 2  # and two ran at the same time


# ---- the batched session with a bbcp-shaped program (bench/standin/bbcp) ----

STANDIN = REPO_ROOT / "bench" / "standin"


def _stand_in_batch(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    count: int, directory: str) -> list[tuple[Endpoint, Endpoint, str]]:
    """The bench's bbcp stand-in on PATH (no start-up wait) and `count` random packages bound
    for one marked directory on the sshd: (source, destination, checksum) each."""
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BBCP_STANDIN_STARTUP_S", "0")
    pairs = []
    for number in range(count):
        path = tmp_path / f"pkg-{number:04d}.tar"
        path.write_bytes(data := os.urandom(10_000 + number))
        pairs.append((Endpoint(PurePosixPath(path)),
                      _marked(sshd, sshd.root / directory, sshd.root / directory / path.name),
                      xxhash.xxh3_128(data).hexdigest()))
    return pairs


@pytest.mark.skipif(shutil.which("python3") is None, reason="the stand-in runs on python3")
def test_a_stand_in_bbcp_session_of_twenty_files_takes_one_ssh_session(
        sshd: SshServer, tmp_path: Path, ssh_commands: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """BbcpTransport runs the bench's bbcp STAND-IN (real bbcp is not installed): a program
    that takes our argv, starts its receiver over ssh with our -T command and prints bbcp's
    messages. Our own ssh commands for the session of twenty: one, beside bbcp."""
    pairs = _stand_in_batch(sshd, tmp_path, monkeypatch, 20, "standin")
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")
    results = _all_copied(transport.copy_many(pairs))
    assert len(ssh_commands) == 1, ssh_commands
    assert "mkdir -p" in ssh_commands[0] and "xxhsum -H2" in ssh_commands[0]
    assert [r.checksum for r in results] == [checksum for _, _, checksum in pairs]
    for source, destination, _ in pairs:
        assert Path(destination.path).read_bytes() == Path(source.path).read_bytes()
    assert not list((sshd.root / "standin").glob(f"{STAGING_DIR}*"))
    assert "20 files copied" in Path(results[0].log_path or "").read_text()


@pytest.mark.skipif(shutil.which("python3") is None, reason="the stand-in runs on python3")
def test_a_session_never_renames_over_a_file_that_took_a_final_name_meanwhile(
        sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file appears at one final name while the batch travels: that package comes back as
    Occupied (a person's to look at), its verified bytes wait where they landed, the file is
    untouched, and the rest of the batch is renamed into place."""
    pairs = _stand_in_batch(sshd, tmp_path, monkeypatch, 3, "taken")
    taken = sshd.root / "taken" / "pkg-0001.tar"
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")
    real_bbcp = transport._bbcp

    def bbcp_then_a_file_appears(*args: Any) -> Path:
        log = real_bbcp(*args)
        taken.write_bytes(b"written by someone else meanwhile")
        return log

    monkeypatch.setattr(transport, "_bbcp", bbcp_then_a_file_appears)
    results = transport.copy_many(pairs)
    assert isinstance(results[1], Occupied) and not results[1].retryable
    assert taken.read_bytes() == b"written by someone else meanwhile"
    [waiting] = (sshd.root / "taken").glob(f"{STAGING_DIR}.*/pkg-0001.tar")
    assert str(waiting) in str(results[1])  # where the verified bytes wait, as it says
    assert waiting.read_bytes() == \
        (tmp_path / "pkg-0001.tar").read_bytes()
    for index in (0, 2):
        result, (source, destination, checksum) = results[index], pairs[index]
        assert isinstance(result, TransferResult) and result.checksum == checksum
        assert Path(destination.path).read_bytes() == Path(source.path).read_bytes()


def test_a_session_lost_during_the_transfer_is_replaced_by_one_ssh_command(
        sshd: SshServer, package, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link drops while bbcp runs and takes the session with it: the landed file is still
    hashed where it lies and renamed only on a match, by a command of its own."""
    from ccat_dt.transports import remote

    source, data, checksum = package
    final = sshd.root / "lost-session" / "pkg-0001.tar"
    started: list[subprocess.Popen[bytes]] = []
    real_spawn = remote.spawn

    def spawn(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        process = real_spawn(argv, **kwargs)  # type: ignore[arg-type]
        if argv[0] == "ssh":
            started.append(process)
        return process

    monkeypatch.setattr(remote, "spawn", spawn)
    copy_bytes = fake_runner("success-single", {str(source.path): data}, [])

    def cut_session(argv: list[str], pass_fds: Sequence[int] = (), **kwargs: object
                    ) -> CompletedRun:
        [session] = started
        os.killpg(session.pid, 9)
        session.wait()
        return copy_bytes(argv, pass_fds, **kwargs)  # type: ignore[arg-type]

    transport = BbcpTransport(BbcpOptions(), sshd.ssh, sshd.root.parent / "logs",
                              runner=cut_session)
    result = transport.copy(source, _marked(sshd, sshd.root / "lost-session", final), checksum)
    assert final.read_bytes() == data and result.checksum == checksum
    assert len(started) == 2  # the session, then the verify-and-rename command
    assert not Path(temporary_name(PurePosixPath(final))).exists()
