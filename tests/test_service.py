"""The filing service for instrument computers, end to end: a real uvicorn server in a child
process (so it can be SIGKILLed), a real PostgreSQL OpsDB reached through a TCP relay that the
test cuts, the HTTP client, and the pipeline archiving what was filed through the service."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import BetaWarning, DagsterInstance, PreviewWarning
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.checksums import hash_file
from ccat_dt.client import FilingClient, ServiceError
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.filing import FileSpec, file_raw_files, start_observation
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    ApiRequest,
    ExecutedObsUnit,
    FilingDeadLetter,
    LocationType,
    ObservationStatus,
    PackageState,
    RawDataFile,
    RawDataPackage,
    utcnow,
)
from ccat_dt.service.tokens import create_token, revoke_token
from ccat_dt.tarball import read_manifest
from ccat_dt.topology import prepare_opsdb
from tests.faults.link import Link
from tests.helpers import run_cli
from tests.services import free_port

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

MAX_BODY = 256 * 1024
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Site:
    """A deployment whose filing service reaches OpsDB only through `link`."""

    config: Config
    opsdb: OpsDB  # direct, for the test's own checks
    link: Link
    via_link: str  # the OpsDB URL through the relay
    token: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def source(self) -> Path:
        return self.config.resolve_root("sites/ccat/instruments")

    def start(self) -> None:
        env = {**os.environ, "CCAT_DT_OPSDB_URL": self.via_link, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ccat_assets.cli", "--config", str(self.config.path),
                 "serve", "--port", str(self.port), "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1, headers={
                        "Authorization": f"Bearer {self.token}"}).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service did not come up:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def health(self) -> dict[str, Any]:
        return FilingClient(self.url, self.token, attempts=1).health()

    def wait(self, condition: str, predicate: Any, timeout: float = 40.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if predicate(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {condition}: {health}\n"
                                     f"{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def journal_rows(self) -> list[tuple[Any, ...]]:
        path = self.config.resolve_root(self.config.settings.service.journal)
        if not path.exists():
            return []
        with sqlite3.connect(path) as db:
            return db.execute("SELECT seq, request_id, state FROM entries ORDER BY seq").fetchall()


@pytest.fixture
def site(tmp_path: Path, postgres_url: str) -> Iterator[Site]:
    sites = copy.deepcopy(EMBEDDED_DEFAULT["sites"])
    assert isinstance(sites, list)
    # Keep the raw files at the source: this test is about filing and archiving, and purging
    # 1,020 source files with a certificate each would triple its run time.
    sites[0]["locations"][0]["retention_hours"] = 1000
    config = load_config(write_default_config(tmp_path / "deploy", {
        "opsdb_url": postgres_url, "sites": sites,
        "service": {"max_body_bytes": MAX_BODY, "token_refresh_s": 0.3,
                    "opsdb_connect_timeout_s": 2}}))
    prepare_opsdb(config)
    for location in ("sites/ccat/instruments", "sites/ccat/buffer", "sites/cologne/buffer",
                     "sites/cologne/lta", "sites/us/buffer", "sites/us/lta",
                     "sites/ramses/processing"):
        config.resolve_root(location).mkdir(parents=True, exist_ok=True)
    opsdb = OpsDB(postgres_url)
    token = create_token(opsdb, config, name="primecam-daq", site="ccat",
                         instruments=["primecam"])
    url = make_url(postgres_url)
    link = Link(url.port or 5432)
    via = url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
    running = Site(config, opsdb, link, via, token, free_port(), tmp_path / "service.log")
    running.start()
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.process.terminate()
            running.process.wait(timeout=15)
        link.close()
        opsdb.dispose()


def write_files(source: Path, observation: str, module: str, count: int, size: int = 64,
                sub: str = "") -> list[str]:
    paths = []
    for i in range(count):
        rel = f"{observation}/{module}/{sub}scan-{i:05d}.dat"
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(os.urandom(size))
        paths.append(rel)
    return paths


def test_filing_with_the_link_cut_survives_kill_9_and_is_applied_once_then_archived(
        site: Site, tmp_path: Path) -> None:
    test_t0 = time.perf_counter()
    bulk = write_files(site.source, "obs-cut", "primecam/f280", 1000)
    singles = write_files(site.source, "obs-cut", "primecam/f350", 20)
    client = FilingClient(site.url, site.token, backoff_s=0.05, max_backoff_s=0.5)

    started = client.start_observation("obs-cut")
    assert started["status"] == "started"  # the link is up: applied at once (201)
    site.link.cut()

    t0 = time.perf_counter()
    answers = client.file("obs-cut", "primecam/f280", bulk)
    bulk_s = time.perf_counter() - t0
    assert [a["status"] for a in answers] == ["buffered"]
    assert len(answers[0]["uuids"]) == 1000
    t0 = time.perf_counter()
    single_answers = [client.file_one("obs-cut", "primecam/f350", path) for path in singles]
    single_s = time.perf_counter() - t0
    assert {a["status"] for a in single_answers} == {"buffered"}
    assert client.finish_observation("obs-cut")["status"] == "buffered"
    print(f"\nacknowledged with the link cut: bulk {1000 / bulk_s:.0f} files/s, "
          f"single {len(singles) / single_s:.0f} files/s")

    # A retried request (same request id, its answer lost) is acknowledged again, not re-queued.
    retry = {"observation": "obs-cut", "module": "primecam/f350", "path": singles[0],
             "request_id": single_answers[0]["request_id"]}
    auth = {"Authorization": f"Bearer {site.token}"}
    again = httpx.post(f"{site.url}/raw_data_files", json=retry, headers=auth)
    assert again.status_code == 202 and again.json()["replayed"] is True
    assert again.json()["uuids"] == single_answers[0]["uuids"]

    with site.opsdb.session() as session:  # nothing reached OpsDB
        assert session.scalar(select(func.count(RawDataFile.id))) == 0
    health = site.health()
    assert health["opsdb"]["reachable"] is False
    assert health["journal"]["pending"] == 1 + len(singles) + 1
    assert health["journal"]["oldest_pending_age_s"] > 0
    view = client.observation("obs-cut")  # reads merge OpsDB (cut) and the journal
    assert (view["files"], view["status"]) == (1020, "finished")
    buffered_uuid = answers[0]["uuids"][bulk[7]]
    assert client.raw_file(buffered_uuid)["state"] == "buffered"

    site.kill()  # kill -9 with everything still in the journal
    site.start()  # comes up while OpsDB is unreachable (tokens from the journal's cache)
    assert site.health()["journal"]["pending"] == 1 + len(singles) + 1
    site.link.restore()
    t0 = time.perf_counter()
    site.wait("the journal to drain", lambda h: h["journal"]["pending"] == 0)
    drain_s = time.perf_counter() - t0
    print(f"drained 22 requests / 1020 files in {drain_s:.2f} s after the link came back")
    health = site.health()
    assert health["journal"]["dead"] == 0 and health["opsdb"]["reachable"] is True

    with site.opsdb.session() as session:
        rows = session.execute(select(RawDataFile.relative_path, RawDataFile.uuid,
                                      RawDataFile.filed_at)).all()
        obs = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == "obs-cut"))
        assert obs is not None and obs.uuid == started["uuid"]
        assert obs.status == ObservationStatus.FINISHED and obs.finished_at is not None
        requests = session.scalar(select(func.count()).select_from(ApiRequest))
    assert sorted(r.relative_path for r in rows) == sorted(bulk + singles)  # each exactly once
    assert max(r.filed_at for r in rows) <= obs.finished_at  # finished after its files
    assert {r.relative_path: r.uuid for r in rows}[bulk[7]] == buffered_uuid  # the acked uuid
    assert requests == 1 + 1 + len(singles) + 1
    assert client.raw_file(buffered_uuid)["state"] == "filed"
    print(f"service part: {time.perf_counter() - test_t0:.1f} s")

    # The pipeline takes it from there: both packages archived, every filed byte in the LTA.
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(  # all runs' events in one SQLite file
        "telemetry:\n  enabled: false\nevent_log_storage:\n"
        "  module: dagster._core.storage.event_log\n"
        "  class: ConsolidatedSqliteEventLogStorage\n"
        f"  config:\n    base_dir: {home / 'history'}\n")
    t0 = time.perf_counter()
    with DagsterInstance.from_config(str(home)) as instance:
        report = drive(build_definitions(site.config), instance)
    assert report.failed == []
    with site.opsdb.session() as session:
        packages = session.scalars(select(RawDataPackage)).all()
        assert {p.state for p in packages} == {PackageState.ARCHIVED}
        archived: list[tuple[str, str, str]] = []
        for package in packages:
            for copy in package.copies:
                if copy.location.location_type == LocationType.LONG_TERM_ARCHIVE:
                    tar = Path(copy.location.root) / copy.relative_path
                    assert hash_file(tar)[0] == package.checksum
                    archived += [(copy.location.label, e.path, e.checksum)
                                 for e in read_manifest(tar)]
        filed = session.execute(select(RawDataFile.relative_path, RawDataFile.checksum)).all()
    print(f"pipeline: {time.perf_counter() - t0:.1f} s")
    for lta in ("cologne/lta", "us/lta"):  # every filed file, byte-identical, in both LTAs
        assert sorted((Path(p).name, c) for label, p, c in archived if label == lta) == \
            sorted((Path(p).name, c) for p, c in filed)
    package_name = packages[0].name
    assert client.package(package_name)["state"] == "archived"
    client.close()


def test_hostile_requests_get_a_4xx_naming_the_field_and_change_nothing(
        site: Site, tmp_path: Path) -> None:
    good = write_files(site.source, "obs-h", "primecam/f280", 2, size=10)
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"secret")
    (site.source / "obs-h" / "escape.dat").symlink_to(outside)
    for awkward in (b"obs-h/scan-\xff.dat", b"obs-h\\scan.dat"):  # there, but not fileable
        with open(os.fsencode(site.source) + b"/" + awkward, "wb") as stream:
            stream.write(b"x")
    client = FilingClient(site.url, site.token, attempts=1)
    client.start_observation("obs-h")
    checksum, size = hash_file(site.source / good[0])
    auth = {"Authorization": f"Bearer {site.token}"}

    def bulk(**changes: Any) -> dict[str, Any]:
        return {"observation": "obs-h", "module": "primecam/f280",
                "files": [{"path": good[0], "size": size, "checksum": checksum}], **changes}

    def state() -> tuple[Any, ...]:
        with site.opsdb.session() as session:
            counts = tuple(session.scalar(select(func.count()).select_from(table))
                           for table in (RawDataFile, ExecutedObsUnit, ApiRequest))
        return counts, site.journal_rows()

    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("traversal", bulk(files=[{"path": "../../../etc/passwd"}]), 422, "files[0].path"),
        ("absolute", bulk(files=[{"path": "/etc/passwd"}]), 422, "files[0].path"),
        ("symlink out", bulk(files=[{"path": "obs-h/escape.dat"}]), 422, "files[0].path"),
        ("wrong checksum", bulk(files=[{"path": good[0], "checksum": "0" * 32}]), 422,
         "files[0].checksum"),
        ("wrong size", bulk(files=[{"path": good[0], "size": size + 1}]), 422, "files[0].size"),
        ("bad checksum", bulk(files=[{"path": good[0], "checksum": "xyz"}]), 422,
         "files[0].checksum"),
        ("unknown module", bulk(module="primecam/f999"), 422, "module"),
        ("other instrument", bulk(module="chai/lfa"), 403, "module"),
        ("negative size", bulk(files=[{"path": good[0], "size": -1}]), 422, "files[0].size"),
        ("unknown key", bulk(extra=1), 422, "extra"),
        ("no files", bulk(files=[]), 422, "files"),
        ("one bad of two", bulk(files=[{"path": good[1]}, {"path": "obs-h/nope.dat"}]), 422,
         "files[1].path"),
        ("not UTF-8", bulk(files=[{"path": "obs-h/scan-\udcff.dat"}]), 422, "files[0].path"),
        ("backslash", bulk(files=[{"path": "obs-h\\scan.dat"}]), 422, "files[0].path"),
    ]
    before = state()
    for cut in (False, True):  # the same answers whether OpsDB is reachable or not
        if cut:
            site.link.cut()
        for name, body, status, field in cases:  # JSON escapes what UTF-8 cannot carry
            response = httpx.post(f"{site.url}/raw_data_files/bulk", content=json.dumps(body),
                                  headers={**auth, "Content-Type": "application/json"})
            assert response.status_code == status, (name, response.text)
            answer = response.json()
            assert field in [e["field"] for e in answer["errors"]], (name, answer)
            assert answer["detail"], name
        raw = httpx.post(f"{site.url}/raw_data_files/bulk", content=b'{"observation": "obs-h",',
                         headers={**auth, "Content-Type": "application/json"})
        assert raw.status_code == 400 and raw.json()["errors"][0]["field"] == "body", raw.text
        huge = bulk(files=[{"path": f"obs-h/{i:08d}.dat"} for i in range(MAX_BODY // 20)])
        big = httpx.post(f"{site.url}/raw_data_files/bulk", json=huge, headers=auth)
        assert big.status_code == 413 and "max_body_bytes" in big.json()["detail"], big.text
        missing = httpx.post(f"{site.url}/raw_data_files/bulk", json=bulk())
        assert missing.status_code == 401
        assert missing.json()["errors"][0]["field"] == "Authorization"
        forged = httpx.post(f"{site.url}/raw_data_files/bulk", json=bulk(),
                            headers={"Authorization": "Bearer ccat_forged"})
        assert forged.status_code == 401
        if cut:
            site.link.restore()
        assert state() == before, name

    revoke_token(site.opsdb, "primecam-daq")
    deadline = time.monotonic() + 10
    while True:  # the service re-reads tokens every service.token_refresh_s
        response = httpx.post(f"{site.url}/raw_data_files/bulk", json=bulk(), headers=auth)
        if response.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    with site.opsdb.session() as session:
        stored = session.scalar(select(func.count()).select_from(RawDataFile))
        assert stored is not None and stored <= 1
    with pytest.raises(ServiceError, match="revoked"):
        client.file("obs-h", "primecam/f280", [good[1]])


def test_a_request_that_becomes_invalid_while_buffered_is_a_dead_letter(site: Site) -> None:
    paths = write_files(site.source, "obs-d", "primecam/f280", 2)
    client = FilingClient(site.url, site.token, attempts=1)
    client.start_observation("obs-d")
    site.link.cut()
    assert client.file("obs-d", "primecam/f280", paths[:1])[0]["status"] == "buffered"
    assert client.file("obs-d", "primecam/f280", paths[1:])[0]["status"] == "buffered"
    # Meanwhile someone files the first path under another observation, straight into OpsDB.
    start_observation(site.opsdb, "obs-other")
    file_raw_files(site.opsdb, observation="obs-other", module="primecam/f280",
                   files=[FileSpec(paths[0])])
    site.link.restore()
    health = site.wait("the drain", lambda h: h["journal"]["pending"] == 0)
    assert health["journal"]["dead"] == 1
    letter = health["journal"]["dead_letters"][0]
    assert "already filed under observation 'obs-other'" in letter["error"]
    with site.opsdb.session() as session:  # the later, valid request was still applied
        assert session.scalar(select(RawDataFile.relative_path).join(ExecutedObsUnit)
                              .where(ExecutedObsUnit.name == "obs-d")) == paths[1]
    shown = subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config",
                            str(site.config.path), "status"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "1 dead letter(s)" in shown.stdout and "obs-other" in shown.stdout


def test_dead_letters_are_told_then_retried_or_discarded_by_a_person(site: Site) -> None:
    paths = write_files(site.source, "obs-r", "primecam/f280", 2)
    client = FilingClient(site.url, site.token, attempts=1)
    client.start_observation("obs-r")
    site.link.cut()
    for path in paths:
        assert client.file("obs-r", "primecam/f280", [path])[0]["status"] == "buffered"
    gone = site.source / paths[0]  # deleted while buffered: fixable by restoring it
    kept = gone.read_bytes()
    gone.unlink()
    start_observation(site.opsdb, "obs-other")  # filed elsewhere meanwhile: never fixable
    file_raw_files(site.opsdb, observation="obs-other", module="primecam/f280",
                   files=[FileSpec(paths[1])])
    site.link.restore()
    health = site.wait("two dead letters", lambda h: h["journal"]["pending"] == 0
                       and h["journal"]["dead"] == 2)
    assert health["status"] == "degraded"
    missing, other = (letter["seq"] for letter in health["journal"]["dead_letters"])

    def mirrored() -> set[str]:
        deadline = time.monotonic() + 20
        while True:
            with site.opsdb.session() as session:
                told = {p.key for p in current_problems(session, site.config, utcnow())
                        if p.kind == "dead_letter"}
                rows = {r.request_id for r in session.scalars(select(FilingDeadLetter))}
            letters = {e["request_id"] for e in site.health()["journal"]["dead_letters"]}
            if rows == letters or time.monotonic() > deadline:
                assert rows == letters
                assert told == {f"dead_letter:ccat:{r}" for r in rows}
                return rows
            time.sleep(0.1)

    assert len(mirrored()) == 2  # a person is told (notify reads the mirror in OpsDB)

    def journal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config",
                               str(site.config.path), "journal", *args], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              check=False)

    listed = journal("list")
    assert listed.returncode == 1, listed.stderr[-2000:]  # done, with problems found
    assert "2 dead letter(s)" in listed.stdout and f"#{missing} files obs-r" in listed.stdout
    assert "does not exist" in listed.stdout and "obs-other" in listed.stdout

    rows = site.journal_rows()  # bad input: a clear error, exit 2, nothing changed
    for args, message in ((["retry", "999"], "no journal entry #999"),
                          (["retry"], "needs the entry number"),
                          (["discard", str(other)], "needs --reason"),
                          (["discard", str(other), "--reason", " "],
                           "argument --reason: empty")):
        answer = journal(*args)
        assert answer.returncode == 2, (args, answer.stdout, answer.stderr)
        last = answer.stderr.splitlines()[-1]  # an argparse error follows its usage lines
        assert last.startswith(("ccat-dt: error: ", "ccat-dt journal: error: ")) \
            and message in last, (args, answer.stderr)
    assert site.journal_rows() == rows

    gone.write_bytes(kept)  # the cause fixed: a retry applies it
    assert journal("retry", str(missing)).returncode == 0
    site.wait("the retried entry", lambda h: h["journal"]["dead"] == 1
              and h["journal"]["pending"] == 0)
    with site.opsdb.session() as session:
        filed = session.execute(select(RawDataFile.relative_path, ExecutedObsUnit.name)
                                .join(ExecutedObsUnit)).all()
    assert sorted(filed) == [(paths[0], "obs-r"), (paths[1], "obs-other")]
    again = journal("retry", str(missing))  # applied now: not a dead letter any more
    assert again.returncode == 2 and "is applied, not a dead letter" in again.stderr

    discarded = journal("discard", str(other), "--reason", "filed under obs-other by hand")
    assert discarded.returncode == 0, discarded.stderr
    health = site.wait("the discard", lambda h: h["journal"]["dead"] == 0)
    assert health["journal"]["discarded"] == 1
    assert mirrored() == set()  # the notification resolves
    assert journal("list").returncode == 0
    # the start (applied at once, kept for its retries), the retried entry, the discarded one
    assert [r[2] for r in site.journal_rows()] == ["applied", "applied", "discarded"]


def test_the_same_file_filed_twice_while_journaled_is_acknowledged_twice_and_filed_once(
        site: Site) -> None:
    """Two instrument processes (or a client restarted, with a new request id) file the same
    file while OpsDB is out of reach: both are acknowledged with one uuid, as they are when it
    is reachable (before: the second got 409 "a file uuid of this request is already used by an
    earlier request; give new uuids or none", although it gave none, and the client raised)."""
    paths = write_files(site.source, "obs-twice", "primecam/f280", 1)
    client = FilingClient(site.url, site.token, attempts=1)
    client.start_observation("obs-twice")
    site.link.cut()
    first, second = (client.file_one("obs-twice", "primecam/f280", paths[0]) for _ in range(2))
    assert (first["status"], second["status"]) == ("buffered", "buffered")
    assert first["uuids"] == second["uuids"]
    site.link.restore()
    health = site.wait("the drain", lambda h: h["journal"]["pending"] == 0)
    assert health["journal"]["dead"] == 0
    with site.opsdb.session() as session:
        filed = session.execute(select(RawDataFile.relative_path, RawDataFile.uuid)).all()
    assert [tuple(row) for row in filed] == [(paths[0], first["uuids"][paths[0]])]
    assert [state for _, _, state in site.journal_rows()] == ["applied"] * 3  # and the start


def test_a_retry_journaled_after_a_direct_apply_is_answered_with_what_opsdb_holds(
        site: Site) -> None:
    """A request applied at once whose answer was lost (the client timed out) is retried with
    the same request id after the link dropped, so the retry is journaled; another process
    starts the same observation meanwhile. Each answer names the uuids OpsDB holds and nothing
    is applied twice (before: the journal did not know the applied requests and answered with
    new uuids that never reached OpsDB)."""
    paths = write_files(site.source, "obs-lost", "primecam/f280", 1)
    auth = {"Authorization": f"Bearer {site.token}"}
    start = {"name": "obs-lost", "request_id": "start-lost"}
    file = {"observation": "obs-lost", "module": "primecam/f280", "path": paths[0],
            "request_id": "file-lost"}
    started = httpx.post(f"{site.url}/executed_obs_units/start", json=start, headers=auth)
    filed = httpx.post(f"{site.url}/raw_data_files", json=file, headers=auth)
    assert (started.status_code, filed.status_code) == (201, 201)
    site.link.cut()
    retried = [httpx.post(f"{site.url}{path}", json=body, headers=auth) for path, body in
               (("/executed_obs_units/start", start), ("/raw_data_files", file))]
    other = FilingClient(site.url, site.token, attempts=1).start_observation("obs-lost")
    assert retried[1].json()["uuids"] == filed.json()["uuids"]
    assert retried[0].json()["uuid"] == other["uuid"] == started.json()["uuid"]
    assert [r.status_code for r in retried] == [200, 200]  # replayed: applied already
    site.link.restore()
    health = site.wait("the drain", lambda h: h["journal"]["pending"] == 0)
    assert health["journal"]["dead"] == 0
    with site.opsdb.session() as session:
        observations = session.execute(select(ExecutedObsUnit.name, ExecutedObsUnit.uuid)).all()
        files = session.execute(select(RawDataFile.relative_path, RawDataFile.uuid)).all()
    assert [tuple(row) for row in observations] == [("obs-lost", started.json()["uuid"])]
    assert [tuple(row) for row in files] == list(filed.json()["uuids"].items())


def test_starting_or_finishing_an_observation_again_answers_200_saying_so(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """An instrument (or `ccat-dt observation start --api`) starting an observation that is
    open already, with a request of its own (a DAQ restarted, a second process): nothing
    changes, and the answer says so, as `ccat-dt observation start` does locally: 200, status
    "already open", the observation's uuid (before: 201 "started", as if this request had
    opened it). A retry of that request gets the same answer. A second finish likewise: 200
    "already finished" with the first's moment (before: 201 "finished")."""
    auth = {"Authorization": f"Bearer {site.token}"}
    start = f"{site.url}/executed_obs_units/start"
    first = httpx.post(start, json={"name": "obs-again"}, headers=auth)
    with site.opsdb.session() as session:
        opened = session.execute(select(ExecutedObsUnit.uuid, ExecutedObsUnit.started_at)
                                 .where(ExecutedObsUnit.name == "obs-again")).one()
    again = httpx.post(start, json={"name": "obs-again", "request_id": "again"}, headers=auth)
    retried = httpx.post(start, json={"name": "obs-again", "request_id": "again"}, headers=auth)
    assert (first.status_code, first.json()["status"]) == (201, "started"), first.text
    assert (again.status_code, again.json()["status"]) == (200, "already open"), again.text
    assert (retried.status_code, retried.json()["status"]) == (200, "already open"), retried.text
    assert first.json()["uuid"] == again.json()["uuid"] == retried.json()["uuid"] == opened.uuid
    assert run_cli("--config", str(site.config.path), "observation", "start", "obs-again",
                   "--api", site.url, "--token", site.token) == 0
    assert capsys.readouterr().out == f"{opened.uuid} (already open)\n"
    with site.opsdb.session() as session:  # one observation, as it was opened, still open
        rows = session.execute(select(ExecutedObsUnit.uuid, ExecutedObsUnit.started_at,
                                      ExecutedObsUnit.status)).all()
    assert [tuple(r) for r in rows] == [(opened.uuid, opened.started_at,
                                         ObservationStatus.OPEN)]

    finish = f"{site.url}/executed_obs_units/obs-again/finish"
    finished = httpx.put(finish, headers=auth)
    with site.opsdb.session() as session:
        finished_at = session.scalar(select(ExecutedObsUnit.finished_at))
    assert finished_at is not None
    finished_again = httpx.put(finish, headers=auth)
    assert (finished.status_code, finished.json()["status"]) == (201, "finished"), finished.text
    assert (finished_again.status_code, finished_again.json()["status"]) == (
        200, "already finished"), finished_again.text
    assert datetime.fromisoformat(finished_again.json()["finished_at"]) == finished_at.replace(
        tzinfo=UTC)
    assert run_cli("--config", str(site.config.path), "observation", "finish", "obs-again",
                   "--api", site.url, "--token", site.token) == 0
    assert capsys.readouterr().out == "observation obs-again already finished\n"
    with site.opsdb.session() as session:  # finished once, at the first finish's moment
        assert session.scalar(select(ExecutedObsUnit.finished_at)) == finished_at


def test_starting_an_observation_under_another_uuid_is_refused_whether_direct_or_journaled(
        site: Site) -> None:
    """An observation an instrument starts with its own uuid, started again with another:
    409 naming the uuid it has, nothing changed, whether OpsDB answers at once or the request
    is journaled (before: 200 "already open" with the other uuid when OpsDB answered, 409
    from the journal). A journaled start with a uuid that finds the observation started
    meanwhile under another is a dead letter, a person told; one without a uuid is applied
    (the uuid the journal made up for it was never the instrument's)."""
    auth = {"Authorization": f"Bearer {site.token}"}
    start = f"{site.url}/executed_obs_units/start"
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())

    def uuids() -> dict[str, str]:
        with site.opsdb.session() as session:
            rows = session.execute(select(ExecutedObsUnit.name, ExecutedObsUnit.uuid)).all()
            return {name: value for name, value in rows}

    assert httpx.post(start, json={"name": "obs-u", "uuid": mine}, headers=auth
                      ).status_code == 201
    refused = httpx.post(start, json={"name": "obs-u", "uuid": other}, headers=auth)
    assert refused.status_code == 409 and mine in refused.json()["detail"], refused.text
    assert uuids() == {"obs-u": mine}
    for body in ({"name": "obs-u", "uuid": mine}, {"name": "obs-u"}):
        again = httpx.post(start, json=body, headers=auth)
        assert (again.status_code, again.json()["uuid"]) == (200, mine), again.text

    site.link.cut()
    refused = httpx.post(start, json={"name": "obs-u", "uuid": other}, headers=auth)
    assert refused.status_code == 409 and mine in refused.json()["detail"], refused.text
    given = httpx.post(start, json={"name": "obs-given", "uuid": other}, headers=auth)
    made_up = httpx.post(start, json={"name": "obs-made-up"}, headers=auth)
    assert [r.json()["status"] for r in (given, made_up)] == ["buffered", "buffered"]
    # Meanwhile both are started straight into OpsDB, each under a uuid of its own.
    first, second = (start_observation(site.opsdb, name) for name in ("obs-given", "obs-made-up"))
    site.link.restore()
    health = site.wait("the drain", lambda h: h["journal"]["pending"] == 0)
    assert health["journal"]["dead"] == 1, health
    letter = health["journal"]["dead_letters"][0]
    assert letter["observation"] == "obs-given" and first in letter["error"], letter
    assert uuids() == {"obs-u": mine, "obs-given": first, "obs-made-up": second}


def test_a_second_service_on_the_same_journal_refuses_to_start(site: Site) -> None:
    """A restart that overlapped, or systemd's service and one started by hand on another port:
    two drainers of one journal would apply its entries side by side (the marker keeps an entry
    from being applied twice, but the loser of a race on a lone file entry gets the unique-key
    clash as a FilingError and can mark it dead although it was applied). The second refuses,
    saying which journal and who holds it, and the first goes on (before: both ran)."""
    client = FilingClient(site.url, site.token, attempts=1)
    client.start_observation("obs-one")
    rows = site.journal_rows()
    env = {**os.environ, "CCAT_DT_OPSDB_URL": site.via_link, "PYTHONPATH": str(ROOT)}
    second = subprocess.Popen(
        [sys.executable, "-m", "ccat_assets.cli", "--config", str(site.config.path), "serve",
         "--port", str(free_port()), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = second.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        second.kill()
        second.communicate()
        raise AssertionError("a second `ccat-dt serve` ran on the same journal") from None
    assert second.returncode == 2, stderr
    assert stderr.startswith("ccat-dt: error: the filing journal "), stderr
    assert site.process is not None
    assert f"in use by another `ccat-dt serve` (pid {site.process.pid} " in stderr
    assert site.journal_rows() == rows
    assert client.start_observation("obs-two")["status"] == "started"


def test_a_full_journal_disk_answers_503_and_stores_nothing_until_there_is_room(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpsDB out of reach and the journal's disk full: a request is not acknowledged, the
    client is told to retry (503, Retry-After) and `/health` says why; once there is room the
    same request is journaled and applied once (before: 500 "Internal Server Error", nothing
    on /health)."""
    from fastapi.testclient import TestClient

    from ccat_dt.service.app import create_app
    from ccat_dt.service.core import FilingService

    monkeypatch.setenv("CCAT_DT_OPSDB_URL", site.via_link)
    service = FilingService(load_config(site.config.path), journal_path=str(tmp_path / "j.db"))
    auth = {"Authorization": f"Bearer {site.token}"}
    service.authenticate(site.token)  # its tokens read from OpsDB once
    site.link.cut()
    with TestClient(create_app(service), raise_server_exceptions=False) as http:
        database = service.journal._db  # the disk fills: no page beyond those it has
        pages = database.execute("PRAGMA page_count").fetchone()[0]
        database.execute(f"PRAGMA max_page_count = {pages}")
        for n in range(500):
            body = {"name": f"obs-full-{n}", "request_id": f"full-{n}"}
            answer = http.post("/executed_obs_units/start", json=body, headers=auth)
            if answer.status_code != 202:
                break
        assert answer.status_code == 503, answer.text
        assert "journal" in answer.json()["detail"] and "full" in answer.json()["detail"]
        assert answer.headers["Retry-After"]
        assert service.journal.find(body["request_id"]) is None  # nothing stored
        health = http.get("/health", headers=auth).json()
        assert health["status"] == "degraded" and "full" in health["journal"]["error"]
        database.execute("PRAGMA max_page_count = 1073741823")  # room again
        again = http.post("/executed_obs_units/start", json=body, headers=auth)
        assert again.status_code == 202, again.text
        assert http.get("/health", headers=auth).json()["journal"]["error"] is None
        site.link.restore()
        deadline = time.monotonic() + 20
        while service.journal.pending()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    with site.opsdb.session() as session:
        started = session.scalars(select(ExecutedObsUnit.name)).all()
    assert sorted(started) == sorted(f"obs-full-{i}" for i in range(n + 1))
