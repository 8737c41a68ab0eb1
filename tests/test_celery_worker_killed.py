"""A Celery worker killed (SIGKILL) and restarted in the middle of a step, under the production
executor (PostgreSQL storage and OpsDB, one real worker per site over Redis): the run that
waited for the step fails (ccat_assets/celery_watch.py) instead of waiting for ever, and the
work is re-attempted with nobody asked.

A hold is installed in a worker through `sitecustomize` (tests/faults/child.wrap): the first
call of a function there writes a marker and sleeps; the test then kills the worker (the
whole worker: its main process and its pool, as the OOM killer of its cgroup, a
`systemctl kill -s KILL` or a machine that stops) or only its pool child, restarts it
(systemd's Restart=on-failure) and lets `ccat-dt drive` go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import select

from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus
from ccat_dt.storage import files_under
from tests.faults.invariants import assert_safe
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import observe
from tests.test_celery import production

pytestmark = pytest.mark.xdist_group("redis")

REPO = Path(__file__).resolve().parents[1]
SITES = ("ccat", "cologne", "us")
DRIVE_TIMEOUT_S = 150.0

SITECUSTOMIZE = '''
import os
_hold = os.environ.get("CCAT_TEST_HOLD")
if _hold:
    import importlib
    from pathlib import Path
    from tests.faults.child import wait_to_be_killed, wrap
    _module, _attribute, _when, _marker, *_seconds = _hold.split("|")
    _owner = importlib.import_module(_module)
    _path, _, _name = _attribute.rpartition(".")
    for _part in filter(None, _path.split(".")):
        _owner = getattr(_owner, _part)
    wrap(_owner, _name, **{_when: wait_to_be_killed(Path(_marker), *map(float, _seconds))})
'''

HOLDS = {  # where a worker waits to be killed, half of its step done
    "mid-write": "ccat_dt.transports.local|os.fsync|before",  # bytes in the .part file
    "after-unlink": "ccat_dt.reaper|_unlink_local|after",  # a source file gone, not recorded
    "mid-tar": "ccat_dt.tarball|_TarWriter.add_file|after",  # one member of the tar written
}


class Workers:
    def __init__(self, config: Config, tmp_path: Path) -> None:
        self.config, self.tmp_path = config, tmp_path
        self.home = config.directory / "dagster_home"
        self.hooks = tmp_path / "hooks"
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start(self, site: str, hold: str | None = None, marker: Path | None = None,
              hold_s: float | None = None) -> None:
        """The site's worker; with `hold`, its first call there waits to be killed (or
        `hold_s` seconds, then goes on) once it has written `marker`."""
        self.starts += 1
        env = {**os.environ, "DAGSTER_HOME": str(self.home),
               "PYTHONPATH": f"{self.hooks}{os.pathsep}{REPO}"}
        env.pop("CCAT_TEST_HOLD", None)
        if hold:
            env["CCAT_TEST_HOLD"] = f"{HOLDS[hold]}|{marker}" + (f"|{hold_s}" if hold_s else "")
        log = self.tmp_path / f"worker-{site}-{self.starts}.log"
        self.procs[site] = subprocess.Popen(
            [sys.executable, "-m", "ccat_assets.cli", "--config", str(self.config.path),
             "worker", "--site", site, "--concurrency", "1", "--loglevel", "INFO"],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def kill_all_of(self, site: str) -> None:
        """SIGKILL for the worker's main process and its pool at once."""
        proc = self.procs[site]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.tmp_path.glob("worker-*.log")))


def start_drive(config: Config, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAGSTER_HOME": str(config.directory / "dagster_home"),
           "CCAT_DT_CONFIG": str(config.path), "PYTHONPATH": str(REPO)}
    env.pop("CCAT_TEST_HOLD", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ccat_assets.cli", "--config", str(config.path), "drive",
         "--wait", "30"], cwd=REPO, env=env, stdout=(tmp_path / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(path: Path, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert all(p.poll() is None for p in procs), "a process ended before the hold"
        time.sleep(0.2)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The drive's exit code, or None if it was still running after `timeout` (killed)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return None


def part_files(config: Config) -> list[Path]:
    root = config.resolve_root("sites")
    return [p for p in root.rglob("*") if p.is_file() and ".part" in p.name]


@pytest.fixture
def deployment(tmp_path: Path, postgres_url: str, dagster_database: str,
               redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, OpsDB]]:
    config = production(tmp_path, postgres_url, dagster_database, redis_url,
                        retry_backoff_first_s=1.0)
    monkeypatch.setenv("DAGSTER_HOME", str(config.directory / "dagster_home"))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    opsdb = OpsDB(config.opsdb_url)
    yield config, opsdb
    opsdb.dispose()


KILLS = {
    "worker": "the whole worker (main process and pool) killed -9, then restarted",
    "pool": "only the pool process executing the step killed -9 (Celery respawns it)",
}


@pytest.mark.parametrize(("site", "hold", "kill"), [
    ("cologne", "mid-write", "worker"),
    ("ccat", "after-unlink", "worker"),
])
def test_a_worker_killed_mid_step(deployment: tuple[Config, OpsDB], tmp_path: Path,
                                  site: str, hold: str, kill: str) -> None:
    """A site's worker killed -9 half way through a step (its bytes in a .part file, or a
    half-written tar), restarted as systemd does. The run that waits for the step must end
    (failed), the work be re-attempted without `ccat-dt retry`, and every package converge,
    nothing left half-written; failing that, at least a person must be told."""
    config, opsdb = deployment
    source = observe(config, opsdb, observations=1, files=1)
    workers = Workers(config, tmp_path)
    marker = tmp_path / "held"
    for name in SITES:
        workers.start(name, hold if name == site else None, marker)
    try:
        time.sleep(3)
        drive = start_drive(config, tmp_path, "drive-1")
        wait_for(marker, 180, drive, *workers.procs.values())
        held_pid = int(marker.read_text())
        assert held_pid in _children(workers.procs[site].pid)
        if kill == "worker":
            workers.kill_all_of(site)
            workers.start(site)  # systemd's Restart=on-failure
        else:
            os.kill(held_pid, signal.SIGKILL)
        code = finish(drive, DRIVE_TIMEOUT_S)
        with DagsterInstance.get() as instance:
            started = [r.run_id for r in instance.get_runs(
                RunsFilter(statuses=[DagsterRunStatus.STARTED]))]
        with opsdb.session() as session:
            problems = current_problems(session, config, _now())
            claims = session.scalars(select(Operation.id).where(
                Operation.status == OperationStatus.IN_PROGRESS)).all()
        if code is None:
            pytest.fail(
                f"{KILLS[kill]} at {site} ({hold}): `ccat-dt drive` had not ended after "
                f"{DRIVE_TIMEOUT_S:.0f} s: runs still STARTED {started}, operations "
                f"IN_PROGRESS {claims}, problems told to a person: "
                f"{[p.subject for p in problems]}")
        assert started == []
        # whatever drive-1 left for a later back-off, a second drive finishes it
        assert finish(start_drive(config, tmp_path, "drive-2"), DRIVE_TIMEOUT_S) is not None
    finally:
        workers.stop()
    assert files_under(source) == [], workers.logs()
    assert part_files(config) == []
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout.split()
    found = {int(p) for p in out}
    for child in list(found):
        found |= _children(child)
    return found


def _now() -> datetime:
    return datetime.now(UTC)
