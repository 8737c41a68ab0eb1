"""rsync and ssh against a real sshd on 127.0.0.1: files arrive verified under their final
name, hostile names stay names, interrupted transfers resume, corruption and broken links are
reported with the right `retryable`, and a batch travels in one session."""

from __future__ import annotations

import os
import pwd
import re
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest
import xxhash

from ccat_dt.health import location_failure
from ccat_dt.transports.base import (
    Endpoint,
    Identity,
    Occupied,
    TransferError,
    TransferResult,
    temporary_name,
)
from ccat_dt.transports.remote import (
    NEW_FILE_MODE,
    CompletedRun,
    _check_xxhsum,
    classify_ssh,
    parse_xxhsum,
    remote_command,
    remote_mkdir,
    remote_remove,
    remote_size,
    remote_verify_and_rename,
    remote_verify_and_rename_many,
    remote_xxh128,
    run,
)
from ccat_dt.transports.rsync import RsyncTransport, classify_rsync
from tests.services import free_port
from tests.sshd import SshServer
from tests.sshd import sshd as sshd_fixture  # noqa: F401 - registers the "sshd" fixture

MIB = 1 << 20
OTHER_HOST = "localhost"  # the same sshd under a second name: a "different" remote host


def write_random(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return xxhash.xxh3_128(data).hexdigest()


def local(path: Path) -> Endpoint:
    return Endpoint(PurePosixPath(path))


def at(server: SshServer, path: Path, host: str | None) -> Endpoint:
    """`path` (on this machine, which is also the ssh server) as seen through `host`."""
    if host is None:
        return local(path)
    return Endpoint(PurePosixPath(path), f"{server.user}@{host}")


def temp_of(path: Path) -> Path:
    return Path(temporary_name(PurePosixPath(path)))


def rsync_runs(log_path: str | None) -> list[str]:
    assert log_path is not None
    return [line for line in Path(log_path).read_text().splitlines()
            if line.startswith("[") and "] $ " in line and "rsync -s" in line]


def logged_commands(log_path: str | None) -> list[str]:
    """Every command the transfer log records, with its output up to the next entry."""
    assert log_path is not None
    return ["] $ " + entry for entry in Path(log_path).read_text().split("] $ ")[1:]]


@pytest.fixture
def transport(sshd: SshServer, tmp_path: Path) -> RsyncTransport:
    return RsyncTransport(sshd.ssh, tmp_path / "logs")


@pytest.fixture
def work(sshd: SshServer) -> Path:
    """A fresh directory inside the sshd's scratch area."""
    directory = sshd.root / uuid.uuid4().hex[:8]
    directory.mkdir()
    return directory


# -- xxhsum ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 129, 241, 100_003, 3 * MIB + 7])
def test_xxhsum_h2_equals_python_xxh3_128(sshd: SshServer, work: Path, size: int) -> None:
    path = work / f"data {size} bytes.bin"
    expected = write_random(path, size)
    gnu = subprocess.run(["xxhsum", "-H2", "--", str(path)], capture_output=True, text=True,
                         check=True).stdout
    bsd = subprocess.run(["xxhsum", "-H2", "--tag", "--", str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert gnu == f"{expected}  {path}\n"
    assert bsd == f"XXH128 ({path}) = {expected}\n"
    assert parse_xxhsum(gnu) == parse_xxhsum(bsd) == expected
    assert remote_xxh128(sshd.ssh, sshd.endpoint(path)) == expected  # over ssh
    assert remote_xxh128(sshd.ssh, local(path)) == expected  # in-process


def test_parse_xxhsum_rejects_what_is_not_one_digest() -> None:
    assert parse_xxhsum("\\" + "a" * 32 + "  we\\\\ird\n") == "a" * 32  # escaped-name GNU line
    for output in ("", "garbage\n", f"{'a' * 32}  x\n{'b' * 32}  y\n", f"{'a' * 31}  x\n"):
        with pytest.raises(TransferError):
            parse_xxhsum(output)


def test_remote_xxh128_of_missing_file_is_not_retryable(sshd: SshServer, work: Path) -> None:
    with pytest.raises(TransferError, match="No such file") as caught:
        remote_xxh128(sshd.ssh, sshd.endpoint(work / "absent"))
    assert not caught.value.retryable


# -- remote commands ------------------------------------------------------------------------


def test_remote_command_passes_every_argument_verbatim(sshd: SshServer, work: Path) -> None:
    canary = work / "canary"
    hostile = ["a b", f"; touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "'\"",
               "*", "-n", "~", "$HOME", "\\", "", "x > y", f"&& touch {canary} #"]
    done = run(remote_command(sshd.ssh, sshd.destination, ["printf", "%s|", *hostile]),
               timeout_s=20)
    assert done.rc == 0, done.stderr
    assert done.stdout == "".join(f"{argument}|" for argument in hostile)
    assert not canary.exists()


@pytest.mark.parametrize("host", ["-oProxyCommand=touch x", "", "a b", "evil\nhost", "a/b"])
def test_remote_command_rejects_hosts_that_are_not_hosts(sshd: SshServer, host: str) -> None:
    with pytest.raises(ValueError):
        remote_command(sshd.ssh, host, ["true"])


def test_transport_rejects_hosts_that_are_options(sshd: SshServer, tmp_path: Path) -> None:
    transport = RsyncTransport(sshd.ssh, tmp_path)
    for source, destination in [(Endpoint(PurePosixPath("/x"), "-oProxyCommand=id"),
                                 local(tmp_path / "y")),
                                (local(tmp_path / "x"), Endpoint(PurePosixPath("/y"), "-lroot"))]:
        with pytest.raises(ValueError):
            transport.copy(source, destination, "0" * 32)
    with pytest.raises(ValueError):
        remote_verify_and_rename(sshd.ssh, sshd.endpoint("/a"),
                                 Endpoint(PurePosixPath("/b"), "other"), "0" * 32)


def test_missing_xxhsum_names_the_package_to_install() -> None:
    for stderr in ("bash: line 1: xxhsum: command not found", "sh: 1: exec: xxhsum: not found"):
        with pytest.raises(TransferError, match="install the Debian package xxhash on h") as e:
            _check_xxhsum(CompletedRun(127, "", stderr), "h", "/x")
        assert not e.value.retryable


@pytest.mark.parametrize("path", ["/a\nb", "/a\0b", "/a\rb"])
def test_paths_with_line_breaks_or_nul_are_rejected(sshd: SshServer, tmp_path: Path,
                                                    path: str) -> None:
    with pytest.raises(ValueError):
        remote_command(sshd.ssh, sshd.destination, ["ls", path])
    with pytest.raises(ValueError):
        RsyncTransport(sshd.ssh, tmp_path).copy(local(tmp_path / "x"),
                                                sshd.endpoint(path), "0" * 32)


@pytest.mark.parametrize("remote", [True, False])
def test_file_helpers_remote_and_local(sshd: SshServer, work: Path, remote: bool) -> None:
    def where(path: Path) -> Endpoint:
        return sshd.endpoint(path) if remote else local(path)

    directory = work / "a dir" / "-sub;dir"
    remote_mkdir(sshd.ssh, where(directory))
    remote_mkdir(sshd.ssh, where(directory))  # idempotent
    source, target = directory / "-x y.tar", directory / "z.tar"
    checksum = write_random(source, 1000)
    assert remote_size(sshd.ssh, where(source)) == 1000
    assert remote_size(sshd.ssh, where(target)) is None
    remote_verify_and_rename(sshd.ssh, where(source), where(target), checksum)
    assert not source.exists() and target.stat().st_size == 1000
    remote_remove(sshd.ssh, where(target))
    remote_remove(sshd.ssh, where(target))  # nothing there: fine
    assert not target.exists()


def test_classification_tables() -> None:
    def ssh(rc: int, stderr: str) -> bool:
        return classify_ssh(rc, stderr).retryable

    assert ssh(255, "ssh: connect to host h port 22: Connection refused")
    assert ssh(255, "ssh: connect to host h port 22: Connection timed out")
    assert ssh(255, "ssh: connect to host h port 22: No route to host")
    assert ssh(255, "Connection reset by 10.0.0.1 port 22")
    assert ssh(255, "ssh: Could not resolve hostname h: Name or service not known")
    assert not ssh(255, "user@h: Permission denied (publickey).")
    assert not ssh(255, "Host key verification failed.")
    assert not ssh(1, "mv: cannot create regular file 'x': No space left on device")
    assert not ssh(1, "stat: cannot statx '/x': No such file or directory")

    def rsync(rc: int, stderr: str = "") -> bool:
        return classify_rsync(rc, stderr).retryable

    for rc in (10, 12, 20, 30, 35, 255):
        assert rsync(rc), rc
    for rc in (1, 2, 4):
        assert not rsync(rc), rc
    assert not rsync(23, 'rsync: [sender] link_stat "/x" failed: No such file or directory (2)')
    assert not rsync(24, "file has vanished: /x")
    assert not rsync(11, 'rsync: [receiver] write failed on "/x": No space left on device (28)')
    assert not rsync(255, "u@h: Permission denied (publickey).\nconnection unexpectedly closed")
    assert rsync(255, "ssh: connect to host h port 22: Connection refused\n"
                      "rsync: connection unexpectedly closed (0 bytes received so far)")
    not_installed = classify_rsync(12, "bash: line 1: rsync: command not found")
    assert not not_installed.retryable and "install" in str(not_installed)
    # the sender's read of a file given to it failed (a bad sector): that source's fault, named
    given = {"/tmp/ccat-rsync.x/.p.tar.part": Endpoint(PurePosixPath("/lta/p.tar"), "u@h")}
    for said in ('rsync: [sender] read errors mapping "/tmp/ccat-rsync.x/.p.tar.part": '
                 "Input/output error (5)",
                 'rsync: [sender] send_files failed to open "/tmp/ccat-rsync.x/.p.tar.part": '
                 "Input/output error (5)"):
        unreadable = classify_rsync(23, f"{said}\nrsync error: some files/attrs were not "
                                    "transferred (see previous errors) (code 23)", given)
        assert str(unreadable).startswith("source unreadable: /lta/p.tar on u@h: its disk "
                                          "failed the read: Input/output error "), unreadable
        assert unreadable.retryable and not location_failure(unreadable), unreadable
    # a read of a file not given to rsync (the receiver's partial, on the destination's disk)
    receiver = classify_rsync(23, 'rsync: [receiver] read errors mapping "/buffer/.p.tar.part": '
                              "Input/output error (5)", given)
    assert "source unreadable" not in str(receiver) and location_failure(receiver), receiver
    # the sender refused a file given to it for lack of permission (its mode, a directory it
    # cannot enter): that source's fault, named, not retried within the run
    for said in ('rsync: [sender] send_files failed to open "/tmp/ccat-rsync.x/.p.tar.part": '
                 "Permission denied (13)",
                 'rsync: [sender] link_stat "/tmp/ccat-rsync.x/.p.tar.part" failed: '
                 "Permission denied (13)",
                 'rsync: send_files failed to open "/tmp/ccat-rsync.x/.p.tar.part": '
                 "Operation not permitted (1)"):
        refused = classify_rsync(23, f"{said}\nrsync error: some files/attrs were not "
                                 "transferred (see previous errors) (code 23)", given)
        assert str(refused).startswith("source unreadable: /lta/p.tar on u@h: permission "
                                       "denied: make it readable by the user ccat-dt logs in "
                                       "as on u@h (rsync exited 23: "), refused
        assert not refused.retryable and not location_failure(refused), refused
    # refused a write at the destination (the receiver), or a file not given to rsync
    for said in ('rsync: [receiver] mkstemp "/buffer/.p.tar.part" failed: Permission denied '
                 "(13)", 'rsync: [sender] send_files failed to open "/elsewhere/p.tar": '
                 "Permission denied (13)"):
        other = classify_rsync(23, said, given)
        assert "source unreadable" not in str(other) and location_failure(other), other


# -- copies ---------------------------------------------------------------------------------

DIRECTIONS = {
    "local->remote": (None, "127.0.0.1"),
    "remote->local": ("127.0.0.1", None),
    "local->local": (None, None),
    "remote->same remote": ("127.0.0.1", "127.0.0.1"),
    "remote->other remote": ("127.0.0.1", OTHER_HOST),
}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_copy_lands_verified_under_final_name(sshd: SshServer, transport: RsyncTransport,
                                              work: Path, direction: str) -> None:
    source_host, destination_host = DIRECTIONS[direction]
    source = work / "outbox" / "obs_cam-a_p00.tar"
    checksum = write_random(source, 3 * MIB + 11)
    final = work / "archive" / "2024" / "obs_cam-a_p00.tar"  # directories made as needed
    result = transport.copy(at(sshd, source, source_host), at(sshd, final, destination_host),
                            checksum)
    assert isinstance(result, TransferResult)
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum == result.checksum
    assert result.bytes == 3 * MIB + 11 and result.streams == 1 and result.seconds > 0
    assert not temp_of(final).exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["obs_cam-a_p00.tar"]
    [command] = rsync_runs(result.log_path)
    if source_host and destination_host:  # rsync ran on the source host, via ssh
        assert " $ ssh " in command
        assert (f"{sshd.user}@{destination_host}:" in command) == (source_host != destination_host)


# A leading dash, a command separator, substitutions, quotes and glob characters in one name.
HOSTILE_NAME = "-rf ;touch {canary}; g[1] $(touch {canary}) `touch {canary}` q'\" *?.tar"


@pytest.mark.parametrize("direction", ["local->remote", "remote->local", "remote->other remote"])
def test_hostile_file_names_are_only_names(sshd: SshServer, transport: RsyncTransport,
                                           work: Path, direction: str) -> None:
    canary = f"ccat-canary-{uuid.uuid4().hex[:8]}"
    name = HOSTILE_NAME.format(canary=canary)
    source_host, destination_host = DIRECTIONS[direction]
    source = work / "in -e ;dir" / name
    checksum = write_random(source, 50_000)
    # Decoys a glob or a split argument would pick up instead (the checksum would then differ).
    write_random(source.with_name(name.replace("[1]", "1").replace("*", "x")
                                  .replace("?", "y")), 40_000)
    write_random(source.with_name("-rf"), 10)
    final = work / f"out dir;touch {canary};$(touch {canary})" / name
    result = transport.copy(at(sshd, source, source_host), at(sshd, final, destination_host),
                            checksum)
    assert result.checksum == checksum
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    assert [p.name for p in final.parent.iterdir()] == [name]
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    for directory in (home, Path.cwd(), work, source.parent, final.parent):
        assert not (directory / canary).exists()


def test_interrupted_transfer_resumes_from_its_partial_file(
        sshd: SshServer, work: Path, tmp_path: Path) -> None:
    size = 64 * MIB
    source = tmp_path / "big.tar"
    checksum = write_random(source, size)
    final = work / "big.tar"
    slow = RsyncTransport(sshd.ssh, tmp_path / "logs", timeout_s=3, bandwidth_limit_kbps=8192)
    with pytest.raises(TransferError, match="timed out") as caught:
        slow.copy(local(source), sshd.endpoint(final), checksum)
    assert caught.value.retryable
    assert not final.exists()
    partial = temp_of(final).stat().st_size
    assert 0 < partial < size

    result = RsyncTransport(sshd.ssh, tmp_path / "logs").copy(local(source),
                                                              sshd.endpoint(final), checksum)
    assert result.checksum == checksum and result.bytes == size
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    assert not temp_of(final).exists()
    assert result.log_path is not None
    log = Path(result.log_path).read_text()
    sent = int(re.search(r"rsync sent (\d+) of (\d+) bytes", log).group(1))  # type: ignore[union-attr]
    assert sent <= size - partial
    assert "(resumed)" in log
    # rsync wrote its partial file 0600 and a resumed rsync keeps an existing file's mode:
    # the archive file gets the mode of a file created now (0666 less the umask) all the same
    assert stat.S_IMODE(final.stat().st_mode) == NEW_FILE_MODE


def test_killed_rsync_leaves_partial_that_the_next_copy_completes(
        sshd: SshServer, work: Path, tmp_path: Path) -> None:
    """rsync killed outright (a crash, not our timeout), pulling from the remote side."""
    size = 48 * MIB
    source = work / "remote big.tar"
    checksum = write_random(source, size)
    final = tmp_path / "landed" / "big.tar"
    final.parent.mkdir()
    slow = RsyncTransport(sshd.ssh, tmp_path / "logs", bandwidth_limit_kbps=8192)
    argv = slow.command([sshd.endpoint(source)], local(temp_of(final)))
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if temp_of(final).exists() and temp_of(final).stat().st_size > 4 * MIB:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # our own process group, by its id
        process.wait()
    partial = temp_of(final).stat().st_size
    assert 0 < partial < size and not final.exists()

    result = RsyncTransport(sshd.ssh, tmp_path / "logs").copy(sshd.endpoint(source),
                                                              local(final), checksum)
    assert result.checksum == checksum and result.bytes == size
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    assert not temp_of(final).exists()
    assert result.log_path and "(resumed)" in Path(result.log_path).read_text()
    assert stat.S_IMODE(final.stat().st_mode) == NEW_FILE_MODE  # not the partial file's 0600


@pytest.mark.parametrize("direction", ["local->remote", "remote->other remote"])
def test_identity_file_in_a_directory_with_spaces(sshd: SshServer, work: Path, tmp_path: Path,
                                                  direction: str) -> None:
    """rsync splits `-e` itself; the key's path must survive that (and the nested ssh)."""
    identity = tmp_path / "my keys 'dir'" / "id key"
    identity.parent.mkdir()
    assert sshd.ssh.identity_file
    identity.write_bytes(Path(sshd.ssh.identity_file).read_bytes())
    identity.chmod(0o600)
    source_host, destination_host = DIRECTIONS[direction]
    checksum = write_random(work / "pkg.tar", 1000)
    transport = RsyncTransport(replace(sshd.ssh, identity_file=str(identity)), tmp_path / "logs")
    result = transport.copy(at(sshd, work / "pkg.tar", source_host),
                            at(sshd, work / "out" / "pkg.tar", destination_host), checksum)
    assert result.checksum == checksum


class CorruptingTransport(RsyncTransport):
    """Flips one byte of the temporary file after rsync, as a bad disk or link would."""

    def _after_rsync(self, temporary: Endpoint) -> None:
        with open(temporary.path, "r+b") as stream:
            stream.seek(1234)
            byte = stream.read(1)
            stream.seek(1234)
            stream.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("corrupt", ["wrong expected checksum", "byte flipped on arrival"])
def test_corruption_is_caught_and_nothing_is_left(sshd: SshServer, work: Path, tmp_path: Path,
                                                  corrupt: str) -> None:
    source = tmp_path / "pkg.tar"
    checksum = write_random(source, MIB)
    final = work / "pkg.tar"
    if corrupt == "wrong expected checksum":
        transport, expected = RsyncTransport(sshd.ssh, tmp_path / "logs"), "0" * 32
    else:
        transport, expected = CorruptingTransport(sshd.ssh, tmp_path / "logs"), checksum
    with pytest.raises(TransferError, match="checksum mismatch on arrival") as caught:
        transport.copy(local(source), sshd.endpoint(final), expected)
    assert caught.value.retryable
    assert "log: " in str(caught.value)
    assert not final.exists() and not temp_of(final).exists()


def test_connection_refused_is_retryable(sshd: SshServer, work: Path, tmp_path: Path) -> None:
    source = tmp_path / "pkg.tar"
    checksum = write_random(source, 1000)
    transport = RsyncTransport(replace(sshd.ssh, port=free_port()), tmp_path / "logs")
    with pytest.raises(TransferError, match="Connection refused") as caught:
        transport.copy(local(source), sshd.endpoint(work / "pkg.tar"), checksum)
    assert caught.value.retryable
    log_path = re.search(r"\[log: (.*)\]$", str(caught.value)).group(1)  # type: ignore[union-attr]
    assert "Connection refused" in Path(log_path).read_text()


def test_auth_failure_is_not_retryable(sshd: SshServer, work: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, capture_output=True)
    source = tmp_path / "pkg.tar"
    checksum = write_random(source, 1000)
    transport = RsyncTransport(replace(sshd.ssh, identity_file=str(stranger)), tmp_path / "logs")
    with pytest.raises(TransferError, match="Permission denied") as caught:
        transport.copy(local(source), sshd.endpoint(work / "pkg.tar"), checksum)
    assert not caught.value.retryable


def test_unknown_host_key_is_not_retryable(sshd: SshServer, work: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    source = tmp_path / "pkg.tar"
    checksum = write_random(source, 1000)
    transport = RsyncTransport(replace(sshd.ssh, known_hosts_file=str(empty)), tmp_path / "l")
    with pytest.raises(TransferError, match="Host key verification failed") as caught:
        transport.copy(local(source), sshd.endpoint(work / "pkg.tar"), checksum)
    assert not caught.value.retryable


@pytest.mark.parametrize("direction", ["local->remote", "remote->local", "remote->other remote"])
def test_missing_source_is_not_retryable(sshd: SshServer, transport: RsyncTransport,
                                         work: Path, direction: str) -> None:
    source_host, destination_host = DIRECTIONS[direction]
    final = work / "out" / "pkg.tar"
    with pytest.raises(TransferError, match="No such file") as caught:
        transport.copy(at(sshd, work / "absent.tar", source_host),
                       at(sshd, final, destination_host), "0" * 32)
    assert not caught.value.retryable
    assert not final.exists() and not temp_of(final).exists()


# -- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["local->remote", "remote->other remote"])
def test_copy_many_is_one_rsync_session_and_one_verification_round_trip(
        sshd: SshServer, transport: RsyncTransport, work: Path, direction: str) -> None:
    """Issue 17: a batch of small packages over a long link costs a handshake per command;
    before, each file was verified and renamed by an ssh command of its own."""
    source_host, destination_host = DIRECTIONS[direction]
    names = ["a.tar", "b c.tar", "-d;e.tar"]
    checksums = [write_random(work / "src" / name, 200_000 + i) for i, name in enumerate(names)]
    pairs = [(at(sshd, work / "src" / name, source_host),
              at(sshd, work / "dst" / name, destination_host), checksum)
             for name, checksum in zip(names, checksums, strict=True)]
    results = transport.copy_many(pairs)
    assert all(isinstance(result, TransferResult) for result in results), results
    assert [r.checksum for r in results if isinstance(r, TransferResult)] == checksums
    assert sorted(p.name for p in (work / "dst").iterdir()) == sorted(names)
    log_paths = {r.log_path for r in results if isinstance(r, TransferResult)}
    assert len(log_paths) == 1
    [log_path] = log_paths
    [command] = rsync_runs(log_path)  # one rsync invocation carried all three
    for name in names:
        assert f".{name}.part" in command
    [verification] = [entry for entry in logged_commands(log_path) if "xxhsum" in entry]
    for name in names:  # one command hashed all three where they landed, and renamed them
        assert f"/dst/.{name}.part" in verification, verification
    for staging in set(re.findall(r"/\S*ccat-rsync\.\w+", Path(str(log_path)).read_text())):
        assert not Path(staging).exists()  # staging symlinks cleaned up


def test_copy_many_one_bad_file_fails_alone(sshd: SshServer, transport: RsyncTransport,
                                            work: Path) -> None:
    good = [write_random(work / "src" / name, 10_000) for name in ("1.tar", "3.tar")]
    corrupt_expected = "f" * 32
    write_random(work / "src" / "4.tar", 10_000)
    pairs = [(local(work / "src" / "1.tar"), sshd.endpoint(work / "dst" / "1.tar"), good[0]),
             (local(work / "src" / "2.tar"), sshd.endpoint(work / "dst" / "2.tar"), "0" * 32),
             (local(work / "src" / "3.tar"), sshd.endpoint(work / "dst" / "3.tar"), good[1]),
             (local(work / "src" / "4.tar"), sshd.endpoint(work / "dst" / "4.tar"),
              corrupt_expected)]
    first, missing, third, mismatched = transport.copy_many(pairs)
    assert isinstance(first, TransferResult) and isinstance(third, TransferResult)
    assert isinstance(missing, TransferError) and not missing.retryable
    assert "2.tar" in str(missing) or ".2.tar.part" in str(missing)
    assert isinstance(mismatched, TransferError) and mismatched.retryable
    assert "checksum mismatch" in str(mismatched)
    assert sorted(p.name for p in (work / "dst").iterdir()) == ["1.tar", "3.tar"]


def _flushers(temporary: Path) -> set[int]:
    """Shells whose command syncs `temporary` in a loop: the receiving side's flusher (a
    subshell, alive as long as rsync), or the shell that started it. Not our rsync or ssh,
    whose arguments also carry that text."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv)
        if os.path.basename(argv[0]).lstrip(b"-") in (b"sh", b"bash", b"dash") \
                and b"kill -0" in line and b"sync -f -- " in line \
                and os.fsencode(temporary) in line:
            found.add(int(entry.name))
    return found


@pytest.mark.parametrize("direction", ["local->remote", "remote->other remote"])
def test_the_receiving_side_flushes_the_landing_file_while_rsync_runs(
        sshd: SshServer, work: Path, tmp_path: Path, direction: str) -> None:
    """Without it the whole file is still in the page cache when rsync ends, and the sync
    before the rename writes all of it then, after the transfer instead of during it (issue 17:
    the transport at its tool's speed). The flusher ends with rsync."""
    import threading

    source_host, destination_host = DIRECTIONS[direction]
    size = 12 * MIB
    source = work / "outbox" / "slow.tar"
    checksum = write_random(source, size)
    final = work / "archive" / "slow.tar"
    slow = RsyncTransport(sshd.ssh, tmp_path / "logs", bandwidth_limit_kbps=4096)  # ~3 s
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(_flushers(temp_of(final)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = slow.copy(at(sshd, source, source_host), at(sshd, final, destination_host),
                           checksum)
    finally:
        done.set()
        watcher.join()
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum == result.checksum
    assert not temp_of(final).exists()
    assert seen, "nothing synced the landing file while rsync wrote it"
    deadline = time.monotonic() + 5  # it looks every 0.2 s whether rsync's shell is there
    while _flushers(temp_of(final)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _flushers(temp_of(final)), "the flusher outlived the transfer"


# -- verification and rename: one ssh round trip --------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_verify_and_rename_take_one_ssh_command_after_rsync(
        sshd: SshServer, transport: RsyncTransport, work: Path, direction: str) -> None:
    """Each ssh command costs a handshake over the long link: after rsync, the checksum where
    the file landed and the durable rename are one command (none for a local destination)."""
    source_host, destination_host = DIRECTIONS[direction]
    checksum = write_random(work / "pkg.tar", 100_000)
    final = work / "out" / "pkg.tar"
    result = transport.copy(at(sshd, work / "pkg.tar", source_host),
                            at(sshd, final, destination_host), checksum)
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    commands = logged_commands(result.log_path)
    assert "rsync -s" in commands[0]
    if destination_host is None:
        assert len(commands) == 1  # checksum and rename in-process
        return
    [verify] = commands[1:]
    assert verify.startswith("] $ ssh ")
    for step in ("stat -L", "xxhsum -H2", "sync --", "mv -f"):
        assert step in verify
    assert f"{checksum}  stdin\nrenamed\n" in verify  # what it printed, in the log


def test_mismatch_never_replaces_the_final_file(sshd: SshServer, work: Path,
                                                tmp_path: Path) -> None:
    """A file already under the final name (an earlier copy) survives a corrupted arrival."""
    source = tmp_path / "pkg.tar"
    checksum = write_random(source, MIB)
    final = work / "pkg.tar"
    final.write_bytes(b"earlier copy")
    transport = CorruptingTransport(sshd.ssh, tmp_path / "logs")
    with pytest.raises(TransferError, match="checksum mismatch on arrival") as caught:
        transport.copy(local(source), sshd.endpoint(final), checksum)
    assert caught.value.retryable
    assert final.read_bytes() == b"earlier copy"
    assert not temp_of(final).exists()  # removed, as before
    log = re.search(r"\[log: (.*)\]$", str(caught.value)).group(1)  # type: ignore[union-attr]
    [verify] = [c for c in logged_commands(log) if "xxhsum" in c]
    assert "renamed" not in verify.split("--- stdout")[1]


@pytest.mark.parametrize("remote", [True, False])
def test_remote_verify_and_rename_renames_only_on_a_match(sshd: SshServer, work: Path,
                                                          remote: bool) -> None:
    def where(path: Path) -> Endpoint:
        return sshd.endpoint(path) if remote else local(path)

    landed, final = work / ".x y.tar.part", work / "x y.tar"
    checksum = write_random(landed, 5000)
    assert remote_verify_and_rename(sshd.ssh, where(landed), where(final), "0" * 32)[:2] == (
        checksum, 5000)
    assert landed.exists() and not final.exists()  # left for the caller
    found = remote_verify_and_rename(sshd.ssh, where(landed), where(final), checksum)
    assert found[:2] == (checksum, 5000)
    assert not landed.exists() and xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    # The identity of the file verified, from the host (a local one is looked at by the
    # recorder): a later deletion there knows it without reading it again.
    expected = (final.stat().st_ino, final.stat().st_mtime_ns) if remote else (None, None)
    assert (found.inode, found.mtime_ns) == expected
    with pytest.raises(ValueError):
        remote_verify_and_rename(sshd.ssh, where(final), Endpoint(PurePosixPath("/b"), "other"),
                                 checksum)


@pytest.mark.parametrize("remote", [True, False])
def test_a_verified_file_is_never_renamed_over_a_file_at_its_final_name(
        sshd: SshServer, work: Path, remote: bool) -> None:
    """The look before a transfer cannot see a file that appears while the package travels
    (hours over the long link): the rename itself refuses to replace one, singly and in a
    batch, and says so; only a repair replaces, and only the quarantined file it found there
    (`replaces`), still there at the moment of the rename."""
    def where(path: Path, *, replaces: Identity | None = None) -> Endpoint:
        return replace(sshd.endpoint(path) if remote else local(path), replaces=replaces)

    landed, final = work / ".x.tar.part", work / "x.tar"
    checksum = write_random(landed, 5000)
    final.write_bytes(b"someone else's file")
    with pytest.raises(Occupied, match="holds a file OpsDB does not record there") as taken:
        remote_verify_and_rename(sshd.ssh, where(landed), where(final), checksum)
    assert not taken.value.retryable
    assert final.read_bytes() == b"someone else's file" and landed.exists()
    quarantined = Identity.of(final.stat())  # as the repair found it
    (work / "other").write_bytes(b"a file put there since")
    (work / "other").rename(final)
    with pytest.raises(Occupied):  # not the file the repair was to replace: kept
        remote_verify_and_rename(sshd.ssh, where(landed), where(final, replaces=quarantined),
                                 checksum)
    assert final.read_bytes() == b"a file put there since" and landed.exists()
    assert remote_verify_and_rename(sshd.ssh, where(landed),
                                    where(final, replaces=Identity.of(final.stat())),
                                    checksum)[:2] == (checksum, 5000)
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum and not landed.exists()

    items = []
    for name in ("a.tar", "b.tar", "c.tar"):
        items.append((where(work / f".{name}.part"), where(work / name),
                      write_random(work / f".{name}.part", 1000)))
    (work / "b.tar").symlink_to(work / "elsewhere")  # a dangling link takes the name too
    found = remote_verify_and_rename_many(sshd.ssh, items, all_or_none=True)
    assert [(v.renamed, v.occupied) for v in found] == [(True, False), (False, True),
                                                       (True, False)]
    assert (work / "b.tar").is_symlink() and (work / ".b.tar.part").exists()
    assert xxhash.xxh3_128((work / "c.tar").read_bytes()).hexdigest() == items[2][2]

    # a batch of repairs: each replaces only the quarantined file it found at its name
    repairs = []
    for name in ("d.tar", "e.tar"):
        (work / name).write_bytes(b"a quarantined copy")
        repairs.append((where(work / f".{name}.part"),
                        where(work / name, replaces=Identity.of((work / name).stat())),
                        write_random(work / f".{name}.part", 1000)))
    (work / "other").write_bytes(b"a file put there since")
    (work / "other").rename(work / "e.tar")
    found = remote_verify_and_rename_many(sshd.ssh, repairs, all_or_none=False)
    assert [(v.renamed, v.occupied) for v in found] == [(True, False), (False, True)]
    assert xxhash.xxh3_128((work / "d.tar").read_bytes()).hexdigest() == repairs[0][2]
    assert (work / "e.tar").read_bytes() == b"a file put there since"


@pytest.mark.parametrize("remote", [True, False])
def test_remote_verify_and_rename_failures_are_classified(sshd: SshServer, work: Path,
                                                          remote: bool) -> None:
    def where(path: Path) -> Endpoint:
        return sshd.endpoint(path) if remote else local(path)

    with pytest.raises(TransferError, match="No such file") as missing:
        remote_verify_and_rename(sshd.ssh, where(work / "absent"), where(work / "final"),
                                 "0" * 32)
    assert not missing.value.retryable
    landed = work / "landed"
    checksum = write_random(landed, 100)
    # Verified, but the rename cannot happen: its directory is gone.
    with pytest.raises(TransferError, match="rename") as rename:
        remote_verify_and_rename(sshd.ssh, where(landed), where(work / "gone" / "final"),
                                 checksum)
    assert not rename.value.retryable
    assert landed.exists()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_the_location_marker_is_looked_at_in_rsyncs_own_command(
        sshd: SshServer, transport: RsyncTransport, work: Path, direction: str) -> None:
    """No round trip of its own: rsync's remote command (or, for a local destination, this
    process) finds the marker before creating the directory. Without it (the archive disk is
    not mounted) nothing is written and a person is needed (not retryable)."""
    source_host, destination_host = DIRECTIONS[direction]
    checksum = write_random(work / "pkg.tar", 10_000)
    mount_point = work / "lta"
    mount_point.mkdir()
    marker = PurePosixPath(mount_point / ".ccat-dt-location")

    def destination() -> Endpoint:
        where = at(sshd, mount_point / "obs" / "pkg.tar", destination_host)
        return Endpoint(where.path, where.host, marker=marker)

    with pytest.raises(TransferError, match="marker") as caught:
        transport.copy(at(sshd, work / "pkg.tar", source_host), destination(), checksum)
    assert not caught.value.retryable
    assert list(mount_point.iterdir()) == []
    Path(marker).write_text("marker\n")
    result = transport.copy(at(sshd, work / "pkg.tar", source_host), destination(), checksum)
    assert xxhash.xxh3_128((mount_point / "obs" / "pkg.tar").read_bytes()).hexdigest() == checksum
    commands = logged_commands(result.log_path)
    assert len(commands) == (1 if destination_host is None else 2)  # rsync (+ verify, rename)


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_file_where_the_packages_directory_should_be_is_named_and_not_retried(
        sshd: SshServer, transport: RsyncTransport, work: Path, direction: str,
        batch: bool) -> None:
    """A regular file sits where the package's directory should be (`obs` at the location's
    root). The copy fails naming that file, as bbcp's does: not retried within the run (a
    person moves it away), and that package's problem, not the location's (other packages
    still go there); nothing is written and the file is left as it is. Before, to a remote
    host: "rsync exited 12: mkdir: cannot create directory '...': File exists | rsync:
    connection unexpectedly closed", retryable, a location failure."""
    source_host, destination_host = DIRECTIONS[direction]
    root = work / "lta"
    root.mkdir()
    marker = PurePosixPath(root / ".ccat-dt-location")
    Path(marker).write_text("marker\n")
    blocker = root / "obs"
    blocker.write_bytes(b"a file, not a directory")
    pairs = []
    for name in ("a.tar", "b.tar")[:2 if batch else 1]:
        checksum = write_random(work / name, 1000)
        where = at(sshd, blocker / name, destination_host)
        pairs.append((at(sshd, work / name, source_host),
                      Endpoint(where.path, where.host, marker=marker), checksum))
    if batch:
        errors = transport.copy_many(pairs)
    else:
        with pytest.raises(TransferError) as caught:
            transport.copy(*pairs[0])
        errors = [caught.value]
    assert len(errors) == len(pairs)
    for error in errors:
        assert isinstance(error, TransferError), error
        message = str(error)
        assert not error.retryable, message
        assert f"{blocker} is not a directory (a file is there)" in message, message
        assert "move it away" in message, message
        assert not location_failure(error), message  # that package's, not the location's
    assert blocker.read_bytes() == b"a file, not a directory"
    assert sorted(p.name for p in root.iterdir()) == [".ccat-dt-location", "obs"]
