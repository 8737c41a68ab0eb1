"""Section 8: the filing service's acknowledgement and drain rates (issue 15).

A real `ccat-dt serve` child on loopback and PostgreSQL (CCAT_TEST_POSTGRES_URL, default the
test database, in a schema of its own) reached through the tests' TCP relay, which is cut for
the journal case. Each round, in rotated order: the CLI's `file_raw_files` of N files straight
into OpsDB through the same relay (the reference: what filing cost before the service); the
service with the link up (N files in one bulk request, then S files one request each); the
service with the link cut (the same, buffered in the journal), then the link restored and the
journal drained. Files are small (1 KiB): the figures are the per-file cost of HTTP,
validation, hashing and the journal or OpsDB, not disk throughput.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.common import Comparison, SectionResult, Settings, Stats, interleaved
from ccat_dt.client import FilingClient
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.filing import FileSpec, file_raw_files, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.service.tokens import create_token
from ccat_dt.topology import prepare_opsdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.faults.link import Link  # noqa: E402
from tests.services import POSTGRES_URL, free_port  # noqa: E402

MODULE = "primecam/f280"
FILE_BYTES = 1024
BULK_GOAL = 2000.0  # files acknowledged per second in one bulk request: "thousands"


@dataclass
class _Site:
    config: Config
    via: str  # OpsDB through the relay
    link: Link
    client: FilingClient
    health: Callable[[], dict[str, object]]

    @property
    def source(self) -> Path:
        return self.config.resolve_root("sites/ccat/instruments")

    def files(self, observation: str, count: int) -> list[str]:
        paths = []
        for i in range(count):
            rel = f"{observation}/f{i:06d}.dat"
            (self.source / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.source / rel).write_bytes(os.urandom(FILE_BYTES))
            paths.append(rel)
        os.sync()
        return paths

    def pending(self) -> int:
        journal = self.health()["journal"]
        assert isinstance(journal, dict)
        return int(journal["pending"])

    def drainer(self) -> dict[str, float]:
        """Files the drainer applied so far and the seconds it spent applying them."""
        drainer = self.health()["drainer"]
        assert isinstance(drainer, dict)
        return drainer


@contextmanager
def _site(work: Path) -> Iterator[_Site]:
    schema = f"ccat_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as db:
        db.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    link = Link(url.port or 5432)
    process = None
    try:
        config = load_config(write_default_config(work, {
            "opsdb_url": url.render_as_string(hide_password=False),
            "service": {"max_body_bytes": 64 * 2**20, "opsdb_connect_timeout_s": 2}}))
        prepare_opsdb(config)
        token = create_token(OpsDB(config.opsdb_url), config, name="bench", site="ccat",
                             instruments=[])
        via = url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
        port = free_port()
        with (work / "service.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "ccat_assets.cli", "--config", str(config.path), "serve",
                 "--port", str(port), "--log-level", "warning"],
                env={**os.environ, "CCAT_DT_OPSDB_URL": via, "PYTHONPATH": str(REPO)},
                stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(600):
            assert process.poll() is None, (work / "service.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", headers=auth, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        with FilingClient(base, token, timeout_s=600) as client, \
                httpx.Client(headers=auth, timeout=30) as raw:
            yield _Site(config, via, link, client,
                        lambda: raw.get(f"{base}/health").json())
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        link.close()
        with admin.begin() as db:
            db.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def bench_service(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    bulk_n, single_n = settings.service_files, settings.service_singles
    names = (f"r{n:03d}" for n in itertools.count())
    emptied: list[float] = []  # link restored -> journal empty, back-off included
    statuses: dict[str, set[str]] = {}

    with _site(settings.work / "service") as site:
        cli_db = OpsDB(site.via)

        def cli() -> dict[str, float]:
            obs = f"cli-{next(names)}"
            paths = site.files(obs, bulk_n)
            start_observation(cli_db, obs)
            started = time.perf_counter()
            file_raw_files(cli_db, observation=obs, module=MODULE,
                           files=[FileSpec(p) for p in paths])
            return {"cli bulk": time.perf_counter() - started}

        def service(state: str) -> dict[str, float]:
            obs = f"{state}-{next(names)}"
            paths = site.files(obs, bulk_n + single_n)
            site.client.start_observation(obs)
            if state == "cut":
                site.link.cut()
            started = time.perf_counter()
            [answer] = site.client.file(obs, MODULE, paths[:bulk_n])
            bulk_s = time.perf_counter() - started
            started = time.perf_counter()
            singles = [site.client.file_one(obs, MODULE, p) for p in paths[bulk_n:]]
            single_s = time.perf_counter() - started
            statuses.setdefault(state, set()).update(
                {answer["status"], *(a["status"] for a in singles)})
            times = {f"bulk {state}": bulk_s, f"single {state}": single_s}
            if state == "cut":
                before = site.drainer()
                restored = time.perf_counter()
                site.link.restore()
                while site.pending():
                    time.sleep(0.005)
                emptied.append(time.perf_counter() - restored)
                after = site.drainer()
                assert after["applied_files"] - before["applied_files"] == bulk_n + single_n
                times["drain"] = after["busy_s"] - before["busy_s"]  # the drainer at work
            return times

        stats = interleaved({"cli": cli, "up": lambda: service("up"),
                             "cut": lambda: service("cut")}, settings.repeat, log=log)
        cli_db.dispose()

    def rate(key: str, n: int) -> dict[str, float]:
        s = stats[key]
        return {"median": n / s.median, "min": n / s.max, "max": n / s.min}

    result.facts.update({
        "bulk_files": bulk_n, "single_files": single_n, "file_bytes": FILE_BYTES,
        "statuses": {k: sorted(v) for k, v in statuses.items()},
        "rates": {
            "bulk up": rate("bulk up", bulk_n), "single up": rate("single up", single_n),
            "bulk cut": rate("bulk cut", bulk_n), "single cut": rate("single cut", single_n),
            "cli bulk": rate("cli bulk", bulk_n),
            "drain files": rate("drain", bulk_n + single_n),
            "drain requests": rate("drain", 1 + single_n)},
        "times": {k: v.as_dict() for k, v in stats.items()},
        "emptied_s": Stats(emptied).as_dict(),
        "bulk_goal": BULK_GOAL,
    })
    result.comparisons.append(Comparison(
        "service", f"{bulk_n:,} files in one bulk request, OpsDB up: the service (HTTP, "
        "validation, one transaction) vs the CLI's file_raw_files through the same link",
        stats["bulk up"], stats["cli bulk"], None, "service", "CLI"))
