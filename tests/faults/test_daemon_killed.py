"""`make ui` (its own command from the Makefile: `dagster dev`, the Dagster daemon, the webserver
and their code servers) killed the ways a machine kills it, and started again the way an
operator does: every package ends verified in both archives, its sources purged, nothing done
twice and nobody told.

1. The daemon SIGKILLed right after a sensor's tick launched its first run and before the
   tick's end stored its cursor (Dagster's own point RUN_LAUNCHED in its sensor daemon): `make
   ui` goes down with it; the same command again replays the tick, and its run key keeps the
   run from being launched twice.
2. Then a run worker the daemon launched SIGKILLed half way through its transfer (bytes in the
   `.part` file), and with it every code server: the run left STARTED is marked failed by
   the sensors and re-attempted, and the daemon serves its sensors and launches its runs
   again. With `dagster dev`'s default (one code server behind a proxy for daemon and UI), a
   killed code server stayed dead: every tick and run launch failed ("Could not reach user
   code server") until a person reloaded the code location. `make ui` now gives the daemon
   its own code server, which it starts again itself (Makefile, UI_COMMAND).

The kill points are installed through `sitecustomize` in the processes `make ui` starts;
the kills are real SIGKILLs."""

from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.scheduler.instigation import TickStatus
from sqlalchemy import func, select

from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.instance import write_instance_yaml
from ccat_assets.tags import WORKER_TAG
from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus, OperationType, utcnow
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import REPO, archived_everywhere
from tests.helpers import observe
from tests.services import free_port
from tests.test_exit_codes import CCAT_DT, clean_env
from tests.test_operator_actions import check_status
from tests.test_ui_browser import LIFECYCLE

START_S = 180.0  # `make ui` up, the packages built and the first copy under way
CONVERGE_S = 420.0  # a killed code server is started again within a minute, then the work

SITECUSTOMIZE = r'''
import os, signal, sys, time

def _first(marker):
    """True in the one process, of all `make ui` started, that gets here first."""
    try:
        os.close(os.open(marker + ".taken", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True

def _note(marker):
    with open(marker + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)

def _cmdline():
    with open("/proc/self/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace")

_crash = os.environ.get("CCAT_TEST_DAEMON_CRASH")  # SENSOR|POINT|MARKER
if _crash and "dagster._daemon" in _cmdline():
    import dagster._daemon.sensor as _sensor_daemon
    _sensor, _point, _marker = _crash.split("|")
    _real = _sensor_daemon.check_for_debug_crash

    def _check(flags, key):
        if key == _point:
            remote = sys._getframe(1).f_locals.get("remote_sensor")
            if getattr(remote, "name", None) == _sensor and _first(_marker):
                _note(_marker)
                os.kill(os.getpid(), signal.SIGKILL)
        return _real(flags, key)

    _sensor_daemon.check_for_debug_crash = _check

_hold = os.environ.get("CCAT_TEST_HOLD")  # MODULE|CLASS.METHOD|MARKER
if _hold:
    import importlib
    _module, _attribute, _marker = _hold.split("|")
    _owner_name, _name = _attribute.split(".")
    _owner = getattr(importlib.import_module(_module), _owner_name)
    _held = getattr(_owner, _name)

    def _wrapper(*args, **kwargs):
        result = _held(*args, **kwargs)
        if _first(_marker):
            _note(_marker)
            time.sleep(600)
        return result

    setattr(_owner, _name, _wrapper)
'''
# Bytes of a transfer landed in its `.part` file, fsynced, hashed, not yet renamed.
MID_TRANSFER = "ccat_dt.transports.local|LocalTransport._copy_and_hash"


def ui_command(port: int) -> list[str]:
    """`make ui`'s command, as the Makefile has it, on `port`."""
    text = (REPO / "Makefile").read_text()
    [line] = re.findall(r"^UI_COMMAND = (.+)$", text, re.MULTILINE)
    argv = shlex.split(line.replace("$(BIN)", str(Path(sys.executable).parent)))
    argv[argv.index("-p") + 1] = str(port)
    return argv


class MakeUi:
    """`make ui` running in a process group of its own."""

    def __init__(self, config: Config, log: Path, hooks: Path, **hook: str) -> None:
        env = {**clean_env(DAGSTER_HOME=str(config.directory / "dagster_home"),
                           CCAT_DT_CONFIG=str(config.path)),
               "PYTHONPATH": os.pathsep.join(filter(None, (
                   str(hooks), str(REPO), os.environ.get("PYTHONPATH")))), **hook}
        self.log = log
        with open(log, "ab") as stream:
            self.process = subprocess.Popen(ui_command(free_port()), cwd=REPO, env=env,
                                            stdin=subprocess.DEVNULL, stdout=stream,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def members(self, needle: str = "") -> list[int]:
        """The live processes of its group whose command line holds `needle`."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, UnicodeDecodeError):
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z" and needle in argv:
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 30
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def wait_for(what: str, ready: Callable[[], bool], timeout: float, ui: MakeUi) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{ui.tail()}"
        time.sleep(0.5)


def done(config: Config, opsdb: OpsDB, instance: DagsterInstance) -> bool:
    """Every package archived at every archive site and purged, and no run in flight."""
    try:
        archived_everywhere(config, opsdb)
    except AssertionError:
        return False
    return not instance.get_runs(RunsFilter(statuses=IN_FLIGHT), limit=1)


def completed_twice(opsdb: OpsDB) -> list[tuple[object, ...]]:
    """Work an operator would see done twice: a package built, a copy made or archived at one
    location, a file deleted, each more than once."""
    with opsdb.session() as session:
        return [tuple(row) for row in session.execute(
            select(Operation.operation_type, Operation.package_id,
                   Operation.destination_location_id, Operation.copy_id, func.count())
            .where(Operation.status == OperationStatus.COMPLETED,
                   Operation.operation_type != OperationType.VERIFICATION)
            .group_by(Operation.operation_type, Operation.package_id,
                      Operation.destination_location_id, Operation.copy_id)
            .having(func.count() > 1))]


def test_make_ui_killed_three_ways_and_started_again_converges(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    observe(config, opsdb, observations=2, files=2)
    home = config.directory / "dagster_home"
    write_instance_yaml(config, home)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    crashed, held = tmp_path / "crashed", tmp_path / "held"

    first = second = None
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            # 1. The daemon killed after its site copy tick launched a run, before the tick
            # ended; `make ui` goes down with it (the run it launched goes on to its end).
            first = MakeUi(config, tmp_path / "ui-1.log", hooks,
                           CCAT_TEST_DAEMON_CRASH=f"site_copy_sensor|RUN_LAUNCHED|{crashed}")
            wait_for("the daemon's crash point", crashed.exists, START_S, first)
            wait_for("`make ui` going down with its daemon",
                     lambda: first is not None and first.process.poll() is not None, 60, first)
            [tick] = [t for state in instance.all_instigator_state()
                      if state.instigator_name == "site_copy_sensor"
                      for t in instance.get_ticks(state.instigator_origin_id,
                                                  state.selector_id, limit=1)]
            assert tick.status == TickStatus.STARTED  # interrupted: its cursor not stored
            reserved = {run_id for run_id, _ in tick.reserved_run_ids_with_requests}
            assert [r for r in instance.get_runs() if r.run_id in reserved]  # launched

            # 2. `make ui` again at once; a transfer's run worker killed half way, and every
            # code server with it.
            second = MakeUi(config, tmp_path / "ui-2.log", hooks,
                            CCAT_TEST_HOLD=f"{MID_TRANSFER}|{held}")
            wait_for("a transfer half way", held.exists, START_S, second)
            worker = int(held.read_text())
            os.kill(worker, signal.SIGKILL)
            servers = second.members("dagster api grpc")
            assert servers, "no code server found"
            for pid in servers:
                os.kill(pid, signal.SIGKILL)

            wait_for("convergence", lambda: done(config, opsdb, instance), CONVERGE_S, second)

            runs = instance.get_runs()
            [killed] = [r for r in runs if r.tags.get(WORKER_TAG, "").endswith(f":{worker}")]
            assert killed.status == DagsterRunStatus.FAILURE
            partition = killed.tags["dagster/partition"]
            assert [r for r in runs if r.tags.get("dagster/partition") == partition
                    and r.status == DagsterRunStatus.SUCCESS
                    and r.tags.get("dagster/run_key", "").startswith("reattempt:")]
            keys = collections.Counter(r.tags.get("dagster/run_key") for r in runs)
            assert [key for key, n in keys.items() if n > 1] == []
            for asset, check in LIFECYCLE.items():
                statuses = check_status(instance, asset, check)
                assert statuses and set(statuses.values()) == {"passed"}, (asset, statuses)
    finally:
        for ui in (second, first):
            if ui is not None:
                ui.stop()

    archived_everywhere(config, opsdb)
    assert completed_twice(opsdb) == []
    assert_safe(config, opsdb)
    with opsdb.session() as session:
        assert current_problems(session, config, utcnow()) == []  # nobody is told
    audit = subprocess.run([CCAT_DT, "audit", "--checksums"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=300, check=False,
                           env={**clean_env(CCAT_DT_CONFIG=str(config.path)),
                                "PYTHONPATH": str(REPO)})
    assert audit.returncode == 0, audit.stdout + audit.stderr
