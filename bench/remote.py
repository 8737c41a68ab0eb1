"""Section 4: RsyncTransport over ssh on loopback against plain `rsync -e ssh`.

A throw-away sshd on 127.0.0.1 is started the way tests/sshd.py does it (the configuration is
repeated here so that the benchmark does not depend on pytest fixtures; starting, waiting and
stopping is tests/processes.py, shared with the test fixtures).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from unittest import mock

from bench.common import (
    Comparison,
    SectionResult,
    Settings,
    Stats,
    drop_outputs,
    fresh,
    interleaved,
    run_tool,
    summed,
    timed,
)
from bench.files import source_file
from ccat_dt.checksums import hash_file
from ccat_dt.config import SshConfig
from ccat_dt.transports import rsync as rsync_module
from ccat_dt.transports.base import Endpoint, SshSettings
from ccat_dt.transports.rsync import RsyncTransport
from tests.processes import DidNotStart, running

SSHD = "/usr/sbin/sshd"


def missing_tools() -> list[str]:
    missing = [] if os.access(SSHD, os.X_OK) else [SSHD]
    return missing + [t for t in ("ssh", "ssh-keygen", "rsync", "xxhsum") if not shutil.which(t)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ccat-dt-bench",
                    "-f", str(path)], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


@contextmanager
def loopback_sshd(directory: Path) -> Iterator[tuple[SshSettings, str]]:
    """(ssh settings, ssh destination) of an sshd on a free 127.0.0.1 port, for this user."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    host_key = _keygen(directory / "host_ed25519")
    (directory / "authorized_keys").write_text(_keygen(directory / "client_ed25519") + "\n")
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key}\n")
    config = directory / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {directory / 'host_ed25519'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        f"PidFile {directory / 'sshd.pid'}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "PrintMotd no",
        "MaxStartups 50:30:100", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    ssh = SshSettings(port=port, identity_file=str(directory / "client_ed25519"),
                      known_hosts_file=str(known_hosts), connect_timeout_s=5)
    destination = f"{getpass.getuser()}@127.0.0.1"

    def ready() -> str:
        probe = subprocess.run([*ssh.ssh_command(), "--", destination, "true"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               check=False)
        return "" if probe.returncode == 0 else probe.stderr.strip() or "ssh probe failed"

    try:
        with running([SSHD, "-D", "-e", "-f", str(config)], log=directory / "sshd.log",
                     ready=ready, timeout_s=15, name="sshd"):
            yield ssh, destination
    except DidNotStart as exc:
        raise RuntimeError(f"sshd did not come up: {exc}") from exc


class _StepTimer:
    """Times the ssh round trip RsyncTransport makes after rsync, to say what it costs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def timed_fn(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return timed_fn


def bench_remote(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    result.facts["bbcp"] = (f"installed at {shutil.which('bbcp')}, not benchmarked here"
                            if shutil.which("bbcp") else "not installed")
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (apt-get install openssh-server "
                           "openssh-client rsync xxhash)")
    source = source_file(settings, settings.remote_mib, log)
    expected, _ = hash_file(source)
    remote_dir = settings.work / "remote-dest"
    remote_dir.mkdir(exist_ok=True)
    ours_dst, tool_dst = remote_dir / "ours.bin", remote_dir / "tool.bin"
    # Socket directories must be short (unix socket paths): not under settings.work.
    sockets = Path(tempfile.mkdtemp(prefix="ccat-bench-", dir="/tmp"))
    with loopback_sshd(settings.work / "sshd") as (plain, host):
        # ours: as deployed, with the configuration's default connection sharing; its master
        # stays up between runs, as between consecutive transfers to one host.
        default = SshConfig()
        ssh = replace(plain, control_persist_s=default.control_persist_s)
        # ours, cold: the same, but its master is closed before each run (a first transfer).
        cold = replace(ssh, control_dir=str(sockets / "cold"))
        # the tools over a persistent connection of their own, for a strict like for like.
        shared_tool = replace(ssh, control_dir=str(sockets / "tool"))
        masters = (ssh, cold, shared_tool)
        transport = RsyncTransport(ssh, settings.work / "rsync-logs")
        transport_cold = RsyncTransport(cold, settings.work / "rsync-logs")
        transport_unshared = RsyncTransport(replace(ssh, control_persist_s=0),
                                            settings.work / "rsync-logs")
        rsh, rsh_cm = shlex.join(plain.ssh_command()), shlex.join(shared_tool.ssh_command())
        steps = _StepTimer()
        name = "remote_verify_and_rename"
        patch = mock.patch.object(rsync_module, name, steps.wrap(name, getattr(rsync_module,
                                                                               name)))

        def copy(with_transport: RsyncTransport) -> float:
            return timed(lambda: with_transport.copy(
                Endpoint(PurePosixPath(source)), Endpoint(PurePosixPath(ours_dst), host),
                expected))

        def ours() -> dict[str, float]:
            steps.seconds.clear()
            with patch:
                seconds = copy(transport)
            verify = steps.seconds.get(name, 0.0)
            return {"ours": seconds, "ours: ssh verify+sync+mv+sync": verify,
                    "ours: rsync and the rest": seconds - verify}

        def ours_cold() -> dict[str, float]:
            _close_master(cold, host)  # untimed
            return {"ours, first to the host": copy(transport_cold)}

        def ours_unshared() -> dict[str, float]:
            return {"ours, sharing off": copy(transport_unshared)}

        def tool() -> dict[str, float]:
            return {"rsync": run_tool(["rsync", "-e", rsh, "--", str(source),
                                       f"{host}:{tool_dst}"]),
                    "ssh sync": run_tool([*plain.ssh_command(), "--", host, "sync", "--",
                                          str(tool_dst)])}

        def tool_cm() -> dict[str, float]:
            return {"rsync, ControlMaster": run_tool(["rsync", "-e", rsh_cm, "--", str(source),
                                                      f"{host}:{tool_dst}"]),
                    "ssh sync, ControlMaster": run_tool([*shared_tool.ssh_command(), "--", host,
                                                         "sync", "--", str(tool_dst)])}

        try:
            stats = interleaved({"ours": ours, "tool": tool, "ours-cold": ours_cold,
                                 "ours-unshared": ours_unshared, "tool-cm": tool_cm},
                                settings.repeat, prepare=fresh(ours_dst, tool_dst), log=log)
            handshake = Stats([run_tool([*plain.ssh_command(), "--", host, "true"])
                               for _ in range(max(settings.repeat, 5))])
            multiplexed = Stats([run_tool([*ssh.ssh_command(), "--", host, "true"])
                                 for _ in range(max(settings.repeat, 5))])
        finally:
            for settings_ in masters:
                _close_master(settings_, host)
            shutil.rmtree(sockets, ignore_errors=True)
    drop_outputs(ours_dst, tool_dst)
    result.facts["size"] = (f"{settings.remote_mib} MiB, source in the page cache, to an sshd "
                            "on 127.0.0.1 (same machine, same disk)")
    result.facts["connection sharing"] = (
        f"RsyncTransport as configured by default: ssh ControlMaster, ControlPersist="
        f"{ssh.control_persist_s} s (config ssh.control_persist_s); `ours` runs find the "
        "master of the previous run, `ours, first to the host` close it first")
    result.facts["steps"] = {k: v.text() for k, v in stats.items()}
    result.facts["ssh round trip (`ssh host true`)"] = handshake.text()
    result.facts["ssh round trip over a shared connection"] = multiplexed.text()
    durable = summed(stats, "rsync", "ssh sync")
    result.comparisons += [
        Comparison("remote", "RsyncTransport.copy vs plain `rsync -e ssh` (as the issue "
                   "defines it)", stats["ours"], stats["rsync"], 0.97, "RsyncTransport.copy",
                   "rsync -e ssh", note="ours also re-hashes the file where it landed and "
                   "syncs/renames it (one ssh command), over its shared connection"),
        Comparison("remote", "durable, like for like: RsyncTransport.copy vs `rsync -e ssh; "
                   "ssh HOST sync FILE`", stats["ours"], durable, 0.97, "RsyncTransport.copy",
                   "rsync -e ssh; ssh sync", note="ours over its shared connection (default)"),
        Comparison("remote", "durable, both over one persistent ssh connection (ControlMaster):"
                   " RsyncTransport.copy vs `rsync -e ssh; ssh HOST sync FILE`", stats["ours"],
                   summed(stats, "rsync, ControlMaster", "ssh sync, ControlMaster"), None,
                   "RsyncTransport.copy", "rsync -e ssh; ssh sync"),
        Comparison("remote", "durable, first transfer to the host (no master yet): "
                   "RsyncTransport.copy vs `rsync -e ssh; ssh HOST sync FILE`",
                   stats["ours, first to the host"], durable, None, "RsyncTransport.copy",
                   "rsync -e ssh; ssh sync"),
        Comparison("remote", "durable, connection sharing off (ssh.control_persist_s: 0): "
                   "RsyncTransport.copy vs `rsync -e ssh; ssh HOST sync FILE`",
                   stats["ours, sharing off"], durable, None, "RsyncTransport.copy",
                   "rsync -e ssh; ssh sync"),
    ]


def _close_master(ssh: SshSettings, host: str) -> None:
    subprocess.run([*ssh.ssh_command(), "-O", "exit", "--", host], capture_output=True,
                   stdin=subprocess.DEVNULL, check=False)
