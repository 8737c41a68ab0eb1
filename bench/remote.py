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
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from unittest import mock

from bench.common import (
    Comparison,
    SectionResult,
    Settings,
    Stats,
    drop_outputs,
    first_line,
    fresh,
    interleaved,
    run_tool,
    settle,
    summed,
    timed,
    write_random,
)
from bench.files import source_file
from ccat_dt.checksums import hash_file
from ccat_dt.config import SshConfig
from ccat_dt.transports import remote as remote_module
from ccat_dt.transports import rsync as rsync_module
from ccat_dt.transports.base import Endpoint, SshSettings
from ccat_dt.transports.bbcp import BbcpOptions, BbcpTransport, bbcp_command
from ccat_dt.transports.rsync import RsyncTransport
from ccat_dt.transports.session import Session
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
    result.facts["bbcp"] = "see section 4b"
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

        def ours_no_flush() -> dict[str, float]:  # as before ee7427b: all flushed after rsync
            with mock.patch.object(rsync_module, "_flusher_sh", lambda files: ""):
                return {"ours, no flush while rsync runs": copy(transport)}

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
                                 "ours-unshared": ours_unshared, "tool-cm": tool_cm,
                                 "ours-no-flush": ours_no_flush},
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
        Comparison("remote", "durable, the landing file not synced while rsync runs (before "
                   "issue 17's flusher): RsyncTransport.copy vs `rsync -e ssh; ssh HOST sync "
                   "FILE`", stats["ours, no flush while rsync runs"], durable, None,
                   "RsyncTransport.copy, no flusher", "rsync -e ssh; ssh sync"),
        Comparison("remote", "durable, connection sharing off (ssh.control_persist_s: 0): "
                   "RsyncTransport.copy vs `rsync -e ssh; ssh HOST sync FILE`",
                   stats["ours, sharing off"], durable, None, "RsyncTransport.copy",
                   "rsync -e ssh; ssh sync"),
    ]


def _close_master(ssh: SshSettings, host: str) -> None:
    subprocess.run([*ssh.ssh_command(), "-O", "exit", "--", host], capture_output=True,
                   stdin=subprocess.DEVNULL, check=False)


# -- 4b. bbcp (a stand-in where it is not installed) -----------------------------------------

STANDIN = Path(__file__).resolve().parent / "standin"  # holds `bbcp`: bench/bbcp_standin.py


def _marked_dir(directory: Path) -> PurePosixPath:
    """An empty destination directory carrying a location marker, as `ccat-dt init` leaves."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / ".ccat-dt-location").write_text("bench\n")
    return PurePosixPath(directory / ".ccat-dt-location")


def bench_bbcp(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    """BbcpTransport against the same bbcp program run by hand, both over the loopback sshd.

    The installed bbcp where there is one; elsewhere (it is not packaged for Debian or PyPI)
    the STAND-IN bench/standin/bbcp: BbcpTransport's options, bbcp's fixed 1.5 s start-up, its
    receiver started over ssh with -T, the bytes over a plain TCP connection."""
    missing = missing_tools() + ([] if shutil.which("python3") else ["python3"])
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}")
    real = shutil.which("bbcp")
    result.facts["real"] = real is not None
    tool = "bbcp" if real else "the stand-in"
    result.facts["bbcp"] = (
        f"bbcp {first_line([real, '--version'])} at {real}: the real tool, its receiver started "
        "over ssh (-T), the data over its own TCP connections" if real else
        "STAND-IN bench/standin/bbcp (bench/bbcp_standin.py), not bbcp: real bbcp is not "
        "installed; fixed start-up 1.5 s per call, receiver started over ssh (-T), data over "
        "one TCP connection")
    big = source_file(settings, settings.bbcp_mib, log)
    big_checksum, _ = hash_file(big)
    small_dir = settings.work / "bbcp-small"
    smalls = []
    for number in range(settings.bbcp_packages):
        path = small_dir / f"pkg-{number:04d}.tar"
        if not path.exists():
            write_random(path, settings.bbcp_package_kib * 1024)
        smalls.append((path, hash_file(path)[0]))
    dest = settings.work / "bbcp-dest"
    sockets = Path(tempfile.mkdtemp(prefix="ccat-bench-", dir="/tmp"))
    options = BbcpOptions()
    path_with_standin = ({} if real else
                         {"PATH": f"{STANDIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    with mock.patch.dict(os.environ, path_with_standin), \
            loopback_sshd(settings.work / "sshd-bbcp") as (plain, host):
        if not real and shutil.which("bbcp") != str(STANDIN / "bbcp"):
            raise RuntimeError(f"the stand-in is not the bbcp on PATH: {shutil.which('bbcp')}")
        default = SshConfig()
        # Both sides over a shared ssh connection of their own (ControlMaster, as deployed):
        # bbcp's -T ssh and the tool's `ssh xxhsum` ride it like ours do.
        ours_ssh = replace(plain, control_persist_s=default.control_persist_s,
                           control_dir=str(sockets / "ours"))
        tool_ssh = replace(ours_ssh, control_dir=str(sockets / "tool"))
        transport = BbcpTransport(options, ours_ssh, settings.work / "bbcp-logs")
        steps = _StepTimer()
        patches = [mock.patch.object(Session, name, steps.wrap(name, getattr(Session, name)))
                   for name in ("wait_ready", "verify")]
        ssh_commands: list[str] = []
        counting = mock.patch.object(remote_module, "spawn", _counting(ssh_commands))

        def bbcp_by_hand(sources: list[Path], target: PurePosixPath) -> list[str]:
            return bbcp_command([Endpoint(PurePosixPath(s)) for s in sources],
                                Endpoint(target, host), options, tool_ssh)

        # (a) one big file
        ours_final, tool_final = dest / "ours" / big.name, dest / "tool" / big.name

        def prepare_big() -> None:
            for directory in (dest / "ours", dest / "tool"):
                _marked_dir(directory)
            settle()

        def ours_big() -> dict[str, float]:
            steps.seconds.clear()
            with ExitStack() as stack:
                for patch in patches:
                    stack.enter_context(patch)
                seconds = timed(lambda: transport.copy(
                    Endpoint(PurePosixPath(big)),
                    Endpoint(PurePosixPath(ours_final), host,
                             marker=PurePosixPath(dest / "ours" / ".ccat-dt-location")),
                    big_checksum))
            prepare_s = steps.seconds.get("wait_ready", 0.0)
            verify_s = steps.seconds.get("verify", 0.0)
            return {"ours": seconds, "ours: session start, marker+mkdir": prepare_s,
                    "ours: after bbcp, xxhsum+sync+mv+sync": verify_s,
                    "ours: bbcp and the rest": seconds - prepare_s - verify_s}

        def tool_big() -> dict[str, float]:
            return {"bbcp": run_tool(bbcp_by_hand([big], PurePosixPath(tool_final))),
                    "ssh xxhsum": run_tool([*tool_ssh.ssh_command(), "--", host, "xxhsum",
                                            "-H2", "--", str(tool_final)])}

        def tool_big_durable() -> dict[str, float]:
            return {"bbcp, durable": run_tool(bbcp_by_hand([big], PurePosixPath(tool_final))),
                    "ssh xxhsum+sync": run_tool([
                        *tool_ssh.ssh_command(), "--", host, "sh", "-c",
                        shlex.quote('xxhsum -H2 -- "$1" && sync -- "$1"'), "sh",
                        shlex.quote(str(tool_final))])}

        # (b) small packages: one session against one call each
        def prepare_batch() -> None:
            for directory in (dest / "batch-ours", dest / "batch-tool"):
                _marked_dir(directory)
            settle()

        marker = PurePosixPath(dest / "batch-ours" / ".ccat-dt-location")
        pairs = [(Endpoint(PurePosixPath(path)),
                  Endpoint(PurePosixPath(dest / "batch-ours" / path.name), host, marker=marker),
                  checksum) for path, checksum in smalls]

        def ours_batch() -> dict[str, float]:
            ssh_commands.clear()
            with counting:
                seconds = timed(lambda: transport.copy_many(pairs))
            result.facts["ssh commands of one batched session"] = len(ssh_commands)
            return {"ours, one session": seconds}

        def tool_batch() -> dict[str, float]:
            return {"bbcp per package": sum(
                run_tool(bbcp_by_hand([path], PurePosixPath(dest / "batch-tool" / path.name)))
                for path, _ in smalls)}

        try:
            big_stats = interleaved({"ours": ours_big, "tool": tool_big,
                                     "tool-durable": tool_big_durable}, settings.repeat,
                                    prepare=prepare_big, log=log)
            batch_stats = interleaved({"ours": ours_batch, "tool": tool_batch},
                                      max(3, settings.repeat // 2), prepare=prepare_batch,
                                      log=log)
            for path, checksum in smalls:  # the batch really landed, verified, renamed
                if hash_file(dest / "batch-ours" / path.name)[0] != checksum:
                    raise AssertionError(f"{path.name} did not land intact")
        finally:
            for settings_ in (ours_ssh, tool_ssh):
                _close_master(settings_, host)
            shutil.rmtree(sockets, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    result.facts["size"] = (f"(a) {settings.bbcp_mib} MiB, (b) {settings.bbcp_packages} "
                            f"packages of {settings.bbcp_package_kib} KiB; sources in the page "
                            "cache, to an sshd on 127.0.0.1 (same machine, same disk)")
    result.facts["steps"] = {k: v.text() for k, v in {**big_stats, **batch_stats}.items()}
    label = "bbcp" if real else "bbcp (stand-in)"
    result.comparisons += [
        Comparison("bbcp", f"one {settings.bbcp_mib} MiB file: BbcpTransport.copy vs {tool}, "
                   "then `ssh HOST xxhsum -H2 FILE`", big_stats["ours"],
                   summed(big_stats, "bbcp", "ssh xxhsum"), round(1 / 1.05, 3),
                   "BbcpTransport.copy", f"{label}; ssh xxhsum",
                   note="ours also looks at the location marker, lands under a temporary name "
                   "and syncs and renames after the hash"),
        Comparison("bbcp", f"durable, like for like: one {settings.bbcp_mib} MiB file: "
                   f"BbcpTransport.copy vs {tool}, then `ssh HOST 'xxhsum -H2 FILE && "
                   "sync FILE'`", big_stats["ours"],
                   summed(big_stats, "bbcp, durable", "ssh xxhsum+sync"), None,
                   "BbcpTransport.copy", f"{label}; ssh xxhsum+sync",
                   note="the tool's copy on disk too, as ours must be before OpsDB records it"),
        Comparison("bbcp", f"{settings.bbcp_packages} small packages: one BbcpTransport "
                   f"session (copy_many) vs {settings.bbcp_packages} calls of {tool}",
                   batch_stats["ours, one session"], batch_stats["bbcp per package"], 5.0,
                   "BbcpTransport.copy_many", f"{settings.bbcp_packages} x {label}",
                   note="ours also verifies (xxh3-128 where they landed) and renames every file"),
    ]


def _counting(seen: list[str]) -> Callable[..., object]:
    """remote.spawn, recording each ssh command it starts."""
    real = remote_module.spawn

    def counting(argv: list[str], **kwargs: object) -> object:
        if argv and argv[0] == "ssh":
            seen.append(argv[-1])
        return real(argv, **kwargs)  # type: ignore[arg-type]
    return counting
