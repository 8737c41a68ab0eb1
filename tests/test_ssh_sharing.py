"""ssh connection sharing (ControlMaster): with it on, every ssh and rsync command of a transfer
rides one persistent connection per host; the commands still return as soon as they are done
(the master, left running, holds none of their pipes), and when the socket directory cannot be
used they connect on their own instead of failing."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash

from ccat_dt.config import ConfigError, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.transports.base import TransferError, default_control_dir
from ccat_dt.transports.factory import ssh_settings
from ccat_dt.transports.remote import remote_command, run
from ccat_dt.transports.rsync import RsyncTransport
from tests.sshd import SshServer
from tests.sshd import sshd as sshd_fixture  # noqa: F401 - registers the "sshd" fixture
from tests.test_rsync import DIRECTIONS, at, logged_commands, write_random


@pytest.fixture
def control_dir() -> Iterator[Path]:
    """A short directory for the sockets (pytest's tmp paths are too long for them)."""
    path = Path("/tmp") / f"ccat-cm-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared(sshd: SshServer, control_dir: Path) -> Iterator[SshServer]:
    """The test sshd, reached with connection sharing on; its master is stopped afterwards."""
    server = replace(sshd, ssh=replace(sshd.ssh, control_persist_s=60,
                                       control_dir=str(control_dir)))
    yield server
    if control_dir.is_dir():
        for host in ("127.0.0.1", "localhost"):
            subprocess.run([*server.ssh.ssh_command(), "-O", "exit", "--",
                            f"{server.user}@{host}"], capture_output=True, check=False)


def master_pid(server: SshServer, host: str | None = None) -> int | None:
    """The pid of the master for `host`, from `ssh -O check`, or None if there is none."""
    done = subprocess.run([*server.ssh.ssh_command(), "-O", "check", "--",
                           host or server.destination], capture_output=True, text=True,
                          check=False)
    match = re.search(r"Master running \(pid=(\d+)\)", done.stderr)
    return int(match.group(1)) if match else None


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_ssh_command_carries_the_sharing_options(shared: SshServer, control_dir: Path) -> None:
    command = shared.ssh.ssh_command()
    options = [command[i + 1] for i, word in enumerate(command) if word == "-o"]
    assert "ControlMaster=auto" in options and "ControlPersist=60" in options
    [path] = [o.removeprefix("ControlPath=") for o in options if o.startswith("ControlPath=")]
    assert path.startswith(f"{control_dir}/") and path.endswith("-%C")
    assert stat.S_IMODE(control_dir.stat().st_mode) == 0o700  # created private
    assert not any("Control" in word for word in shared.ssh.ssh_command(shared=False))
    assert not any("Control" in word for word in replace(shared.ssh, control_persist_s=0)
                   .ssh_command())


def test_commands_return_while_the_master_stays(shared: SshServer) -> None:
    """The first command forks the master, which outlives it: were the master holding the
    command's stdout/stderr, run() would wait for it until its time limit."""
    done = run(remote_command(shared.ssh, shared.destination,
                              ["sh", "-c", 'echo out; echo err >&2']), timeout_s=60)
    assert (done.rc, done.stdout, done.stderr) == (0, "out\n", "err\n")
    pid = master_pid(shared)
    assert pid is not None
    again = run(remote_command(shared.ssh, shared.destination, ["echo", "again"]), timeout_s=60)
    assert again.stdout == "again\n"
    assert master_pid(shared) == pid  # the same connection served the second command


@pytest.mark.parametrize("direction", ["local->remote", "remote->local",
                                       "remote->other remote"])
def test_transfer_over_a_shared_connection(shared: SshServer, work: Path, tmp_path: Path,
                                           direction: str) -> None:
    source_host, destination_host = DIRECTIONS[direction]
    checksum = write_random(work / "pkg.tar", 300_000)
    final = work / "out" / "pkg.tar"
    transport = RsyncTransport(shared.ssh, tmp_path / "logs")
    result = transport.copy(at(shared, work / "pkg.tar", source_host),
                            at(shared, final, destination_host), checksum)
    assert xxhash.xxh3_128(final.read_bytes()).hexdigest() == checksum
    commands = logged_commands(result.log_path)
    for command in commands:
        # rsync's -e, the verify+rename ssh; an rsync started on the source host uses plain
        # ssh there (our socket directory is on this host): one ControlPath, the outer ssh's.
        assert command.split("\n")[0].count("ControlMaster=auto") == 1, command
    pid = master_pid(shared)
    assert pid is not None
    subprocess.run([*shared.ssh.ssh_command(), "-O", "exit", "--", shared.destination],
                   capture_output=True, check=True)
    assert gone(pid)  # nothing left running once the master is told to go


@pytest.fixture
def work(sshd: SshServer) -> Path:
    directory = sshd.root / uuid.uuid4().hex[:8]
    directory.mkdir()
    return directory


def test_a_stale_socket_is_replaced(shared: SshServer, work: Path, tmp_path: Path) -> None:
    """A master that died (killed, crashed host) leaves its socket; the next command must not
    fail on it."""
    run(remote_command(shared.ssh, shared.destination, ["true"]), timeout_s=60)
    pid = master_pid(shared)
    assert pid is not None
    os.kill(pid, 9)  # the master this test started
    assert gone(pid)
    checksum = write_random(tmp_path / "pkg.tar", 1000)
    result = RsyncTransport(shared.ssh, tmp_path / "logs").copy(
        at(shared, tmp_path / "pkg.tar", None), shared.endpoint(work / "pkg.tar"), checksum)
    assert result.checksum == checksum
    assert master_pid(shared) not in (None, pid)


def test_a_master_does_not_serve_other_keys(shared: SshServer, work: Path,
                                            tmp_path: Path) -> None:
    """ssh keys masters by host, port and user only; a transport with another key (or
    known_hosts file) must authenticate itself, not ride on a master that did."""
    run(remote_command(shared.ssh, shared.destination, ["true"]), timeout_s=60)
    assert master_pid(shared) is not None
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, capture_output=True)
    checksum = write_random(tmp_path / "pkg.tar", 1000)
    transport = RsyncTransport(replace(shared.ssh, identity_file=str(stranger)),
                               tmp_path / "logs")
    with pytest.raises(TransferError, match="Permission denied") as caught:
        transport.copy(at(shared, tmp_path / "pkg.tar", None), shared.endpoint(work / "p.tar"),
                       checksum)
    assert not caught.value.retryable


def _with_control_dir(server: SshServer, directory: str) -> SshServer:
    return replace(server, ssh=replace(server.ssh, control_dir=directory))


@pytest.mark.parametrize("problem", ["parent is a file", "a symlink", "another user's"])
def test_unusable_socket_directory_means_plain_ssh(shared: SshServer, control_dir: Path,
                                                   work: Path, tmp_path: Path,
                                                   problem: str) -> None:
    """ssh refuses to connect at all when it cannot create its socket; so then we leave the
    sharing options out and every command connects on its own."""
    control_dir.mkdir(mode=0o700)
    if problem == "parent is a file":
        (control_dir / "file").write_text("")
        directory = control_dir / "file" / "sockets"
    elif problem == "a symlink":
        (control_dir / "real").mkdir(mode=0o700)
        directory = control_dir / "link"
        directory.symlink_to(control_dir / "real")
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a directory of another user")
        directory = control_dir / "theirs"
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)
    server = _with_control_dir(shared, str(directory))
    assert not any("Control" in word for word in server.ssh.ssh_command())
    checksum = write_random(tmp_path / "pkg.tar", 1000)
    result = RsyncTransport(server.ssh, tmp_path / "logs").copy(
        at(server, tmp_path / "pkg.tar", None), server.endpoint(work / "pkg.tar"), checksum)
    assert result.checksum == checksum


def test_a_too_open_socket_directory_of_ours_is_made_private(shared: SshServer,
                                                             control_dir: Path) -> None:
    control_dir.mkdir()
    control_dir.chmod(0o755)
    assert any(word.startswith("ControlPath=") for word in shared.ssh.ssh_command())
    assert stat.S_IMODE(control_dir.stat().st_mode) == 0o700


def test_default_socket_directory_is_short() -> None:
    assert len(default_control_dir()) <= 40


# -- configuration ----------------------------------------------------------------------------


def _config(tmp_path: Path, ssh: dict[str, object]) -> Path:
    return write_default_config(tmp_path / uuid.uuid4().hex[:6], overrides={"ssh": ssh})


def test_sharing_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    default = ssh_settings(load_config(_config(tmp_path, {})))
    assert default.control_persist_s == 300 and default.control_dir is None
    assert "ControlMaster=auto" in default.ssh_command()
    off = ssh_settings(load_config(_config(tmp_path, {"control_persist_s": 0})))
    assert not any("Control" in word for word in off.ssh_command())
    chosen = ssh_settings(load_config(_config(tmp_path, {"control_persist_s": 30,
                                                          "control_dir": "/tmp/ccat-ssh"})))
    assert (chosen.control_persist_s, chosen.control_dir) == (30, "/tmp/ccat-ssh")


@pytest.mark.parametrize("ssh", [{"control_dir": "relative/dir"},
                                 {"control_dir": "/a/path/much/longer/than/forty/characters/x"},
                                 {"control_dir": "/tmp/with space"}, {"control_dir": "/tmp/%h"},
                                 {"control_persist_s": -1}])
def test_bad_sharing_settings_are_rejected(tmp_path: Path, ssh: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="ssh.control_"):
        load_config(_config(tmp_path, ssh))
