"""Section 5: orchestration overhead of the whole lifecycle on the embedded default (drive())."""

from __future__ import annotations

import json
import os
import pstats
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import SectionResult, Settings, fmt_s
from bench.empty_runs import floor_per_run_s

STAGE_OF_JOB = {"package_job": "package (raw_files + packages)",
                "site_copy_job": "site_copies", "lta_copy_job": "lta_copies",
                "site_copy_archive_job": "site_copies + lta_copies",
                "purge_job": "purge_status", "staging_job": "staged_copies"}
GOAL_S = 0.25  # orchestration per package per stage (issue 17)
OURS = ("/ccat_dt/", "/ccat_assets/", "/resources/", "/sensors/", "/bench/")


def _worker(settings: Settings, name: str, packages: int, log: Callable[[str], None],
            *extra: str) -> dict[str, Any]:
    out = settings.work / f"{name}.json"
    err = settings.work / f"{name}.log"
    argv = [sys.executable, "-m", "bench.lifecycle_worker", "--root",
            str(settings.work / name), "--packages", str(packages),
            "--files", str(settings.files_per_lifecycle_package),
            "--file-kib", str(settings.lifecycle_file_kib), "--out", str(out), *extra]
    log(f"  {name}: {packages} package(s) through the whole lifecycle (Dagster log: {err})")
    with open(err, "wb") as stream:
        done = subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"lifecycle worker {name} exited {done.returncode}; see {err}: "
                           + err.read_text()[-1500:])
    data: dict[str, Any] = json.loads(out.read_text())
    if data["failed"]:
        raise RuntimeError(f"{name}: runs failed: {data['failed'][:5]} (see {err})")
    return data


def _per_stage(data: dict[str, Any]) -> list[dict[str, Any]]:
    by_stage: dict[str, list[float]] = defaultdict(list)
    for run in data["runs"]:
        if run["start"] is not None and run["end"] is not None:
            by_stage[STAGE_OF_JOB.get(run["job"], run["job"])].append(run["end"] - run["start"])
    n = data["packages"]
    return [{"stage": stage, "runs": len(d), "runs_per_package": len(d) / n,
             "median_run_s": statistics.median(d), "min_run_s": min(d), "max_run_s": max(d),
             "seconds_per_package": sum(d) / n}
            for stage, d in by_stage.items()]


def _growth(data: dict[str, Any]) -> dict[str, float]:
    """Median run duration (start -> end) in the first and the last third of the runs."""
    runs = sorted((r for r in data["runs"] if r["start"] and r["end"]), key=lambda r: r["start"])
    third = max(1, len(runs) // 3)
    first = statistics.median(r["end"] - r["start"] for r in runs[:third])
    last = statistics.median(r["end"] - r["start"] for r in runs[-third:])
    return {"first_third_median_s": first, "last_third_median_s": last}


def _bucket(filename: str, function: str) -> str:
    if filename == "~":
        if "sqlite3" in function:
            return "SQLite (C library calls)"
        if "fsync" in function:
            return "fsync"
        return "builtins (I/O, hashing, other C calls)"
    if "/dagster/_core/storage/" in filename:
        return "Dagster storage layer (Python)"
    if "/dagster" in filename:
        return "Dagster (other Python)"
    if "/sqlalchemy/" in filename or "/alembic/" in filename:
        return "SQLAlchemy"
    if any(part in filename for part in OURS):
        return "ccat-dt (our Python)"
    if "/logging/" in filename:
        return "logging"
    return "other Python (stdlib, pydantic, yaml, ...)"


CURATED = [
    ("execute_in_process", "job_definition.py", "Dagster: execute_in_process (whole runs)"),
    ("create_run", "run_domain.py", "Dagster: create_run (run record, planned events)"),
    ("store_event", "sqlite_event_log.py", "Dagster: store_event (one SQLite write per event)"),
    ("_initdb", "sqlite_storage.py", "Dagster: _initdb (a new SQLite event DB per run)"),
    ("evaluate_tick", "sensor_definition.py", "Dagster: sensor evaluate_tick (our queries incl.)"),
    ("get_runs", "run_methods.py", "Dagster: get_runs (driver's run-key dedup)"),
    ("build", "ccat_dt/packages.py", "ccat-dt: packages.build (tar + checksums)"),
    ("plan_cycle", "purge_cycle.py", "ccat-dt: plan_cycle (purge sensor)"),
    ("plan_packages", "ccat_dt/packages.py", "ccat-dt: plan_packages (package sensor)"),
    ("purge_package", "reaper.py", "ccat-dt: purge_package (deletions + certificates)"),
    ("opsdb", "resources/deployment.py",
     "ccat-dt: Deployment.opsdb (engine + Alembic schema check)"),
    ("load_config", "ccat_dt/config.py", "ccat-dt: load_config (YAML + validation)"),
    ("fsync", "~", "os.fsync (all callers)"),
    ("'execute' of 'sqlite3.Cursor'", "~", "sqlite3 Cursor.execute (all callers)"),
    ("'commit' of 'sqlite3.Connection'", "~", "sqlite3 Connection.commit (all callers)"),
    ("'close' of 'sqlite3.Connection'", "~", "sqlite3 Connection.close (all callers)"),
    ("_sqlite3.connect", "~", "sqlite3 connect (all callers)"),
]


def summarize_profile(path: Path) -> dict[str, Any]:
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = max(entry[3] for entry in raw.values())  # (cc, nc, tt, ct, callers)
    buckets: dict[str, float] = defaultdict(float)
    for (filename, _line, function), (_cc, _nc, tt, _ct, _callers) in raw.items():
        buckets[_bucket(filename, function)] += tt
    curated = []
    for function, where, label in CURATED:
        matches = [(nc, ct) for (filename, _l, name), (_cc, nc, _tt, ct, _c) in raw.items()
                   if (function in name if filename == "~" else name == function)
                   and where.strip("~") in filename]
        if matches:
            curated.append({"what": label, "calls": sum(m[0] for m in matches),
                            "cumulative_s": sum(m[1] for m in matches) if where == "~"
                            else max(m[1] for m in matches)})
    ours = sorted(((ct, nc, f"{Path(fn).parent.name}/{Path(fn).name}:{name}")
                   for (fn, _l, name), (_cc, nc, _tt, ct, _c) in raw.items()
                   if any(part in fn for part in OURS[:4])), reverse=True)[:12]
    return {"total_s": total,
            "buckets": sorted(buckets.items(), key=lambda kv: -kv[1]),
            "curated": curated,
            "ours_top": [{"function": f, "calls": nc, "cumulative_s": ct} for ct, nc, f in ours]}


def bench_lifecycle(settings: Settings, result: SectionResult,
                    log: Callable[[str], None]) -> None:
    n = settings.packages
    # The floor, bracketing the drive (a drifting load moves both): what a run costs here
    # when its steps do nothing, with as many runs at once as cores.
    empty_runs = 5 if settings.quick else 30
    floor_before = floor_per_run_s(settings.work, empty_runs)
    main = _worker(settings, "lifecycle", n, log)
    floor_after = floor_per_run_s(settings.work, empty_runs)
    result.facts["empty_run"] = {"before": floor_before, "after": floor_after}
    log(f"  an empty run: {floor_before['per_run_s']:.3f} s before the drive, "
        f"{floor_after['per_run_s']:.3f} s after")
    overhead = main["drive_s"] - main["data_s"]
    launched = main["launched"]
    in_runs = sum(r["end"] - r["start"] for r in main["runs"] if r["start"] and r["end"])
    stages = _per_stage(main)
    per_run = overhead / launched
    per_package = overhead / n
    result.facts.update({
        "size": (f"{n} packages (1 observation x 1 module x {settings.files_per_lifecycle_package}"
                 f" files of {settings.lifecycle_file_kib} KiB each), embedded default "
                 "(SQLite OpsDB, SQLite Dagster instance from dagster.yaml, local transport)"),
        "main": {k: v for k, v in main.items() if k != "runs"},
        "overhead_s": overhead, "per_package_s": per_package, "per_stage_run_s": per_run,
        "runs_per_package": launched / n, "inside_runs_s": in_runs,
        "outside_runs_s": main["drive_s"] - in_runs, "stages": stages, "growth": _growth(main),
        "extrapolated_500_s": per_package * 500,
    })
    result.facts["goal"] = {"goal_s": GOAL_S, "measured_s": per_run,
                            "verdict": "PASS" if per_run <= GOAL_S else "MISS"}
    log(f"  drive {fmt_s(main['drive_s'])} s, data work {fmt_s(main['data_s'])} s, "
        f"{launched} runs: {per_run:.3f} s overhead per stage run")

    small = min(settings.profile_packages, n)
    profiled = _worker(settings, "lifecycle-profiled", small, log, "--profile",
                       str(settings.work / "lifecycle.prof"))
    result.facts["profile"] = summarize_profile(settings.work / "lifecycle.prof")
    result.facts["profile"]["packages"] = small
    result.facts["profile"]["drive_s"] = profiled["drive_s"]

    experiment_n = settings.event_log_packages
    if experiment_n <= 0:
        return
    default = _worker(settings, "lifecycle-default-small", experiment_n, log)
    consolidated = _worker(settings, "lifecycle-consolidated", experiment_n, log,
                           "--event-log", "consolidated")
    experiment = {
        "packages": experiment_n,
        "default_drive_s": default["drive_s"], "consolidated_drive_s": consolidated["drive_s"],
        "default_per_run_s": _per_run(default), "consolidated_per_run_s": _per_run(consolidated),
    }
    with _empty_postgres_database(log) as url:
        if url:
            postgres = _worker(settings, "lifecycle-postgres", experiment_n, log,
                               "--postgres", url)
            experiment |= {"postgres_drive_s": postgres["drive_s"],
                           "postgres_per_run_s": _per_run(postgres)}
    result.facts["event_log_experiment"] = experiment


def _per_run(data: dict[str, Any]) -> float:
    return float(data["drive_s"] - data["data_s"]) / data["launched"]


@contextmanager
def _empty_postgres_database(log: Callable[[str], None]) -> Iterator[str | None]:
    """A fresh database on the PostgreSQL server at $CCAT_BENCH_POSTGRES_URL (default: the
    local one, as in the tests), dropped afterwards; None when no server answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    server = os.environ.get("CCAT_BENCH_POSTGRES_URL",
                            "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"ccat_bench_dagster_{os.getpid()}"
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except OperationalError as exc:
        log(f"  no PostgreSQL at {server} ({str(exc).splitlines()[0]}): instance-storage "
            "experiment skipped")
        engine.dispose()
        yield None
        return
    try:
        yield str(engine.url.set(database=name).render_as_string(hide_password=False))
    finally:
        with engine.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()
