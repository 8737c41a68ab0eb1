"""A throw-away OpenSSH server on 127.0.0.1, so that ssh/rsync code is tested against the real
programs (quoting, exit codes, error texts) instead of mocks of what we think they do.

Use it with `pytest_plugins = ["tests.sshd"]` in the root conftest, or import it into a test
module (`from tests.sshd import sshd as sshd_fixture`; the fixture is named "sshd" whatever the
alias, and an alias keeps linters from seeing test arguments as redefinitions).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from ccat_dt.transports.base import Endpoint, SshSettings
from tests.processes import DidNotStart, running
from tests.services import free_port, unavailable

SSHD = "/usr/sbin/sshd"
PACKAGES = ["openssh-server", "openssh-client", "rsync", "xxhash"]
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SshServer:
    host: str  # address sshd listens on
    port: int
    user: str
    ssh: SshSettings  # port, client key and known_hosts that reach this server
    root: Path  # a scratch directory tests may use for "remote" files

    @property
    def destination(self) -> str:
        """The ssh destination, as an Endpoint.host."""
        return f"{self.user}@{self.host}"

    def endpoint(self, path: Path | PurePosixPath | str, *, host: str | None = None) -> Endpoint:
        return Endpoint(PurePosixPath(path), host or self.destination)


def _missing_tools() -> list[str]:
    missing = [] if os.access(SSHD, os.X_OK) else [SSHD]
    return missing + [tool for tool in ("ssh", "ssh-keygen", "rsync", "xxhsum")
                      if shutil.which(tool) is None]



def _keygen(path: Path) -> str:
    """A new ed25519 key pair without passphrase; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ccat-dt-test",
                    "-f", str(path)], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


def _write_config(directory: Path, port: int, extra: Sequence[str] = ()) -> Path:
    config = directory / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {directory / 'host_ed25519'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        f"PidFile {directory / 'sshd.pid'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",  # the tests run as root in CI containers
        "StrictModes no",  # tmp directories are not owned/moded the way sshd insists on
        "UsePAM no",
        "PrintMotd no",
        "MaxStartups 50:30:100",  # tests open many short connections
        "LogLevel VERBOSE",
        *extra,
        "",
    ]))
    return config


def _ready(server: SshServer) -> str:
    """Empty string once `ssh ... true` works, else why not."""
    try:
        with socket.create_connection((server.host, server.port), timeout=1):
            pass
    except OSError as exc:
        return f"port {server.port}: {exc}"
    probe = subprocess.run([*server.ssh.ssh_command(), "--", server.destination, "true"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=START_TIMEOUT_S, check=False)
    return "" if probe.returncode == 0 else (f"ssh probe exited {probe.returncode}: "
                                             f"{probe.stderr.strip()}")


@contextmanager
def serve(directory: Path, extra_config: Sequence[str] = ()) -> Iterator[SshServer]:
    """A running sshd on a free 127.0.0.1 port that accepts a throw-away key for this user;
    `extra_config`: more sshd_config lines (e.g. "SetEnv PATH=..."). Skips when it cannot."""
    missing = _missing_tools()
    if missing:
        unavailable("sshd", f"missing {', '.join(missing)}: run `make test-deps` "
                    f"(scripts/setup-test-host installs {' '.join(PACKAGES)})")
    directory.mkdir(parents=True, exist_ok=True)
    root = directory / "files"
    root.mkdir()
    port = free_port()
    host_key = _keygen(directory / "host_ed25519")
    (directory / "authorized_keys").write_text(_keygen(directory / "client_ed25519") + "\n")
    known_hosts = directory / "known_hosts"
    # Two names for one server: remote-to-remote tests address it as two different hosts.
    known_hosts.write_text("".join(f"[{name}]:{port} {host_key}\n"
                                   for name in ("127.0.0.1", "localhost")))
    config = _write_config(directory, port, extra_config)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation dir
    server = SshServer(host="127.0.0.1", port=port, user=getpass.getuser(), root=root,
                       ssh=SshSettings(port=port,
                                       identity_file=str(directory / "client_ed25519"),
                                       known_hosts_file=str(known_hosts), connect_timeout_s=5))
    with ExitStack() as stack:
        try:
            stack.enter_context(running([SSHD, "-D", "-e", "-f", str(config)],
                                        log=directory / "sshd.log", name="sshd",
                                        ready=lambda: _ready(server),
                                        timeout_s=START_TIMEOUT_S))
        except DidNotStart as exc:
            unavailable("sshd", str(exc))
        yield server


@pytest.fixture(scope="session", name="sshd")  # named: importable under any alias
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """The tests' shared sshd (see serve)."""
    with serve(tmp_path_factory.mktemp("sshd")) as server:
        yield server
