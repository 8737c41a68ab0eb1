"""`make demo`: an observing night on the embedded default, driven to the end by the sensors."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ccat_assets.cli import init
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.instance import open_instance
from ccat_assets.runlog import LOG_NAME, RunReporter, quiet_runs
from ccat_assets.status import print_status
from ccat_dt.config import Config, load_config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.reaper import certificate_problems
from ccat_dt.report import disagreements
from ccat_dt.retention import verified_lta_copies
from ccat_dt.storage import files_under
from ccat_dt.topology import primary_location

MARKER = ".ccat-demo-root"  # not storage.MARKER: this one marks the demo's scratch root
MODULES = ("primecam/f280", "chai/lfa")


def run_demo(root: Path, *, observations: int, files_per_module: int, file_bytes: int,
             verbose: bool = False) -> bool:
    """One line per run and a summary; Dagster's event log goes to the instance and to
    `log_dir/ccat-dt.log` (and to stderr with `verbose`)."""
    started = time.monotonic()
    _fresh_root(root)
    config = load_config(init(root))
    os.environ["DAGSTER_HOME"] = str(root / "dagster_home")
    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:
        source = Path(primary_location(session, config.settings.observatory,
                                       LocationType.SOURCE).root)
    print(f"observing: {observations} observations x {len(MODULES)} modules x "
          f"{files_per_module} files of {file_bytes / 1e6:.1f} MB into {source}")
    for n in range(1, observations + 1):
        observation = f"obs-{n:04d}"
        start_observation(opsdb, observation)
        for module in MODULES:
            directory = f"{observation}/{module}"
            for i in range(files_per_module):
                path = source / directory / f"scan-{i:03d}.dat"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(file_bytes))
            file_directory(opsdb, observation=observation, module=module, directory=directory)
        finish_observation(opsdb, observation)
    print("driving sensors and runs ...")
    instance = open_instance(config)
    reporter = RunReporter(instance, write=lambda line: print(f"  {line}"))
    with quiet_runs(config.log_dir / LOG_NAME, verbose=verbose) as log_file:
        report = drive(build_definitions(config), instance, log=reporter)
    print(f"{reporter.summary()}; Dagster's event log: {log_file}")
    elapsed = time.monotonic() - started
    print()
    summary = print_status(opsdb, config)
    problems = _incomplete(opsdb, config, source)
    problems += [f"run failed: {key}" for key in report.failed]
    print(f"\nelapsed {elapsed:.1f} s, {len(report.launched)} runs, "
          f"{summary.file_bytes / 1e6 / elapsed:.1f} MB/s of raw data end to end")
    for problem in problems:
        print(f"INCOMPLETE: {problem}")
    print("demo " + ("FAILED" if problems else "complete: every package verified in every "
                     "archive, every source file purged, OpsDB agrees with the disks"))
    return not problems


def _incomplete(opsdb: OpsDB, config: Config, source: Path) -> list[str]:
    required = config.settings.required_lta_copies
    from sqlalchemy import select

    from ccat_dt.opsdb.models import RawDataPackage

    problems = []
    with opsdb.session() as session:
        packages = session.scalars(select(RawDataPackage)).all()
        if not packages:
            problems.append("no package was made")
        for package in packages:
            sites = {c.location.site.short_name for c in verified_lta_copies(session, package)}
            if len(sites) < required:
                problems.append(f"{package.name}: verified in LTA at {sorted(sites)} only")
        names = [p.name for p in packages]
    for name in names:
        problems += [f"{name}: {p}" for p in certificate_problems(opsdb, config, name)]
    left = files_under(source)  # the location root's own marker is not data
    if left:
        problems.append(f"{len(left)} file(s) still at the source, e.g. {left[0]}")
    return problems + disagreements(opsdb)


def _fresh_root(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).exists():
            raise FileExistsError(f"{root} exists and is not a demo root; choose another --root")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("scratch data root of `ccat-dt demo`; wiped on each run\n")
