"""Sections 6 and 7: the sensor queries and the deletion planner against a large OpsDB.

Rows are inserted directly (executemany on the SQLite connection, not through the filing API),
into a schema made by the real migrations. The shape is the steady state of a long-running
deployment: almost every package is archived in both LTAs with its source files and buffer
copies deleted; a constant frontier of packages is in flight (built, transferring, archived but
not yet purged); one observation has just finished and is not packaged yet.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.orm import Session

from bench.common import SectionResult, Settings, Stats, fmt_s
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import PhysicalCopy, RawDataPackage
from ccat_dt.packages import plan_packages
from ccat_dt.pending import (
    PAGE,
    finished_packages,
    lta_copies_due,
    new_packages,
    site_copies_due,
)
from ccat_dt.purge_cycle import packages_with_purgeable_copies, plan_cycle
from ccat_dt.report import summarize
from ccat_dt.topology import prepare_opsdb

MODULES = (("primecam", "f280"), ("chai", "lfa"))
TS = "%Y-%m-%d %H:%M:%S.%f"
PACKAGE_BYTES = 50 * 10**9  # ~50 GB packages, as in production
CHUNK_ROWS = 200_000  # physical-copy rows per insert transaction (bounds the generator's memory)
INSERTS = {
    "observations": "INSERT INTO executed_obs_units (id, uuid, name, status, started_at, "
                    "finished_at) VALUES (?,?,?,?,?,?)",
    "packages": "INSERT INTO raw_data_packages (id, uuid, name, observation_id, module_id, "
                "part, state, primary_site_id, size, checksum_algorithm, checksum, adler32, "
                "manifest, created_at, built_at, archived_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "raw files": "INSERT INTO raw_data_files (id, uuid, source_location_id, relative_path, "
                 "size, checksum_algorithm, checksum, observation_id, module_id, package_id, "
                 "filed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    "physical copies": "INSERT INTO physical_copies (id, kind, location_id, relative_path, "
                       "size, status, checksum, created_at, verified_at, deleted_at, "
                       "package_id, raw_data_file_id, staging_request_id) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "operations": "INSERT INTO operations (id, operation_type, status, package_id, copy_id, "
                  "source_location_id, destination_location_id, transport, retry_count, bytes, "
                  "duration_s, error, reason, evidence, run_id, started_at, finished_at, worker, "
                  "log_path) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
}


def _ts(moment: datetime) -> str:
    return moment.strftime(TS)


def _hex(n: int, width: int = 32) -> str:
    return f"{(n * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << (4 * width)):0{width}x}"


def _uuid(kind: int, n: int) -> str:
    return f"{kind:08x}-0000-4000-8000-{n:012x}"


@dataclass
class Frontier:
    observations: list[int] = field(default_factory=list)
    packages: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)


class SyntheticOpsDB:
    """A migrated OpsDB for the embedded default, filled with history by direct inserts."""

    def __init__(self, root: Path) -> None:
        if root.exists():
            shutil.rmtree(root)
        self.root = root
        self.config_path = write_default_config(root)
        self.config: Config = load_config(self.config_path)
        prepare_opsdb(self.config)
        self.path = Path(self.config.opsdb_url.removeprefix("sqlite:///"))
        self.engine = create_engine(self.config.opsdb_url)
        with self.engine.begin() as c:
            self.site: dict[str, int] = {name: id_ for name, id_ in c.execute(
                text("SELECT short_name, id FROM sites")).all()}
            self.location = {(s, n): i for s, n, i in c.execute(text(
                "SELECT s.short_name, l.name, l.id FROM data_locations l "
                "JOIN sites s ON s.id = l.site_id")).all()}
            self.module = {(i, n): m for i, n, m in c.execute(text(
                "SELECT instrument, name, id FROM instrument_modules")).all()}
        self.next = {"obs": 1, "pkg": 1, "file": 1, "copy": 1, "op": 1}
        self.frontier = Frontier()
        self.counts: dict[str, int] = defaultdict(int)

    # -- inserting ------------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA synchronous=OFF")  # scratch data: generation speed only
            yield cursor
            raw.commit()
        finally:
            raw.close()

    def _take(self, kind: str, n: int = 1) -> int:
        first = self.next[kind]
        self.next[kind] += n
        return first

    def add_packages(self, count: int, files_per_package: int, start: datetime, end: datetime,
                     state: str = "archived") -> list[int]:
        """`count` packages (two per observation, one per module) created between start and
        end. state: archived (purged everywhere but the LTAs), waiting, transferring or
        unpurged (archived, source files and observatory buffer copy still present). Rows are
        inserted in chunks of ~CHUNK_ROWS copies, so memory stays small at any scale."""
        rows: dict[str, list[tuple[Any, ...]]] = {key: [] for key in INSERTS}
        file_size = PACKAGE_BYTES // files_per_package
        step = (end - start) / max(count, 1)
        package_ids = []
        archived = state == "archived"
        lta = {"cologne": self.location[("cologne", "lta")], "us": self.location[("us", "lta")]}
        buffers = {"cologne": self.location[("cologne", "buffer")],
                   "us": self.location[("us", "buffer")]}
        obs_buffer, source = self.location[("ccat", "buffer")], self.location[("ccat",
                                                                               "instruments")]
        for k in range(count):
            created = start + step * k
            t = _ts(created)
            later = _ts(created + timedelta(hours=6))
            if k % 2 == 0:
                obs_id = self._take("obs")
                obs_name = f"obs-{obs_id:07d}"
                rows["observations"].append((obs_id, _uuid(1, obs_id), obs_name, "finished", t,
                                             t))
                if not archived:
                    self.frontier.observations.append(obs_id)
            instrument, module = MODULES[k % 2]
            module_id = self.module[(instrument, module)]
            pkg_id = self._take("pkg")
            package_ids.append(pkg_id)
            primary, other = ("cologne", "us") if pkg_id % 2 else ("us", "cologne")
            name = f"{obs_name}_{instrument}-{module}_p00"
            rel = f"{obs_name}/{name}.tar"
            paths = [f"{obs_name}/{instrument}/{module}/scan-{i:04d}.dat"
                     for i in range(files_per_package)]
            first_file = self._take("file", files_per_package)
            checksums = [_hex(first_file + i) for i in range(files_per_package)]
            manifest = json.dumps({"files": [{"path": p, "size": file_size, "checksum": c}
                                             for p, c in zip(paths, checksums, strict=True)]})
            pkg_state = {"archived": "archived", "unpurged": "archived", "waiting": "waiting",
                         "transferring": "transferring"}[state]
            checksum = _hex(pkg_id + 10**12)
            size = file_size * files_per_package + 10240 * (files_per_package + 2)
            rows["packages"].append((pkg_id, _uuid(2, pkg_id), name, obs_id, module_id, 0,
                                     pkg_state, self.site[primary], size, "xxh3_128", checksum,
                                     _hex(pkg_id, 8), manifest, t, t,
                                     later if pkg_state == "archived" else None))
            raw_status = "deleted" if archived else "present"
            deleted_at = later if archived else None
            first_copy = self._take("copy", files_per_package)
            rows["raw files"] += [
                (first_file + i, _uuid(3, first_file + i), source, path, file_size, "xxh3_128",
                 file_checksum, obs_id, module_id, pkg_id, t)
                for i, (path, file_checksum) in enumerate(zip(paths, checksums, strict=True))]
            rows["physical copies"] += [
                (first_copy + i, "raw_file", source, path, file_size, raw_status, file_checksum,
                 t, t, deleted_at, None, first_file + i, None)
                for i, (path, file_checksum) in enumerate(zip(paths, checksums, strict=True))]
            if not archived:
                self.frontier.files += range(first_file, first_file + files_per_package)

            # observatory buffer, primary archive buffer + LTA, other archive buffer + LTA
            placed = [(obs_buffer, "deleted" if archived else "present")]
            if state != "waiting":
                placed += [(buffers[primary], "deleted"), (lta[primary], "present")]
            if state in ("archived", "unpurged"):
                placed += [(buffers[other], "deleted"), (lta[other], "present")]
            for location, status in placed:
                rows["physical copies"].append((
                    self._take("copy"), "package", location, rel, size, status, checksum, t, t,
                    later if status == "deleted" else None, pkg_id, None, None))
            if archived:
                evidence = json.dumps({"copies": [{"site": s, "checksum": checksum}
                                                  for s in ("cologne", "us")]})
                for kind, src, dst, ev in (
                        ("packaging", source, obs_buffer, None),
                        ("transfer", obs_buffer, buffers[primary], None),
                        ("archive", buffers[primary], lta[primary], None),
                        ("transfer", lta[primary], buffers[other], None),
                        ("archive", buffers[other], lta[other], None),
                        ("deletion", None, obs_buffer, evidence),
                        ("deletion", None, buffers[primary], evidence),
                        ("deletion", None, buffers[other], evidence)):
                    rows["operations"].append((
                        self._take("op"), kind, "completed", pkg_id, None, src, dst, "local", 0,
                        size, 100.0, None, None, ev, None, t, later, "bench", None))
            else:
                self.frontier.packages.append(pkg_id)
            if len(rows["physical copies"]) >= CHUNK_ROWS:
                self._insert(rows)
        self._insert(rows)
        return package_ids

    def _insert(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Write the collected rows in one transaction and empty the lists."""
        with self._cursor() as cur:
            for key, statement in INSERTS.items():
                if rows[key]:
                    cur.executemany(statement, rows[key])
        for key in INSERTS:
            self.counts[key] += len(rows[key])
            rows[key].clear()

    def add_frontier(self, in_flight: int, files_per_package: int, now: datetime) -> None:
        """Packages in flight (a third each waiting, transferring, archived-not-purged) and one
        finished observation whose files (2 modules) are filed but not yet packaged."""
        third = max(1, in_flight // 3)
        for state in ("waiting", "transferring", "unpurged"):
            self.add_packages(third, files_per_package, now - timedelta(days=2),
                              now - timedelta(days=1), state)
        self.add_unpackaged(files_per_package, now)

    def add_unpackaged(self, files_per_package: int, now: datetime) -> None:
        obs_id = self._take("obs")
        obs_name = f"obs-{obs_id:07d}"
        t = _ts(now - timedelta(hours=1))
        source = self.location[("ccat", "instruments")]
        file_size = PACKAGE_BYTES // files_per_package
        files, copies = [], []
        for instrument, module in MODULES:
            for i in range(files_per_package):
                file_id = self._take("file")
                path = f"{obs_name}/{instrument}/{module}/scan-{i:04d}.dat"
                files.append((file_id, _uuid(3, file_id), source, path, file_size, "xxh3_128",
                              _hex(file_id), obs_id, self.module[(instrument, module)], None, t))
                copies.append((self._take("copy"), "raw_file", source, path, file_size,
                               "present", _hex(file_id), t, t, None, None, file_id, None))
                self.frontier.files.append(file_id)
        self.frontier.observations.append(obs_id)
        with self._cursor() as cur:
            cur.execute(INSERTS["observations"],
                        (obs_id, _uuid(1, obs_id), obs_name, "finished", t, t))
            cur.executemany(INSERTS["raw files"], files)
            cur.executemany(INSERTS["physical copies"], copies)
        self.counts["observations"] += 1
        self.counts["raw files"] += len(files)
        self.counts["physical copies"] += len(copies)

    def remove_frontier(self) -> None:
        """Take the in-flight rows out again (the next year's history replaces them)."""
        f = self.frontier
        removed_copies = 0
        with self._cursor() as cur:
            for start in range(0, max(len(f.files), 1), 500):
                chunk = f.files[start:start + 500]
                marks = ",".join("?" * len(chunk))
                if chunk:
                    cur.execute(f"DELETE FROM physical_copies WHERE raw_data_file_id IN ({marks})",
                                chunk)
                    removed_copies += cur.rowcount
                    cur.execute(f"DELETE FROM raw_data_files WHERE id IN ({marks})", chunk)
            marks = ",".join("?" * len(f.packages))
            if f.packages:
                cur.execute(f"DELETE FROM physical_copies WHERE package_id IN ({marks})",
                            f.packages)
                removed_copies += cur.rowcount
                cur.execute(f"DELETE FROM raw_data_packages WHERE id IN ({marks})", f.packages)
            marks = ",".join("?" * len(f.observations))
            if f.observations:
                cur.execute(f"DELETE FROM executed_obs_units WHERE id IN ({marks})",
                            f.observations)
        self.counts["observations"] -= len(f.observations)
        self.counts["packages"] -= len(f.packages)
        self.counts["raw files"] -= len(f.files)
        self.counts["physical copies"] -= removed_copies
        self.frontier = Frontier()

    def size_mb(self) -> float:
        total = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))
        return total / 1e6

    def dispose(self) -> None:
        self.engine.dispose()


# -- measuring ----------------------------------------------------------------------------------

class SqlCapture:
    """Per-statement execute time (SQLite runs a query up to its first row inside execute)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.rows: list[tuple[str, Any, float]] = []
        self._started: list[float] = []

    def __enter__(self) -> SqlCapture:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _before(self, *args: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        self.rows.append((statement, parameters, time.perf_counter() - self._started.pop()))

    def top(self, n: int = 4) -> list[dict[str, Any]]:
        grouped: dict[str, list[tuple[Any, float]]] = defaultdict(list)
        for statement, parameters, seconds in self.rows:
            grouped[statement].append((parameters, seconds))
        ranked = sorted(grouped.items(), key=lambda kv: -sum(s for _, s in kv[1]))[:n]
        total = sum(s for _, _, s in self.rows)
        return [{"sql": statement, "calls": len(calls), "seconds": sum(s for _, s in calls),
                 "share": sum(s for _, s in calls) / total if total else 0.0,
                 "parameters": calls[0][0]} for statement, calls in ranked]


def explain(engine: Any, statement: str, parameters: Any) -> list[str]:
    if isinstance(parameters, list) and parameters and isinstance(parameters[0], tuple | list):
        parameters = parameters[0]  # an executemany: explain it with its first row
    raw = engine.raw_connection()
    try:
        rows = raw.cursor().execute("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()
    finally:
        raw.close()
    return [row[-1] for row in rows]


def _short_sql(statement: str) -> str:
    one = re.sub(r"\s+", " ", statement).strip()
    one = re.sub(r"SELECT .*? FROM", "SELECT … FROM", one, count=1)
    return one if len(one) < 400 else one[:400] + " …"


def _repeat(fn: Callable[[], object], repeat: int) -> Stats:
    fn()  # warm: first-touch of the pages, statement cache
    values = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        values.append(time.perf_counter() - started)
    return Stats(values)


def measure(db: SyntheticOpsDB, repeat: int, *, detail: bool) -> dict[str, Any]:
    """Median times of the package-sensor and purge-sensor queries on `db` as it is now.
    Expects the frontier (with one unpackaged observation) to be present."""
    config = db.config
    opsdb = OpsDB(config.opsdb_url)
    now = datetime.now(UTC)
    with opsdb.session() as session:
        last_package = session.scalar(select(func.max(RawDataPackage.id))) or 0
        first_frontier_copy = session.scalar(select(func.min(PhysicalCopy.id)).where(
            PhysicalCopy.package_id.in_(db.frontier.packages))) or 0

    def rolled_back(fn: Callable[[Session], object]) -> Callable[[], object]:
        def run() -> object:
            with Session(opsdb.engine) as session:
                try:
                    return fn(session)
                finally:
                    session.rollback()
        return run

    def package_tick(session: Session) -> None:
        planned = plan_packages(session, config)
        assert len(planned) == len(MODULES), f"planned {len(planned)} packages"
        new_packages(session, last_package)

    def purge_tick(session: Session) -> None:
        plan = plan_cycle(session, config, now, usage=lambda _location: None)
        assert plan.deletions, "the frontier has archived packages that may be purged"

    queries = {
        "package sensor tick: plan_packages (2 new packages) + new_packages page":
            rolled_back(package_tick),
        "new_packages page (cursor at the newest package)":
            rolled_back(lambda s: new_packages(s, last_package - 2)),
        "new_packages page after a restart (cursor 0, first 500)":
            rolled_back(lambda s: new_packages(s, 0, PAGE)),
        "site_copies_due + lta_copies_due (cursor before the frontier)":
            rolled_back(lambda s: (site_copies_due(s, config, first_frontier_copy - 1),
                                   lta_copies_due(s, config, first_frontier_copy - 1))),
        "purge sensor tick: plan_cycle": rolled_back(purge_tick),
        "  of which packages_with_purgeable_copies (candidate query)":
            rolled_back(lambda s: packages_with_purgeable_copies(s, 2000)),
    }
    out: dict[str, Any] = {"times": {name: _repeat(fn, repeat) for name, fn in queries.items()}}
    if detail:
        for name, fn in (("plan_cycle", rolled_back(purge_tick)),
                         ("package tick", rolled_back(package_tick))):
            with SqlCapture(opsdb.engine) as capture:
                fn()
            top = capture.top(3)
            for entry in top:
                entry["plan"] = explain(opsdb.engine, entry["sql"], entry["parameters"])
                entry["sql"] = _short_sql(entry["sql"])
                entry.pop("parameters")
            out[f"sql:{name}"] = {"statements": len(capture.rows), "top": top}
    opsdb.dispose()
    return out


def bench_opsdb(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    per_package = settings.opsdb_files_per_package
    now = datetime.now(UTC)
    rows = []
    for n_files in settings.opsdb_sizes:
        root = settings.work / f"opsdb-{n_files}"
        db = SyntheticOpsDB(root)
        started = time.perf_counter()
        rest = n_files - 3 * max(1, settings.in_flight // 3) * per_package - 2 * per_package
        history = max(2, -(-rest // per_package))  # at least n_files raw files in all
        history += history % 2
        db.add_packages(history, per_package, now - timedelta(days=5 * 365),
                        now - timedelta(days=3))
        db.add_frontier(settings.in_flight, per_package, now)
        generate = time.perf_counter() - started
        log(f"  {db.counts['raw files']} raw files, {db.counts['packages']} packages, "
            f"{db.counts['physical copies']} copies: generated in {fmt_s(generate)} s, "
            f"{db.size_mb():.0f} MB")
        measured = measure(db, settings.repeat, detail=True)
        rows.append({"raw_files": db.counts["raw files"], "counts": dict(db.counts),
                     "db_mb": db.size_mb(), "generate_s": generate, **measured})
        for name, stats in measured["times"].items():
            log(f"    {name}: {stats.text()}")
        db.dispose()
        if not settings.keep:
            shutil.rmtree(root, ignore_errors=True)
    result.facts["files_per_package"] = per_package
    result.facts["in_flight"] = 3 * max(1, settings.in_flight // 3)
    result.facts["sizes"] = rows


# -- 7. five years ------------------------------------------------------------------------------

def _retire_ticks(instance: Any, config_path: Path, now: datetime,
                  max_ticks: int) -> dict[str, Any]:
    """The real retire_partitions_sensor, ticked with the clock at the simulated `now` (and its
    cursor kept between ticks) until its ticks have gone once round all live partitions
    without retiring any (every later tick would give the same answer); each tick's delete
    request applied key by key with instance.delete_dynamic_partition, as the sensor daemon
    (and ccat_assets/driver.py) apply it. At most `max_ticks` ticks (a year of hourly ones)."""
    from unittest import mock

    from dagster import build_sensor_context

    import sensors.retire
    from resources.deployment import Deployment

    deployment = Deployment(config_path=str(config_path))
    ticks, retired, sensor_s, delete_s = 0, 0, 0.0, 0.0
    skip, cursor, idle = "", None, 0
    try:
        with mock.patch.object(sensors.retire, "utcnow", lambda: now):
            while ticks < max_ticks:
                ticks += 1
                started = time.perf_counter()
                with build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"deployment": deployment}) as context:
                    tick = sensors.retire.retire_partitions_sensor.evaluate_tick(context)
                sensor_s += time.perf_counter() - started
                cursor = tick.cursor
                keys = [(request.partitions_def_name, key)
                        for request in tick.dynamic_partitions_requests or []
                        for key in request.partition_keys or []]
                started = time.perf_counter()
                for name, key in keys:
                    instance.delete_dynamic_partition(name, key)
                delete_s += time.perf_counter() - started
                retired += len(keys)
                idle = 0 if keys else idle + 1
                live = len(instance.get_dynamic_partitions("packages"))
                if idle * sensors.retire.BATCH >= max(live, 1):
                    skip = tick.skip_message or ""
                    break
    finally:
        deployment.opsdb.dispose()
    return {"ticks": ticks, "retired": retired, "sensor_s": sensor_s, "delete_s": delete_s,
            "skip": skip}


def _dagster_year(home: Path, config_path: Path, config: Config, names: list[str],
                  now: datetime, watch: str, repeat: int) -> dict[str, Any]:
    """One simulated year in the Dagster instance: this year's package names added as the
    package sensor's add requests add them, the retire sensor ticked at the year's end, then
    the partition reads timed on what is left. `watch`: a package whose partition is
    reported as live or not."""
    from dagster import DagsterInstance

    from ccat_assets.partitions import package_site_partitions

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    try:
        started = time.perf_counter()
        for start in range(0, len(names), 5000):
            instance.add_dynamic_partitions("packages", names[start:start + 5000])
        add = time.perf_counter() - started
        before = len(instance.get_dynamic_partitions("packages"))
        retire = _retire_ticks(instance, config_path, now, max_ticks=365 * 24)
        probe = names[-1]  # the newest package: live whatever the retirement does
        keys = _repeat(lambda: instance.get_dynamic_partitions("packages"), repeat)
        has = _repeat(lambda: instance.has_dynamic_partition("packages", probe), repeat)
        multi = package_site_partitions(config)
        multi_keys = _repeat(lambda: multi.get_partition_keys(dynamic_partitions_store=instance),
                             repeat)
        live = instance.get_dynamic_partitions("packages")
        watch_live = watch in set(live)
    finally:
        instance.dispose()
    return {"live_after": live, "added": len(names), "added_s": add,
            "before_retire": before, **retire,
            "total_keys": len(live), "watch": watch, "watch_live": watch_live,
            "get_dynamic_partitions": keys, "has_dynamic_partition": has,
            "package_x_site_keys": multi_keys}


def _retire_query(db: SyntheticOpsDB, now: datetime, live: list[str],
                  repeat: int) -> dict[str, Any]:
    """finished_packages, the retire sensor's OpsDB query, as the sensor's first tick at `now`
    calls it (on the first batch of live partitions): its time, what it returns, its plan."""
    from sensors.retire import BATCH

    days = db.config.settings.policies.retire_partitions_after_days
    opsdb = OpsDB(db.config.opsdb_url)
    cutoff = now - timedelta(days=days)
    batch = sorted(live)[:BATCH]
    sites = [site.short_name for site in db.config.settings.archive_sites]
    try:
        with Session(opsdb.engine) as session:
            stats = _repeat(lambda: finished_packages(session, cutoff, batch, sites), repeat)
            with SqlCapture(opsdb.engine) as capture:
                found = finished_packages(session, cutoff, batch, sites)
        statement, parameters, _ = capture.rows[-1]
        plan = explain(opsdb.engine, statement, parameters)
    finally:
        opsdb.dispose()
    return {"time": stats, "returned": len(found), "examined": len(batch), "days": days,
            "sql": _short_sql(statement), "plan": plan}


def _cli_lookup(db: SyntheticOpsDB, name: str, now: datetime, repeat: int) -> dict[str, Any]:
    """What `ccat-dt why NAME` reads from OpsDB (ccat_dt.diagnosis.diagnose), timed, and one
    run of what `ccat-dt status` reads (ccat_dt.report.summarize: counts over every table)."""
    opsdb = OpsDB(db.config.opsdb_url)
    try:
        with Session(opsdb.engine) as session:
            stages = diagnose(session, db.config, name, now)
            why = _repeat(lambda: diagnose(session, db.config, name, now), repeat)
        started = time.perf_counter()
        summary = summarize(opsdb)
        status_s = time.perf_counter() - started
    finally:
        opsdb.dispose()
    return {"package": name, "why": why,
            "stages": [f"{s.stage}: {s.state} ({s.detail})" for s in stages],
            "status_s": status_s, "status_packages": sum(summary.packages.values())}


def bench_years(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    per_package = settings.years_files_per_package
    yearly = settings.years_packages // 5
    yearly -= yearly % 2
    root = settings.work / "opsdb-years"
    db = SyntheticOpsDB(root / "deploy")
    now = datetime.now(UTC)
    begin = now - timedelta(days=5 * 365)
    rows = []
    first_name = ""
    live: list[str] = []  # the live `packages` partitions, as the Dagster instance has them
    for year in range(1, 6):
        db.remove_frontier()
        year_end = begin + timedelta(days=365 * year)
        started = time.perf_counter()
        ids = db.add_packages(yearly, per_package, begin + timedelta(days=365 * (year - 1)),
                              year_end - timedelta(days=3))
        db.add_frontier(settings.in_flight, per_package, year_end)
        generate = time.perf_counter() - started
        measured = measure(db, settings.repeat, detail=False)
        with db.engine.begin() as c:
            names = list(c.execute(text("SELECT name FROM raw_data_packages WHERE id BETWEEN "
                                        ":a AND :b ORDER BY id"), {"a": ids[0], "b": ids[-1]})
                         .scalars())
        first_name = first_name or names[0]
        retire_query = _retire_query(db, year_end, live + names, settings.repeat)
        partitions = _dagster_year(root / "dagster_home", db.config_path, db.config, names,
                                   year_end, first_name, settings.repeat)
        live = partitions.pop("live_after")
        rows.append({"year": year, "counts": dict(db.counts), "db_mb": db.size_mb(),
                     "generate_s": generate, "petabytes": db.counts["packages"]
                     * PACKAGE_BYTES / 1e15, **measured, "retire_query": retire_query,
                     "dagster": partitions})
        log(f"  year {year}: {db.counts['packages']} packages, {db.counts['raw files']} raw "
            f"files, {db.size_mb():.0f} MB (generated in {fmt_s(generate)} s); plan_cycle "
            f"{measured['times']['purge sensor tick: plan_cycle'].text()}; finished_packages "
            f"{retire_query['time'].text()} ({retire_query['returned']} returned); dagster "
            f"keys +{partitions['added']}, -{partitions['retired']} in {partitions['ticks']} "
            f"retire tick(s), {partitions['total_keys']} live")
    lookup = _cli_lookup(db, first_name, begin + timedelta(days=5 * 365), settings.repeat)
    log(f"  ccat-dt why {first_name}: {lookup['why'].text()}; status {fmt_s(lookup['status_s'])}"
        f" s")
    disk_mb = db.size_mb() + sum(
        p.stat().st_size for p in (root / "dagster_home").rglob("*") if p.is_file()) / 1e6
    db.dispose()
    if not settings.keep:
        shutil.rmtree(root, ignore_errors=True)
    result.facts.update({"files_per_package": per_package, "packages_per_year": yearly,
                         "in_flight": 3 * max(1, settings.in_flight // 3), "years": rows,
                         "cli": lookup, "disk_mb": disk_mb})
