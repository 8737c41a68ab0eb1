"""One lifecycle measurement in a fresh process: `ccat-dt init`'s embedded default, N small
packages filed as instruments do, then `drive()` (the real sensors, runs side by side within
the instance's run limits) until idle; with --profile one run at a time in this process (a
profile does not see the forked run processes).

python -m bench.lifecycle_worker --root DIR --packages N --out RESULT.json
    [--modules K] [--files F --file-kib S] [--no-data-work]
    [--profile STATS.prof] [--event-log consolidated] [--postgres URL]

N observations, each filed for the first K instrument modules of the embedded default (one
package per observation and module).

Also measured, before driving: the same bytes packaged and copied directly (one build_package per
package and the four verified copies a package makes, each hashing its landed bytes once, as
the lifecycle does), so that the orchestration overhead is the drive time minus that.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import yaml

MODULE = "primecam/f280"
CHUNK = 64 * 2**20


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as stream:
        for offset in range(0, size, CHUNK):
            stream.write(os.urandom(min(CHUNK, size - offset)))


def _file_observations(root: Path, observations: int, modules: int, files: int,
                       file_bytes: int) -> float:
    from ccat_dt.config import load_config
    from ccat_dt.filing import file_directory, finish_observation, start_observation
    from ccat_dt.opsdb.database import OpsDB

    config = load_config(root / "ccat-dt.yaml")
    names = [f"{i.name}/{m}" for i in config.settings.instruments for m in i.modules][:modules]
    opsdb = OpsDB(config.opsdb_url)
    source = config.resolve_root("sites/ccat/instruments")
    started = time.perf_counter()
    for n in range(observations):
        observation = f"obs-{n:05d}"
        start_observation(opsdb, observation)
        for module in names:
            directory = source / observation / module
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(files):
                _write_random(directory / f"scan-{i:03d}.dat", file_bytes)
            file_directory(opsdb, observation=observation, module=module,
                           directory=f"{observation}/{module}")
        finish_observation(opsdb, observation)
    opsdb.dispose()
    return time.perf_counter() - started


def _data_work(root: Path, scratch: Path) -> float:
    """The byte work of the lifecycle without any orchestration: per package one tar build and
    four verified copies (buffer -> archive buffer -> LTA, twice); the checks re-read nothing
    (they report each copy's landed-bytes hash)."""
    from ccat_dt.checksums import hash_file
    from ccat_dt.tarball import PackageMember, build_package
    from ccat_dt.transports.local import LocalTransport

    source = root / "sites" / "ccat" / "instruments"
    transport = LocalTransport()
    packages = []
    for observation in sorted(p for p in source.iterdir() if p.is_dir()):
        members = []
        for path in sorted((observation / MODULE).iterdir()):
            checksum, size = hash_file(path)  # the filed checksum: filing, not counted here
            members.append(PackageMember(path, f"{observation.name}/{MODULE}/{path.name}", size,
                                         checksum))
        packages.append((observation.name, members))
    started = time.perf_counter()
    for name, members in packages:
        built = build_package(members, scratch / "buffer" / f"{name}.tar", package_name=name)
        previous = built.path
        for hop in ("site-a", "lta-a", "site-b", "lta-b"):
            target = scratch / hop / previous.name
            transport.copy_file(previous, target, built.checksum)
            previous = target
    seconds = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--packages", type=int, required=True)
    parser.add_argument("--modules", type=int, default=1)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-kib", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-data-work", action="store_true",
                        help="skip the orchestration-free reference (end-to-end section)")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--event-log", choices=["default", "consolidated"], default="default")
    parser.add_argument("--postgres", metavar="URL",
                        help="the Dagster instance's storage in this (empty) PostgreSQL database")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    root: Path = args.root.absolute()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    os.environ["DAGSTER_HOME"] = str(root / "dagster_home")
    os.environ["CCAT_DT_CONFIG"] = str(root / "ccat-dt.yaml")

    from ccat_assets.cli import init  # noqa: E402 - after DAGSTER_HOME is set

    config_path = init(root)
    home = root / "dagster_home"
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    if args.event_log == "consolidated":  # an experiment: one event-log DB, not one per run
        settings["event_log_storage"] = {
            "module": "dagster.core.storage.event_log",
            "class": "ConsolidatedSqliteEventLogStorage",
            "config": {"base_dir": str(home / "history")}}
    if args.postgres:  # the production instance's storage (deploy/dagster.yaml)
        for kind in ("run_storage", "event_log_storage", "schedule_storage"):
            settings.pop(kind, None)
        settings["storage"] = {"postgres": {"postgres_url": args.postgres}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    filing_s = _file_observations(root, args.packages, args.modules, args.files,
                                  args.file_kib * 1024)
    data_s = (0.0 if args.no_data_work
              else _data_work(root, root.parent / f"{root.name}-data-work"))

    from ccat_assets.definitions import build_definitions
    from ccat_assets.driver import drive
    from ccat_assets.instance import open_instance
    from ccat_dt.config import load_config

    config = load_config(config_path)
    instance = open_instance(config)
    defs = build_definitions(config)
    profiler = cProfile.Profile() if args.profile else None
    os.sync()  # the filing's dirty pages are not the drive's to write
    cpu_before, driver_before = _cpu_s(), _cpu_s(children=False)
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    report = drive(defs, instance, max_rounds=1000, in_process=profiler is not None)
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    drive_s = time.perf_counter() - started
    cpu_s, driver_cpu_s = _cpu_s() - cpu_before, _cpu_s(children=False) - driver_before

    runs = []
    for record in instance.get_run_records():
        tags = record.dagster_run.tags
        runs.append({"key": tags.get("dagster/run_key", ""), "job": record.dagster_run.job_name,
                     "status": record.dagster_run.status.value,
                     "start": record.start_time, "end": record.end_time})
    from ccat_dt.opsdb.database import OpsDB
    from ccat_dt.report import summarize

    opsdb = OpsDB(config.opsdb_url)
    summary = summarize(opsdb)
    args.out.write_text(json.dumps({
        "packages": args.packages * args.modules, "files_per_package": args.files,
        "raw_bytes": args.packages * args.modules * args.files * args.file_kib * 1024,
        "written_bytes": _written_bytes(opsdb), "deleted_bytes": _deleted_bytes(opsdb),
        "cpu_s": cpu_s,
        "driver_cpu_s": driver_cpu_s,
        "file_bytes": args.file_kib * 1024, "event_log": args.event_log,
        "filing_s": filing_s, "data_s": data_s, "drive_s": drive_s,
        "launched": len(report.launched), "failed": report.failed, "rounds": report.rounds,
        "runs": runs, "package_states": dict(summary.packages),
    }))
    instance.dispose()
    sys.exit(0)


def _cpu_s(children: bool = True) -> float:
    """CPU seconds of this process (the driver: sensor ticks, run creation) and, unless
    `children` is False, of the children it waited for (a parallel drive's runs)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    if children:
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += waited.ru_utime + waited.ru_stime
    return total


def _written_bytes(opsdb: object) -> int:
    """Bytes of every package copy the lifecycle made (the tar, buffers, LTAs), purged or
    not: what the disk had to write durably, read from OpsDB's copy records."""
    from sqlalchemy import func, select

    from ccat_dt.opsdb.database import OpsDB
    from ccat_dt.opsdb.models import PackageCopy

    assert isinstance(opsdb, OpsDB)
    with opsdb.session() as session:
        return int(session.scalar(select(func.coalesce(func.sum(PackageCopy.size), 0))) or 0)


def _deleted_bytes(opsdb: object) -> int:
    """Bytes of every copy the purges deleted (raw files at the source, the observatory's tar,
    the archives' buffer copies): what the disk had to free, read from OpsDB's copy records."""
    from sqlalchemy import func, select

    from ccat_dt.opsdb.database import OpsDB
    from ccat_dt.opsdb.models import CopyStatus, PhysicalCopy

    assert isinstance(opsdb, OpsDB)
    with opsdb.session() as session:
        return int(session.scalar(select(func.coalesce(func.sum(PhysicalCopy.size), 0))
                                  .where(PhysicalCopy.status == CopyStatus.DELETED)) or 0)


if __name__ == "__main__":
    main()
