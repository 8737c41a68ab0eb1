"""Section 10: the fast commands. `status`, `why`, `purge --plan` and `file` on the demo
instance, each timed in a fresh process against `python -c pass` (Python's own start-up); then
`ccat-dt status` against an OpsDB (PostgreSQL) holding 10^7 copies.

A scratch database on the PostgreSQL server of the tests is migrated and given the shape of a
deployment after years of operation, loaded in bulk by the server itself (generate_series):
every raw file ever filed has its copy at the source, purged after archiving but for the newest
packages; every package has been in three buffers (purged) and two long-term archives
(present). Then `ccat-dt status` is run as an operator runs it, in a fresh process, and timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import SectionResult, Settings, Stats, fmt_s
from bench.lifecycle import _empty_postgres_database

# A package of FILES raw files; its buffer copies (three) are purged, its LTA copies (two) not.
FILES = 95
PACKAGE_COPIES = {"ccat/buffer": "deleted", "cologne/buffer": "deleted", "us/buffer": "deleted",
                  "cologne/lta": "present", "us/lta": "present"}
LIVE_PACKAGES = 200  # the newest: their raw files are still at the source
# Row g of n was written (n - g) / n of five years ago: the oldest first, the last just now.
_AGO = "now() - (CAST({n} AS bigint) - g) * interval '5 years' / CAST({n} AS bigint)"


def _load(url: str, copies: int, log: Callable[[str], None]) -> dict[str, int]:
    """Fill the migrated OpsDB at `url` with about `copies` physical copies."""
    from sqlalchemy import create_engine, text

    packages = max(1, copies // (FILES + len(PACKAGE_COPIES)))
    files = packages * FILES
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    with engine.connect() as db:
        def run(sql: str, **parameters: object) -> None:
            db.execute(text(sql), parameters)

        location = dict(db.execute(text(
            "SELECT s.short_name || '/' || l.name, l.id FROM data_locations l "
            "JOIN sites s ON s.id = l.site_id")).tuples().all())
        source = location["ccat/instruments"]
        run("INSERT INTO instrument_modules (id, instrument, name) VALUES (9001, 'bench', 'm')")
        run("INSERT INTO executed_obs_units (id, uuid, name, status, started_at) "
            "SELECT g, md5(g::text)::uuid::text, 'obs-' || g, 'finished', now() "
            "FROM generate_series(1, :n) g", n=packages // 10 + 1)
        run("INSERT INTO raw_data_packages (id, uuid, name, observation_id, module_id, part, "
            "state, primary_site_id, size, checksum_algorithm, checksum, created_at) "
            "SELECT g, md5('p' || g)::uuid::text, 'pkg-' || g, (g - 1) / 10 + 1, 9001, "
            "(g - 1) % 10, "
            "'archived', (SELECT site_id FROM data_locations WHERE id = :source), "
            "CAST(:files AS bigint) * 1000000, 'xxh3_128', md5(g::text), now() "
            "FROM generate_series(1, :n) g", n=packages, files=FILES, source=source)
        run("INSERT INTO raw_data_files (id, uuid, source_location_id, relative_path, size, "
            "checksum_algorithm, checksum, observation_id, module_id, package_id, filed_at) "
            "SELECT g, md5('f' || g)::uuid::text, :source, 'raw/' || g || '.dat', 1000000, "
            "'xxh3_128', md5(g::text), (g - 1) / :files / 10 + 1, 9001, (g - 1) / :files + 1, "
            f"{_AGO.format(n=':n')} FROM generate_series(1, :n) g", n=files, files=FILES,
            source=source)
        log(f"    {packages:,} packages, {files:,} raw files: "
            f"{fmt_s(time.perf_counter() - started)} s")
        run("INSERT INTO physical_copies (kind, location_id, relative_path, size, status, "
            "checksum, created_at, deleted_at, raw_data_file_id) "
            "SELECT 'raw', :source, 'raw/' || g || '.dat', 1000000, CASE WHEN "
            "(g - 1) / :files + 1 > :live THEN 'present' ELSE 'deleted' END, md5(g::text), "
            f"{_AGO.format(n=':n')}, CASE WHEN (g - 1) / :files + 1 <= :live THEN "
            f"{_AGO.format(n=':n')} + interval '10 days' END, g "
            "FROM generate_series(1, :n) g", n=files, files=FILES, source=source,
            live=packages - LIVE_PACKAGES)
        log(f"    raw file copies: {fmt_s(time.perf_counter() - started)} s")
        for name, status in PACKAGE_COPIES.items():
            run("INSERT INTO physical_copies (kind, location_id, relative_path, size, status, "
                "checksum, created_at, verified_at, deleted_at, package_id) "
                "SELECT 'package', :location, 'pkg-' || g || '.tar', "
                "CAST(:files AS bigint) * 1000000, :status, md5(g::text), "
                f"{_AGO.format(n=':n')}, {_AGO.format(n=':n')}, CASE WHEN :status = 'deleted' "
                f"THEN {_AGO.format(n=':n')} + interval '10 days' END, g "
                "FROM generate_series(1, :n) g",
                location=location[name], files=FILES, status=status, n=packages)
        log(f"    package copies: {fmt_s(time.perf_counter() - started)} s")
        for table in ("raw_data_files", "raw_data_packages", "physical_copies",
                      "executed_obs_units"):
            run(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))")
        run("VACUUM ANALYZE")  # as autovacuum leaves a table that is not being written
        log(f"    vacuum analyze: {fmt_s(time.perf_counter() - started)} s")
        total = db.execute(text("SELECT count(*) FROM physical_copies")).scalar_one()
    engine.dispose()
    return {"packages": packages, "raw_files": files, "copies": int(total),
            "load_s": int(time.perf_counter() - started)}


def _status(config: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ccat_assets.cli", "--config", str(config),
                           "status"], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - started, done.stdout


FAST_GOAL_S = 0.3  # each fast command on the demo instance
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ccat_dt", "ccat_assets", "sensors", "resources")
COMMANDS = {"status": ["status"], "why": ["why", "{package}"], "purge --plan": ["purge", "--plan"],
            "file": ["file", "--observation", "bench-commands", "--module", "primecam/f280",
                     "bench-commands/one.dat"]}


# What every fast command imports before its first query, each layer on top of the one before:
# the floor under the commands' times, measured in the same rounds.
FLOORS = {"import sqlalchemy": "sqlalchemy",
          "+ its ORM": "sqlalchemy.orm",
          "+ our ORM models": "ccat_dt.opsdb.models",
          "+ the configuration (pydantic, YAML)": "ccat_dt.config"}


def _commands(settings: Settings, log: Callable[[str], None]) -> dict[str, object]:
    """Each fast command on a fresh demo instance, a fresh process each time, the commands and
    the reference interleaved (order rotated every round); the first round is not timed."""
    root = settings.work / "commands-demo"
    cli = [sys.executable, "-m", "ccat_assets.cli"]
    # Our modules' bytecode written once, as `pip install` does and as Python does on a first
    # run; an editable checkout under PYTHONDONTWRITEBYTECODE=1 (set on some machines) would
    # otherwise compile every module again at every start (~0.1 s of each command).
    subprocess.run([sys.executable, "-m", "compileall", "-q", *PACKAGES], cwd=REPO, check=True,
                   capture_output=True)
    subprocess.run([*cli, "demo", "--root", str(root)], check=True, capture_output=True)
    env = {**os.environ, "CCAT_DT_CONFIG": str(root / "ccat-dt.yaml"),
           "DAGSTER_HOME": str(root / "dagster_home")}
    subprocess.run([*cli, "observation", "start", "bench-commands"], env=env, check=True,
                   capture_output=True)
    one = root / "sites/ccat/instruments/bench-commands/one.dat"
    one.parent.mkdir(parents=True, exist_ok=True)
    one.write_bytes(os.urandom(1000))  # filed in the first round, "unchanged" afterwards
    package = sorted(p.name for p in (root / "sites/cologne/lta").rglob("*.tar"))[0][:-4]
    runs = {name: [*cli, *(a.format(package=package) for a in argv)]
            for name, argv in COMMANDS.items()}
    runs["python -c pass"] = [sys.executable, "-c", "pass"]
    for name, module in FLOORS.items():
        # the garbage collector off while importing, as the commands have it (ccat_assets/cli)
        runs[name] = [sys.executable, "-c", f"import gc; gc.disable(); import {module}"]
    times: dict[str, list[float]] = {name: [] for name in runs}
    load_before = os.getloadavg()
    names = list(runs)
    for round_ in range(settings.repeat + 1):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            subprocess.run(runs[name], env=env, check=True, capture_output=True)
            if round_:
                times[name].append(time.perf_counter() - started)
    reference = Stats(times.pop("python -c pass"))
    floors = {name: Stats(times.pop(name)).as_dict() for name in FLOORS}
    log(f"    python -c pass {reference.text()}; " + "; ".join(
        f"{name} {Stats(t).text()}" for name, t in times.items()))
    return {"reference": reference.as_dict(), "floors": floors,
            "commands": {name: Stats(t).as_dict() for name, t in times.items()},
            "load": [load_before, os.getloadavg()], "package": package}


def bench_status(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    from ccat_assets.cli import init

    result.facts["commands"] = _commands(settings, log)
    copies = settings.status_copies
    with _empty_postgres_database(log) as url:
        if url is None:
            result.facts["skipped"] = "no PostgreSQL server answered"
            return
        env = {**os.environ, "CCAT_DT_OPSDB_URL": url}
        os.environ["CCAT_DT_OPSDB_URL"] = url
        try:
            config = init(settings.work / "status-deployment")
        finally:
            del os.environ["CCAT_DT_OPSDB_URL"]
        shape = _load(url, copies, log)
        result.facts["size"] = (f"{shape['copies']:,} copies ({shape['raw_files']:,} raw files "
                                f"at the source, {LIVE_PACKAGES} newest packages' still "
                                f"present; {shape['packages']:,} packages x 5 copies: 3 "
                                "buffers purged, 2 LTA present), PostgreSQL, loaded in "
                                f"{shape['load_s']} s")
        times, output = [], ""
        for round_ in range(settings.repeat + 1):  # the first warms the server's cache
            seconds, output = _status(config, env)
            if round_:
                times.append(seconds)
                log(f"    round {round_}/{settings.repeat}: status {fmt_s(seconds)} s")
        result.facts["status"] = Stats(times).text()
        result.facts["status_median_s"] = Stats(times).median
        result.facts["output"] = output
        result.facts["copies"] = shape["copies"]
        result.facts["queries"] = _explained(url, config)


def _explained(url: str, config_path: Path) -> list[str]:
    """The execution time PostgreSQL reports for each statement `status` sends, slowest
    first, with the plan's top node (EXPLAIN ANALYZE of the statements SQLAlchemy logged)."""
    import logging

    from sqlalchemy import create_engine, event, text

    from ccat_assets.status import print_status
    from ccat_dt.config import load_config
    from ccat_dt.opsdb.database import OpsDB

    os.environ["CCAT_DT_OPSDB_URL"] = url
    try:
        config = load_config(config_path)
    finally:
        del os.environ["CCAT_DT_OPSDB_URL"]
    opsdb = OpsDB(url)
    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(opsdb.engine, "before_cursor_execute", capture)
    logging.disable(logging.CRITICAL)
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            print_status(opsdb, config)
    finally:
        logging.disable(logging.NOTSET)
    engine = create_engine(url)
    out = []
    with engine.connect() as db:
        for statement, parameters in seen:
            cursor = db.connection.cursor()
            cursor.execute("EXPLAIN (ANALYZE, FORMAT TEXT) " + statement, parameters)
            plan = [row[0] for row in cursor.fetchall()]
            took = next((line for line in plan if line.startswith("Execution Time")), "?")
            short = " ".join(statement.split())
            out.append((took, f"{took.removeprefix('Execution Time: ')}: "
                              f"`{short[:160]}{'...' if len(short) > 160 else ''}` -- "
                              f"{plan[0].strip()[:120]}"))
        db.execute(text("SELECT 1"))
    engine.dispose()
    opsdb.dispose()

    def ms(item: tuple[str, str]) -> float:
        try:
            return float(item[0].split()[2])
        except (IndexError, ValueError):
            return 0.0
    return [line for _, line in sorted(out, key=ms, reverse=True)]
