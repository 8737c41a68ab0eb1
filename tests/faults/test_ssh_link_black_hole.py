"""The WAN link to an archive host goes silent: its packets are black-holed (no RST, no FIN: a
NAT or firewall forgetting the flow, a VPN or radio link down), which is how WAN links usually
fail, and which the relay of tests/faults/link.py cannot do (its kernel acknowledges
everything). Here the kernel drops them (tests/faults/blackhole.py; skipped without root and
iptables, a failure under CCAT_REQUIRE_SERVICES=1): every packet of the path to the test sshd,
both ways, and of bbcp's own data streams (straight between the two bbcp, on the port its `-Z`
names, not through ssh).

The path goes silent (a) in the middle of a transfer (rsync over ssh, bbcp), and (b) while the
shared ssh connection (ControlMaster) is idle between operations: the next operation is handed
to a master whose peer went silent. Each operation must end within a bound, as a transient
fault: ssh gives a silent peer up after ServerAliveInterval x (ServerAliveCountMax + 1) (30 s x
5 in production, base.SshSettings.ssh_command; here 1 s x 4, through SshSettings.options, which
ssh reads first) and a new connection after `ssh.connect_timeout_s` (here 3 s); bbcp's data
streams after `routes[].bbcp.stall_timeout_s` of no bytes (here 4 s). Nothing half-done is
recorded as done, the stale master is not used for ever (it exits; the next command connects
afresh), and once the path is back the next attempt, automatic, completes: every file once in
each archive, its bytes read back from the storage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from ccat_dt.config import Config
from ccat_dt.storage import StorageUnavailable, Wanted, listing, look
from ccat_dt.transports.base import TransferError
from ccat_dt.transports.remote import remote_xxh128
from tests.faults.blackhole import BlackHole, black_hole_to
from tests.services import free_port
from tests.sshd import SshServer
from tests.test_multisite import multisite

# ssh gives a silent peer up after 1 s x (3 + 1) here (30 s x 5 in production).
SHORT_ALIVE = ("ServerAliveInterval=1", "ServerAliveCountMax=3")
CONNECT_TIMEOUT_S = 3
# An operation on the silent path must have ended by then: the stale master's ~4 s, a new
# connection's 3 s, maybe twice (bbcp's session asks again), a loaded machine. Without the
# bounds it waits for ever (an idle connection) or ~15 min (TCP's retransmissions).
ENDED_WITHIN_S = 45.0
MiB = 2**20
MB = 1_000_000
MARKER = ".ccat-dt-location"

needs_bbcp = pytest.mark.skipif(shutil.which("bbcp") is None, reason="bbcp is not installed "
                                "(not packaged for Debian); tests/test_bbcp.py replays captured "
                                "output of real bbcp failures")


@dataclass(frozen=True)
class Wan:
    """The test sshd reached through a path that can go silent (`hole`)."""

    hole: BlackHole
    server: SshServer  # through the path: connection sharing on, short ServerAlive
    data_port: int  # bbcp's data streams' port (`-Z`), silent with the path
    control_dir: Path  # the ControlMaster sockets

    def config(self, tmp_path: Path, transport: str, **settings: Any) -> Config:
        """The multi-site deployment, its archive sites reached through the path, sharing one
        ssh connection per host (as in production), given up on quickly."""
        return multisite(tmp_path, self.server, transport,
                         ssh={"connect_timeout_s": CONNECT_TIMEOUT_S, "control_persist_s": 60,
                              "control_dir": str(self.control_dir)}, **settings)


@pytest.fixture
def wan(sshd: SshServer, tmp_path: Path) -> Iterator[Wan]:
    data_port = free_port()
    control = Path(tempfile.mkdtemp(prefix="ccat-wan-", dir="/tmp"))  # socket paths are short
    try:
        with black_hole_to(sshd.port, direct=[data_port]) as hole:
            through = hole.through(sshd, tmp_path)
            server = replace(through, ssh=replace(
                through.ssh, connect_timeout_s=CONNECT_TIMEOUT_S, options=SHORT_ALIVE,
                control_persist_s=60, control_dir=str(control)))
            try:
                yield Wan(hole, server, data_port, control)
            finally:
                hole.mend()
                _stop_masters(control)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def _stop_masters(control: Path) -> None:
    """End the ssh masters this test left (their sockets are in `control`)."""
    for socket in control.glob("*"):
        subprocess.run(["ssh", "-S", str(socket), "-O", "exit", "none"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30, check=False)


def _within(action: Callable[[], Any], what: str) -> Any:
    """What `action` returned or raised; a failure if it is still running after the bound."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:  # noqa: BLE001 - what the caller sees, kept to look at
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=ENDED_WITHIN_S)
    assert not thread.is_alive(), f"{what}: still waiting {ENDED_WITHIN_S:g} s after the " \
                                  "path went silent"
    return outcome[0]


def _location(wan: Wan, tmp_path: Path) -> Path:
    """A marked location root on the test sshd."""
    root = wan.server.root / tmp_path.name / "lta"
    root.mkdir(parents=True)
    (root / MARKER).write_text("marker\n")
    return root


# -- (b) silent while the shared connection is idle --------------------------------------------

def _look(wan: Wan, root: Path, relative: str) -> Any:
    return look(str(root), wan.server.destination, wan.server.ssh, [Wanted(relative, True)])


def _listing(wan: Wan, root: Path, relative: str) -> Any:
    return listing(str(root), wan.server.destination, wan.server.ssh)


def _hash(wan: Wan, root: Path, relative: str) -> Any:
    return remote_xxh128(wan.server.ssh, wan.server.endpoint(root / relative))


LOOKS: dict[str, Callable[[Wan, Path, str], Any]] = {
    "a look (marker, identity, hash)": _look, "a listing": _listing, "a remote hash": _hash}


@pytest.mark.parametrize("operation", list(LOOKS))
def test_a_look_over_a_shared_connection_gone_silent_while_idle_fails_transient_then_heals(
        wan: Wan, tmp_path: Path, operation: str) -> None:
    """A look at a location over ssh has left its master connection idle; the path goes
    silent. The next look, handed to that master, ends within the bound as a transient fault
    (the host could not be reached: not a disk for a person to mount); once the path is back
    the next look answers, over a new connection."""
    root = _location(wan, tmp_path)
    data = os.urandom(MiB)
    (root / "obs").mkdir()
    (root / "obs" / "pkg.tar").write_bytes(data)
    action = LOOKS[operation]
    before = action(wan, root, "obs/pkg.tar")  # the master is up, then idle
    wan.hole.cut()

    failed = _within(lambda: action(wan, root, "obs/pkg.tar"), f"{operation} on a silent path")

    assert isinstance(failed, StorageUnavailable | TransferError), failed
    if isinstance(failed, StorageUnavailable):
        assert failed.transient, failed
    else:
        assert failed.retryable, failed
    wan.hole.mend()
    assert action(wan, root, "obs/pkg.tar") == before  # healed
    assert (root / "obs" / "pkg.tar").read_bytes() == data
