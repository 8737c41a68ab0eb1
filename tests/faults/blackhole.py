"""A network path that can black-hole its packets for real: no RST, no FIN, nothing answered,
as a firewall that forgets the connection, a VPN or a link that goes down.

A userspace proxy cannot do this (its kernel acknowledges everything it is sent), so the kernel
drops the packets: a port of 127.0.0.1 of the test's own is redirected to the server (PostgreSQL,
the test sshd; iptables, nat OUTPUT REDIRECT), and `cut()` drops every packet, both ways, of the
connections made to that port (conntrack's original destination port): the client and the
server both see a silent peer. `direct` ports, chosen by the test and reached without the
redirect (bbcp's data streams, which go straight from one bbcp to the other on the port range
`-Z` names, not through ssh), are dropped the same way. Nothing else is touched: the rules name
those ports only (never a server's own port), carry a comment of this process, and are removed
when the fixture ends, also when the test fails.

Needs root and iptables with the nat table and the conntrack match: without them the test is
skipped, or fails under CCAT_REQUIRE_SERVICES=1 (tests/services.py `unavailable`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.services import POSTGRES_URL, free_port, unavailable
from tests.sshd import SshServer

FACILITY = "packet dropping (iptables)"


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True,
                          timeout=30)


class BlackHole:
    """127.0.0.1:`port` leads to the server's `server_port` until `cut()`, and again after
    `mend()`; connections to the `direct` ports of 127.0.0.1 go silent with it."""

    def __init__(self, server_port: int, *, direct: Sequence[int] = ()) -> None:
        self.port = free_port()
        self.direct = tuple(direct)
        self.comment = f"ccat-test-blackhole-{os.getpid()}-{self.port}"
        self._redirect = ["OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1", "--dport",
                          str(self.port), "-m", "comment", "--comment", self.comment,
                          "-j", "REDIRECT", "--to-ports", str(server_port)]
        self._drops = [["OUTPUT", "-p", "tcp", "-m", "conntrack", "--ctorigdst", "127.0.0.1",
                        "--ctorigdstport", str(port), "-m", "comment", "--comment",
                        self.comment, "-j", "DROP"] for port in (self.port, *self.direct)]
        self.is_cut = False

    def url(self, url: str) -> str:
        """`url` (a database of the server) through this path."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False)

    def through(self, sshd: SshServer, directory: Path) -> SshServer:
        """The test sshd reached through this path (its host key listed for the path's port
        in a known_hosts file of its own, in `directory`)."""
        known = Path(str(sshd.ssh.known_hosts_file)).read_text().splitlines()
        mine = directory / f"known_hosts_via_{self.port}"
        mine.write_text("".join(line.replace(f"]:{sshd.port} ", f"]:{self.port} ") + "\n"
                                for line in known))
        return replace(sshd, port=self.port, ssh=replace(sshd.ssh, port=self.port,
                                                         known_hosts_file=str(mine)))

    def open(self) -> str | None:
        """Install the redirect and check that a drop rule takes; why not, if it cannot."""
        added = _iptables("-t", "nat", "-A", *self._redirect)
        if added.returncode != 0:
            return f"iptables -t nat REDIRECT: {added.stderr.strip()}"
        probe = _iptables("-I", *self._drops[0])  # the conntrack match exists, rules take
        if probe.returncode != 0:
            return f"iptables conntrack DROP: {probe.stderr.strip()}"
        _iptables("-D", *self._drops[0])
        return None

    def cut(self, *, direct_only: bool = False) -> None:
        """From now on every packet of the path's connections is dropped, both ways; with
        `direct_only`, of the connections to the `direct` ports only."""
        for drop in self._drops[1:] if direct_only else self._drops:
            result = _iptables("-I", *drop)
            assert result.returncode == 0, result.stderr
        self.is_cut = True

    def mend(self) -> None:
        """The path carries packets again (connections cut meanwhile stay as their ends
        left them)."""
        for drop in self._drops:
            while _iptables("-D", *drop).returncode == 0:
                pass
        self.is_cut = False

    def close(self) -> None:
        """Every rule of ours gone, whatever happened."""
        self.mend()
        while _iptables("-t", "nat", "-D", *self._redirect).returncode == 0:
            pass
        left = [line for table in ("filter", "nat")
                for line in _iptables("-t", table, "-S").stdout.splitlines()
                if self.comment in line]
        assert left == [], left


@contextmanager
def black_hole_to(server_port: int, *, direct: Sequence[int] = ()) -> Iterator[BlackHole]:
    """A BlackHole to 127.0.0.1:`server_port` (see BlackHole), its rules removed at the end;
    skipped (or failed, CCAT_REQUIRE_SERVICES=1) where packets cannot be dropped."""
    if shutil.which("iptables") is None:
        unavailable(FACILITY, "no iptables on PATH (apt-get install iptables)")
    if os.geteuid() != 0:
        unavailable(FACILITY, "iptables rules need root")
    hole = BlackHole(server_port, direct=direct)
    try:
        if (why := hole.open()) is not None:
            unavailable(FACILITY, why)
        yield hole
    finally:
        hole.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    """A path to the test PostgreSQL server that the test can black-hole (BlackHole)."""
    server = make_url(POSTGRES_URL)
    host = server.host or "localhost"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        unavailable(FACILITY, f"the test PostgreSQL server {host} is not on this host "
                              "(only a port of 127.0.0.1 is redirected to it)")
    with black_hole_to(server.port or 5432) as hole:
        yield hole
