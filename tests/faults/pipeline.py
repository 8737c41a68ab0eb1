"""Running the real pipeline in a fault test: deployments, observations, driving the sensors,
an operator's retry, and steps in child processes."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, drive
from ccat_assets.partitions import package_partitions
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    RawDataPackage,
)
from ccat_dt.packages import plan_packages
from ccat_dt.topology import prepare_opsdb
from ccat_dt.transports.bbcp import BbcpTransport
from tests.helpers import new_opsdb

REPO = Path(__file__).resolve().parents[2]
MODULE = "primecam/f280"


def deployment(directory: Path, **overrides: Any) -> Config:
    """The embedded default (with top-level `overrides`) written to `directory`, migrated;
    `policies` overrides are merged into the default's."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    policies = {**settings["policies"], **overrides.pop("policies", {})}  # type: ignore[dict-item]
    settings.update(overrides, policies=policies)
    config = load_config(write_default_config(directory, overrides=settings))
    new_opsdb(config)
    prepare_opsdb(config)
    return config


def source_root(config: Config) -> Path:
    return config.resolve_root("sites/ccat/instruments")


def observe(config: Config, opsdb: OpsDB, *, name: str = "obs-0", module: str = MODULE,
            files: int = 3, size: int = 40_000, names: list[str] | None = None) -> list[Path]:
    """Random raw files written at the source and filed, the observation finished."""
    directory = source_root(config) / name / module
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, file_name in enumerate(names or [f"scan-{i}.dat" for i in range(files)]):
        path = directory / file_name
        path.write_bytes(os.urandom(size + i))
        written.append(path)
    start_observation(opsdb, name)
    file_directory(opsdb, observation=name, module=module, directory=f"{name}/{module}")
    finish_observation(opsdb, name)
    return written


def plan(config: Config, opsdb: OpsDB, instance: DagsterInstance) -> str:
    """What the package sensor does before any run: group the finished observation into its
    one package and register the package as a partition; returns its name."""
    with opsdb.session() as session:
        [package] = [p.name for p in plan_packages(session, config)]
    assert package_partitions.name is not None  # Dagster types a dynamic set's name optional
    instance.add_dynamic_partitions(package_partitions.name, [package])
    return package


def run(config: Config, instance: DagsterInstance, *, wait_s: float = 10.0,
        in_process: bool = False) -> DriveReport:
    """Tick the real sensors and execute what they request until idle, waiting for automatic
    re-attempts due within `wait_s` (0: stop at the first back-off, a fault that persists).
    `in_process=True`: one run at a time in this process, for a fault scripted in this process's
    memory (a relay thread's state, a process started by the first step to get there)."""
    return drive(build_definitions(config), instance, wait_s=wait_s, in_process=in_process)


def package_names(opsdb: OpsDB) -> list[str]:
    with opsdb.session() as session:
        return list(session.scalars(select(RawDataPackage.name).order_by(RawDataPackage.id)))


def package_state(opsdb: OpsDB, name: str) -> PackageState:
    with opsdb.session() as session:
        state = session.scalar(select(RawDataPackage.state).where(RawDataPackage.name == name))
        assert state is not None
        return state


def operations(opsdb: OpsDB, kind: OperationType, package: str | None = None
               ) -> list[tuple[OperationStatus, str | None]]:
    with opsdb.session() as session:
        query = select(Operation.status, Operation.error).where(Operation.operation_type == kind)
        if package is not None:
            query = query.join(RawDataPackage, Operation.package_id == RawDataPackage.id).where(
                RawDataPackage.name == package)
        return [(status, error) for status, error in session.execute(query.order_by(Operation.id))]


def archived_everywhere(config: Config, opsdb: OpsDB) -> None:
    """Every package archived at every archive site, nothing left at the observatory or in
    any buffer: the end state of a converged embedded deployment."""
    archives = sorted(site.short_name for site in config.settings.archive_sites)
    with opsdb.session() as session:
        packages = session.scalars(select(RawDataPackage).order_by(RawDataPackage.id)).all()
        assert packages
        for package in packages:
            assert package.state == PackageState.ARCHIVED, (package.name, package.state)
            lta = sorted(c.location.site.short_name for c in package.copies
                         if c.location.location_type == LocationType.LONG_TERM_ARCHIVE
                         and c.is_verified)
            assert lta == archives, (package.name, lta)
            left = [(c.location.label, c.status.value) for c in package.copies
                    if c.location.location_type == LocationType.BUFFER
                    and c.status != CopyStatus.DELETED]
            assert left == [], (package.name, left)
            for raw in package.files:
                assert all(c.status == CopyStatus.DELETED for c in raw.copies), raw.relative_path


# -- child processes -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def result(self) -> Any:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None


def child_argv(config: Config, action: str, *args: str, **options: str | float) -> list[str]:
    argv = [sys.executable, "-m", "tests.faults.child", str(config.path), action, *args]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def spawn(argv: list[str], *, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """`sigint_ignored`: started as cron or a script's `&` job starts it (SIGINT ignored by a
    shell, inherited through exec)."""
    if sigint_ignored:
        argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
    return subprocess.Popen(argv, cwd=REPO, env=_environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_idle(process: subprocess.Popen[str], quiet_s: float = 1.0,
                    timeout: float = 120) -> None:
    """Until the process used no CPU for `quiet_s` (a drive waiting for its runs, no sensor
    ticking): a signal then lands where the drive waits, not inside a tick."""
    def cpu_ticks() -> int:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    deadline = time.monotonic() + timeout
    last, since = cpu_ticks(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{process.pid} never went idle (exit {process.poll()})")
        time.sleep(0.05)
        now = cpu_ticks()
        if now != last:
            last, since = now, time.monotonic()


def finish(process: subprocess.Popen[str], timeout: float = 60) -> ChildResult:
    stdout, stderr = process.communicate(timeout=timeout)
    return ChildResult(process.returncode, stdout, stderr)


def child(config: Config, action: str, *args: str, **options: str | int) -> ChildResult:
    return finish(spawn(child_argv(config, action, *args, **options)))


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"child exited {process.returncode} early: {stderr[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


def after_each_bbcp_start(monkeypatch: pytest.MonkeyPatch, delay_s: float,
                          action: Callable[[], None],
                          ended: Callable[[], None] | None = None) -> None:
    """`action` (in a timer thread of this process) `delay_s` after each bbcp call starts:
    a fault timed to land in the middle of a transfer; `ended` once that call has returned
    (the fault lifted before the next attempt)."""
    real_init = BbcpTransport.__init__

    def init(self: BbcpTransport, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        runner = self._run

        def run_bbcp(argv: list[str], *rest: Any, **options: Any) -> Any:
            threading.Timer(delay_s, action).start()
            try:
                return runner(argv, *rest, **options)
            finally:
                if ended is not None:
                    ended()

        self._run = run_bbcp  # type: ignore[method-assign]

    monkeypatch.setattr(BbcpTransport, "__init__", init)
