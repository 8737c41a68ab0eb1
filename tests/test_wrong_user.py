"""An operator runs ccat-dt as root on a deployment a service user owns (`sudo ccat-dt drive`).

Before, every write succeeded and left root-owned files the service user could neither write
nor delete (a run's event database in DAGSTER_HOME, package directories and tars in the
buffers and LTAs, staged files, whose purge then failed "Permission denied" at every
re-attempt). Now such a command is refused at once (exit 2, one line naming the owner and
what to type), before it opens anything that could create a file; a run a root `dagster asset
materialize` executes fails once before any step. Here a real service user owns a real
deployment, the CLI runs in subprocesses, and the disk is read afterwards: no file appeared,
none is root's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
USER = "ccatsvc"
CCAT_DT = str(Path(sys.executable).parent / "ccat-dt")
DAGSTER = str(Path(sys.executable).parent / "dagster")
MODULE = "primecam/f280"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
    reason="needs root and useradd/runuser: the fault is root acting on another user's "
           "deployment")

# The installed entry point, run by an interpreter the service user can execute: the venv's
# own if the user reaches it, else the system's Python of the same minor version with the
# venv's site-packages (the venv's interpreter may live under root's home, closed to others).
_LAUNCH = ("import site, sys; site.addsitedir({site!r}); sys.path.insert(0, {repo!r}); "
           "sys.argv[0] = 'ccat-dt'; from ccat_assets.cli import main; main()")


def _as_user(argv: list[str], cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, cwd=cwd, env=env, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def service_python() -> list[str]:
    """The command line that runs `ccat-dt` as the service user (created if absent)."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", USER], check=True, capture_output=True)
    site = next(Path(sys.prefix, "lib").glob("python3.*/site-packages"))
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{minor}"):
        command = [python, "-c", _LAUNCH.format(site=str(site), repo=str(REPO))]
        probe = _as_user([*command, "--help"])
        if probe.returncode == 0:
            return command
    pytest.skip(f"the user {USER} can run no Python with this venv's packages "
                f"({sys.executable} unreachable and no /usr/bin/{minor}): {probe.stderr[-300:]}")


def _env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCAT_DT_", "DAGSTER_HOME"))}
    return {**env, "CCAT_DT_CONFIG": str(directory / "ccat-dt.yaml"),
            "DAGSTER_HOME": str(directory / "dagster_home"), "HOME": str(directory)}


@pytest.fixture(scope="module")
def deployment(service_python: list[str]) -> Iterator[Path]:
    """A deployment the service user made and drove: one observation archived and purged, a
    second filed and finished, waiting for its drive."""
    directory = Path(tempfile.mkdtemp(prefix="ccat-wrong-user-", dir="/tmp"))
    directory.chmod(0o755)
    shutil.chown(directory, USER, USER)
    env = _env(directory)
    try:
        def service(*argv: str) -> None:
            done = _as_user([*service_python, *argv], cwd=directory, env=env)
            assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])

        service("init", str(directory))
        for name in ("obs-0001", "obs-0002"):
            service("observation", "start", name)
            _as_user(["mkdir", "-p", str(directory / f"sites/ccat/instruments/{name}")])
            _as_user(["sh", "-c", "head -c 300000 /dev/urandom > "
                      f"{directory}/sites/ccat/instruments/{name}/scan-001.dat"])
            service("file", "--observation", name, "--module", MODULE, f"{name}/scan-001.dat")
            service("observation", "finish", name)
            if name == "obs-0001":
                service("drive", "--wait", "0")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _files(directory: Path) -> dict[str, int]:
    """Every path under the deployment and its owner's uid, read from the disk."""
    return {str(path.relative_to(directory)): path.lstat().st_uid
            for path in directory.rglob("*")}


def test_root_is_refused_on_a_service_users_deployment(
        deployment: Path, service_python: list[str]) -> None:
    env = _env(deployment)
    before = _files(deployment)
    assert 0 not in before.values()
    commands = [["status"], ["drive"], ["retry"], ["migrate"],
                ["why", "obs-0001_primecam-f280_p00"], ["purge"], ["purge", "--plan"],
                ["audit"], ["token", "list"],
                ["stage", "--location", "ramses/processing", "--observation", "obs-0001"],
                ["file", "--observation", "obs-0002", "--module", MODULE, "x.dat"],
                ["init", str(deployment)]]
    for argv in commands:
        done = subprocess.run([CCAT_DT, *argv], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=600, check=False)
        lines = done.stderr.splitlines()
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert len(lines) == 1 and done.stdout == "", (argv, done.stdout, done.stderr)
        assert lines[0].startswith(f"ccat-dt: error: this deployment belongs to {USER} ("), lines
        assert f"sudo -u {USER} env CCAT_DT_CONFIG={deployment}/ccat-dt.yaml " in lines[0]
        assert lines[0].endswith(f"ccat-dt {' '.join(argv)}"), lines
    # `--config` alone, without the environment, names the deployment the same way
    bare = {k: v for k, v in env.items() if k not in ("CCAT_DT_CONFIG", "DAGSTER_HOME")}
    done = subprocess.run([CCAT_DT, "--config", str(deployment / "ccat-dt.yaml"), "drive"],
                          capture_output=True, text=True, env=bare, check=False, timeout=600)
    assert done.returncode == 2 and f"belongs to {USER}" in done.stderr, done.stderr
    assert _files(deployment) == before  # nothing created, changed hands or went away

    # the service is not stuck: its own drive archives the waiting observation, and the disk
    # holds no root-owned file
    done = _as_user([*service_python, "drive", "--wait", "0"], cwd=deployment, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    after = _files(deployment)
    assert "sites/us/lta/obs-0002/obs-0002_primecam-f280_p00.tar" in after
    assert [path for path, uid in after.items() if uid == 0] == []


def test_a_run_root_executes_with_dagster_fails_once_before_any_step(
        deployment: Path) -> None:
    """`dagster asset materialize` as root: the run fails at its start, never retried, with
    the same line; the only root-owned file it leaves is Dagster's own event database of the
    run, which Dagster writes before any code of ours runs (not covered)."""
    env = _env(deployment)
    before = _files(deployment)
    done = subprocess.run(
        [DAGSTER, "asset", "materialize", "-m", "ccat_assets.definitions", "--select",
         "packages", "--partition", "obs-0001_primecam-f280_p00"],
        capture_output=True, text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
        timeout=600, check=False)
    assert done.returncode != 0
    assert f"this deployment belongs to {USER}" in done.stderr, done.stderr[-3000:]
    assert "STEP_START" not in done.stderr and "STEP_UP_FOR_RETRY" not in done.stderr
    after = _files(deployment)
    # (loading the definitions opens OpsDB: SQLite gives a -wal/-shm it makes as root to the
    # database file's owner)
    roots = [path for path, uid in after.items() if uid == 0]
    assert all(path.startswith("dagster_home/history/runs/") for path in roots), roots
    assert [path for path, uid in before.items() if after.get(path, uid) != uid] == []


def test_root_on_its_own_deployment_and_another_user_are_not_refused(
        service_python: list[str]) -> None:
    """Root on a root-owned deployment works as before; another non-root user is not refused
    by us (the permissions stop it, and it cannot leave root's files behind)."""
    directory = Path(tempfile.mkdtemp(prefix="ccat-root-owned-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        env = _env(directory)
        for argv in (["init", str(directory)], ["status"]):
            done = subprocess.run([CCAT_DT, *argv], capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=600, check=False)
            assert done.returncode == 0, (argv, done.stderr)
        done = _as_user([*service_python, "observation", "start", "obs-0009"],
                        cwd=directory, env=env)
        assert done.returncode == 2, done.stderr
        assert "belongs to" not in done.stderr and "readonly" in done.stderr.lower(), \
            done.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_with_a_postgresql_opsdb_the_instance_directory_decides(deployment: Path) -> None:
    """With OpsDB on PostgreSQL no file of ours holds it: the owner of DAGSTER_HOME decides,
    and the command is refused before it connects (this server does not exist)."""
    env = {**_env(deployment),
           "CCAT_DT_OPSDB_URL": "postgresql+psycopg://ccat@127.0.0.1:9/opsdb"}
    before = _files(deployment)
    done = subprocess.run([CCAT_DT, "drive"], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"ccat-dt: error: this deployment belongs to {USER} ({deployment}/dagster_home)"), \
        done.stderr
    assert _files(deployment) == before
