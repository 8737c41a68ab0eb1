"""Production mode with real separation: each site's worker runs in its own mount namespace in
which the other sites' data roots are empty read-only mounts, so it can read and write only its
own site's data; everything that crosses sites goes through ssh (rsync), as between real hosts.
The lifecycle must still complete, each step on the worker of its site."""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, Operation, OperationType, Site
from ccat_dt.storage import files_under
from ccat_dt.topology import prepare_opsdb
from tests.helpers import observe
from tests.services import unavailable
from tests.sshd import SshServer
from tests.test_celery import REPO, quick_polls

# Both Celery suites flush the same Redis database: never at once (pytest -n, loadgroup).
pytestmark = pytest.mark.xdist_group("redis")

SITES = ("ccat", "cologne", "us")


def hide_other_sites(base: Path, site: str) -> list[str]:
    """A shell prefix run by `unshare -m`: every other site's root becomes an empty,
    read-only tmpfs in this process's private view of the filesystem."""
    mounts = [f"mount -t tmpfs -o ro,size=4k none {shlex.quote(str(base / 'sites' / other))}"
              for other in SITES if other != site]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            " && ".join([*mounts, 'exec "$@"']), "sh"]


@pytest.fixture(scope="module")
def namespaces() -> None:
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, check=False).returncode != 0:
        unavailable("mount namespaces", "`unshare --mount` is not permitted here")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every site user can traverse (pytest's own tmp is root-only)."""
    path = Path("/tmp") / f"ccat-isolated-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def isolated(base: Path, sshd: SshServer, postgres_url: str, redis_url: str) -> Config:
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    settings["sites"] = [s for s in settings["sites"]  # type: ignore[index,attr-defined]
                         if s["short_name"] in SITES]
    for site in settings["sites"]:  # type: ignore[attr-defined]
        for location in site["locations"]:
            location["root"] = str(base / "sites" / site["short_name"] / location["name"])
            if location["type"] != "source":
                location["host"] = sshd.destination  # reached over ssh, as another host
    settings["routes"] = [r for r in settings["routes"]  # type: ignore[attr-defined]
                          if r["destination"] in SITES]
    for route in settings["routes"]:  # type: ignore[attr-defined]
        route["transport"] = "rsync"
    settings["ssh"] = {"port": sshd.port, "identity_file": sshd.ssh.identity_file,
                       "known_hosts_file": sshd.ssh.known_hosts_file}
    settings["opsdb_url"] = postgres_url
    settings["execution"] = {"celery_broker": redis_url}
    settings["log_dir"] = str(base / "logs")
    config = load_config(write_default_config(base, overrides=settings))
    prepare_opsdb(config)
    for site in SITES:
        for location in config.settings.site(site).locations:
            Path(location.root).mkdir(parents=True, exist_ok=True)
    return config


def start_worker(config: Config, site: str, base: Path, home: Path,
                 log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [*hide_other_sites(base, site), sys.executable, "-m", "ccat_assets.cli", "--config",
         str(config.path), "worker", "--site", site, "--concurrency", "1",
         "--loglevel", "WARNING"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def test_site_workers_only_touch_their_own_site(
        base: Path, sshd: SshServer, namespaces: None, postgres_url: str,
        dagster_database: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    quick_polls(monkeypatch)
    config = isolated(base, sshd, postgres_url, redis_url)
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": dagster_database}}}))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb, observations=1, files=1)
    probe = subprocess.run([*hide_other_sites(base, "cologne"), "ls", "-A",
                            str(base / "sites" / "ccat")], capture_output=True, text=True,
                           check=True)
    assert probe.stdout == ""  # what the cologne worker sees of the observatory: nothing

    logs = {site: base / f"worker-{site}.log" for site in SITES}
    workers = {site: start_worker(config, site, base, home, logs[site]) for site in SITES}
    try:
        time.sleep(3)
        assert all(w.poll() is None for w in workers.values()), {
            s: p.read_text()[-2000:] for s, p in logs.items()}
        with DagsterInstance.get() as instance:
            report = drive(build_definitions(config), instance)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                os.killpg(worker.pid, 15)
        for worker in workers.values():
            worker.wait(timeout=30)
    assert report.failed == [], {s: p.read_text()[-3000:] for s, p in logs.items()}

    with opsdb.session() as session:
        rows = session.execute(
            select(Operation.operation_type, Operation.worker, Site.short_name)
            .join(DataLocation, Operation.destination_location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .where(Operation.operation_type.in_([OperationType.PACKAGING,
                                                 OperationType.TRANSFER,
                                                 OperationType.ARCHIVE]))).all()
    assert rows and all(worker == site for _, worker, site in rows), rows
    for site in ("cologne", "us"):
        assert len(list((base / "sites" / site / "lta").rglob("*.tar"))) == 2
    assert files_under(source) == []  # purged by the ccat worker
    opsdb.dispose()
