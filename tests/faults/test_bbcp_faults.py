"""Real bbcp failing as it does in the field, against the test sshd: its own TCP data streams
cut while ssh stays up, an end frozen (nothing moves, nothing ends), the source changing size
while it is sent, one file of a batched session missing, the target disk filling up. Each
attempt must fail with the right classification (transient heals by itself, permanent names
the cause), leave nothing under a final name, no temporary file where the next attempt cannot
use it, and no bbcp running."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
import xxhash
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.health import location_failure
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType, OperationStatus, OperationType, RawDataPackage
from ccat_dt.report import disagreements
from ccat_dt.transports.base import (
    SOURCE_MISSING,
    SOURCE_UNREADABLE,
    Endpoint,
    TransferError,
    TransferResult,
    temporary_name,
)
from ccat_dt.transports.bbcp import STAGING_DIR, BbcpOptions, BbcpTransport
from ccat_dt.transports.factory import ssh_settings
from tests.faults.invariants import assert_safe
from tests.faults.moments import size_of, when
from tests.faults.pipeline import (
    after_each_bbcp_start,
    archived_everywhere,
    observe,
    operations,
    package_names,
    run,
)
from tests.faults.storage_truth import lost_filed_files
from tests.services import free_port
from tests.sshd import SshServer, serve
from tests.sshd import sshd as sshd_fixture  # noqa: F401 - registers the "sshd" fixture
from tests.test_multisite import multisite

pytestmark = pytest.mark.skipif(
    shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged for Debian); "
    "tests/test_bbcp.py replays captured output of real bbcp failures")

MiB = 2**20
MB = 1_000_000
MARKER = ".ccat-dt-location"


def _marked(sshd: SshServer, root: Path, final: Path) -> Endpoint:
    """`final` as a file of a location whose root `root` carries the marker."""
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("marker\n")
    return Endpoint(PurePosixPath(final), sshd.destination, marker=PurePosixPath(root / MARKER))


def _package(directory: Path, name: str, size: int) -> tuple[Endpoint, bytes, str]:
    data = os.urandom(size)
    path = directory / name
    path.write_bytes(data)
    return Endpoint(PurePosixPath(path)), data, xxhash.xxh3_128(data).hexdigest()


def _holders(paths: list[Path]) -> list[str]:
    """Processes that have one of `paths` open or name one on their command line."""
    wanted = {str(p) for p in paths}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            opened = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if int(proc.name) != os.getpid() and (wanted & opened
                                              or any(w in cmdline for w in wanted)):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def _nothing_running(paths: list[Path], within_s: float = 10.0) -> None:
    """No bbcp/ssh of the attempt is left (bbcp's stragglers may take a few seconds)."""
    deadline = time.monotonic() + within_s
    while (left := _holders(paths)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], left


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".part")]


def _freeze_bbcp(holding: Callable[[str], bool]) -> list[int]:
    """SIGSTOP every bbcp process that has a file open `holding` accepts: an end that froze,
    as behind a link gone silent (its connections stay up, no reset, no end, no word)."""
    return _signal_bbcp(signal.SIGSTOP, holding)


def _signal_bbcp(signum: signal.Signals, holding: Callable[[str], bool]) -> list[int]:
    """Send `signum` to every bbcp process that has a file open `holding` accepts."""
    signalled = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() != "bbcp":
                continue
            opened = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(map(holding, opened)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signum)
                signalled.append(int(proc.name))
    return signalled


@pytest.fixture
def ss_kill() -> Iterator[None]:
    """`ss -K` needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed: cannot reset bbcp's data streams")
    probe = subprocess.run(["ss", "-K", "-tn", "dport = :1"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"ss -K is not permitted here: {probe.stderr.strip()}")
    yield


def test_bbcps_data_streams_cut_while_ssh_stays_up_is_transient_and_resumed(
        sshd: SshServer, tmp_path: Path, ss_kill: None) -> None:
    """The data link (bbcp's own TCP streams, not ssh) is reset mid-transfer: bbcp exits 128
    with 'Connection reset by peer reading data'. That is the link, not the destination: the
    attempt fails retryable, keeps what landed, and the next attempt appends to it."""
    source, data, checksum = _package(tmp_path, "pkg-cut.tar", 64 * MiB)
    root = sshd.root / tmp_path.name
    final = root / "obs" / "pkg-cut.tar"
    destination = _marked(sshd, root, final)
    landing = Path(temporary_name(PurePosixPath(final)))
    port = free_port()
    slow = BbcpTransport(BbcpOptions(rate_limit="8M", port_range=f"{port}:{port}"), sshd.ssh,
                         tmp_path / "logs")
    reset: list[str] = []

    def reset_the_data_streams() -> None:
        done = subprocess.run(["ss", "-K", "-tn", f"( sport = :{port} or dport = :{port} )"],
                              capture_output=True, text=True, check=False)
        reset.append(done.stdout)

    watcher = when(lambda: size_of(landing) > 4 * MiB, reset_the_data_streams)
    with pytest.raises(TransferError) as caught:
        slow.copy(source, destination, checksum)
    watcher.join()
    assert reset and f":{port}" in reset[0], reset
    assert caught.value.retryable, caught.value
    assert not final.exists()
    kept = size_of(landing)
    assert 0 < kept < len(data), kept  # what landed is kept for -a
    _nothing_running([Path(str(source.path)), landing])

    result = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs").copy(
        source, destination, checksum)
    assert final.read_bytes() == data and result.checksum == checksum
    assert _temporaries(root) == []
    log = Path(result.log_path or "").read_text()
    assert "Appending to" in log and "at offset 0" not in log.split("Appending to", 1)[1]
    _nothing_running([Path(str(source.path)), landing])


def test_a_transfer_that_moves_no_bytes_is_stopped_after_the_stall_time_and_resumed(
        sshd: SshServer, tmp_path: Path) -> None:
    """The sending bbcp freezes mid-transfer: bbcp's data streams have no idle timeout, the
    receiving end goes on printing progress lines of 0.0 B/s, and the attempt would wait for
    the runner's 48 h. It is stopped after the stall time (4 s here), retryable, what landed
    kept; the next attempt appends to it."""
    source, data, checksum = _package(tmp_path, "pkg-stall.tar", 64 * MiB)
    root = sshd.root / tmp_path.name
    final = root / "obs" / "pkg-stall.tar"
    destination = _marked(sshd, root, final)
    landing = Path(temporary_name(PurePosixPath(final)))
    options = BbcpOptions(rate_limit="8M", progress_interval_s=1, stall_timeout_s=4)
    frozen: list[int] = []
    watcher = when(lambda: size_of(landing) > 4 * MiB,
                    lambda: frozen.extend(_freeze_bbcp(lambda f: f == str(source.path))))
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        BbcpTransport(options, sshd.ssh, tmp_path / "logs").copy(source, destination, checksum)
    watcher.join()
    assert frozen and time.monotonic() - started < 30
    assert caught.value.retryable, caught.value
    assert "no bytes moved for 4 s: the link stalled" in str(caught.value), caught.value
    kept = size_of(landing)
    assert 0 < kept < len(data), kept
    _nothing_running([Path(str(source.path)), landing])  # the frozen ones went with the group

    result = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs").copy(
        source, destination, checksum)
    assert final.read_bytes() == data and result.checksum == checksum
    assert _temporaries(root) == []
    assert f"at offset {kept}" in Path(result.log_path or "").read_text()


@pytest.mark.parametrize("change", ["truncated", "grown", "shrunk"])
def test_a_source_that_changes_size_while_sent_is_the_sources_fault_not_the_destinations(
        sshd: SshServer, tmp_path: Path, change: str) -> None:
    """The package file changes size while bbcp reads it (bbcp exits 128, 'Error -N writing
    SOURCE'; shrunk to a buffer boundary below what bbcp had read, 'No data available writing
    SOURCE'). That says nothing about the destination: it must not be reported as a failure of
    the location (marked unhealthy, nobody re-hashing the source) with a permanent 'bbcp
    failed (exit 128)'. It is the source's (SOURCE_UNREADABLE, retried: the next attempt's
    checksum settles whether the source is bad), and the useless partial is removed."""
    source, data, checksum = _package(tmp_path, "pkg-src.tar", 32 * MiB)
    path = Path(str(source.path))
    root = sshd.root / tmp_path.name
    final = root / "obs" / "pkg-src.tar"
    destination = _marked(sshd, root, final)
    landing = Path(temporary_name(PurePosixPath(final)))

    def change_the_source() -> None:
        if change == "grown":
            with path.open("ab") as grown:
                grown.write(os.urandom(4 * MiB))
        else:
            os.truncate(path, 8 * MiB)

    landed = 10 * MiB if change == "shrunk" else 2 * MiB  # shrunk: below what bbcp read
    watcher = when(lambda: size_of(landing) > landed, change_the_source)
    with pytest.raises(TransferError) as caught:
        BbcpTransport(BbcpOptions(rate_limit="8M"), sshd.ssh, tmp_path / "logs").copy(
            source, destination, checksum)
    watcher.join()
    message = str(caught.value)
    assert SOURCE_UNREADABLE in message and str(path) in message, message
    assert caught.value.retryable, message
    assert not location_failure(caught.value), message  # the destination stays healthy
    assert not final.exists() and _temporaries(root) == []
    _nothing_running([path, landing])


def test_a_batch_whose_one_source_is_missing_fails_only_that_package(
        sshd: SshServer, tmp_path: Path) -> None:
    """Two packages in one bbcp session; one's source file is gone. bbcp refuses the whole
    session (exit 2, 'No such file or directory processing B'), but only B's failure is
    permanent: A's source is fine, and failing A permanently with B's cause stops A until a
    person retries it (and `why` names a file that is not A's). A's attempt is transient, and
    A alone then goes through."""
    a, a_data, a_sum = _package(tmp_path, "pkg-a.tar", 2 * MiB)
    b, _, b_sum = _package(tmp_path, "pkg-b.tar", 2 * MiB)
    root = sshd.root / tmp_path.name
    final_a, final_b = root / "obs" / "pkg-a.tar", root / "obs" / "pkg-b.tar"
    destination_a = _marked(sshd, root, final_a)
    destination_b = Endpoint(PurePosixPath(final_b), sshd.destination,
                             marker=destination_a.marker)
    Path(str(b.path)).unlink()
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")

    outcomes = transport.copy_many([(a, destination_a, a_sum), (b, destination_b, b_sum)])

    outcome_a, outcome_b = outcomes
    assert isinstance(outcome_b, TransferError) and not outcome_b.retryable
    assert SOURCE_MISSING in str(outcome_b) and str(b.path) in str(outcome_b)
    assert isinstance(outcome_a, TransferResult) or (
        isinstance(outcome_a, TransferError) and outcome_a.retryable
        and SOURCE_MISSING not in str(outcome_a) and not location_failure(outcome_a)), outcome_a
    assert not final_b.exists()
    if isinstance(outcome_a, TransferError):
        assert not final_a.exists()
        assert transport.copy(a, destination_a, a_sum).checksum == a_sum
    assert final_a.read_bytes() == a_data
    assert _temporaries(root) == []
    assert not any((root / "obs" / STAGING_DIR).glob("*"))
    _nothing_running([Path(str(a.path)), Path(str(b.path))])


def _staged(directory: Path, name: str) -> list[Path]:
    """`name` as landed by batched sessions in `directory`'s staging directories."""
    return list(directory.glob(f"{STAGING_DIR}*/{name}"))


@pytest.mark.parametrize("fault", ["none", "source missing", "other bytes", "receiver killed",
                                   "sender killed"])
def test_a_batch_leaves_nothing_but_archived_packages_in_the_packages_directory(
        sshd: SshServer, tmp_path: Path, fault: str) -> None:
    """An archive's directories hold archived packages and nothing else, whatever becomes of a
    batched session: it succeeds, one of its sources is missing, one file lands with other
    bytes than expected, the receiving or the sending bbcp is killed (SIGKILL) mid-transfer.
    Nothing of it is left beside the packages (before: an empty `.bbcp-incoming` after every
    batch, and in it the partial of a cut session or the verified files of one that failed
    verification, which no later attempt takes up: the pipeline sends each package of a failed
    batch on its own). A retryable fault stays retryable, and the next attempt (each package
    on its own, as the pipeline's retry sends it) archives what is left."""
    a, a_data, a_sum = _package(tmp_path, "pkg-a.tar", 24 * MiB)
    b, b_data, b_sum = _package(tmp_path, "pkg-b.tar", 2 * MiB)
    root = sshd.root / tmp_path.name
    obs = root / "obs"
    destination_a = _marked(sshd, root, obs / "pkg-a.tar")
    destination_b = Endpoint(PurePosixPath(obs / "pkg-b.tar"), sshd.destination,
                             marker=destination_a.marker)
    if fault == "source missing":
        Path(str(b.path)).unlink()
    expected_b = xxhash.xxh3_128(b"other bytes").hexdigest() if fault == "other bytes" else b_sum
    killed: list[int] = []
    watcher = None
    if fault.endswith("killed"):
        def holding(opened: str) -> bool:
            return (opened.startswith(f"{obs}/") if fault == "receiver killed"
                    else opened == str(a.path))

        watcher = when(lambda: any(size_of(p) > 4 * MiB for p in _staged(obs, "pkg-a.tar")),
                       lambda: killed.extend(_signal_bbcp(signal.SIGKILL, holding)))
    transport = BbcpTransport(BbcpOptions(rate_limit="8M"), sshd.ssh, tmp_path / "logs")
    try:
        outcomes = transport.copy_many([(a, destination_a, a_sum), (b, destination_b,
                                                                     expected_b)])
    except TransferError as failed:  # the session as a whole
        outcomes = [failed, failed]
    if watcher is not None:
        watcher.join()
        assert killed
    _nothing_running([Path(str(a.path)), obs])

    done = [o for o in outcomes if isinstance(o, TransferResult)]
    assert len(done) == (2 if fault == "none" else 0), outcomes
    assert sorted(p.name for p in obs.iterdir()) == (
        ["pkg-a.tar", "pkg-b.tar"] if fault == "none" else []), list(obs.iterdir())
    if fault != "none":
        outcome_a = outcomes[0]
        assert isinstance(outcome_a, TransferError) and outcome_a.retryable, outcome_a
        for source, destination, checksum in ((a, destination_a, a_sum),
                                              (b, destination_b, b_sum)):
            if Path(str(source.path)).exists():  # the next attempt, one by one
                transport.copy(source, destination, checksum)
    assert (obs / "pkg-a.tar").read_bytes() == a_data
    archived = ["pkg-a.tar"] + ([] if fault == "source missing" else ["pkg-b.tar"])
    assert sorted(p.name for p in obs.iterdir()) == archived
    if fault != "source missing":
        assert (obs / "pkg-b.tar").read_bytes() == b_data


@pytest.mark.parametrize("next_attempt", ["alone", "in a batch"])
def test_what_a_batch_cut_off_from_its_destination_left_is_removed_by_the_next_attempt(
        sshd: SshServer, tmp_path: Path, next_attempt: str) -> None:
    """A batched session cut together with its link leaves its partial file in its staging
    directory: nothing could reach the destination to remove it. The next attempt of that
    package (on its own, as the pipeline's retry sends it, or in another batch) removes it
    and that staging directory once empty, also one an older version's shared
    `.bbcp-incoming` holds; and nothing else: another package's landed file (its transfer
    may be in flight) stays where it is."""
    a, a_data, a_sum = _package(tmp_path, "pkg-a.tar", 4 * MiB)
    c, c_data, c_sum = _package(tmp_path, "pkg-c.tar", 1 * MiB)
    root = sshd.root / tmp_path.name
    obs = root / "obs"
    destination_a = _marked(sshd, root, obs / "pkg-a.tar")
    destination_c = Endpoint(PurePosixPath(obs / "pkg-c.tar"), sshd.destination,
                             marker=destination_a.marker)
    # what the storage holds after such cuts (the names are the landing's, any suffix)
    cut = obs / f"{STAGING_DIR}.0123456789abcdef" / "pkg-a.tar"
    older = obs / STAGING_DIR / "pkg-a.tar"
    others = obs / f"{STAGING_DIR}.fedcba9876543210" / "pkg-z.tar"
    for path, data in ((cut, a_data[:MiB]), (older, a_data[:2 * MiB]), (others, b"z" * 100)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")

    if next_attempt == "alone":
        transport.copy(a, destination_a, a_sum)
    else:
        outcomes = transport.copy_many([(a, destination_a, a_sum), (c, destination_c, c_sum)])
        assert all(isinstance(o, TransferResult) for o in outcomes), outcomes
        assert (obs / "pkg-c.tar").read_bytes() == c_data

    assert (obs / "pkg-a.tar").read_bytes() == a_data
    assert others.read_bytes() == b"z" * 100  # not this attempt's, nor provably abandoned
    assert sorted(p.name for p in obs.iterdir()) == sorted(
        [others.parent.name, "pkg-a.tar"] + (["pkg-c.tar"] if next_attempt != "alone" else []))
    _nothing_running([Path(str(a.path)), obs])


@pytest.mark.parametrize("host", ["remote", "local"])
def test_a_cut_single_copys_partial_is_removed_once_a_batch_verified_its_package(
        sshd: SshServer, tmp_path: Path, host: str) -> None:
    """A single copy cut in the middle keeps its `.NAME.part` beside the final name for -a to
    resume. When the package's next attempt is a batch instead (several packages in one
    session, landing in `.bbcp-incoming.HASH`), that partial is not used; once the batch has
    verified and renamed the package it is removed, so no stale partial stays at the
    destination. Before, it stayed for ever (the audit reported it as a temporary file to
    remove by hand on the archive host)."""
    a, a_data, a_sum = _package(tmp_path, "pkg-a.tar", 2 * MiB)
    c, c_data, c_sum = _package(tmp_path, "pkg-c.tar", 1 * MiB)
    root = (sshd.root if host == "remote" else tmp_path / "local") / tmp_path.name
    obs = root / "obs"
    destination_a = _marked(sshd, root, obs / "pkg-a.tar")
    destination_c = Endpoint(PurePosixPath(obs / "pkg-c.tar"), destination_a.host,
                             marker=destination_a.marker)
    if host == "local":
        destination_a = Endpoint(destination_a.path, None, marker=destination_a.marker)
        destination_c = Endpoint(destination_c.path, None, marker=destination_c.marker)
    obs.mkdir(parents=True)
    cut = obs / ".pkg-a.tar.part"  # what the cut single copy left, to resume
    cut.write_bytes(a_data[:MiB])
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")

    outcomes = transport.copy_many([(a, destination_a, a_sum), (c, destination_c, c_sum)])

    assert all(isinstance(o, TransferResult) for o in outcomes), outcomes
    assert (obs / "pkg-a.tar").read_bytes() == a_data
    assert (obs / "pkg-c.tar").read_bytes() == c_data
    assert sorted(p.name for p in obs.iterdir()) == ["pkg-a.tar", "pkg-c.tar"]
    _nothing_running([Path(str(a.path)), obs])


def test_two_batches_into_one_directory_at_once_leave_each_others_files_alone(
        sshd: SshServer, tmp_path: Path) -> None:
    """Two batched sessions into one package directory at once (two runs of one observation,
    each with its companions): the second fails (one of its sources is missing) and clears up
    after itself while the first one's bytes are in flight. The first is left alone and
    archives its packages; nothing else is left in the directory."""
    x1, x1_data, x1_sum = _package(tmp_path, "pkg-x1.tar", 32 * MiB)
    x2, x2_data, x2_sum = _package(tmp_path, "pkg-x2.tar", 2 * MiB)
    y1, _, y1_sum = _package(tmp_path, "pkg-y1.tar", 1 * MiB)
    y2, _, y2_sum = _package(tmp_path, "pkg-y2.tar", 1 * MiB)
    Path(str(y2.path)).unlink()
    root = sshd.root / tmp_path.name
    obs = root / "obs"
    marked = _marked(sshd, root, obs / "pkg-x1.tar")

    def to(source: Endpoint, checksum: str) -> tuple[Endpoint, Endpoint, str]:
        return source, Endpoint(PurePosixPath(obs / source.path.name), sshd.destination,
                                marker=marked.marker), checksum

    first: list[TransferResult | TransferError] = []
    sending = threading.Thread(target=lambda: first.extend(BbcpTransport(
        BbcpOptions(rate_limit="8M"), sshd.ssh, tmp_path / "logs-x").copy_many(
            [to(x1, x1_sum), to(x2, x2_sum)])))
    sending.start()
    deadline = time.monotonic() + 30
    while not any(size_of(p) > 2 * MiB for p in _staged(obs, "pkg-x1.tar")):
        assert time.monotonic() < deadline and sending.is_alive()
        time.sleep(0.01)
    second = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs-y").copy_many(
        [to(y1, y1_sum), to(y2, y2_sum)])
    assert any(size_of(p) > 2 * MiB for p in _staged(obs, "pkg-x1.tar"))  # still in flight
    sending.join()

    assert all(isinstance(o, TransferError) for o in second), second
    assert all(isinstance(o, TransferResult) for o in first), first
    assert (obs / "pkg-x1.tar").read_bytes() == x1_data
    assert (obs / "pkg-x2.tar").read_bytes() == x2_data
    assert sorted(p.name for p in obs.iterdir()) == ["pkg-x1.tar", "pkg-x2.tar"]
    _nothing_running([obs])


def test_the_target_disk_filling_up_mid_transfer_is_permanent_and_leaves_nothing(
        sshd: SshServer, tmp_path: Path) -> None:
    """The destination file system fills while bbcp writes (bbcp's own free-space check
    passed at the start): exit 228, 'No space left on device writing'. Permanent (a person
    frees space), named as a full disk, and the useless partial is removed."""
    source, _, checksum = _package(tmp_path, "pkg-full.tar", 24 * MiB)
    root = sshd.root / tmp_path.name
    root.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(root)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        final = root / "obs" / "pkg-full.tar"
        destination = _marked(sshd, root, final)  # the marker on the mounted file system
        landing = Path(temporary_name(PurePosixPath(final)))

        def fill_the_disk() -> None:
            with contextlib.suppress(OSError):
                (root / "filler").write_bytes(b"\0" * 30 * MiB)

        watcher = when(lambda: size_of(landing) > 2 * MiB, fill_the_disk)
        with pytest.raises(TransferError) as caught:
            BbcpTransport(BbcpOptions(rate_limit="8M"), sshd.ssh, tmp_path / "logs").copy(
                source, destination, checksum)
        watcher.join()
        assert not caught.value.retryable and "disk full" in str(caught.value), caught.value
        assert not final.exists() and _temporaries(root) == []
        _nothing_running([Path(str(source.path)), landing])
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture(params=["SIGXFSZ", "EFBIG"])
def size_limited_target(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> Iterator[tuple[SshServer, Path]]:
    """An sshd whose sessions run with a file-size limit (`prlimit --fsize`, bytes, read from
    the returned file at each login; "unlimited" lifts it), as an `fsize` line in limits.conf
    gives a login: a bbcp target there writing past it is killed by SIGXFSZ; with that signal
    ignored ("EFBIG"; as a file system's own largest file) its write fails with EFBIG."""
    if shutil.which("prlimit") is None:
        pytest.skip("util-linux's prlimit is not installed")
    limit = tmp_path / "fsize"
    limit.write_text("unlimited\n")
    ignore = "trap '' XFSZ; " if request.param == "EFBIG" else ""
    force = (f'ForceCommand {ignore}exec prlimit --fsize="$(cat {limit})" -- '
             '"${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"')
    with serve(tmp_path / "sshd", [force]) as server:
        yield server, limit


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_a_target_that_takes_no_file_this_big_is_told_so_not_retried_and_left_clean(
        size_limited_target: tuple[SshServer, Path], tmp_path: Path, batch: bool) -> None:
    """The target host lets bbcp's user write files of 64 KiB at most; the package is 200 KB.
    Real bbcp says "Copy process N was killed via signal 25" (SIGXFSZ, exit 255), or with the
    signal ignored "File too large writing LANDING" (exit 229). Either is TOO_LARGE, as for
    local and rsync copies: not retried within the run, not resumed (appending can never
    complete it), not the location's failure (smaller files still go there), the partial file
    removed and nothing under the final name. Once the limit is lifted the copy goes through.
    Before: the signal was taken for a cut link (retried, the 64 KiB partial kept to append
    to, killed again at once); EFBIG a plain "bbcp failed (exit 229)"."""
    sshd, limit = size_limited_target
    limit.write_text(f"{64 * 1024}\n")
    root = sshd.root / "lta"
    sources = [_package(tmp_path, name, 200_000) for name in ("pkg-a.tar", "pkg-b.tar")]
    sources = sources[:2 if batch else 1]
    pairs = [(source, _marked(sshd, root, root / "obs" / PurePosixPath(source.path).name),
              checksum) for source, _, checksum in sources]
    transport = BbcpTransport(BbcpOptions(), sshd.ssh, tmp_path / "logs")
    with pytest.raises(TransferError) as caught:
        if batch:
            transport.copy_many(pairs)
        else:
            transport.copy(*pairs[0])
    message = str(caught.value)
    assert not caught.value.retryable and "File too large" in message, message
    assert "takes no file this big" in message, message
    assert not location_failure(caught.value), message
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == [MARKER, "obs"], left  # no partial, no staging directory, no final name
    _nothing_running([Path(str(source.path)) for source, _, _ in sources])

    limit.write_text("unlimited\n")  # a person lifts the limit
    if batch:
        assert all(isinstance(r, TransferResult) for r in transport.copy_many(pairs))
    else:
        transport.copy(*pairs[0])
    for _, data, _ in sources:
        [landed] = [p for p in (root / "obs").iterdir() if p.read_bytes() == data]
        assert not landed.name.startswith(".")
    assert len(list((root / "obs").iterdir())) == len(sources)


def test_a_pipeline_transfer_whose_bbcp_data_streams_are_cut_heals_without_a_person(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, ss_kill: None) -> None:
    """The whole pipeline, real bbcp slowed to 8 MB/s: 1.5 s into the first transfer its data
    streams are reset (ssh stays up). The attempt fails retryable; the step's own retry
    appends to what landed, the package ends archived at both sites, no `ccat-dt retry`."""
    port = free_port()
    config = multisite(tmp_path, sshd, "bbcp",
                       bbcp={"rate_limit": "8M", "port_range": f"{port}:{port}"})
    opsdb = OpsDB(config.opsdb_url)
    cut = threading.Event()

    def reset_once() -> None:
        if not cut.is_set():
            cut.set()
            subprocess.run(["ss", "-K", "-tn", f"( sport = :{port} or dport = :{port} )"],
                           capture_output=True, check=False)

    after_each_bbcp_start(monkeypatch, 1.5, reset_once)
    try:
        observe(config, opsdb, files=3, size=10 * MB)

        report = run(config, instance, in_process=True)  # the reset is timed from this process

        assert cut.is_set()
        assert report.failed == []  # the step's own retry got through
        [package] = package_names(opsdb)
        transfers = operations(opsdb, OperationType.TRANSFER, package)
        assert transfers[0][0] == OperationStatus.FAILED
        assert "data link lost" in (transfers[0][1] or ""), transfers[0]
        assert [s for s, _ in transfers[1:]] == [OperationStatus.COMPLETED] * 2
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)  # the "remote" roots are on this machine: read directly
        assert disagreements(opsdb, ssh_settings(config)) == []
        assert lost_filed_files(config, opsdb) == []
        _nothing_running([sshd.root / tmp_path.name])
    finally:
        opsdb.dispose()


def test_a_pipeline_transfer_whose_far_end_freezes_is_stopped_and_heals_without_a_person(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline, real bbcp at 8 MB/s: 1.5 s into the first transfer the receiving
    bbcp freezes (connections up, nothing written, nothing said: a stalled router, a frozen
    peer). The attempt is stopped after the stall time (4 s) instead of the runner's 48 h,
    retryable; the far end wakes once it was stopped (its connections are gone, it ends);
    the step's own retry resumes, and the package is archived at both sites, intact."""
    config = multisite(tmp_path, sshd, "bbcp", bbcp={"rate_limit": "8M",
                                                     "progress_interval_s": 1,
                                                     "stall_timeout_s": 4})
    opsdb = OpsDB(config.opsdb_url)
    sites = sshd.root / tmp_path.name
    frozen: list[int] = []

    def freeze_the_receiver_once() -> None:
        if not frozen:
            frozen.extend(_freeze_bbcp(
                lambda f: f.startswith(f"{sites}/") and f.endswith(".part")))

    def wake() -> None:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    after_each_bbcp_start(monkeypatch, 1.5, freeze_the_receiver_once, ended=wake)
    try:
        observe(config, opsdb, files=3, size=10 * MB)

        report = run(config, instance, in_process=True)  # the freeze is timed from this process

        assert frozen
        assert report.failed == []  # the step's own retry got through
        [package] = package_names(opsdb)
        transfers = operations(opsdb, OperationType.TRANSFER, package)
        assert transfers[0][0] == OperationStatus.FAILED
        assert "no bytes moved for 4 s: the link stalled" in (transfers[0][1] or ""), transfers
        assert [s for s, _ in transfers[1:]] == [OperationStatus.COMPLETED] * 2
        archived_everywhere(config, opsdb)
        with opsdb.session() as session:  # read the storage itself
            archived = session.scalars(select(RawDataPackage)).one()
            copies = [(Path(c.location.root) / c.relative_path, archived.checksum)
                      for c in archived.copies
                      if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
        assert len(copies) == 2
        for path, checksum in copies:
            assert xxhash.xxh3_128(path.read_bytes()).hexdigest() == checksum, path
        assert _temporaries(sites) == []
        assert_safe(config, opsdb)
        assert disagreements(opsdb, ssh_settings(config)) == []
        assert lost_filed_files(config, opsdb) == []
        _nothing_running([sites])
    finally:
        wake()
        opsdb.dispose()
