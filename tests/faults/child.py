"""One step of the pipeline in a process of its own, to be killed (SIGKILL) at a precise point
or raced against a twin: `python -m tests.faults.child CONFIG ACTION ...`.

The step bodies are exactly what the Dagster assets and IO managers call (ccat_dt only, so the
child starts in well under a second). A kill point is installed by wrapping one function in
this process only; the kill itself is a real SIGKILL, so no `finally`, no `except` and no
atexit handler runs, as when the OOM killer or a power cut ends a worker. Barriers are files:
each party creates one, then waits until all have, so that two racers are both past their
checks before either acts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccat_dt.config import load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.transports.base import TransferError

BARRIER_TIMEOUT_S = 30.0


DRIVE = os.getpid()  # the process `main` runs in; a drive executes its runs in forked children


def die() -> None:
    """SIGKILL for this process and, in a run's child process, for the drive that forked it
    first: the drive dies at this point of the run, as a machine that stops."""
    if os.getpid() != DRIVE:
        os.kill(DRIVE, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def barrier(directory: Path, parties: int, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(directory.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {directory}: {parties} parties never arrived")
        time.sleep(0.005)


def wrap(module: Any, name: str, before: Callable[[], None] | None = None,
         after: Callable[[], None] | None = None, nth: int = 1) -> None:
    """Run `before`/`after` around the `nth` call of module.name, counted across the drive's
    forked run processes (shared memory); around every call with `nth` 0."""
    real = getattr(module, name)
    calls = multiprocessing.Value("i", 0)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with calls.get_lock():
            calls.value += 1
            active = nth in (0, calls.value)
        if active and before:
            before()
        result = real(*args, **kwargs)
        if active and after:
            after()
        return result

    setattr(module, name, wrapper)


def at_copy(module: Any, name: str, label: str, meet: Callable[[], None], *,
            after: bool = False) -> None:
    """`meet` before (or after) module.name, a reaper function given a deletion's claim,
    for the claim of the copy at the location labelled `label` only."""
    real = getattr(module, name)

    def wrapper(*args: Any) -> Any:
        ours = any(getattr(a, "label", None) == label for a in args)
        if ours and not after:
            meet()
        result = real(*args)
        if ours and after:
            meet()
        return result

    setattr(module, name, wrapper)


def wait_to_be_killed(marker: Path, seconds: float = 300.0) -> Callable[[], None]:
    """Write `marker` (our pid) and wait: the parent kills us there, or, given a short
    `seconds`, does something meanwhile and lets us go on after them."""
    def hold() -> None:
        written = marker.with_name(f".{marker.name}.{os.getpid()}")
        written.write_text(str(os.getpid()))
        written.rename(marker)  # whole: the parent reads it as soon as it exists
        time.sleep(seconds)
    return hold


def wait_to_be_let_go(marker: Path, seconds: float = 120.0) -> Callable[[], None]:
    """Write `marker` (our pid) and wait until the parent removes it, then go on: the parent
    does something meanwhile (edits the configuration, runs `migrate`)."""
    def hold() -> None:
        wait_to_be_killed(marker, 0)()
        deadline = time.monotonic() + seconds
        while marker.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{marker} was never removed")
            time.sleep(0.01)
    return hold


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("action", choices=["build", "place", "purge", "file",
                                                    "stage", "drive", "instance"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--kill", default="")
    parser.add_argument("--nth", type=int, default=1, help="kill at the n-th call")
    parser.add_argument("--marker", default="")
    parser.add_argument("--barrier", default="")
    parser.add_argument("--parties", type=int, default=2)
    parser.add_argument("--at", default="write", choices=["write", "record", "claim"],
                        help="where the racers meet: about to write, or about to record; "
                             "place: about to claim the transfer (past the is-it-there check); "
                             "purge: `claim`, certified, about to unlink the copy at "
                             "--copy-at, or `record`, unlinked, about to record it")
    parser.add_argument("--copy-at", default="",
                        help="purge: the location label (site/location) of the copy whose "
                             "deletion meets the others at the barrier")
    parser.add_argument("--barrier-timeout", type=float, default=BARRIER_TIMEOUT_S,
                        help="seconds to wait at the barrier for the other racers")
    parser.add_argument("--home", default="", help="Dagster instance directory (drive)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="drive: wait for re-attempts due within this many seconds")
    parser.add_argument("--slow-s", type=float, default=0.1,
                        help="drive --kill slow-copy: seconds a local copy waits per slice")
    parser.add_argument("--slow-stamp", type=float, default=0.0,
                        help="instance: seconds between Dagster creating a storage's tables "
                             "and stamping its schema revision (widens that window)")
    options = parser.parse_args(argv)
    config = load_config(options.config)
    opsdb = OpsDB(config.opsdb_url)
    meet = (lambda: barrier(Path(options.barrier), options.parties, options.barrier_timeout)
            ) if options.barrier else None
    result: object = None

    if options.action == "build":
        import ccat_dt.packages as packages
        import ccat_dt.tarball as tarball

        [name] = options.args
        if options.kill == "mid-tar":  # the parent kills us once the tar is half written
            wrap(tarball._TarWriter, "add_file", after=wait_to_be_killed(Path(options.marker)))
        elif options.kill == "before-record":  # the tar is renamed into place, not recorded
            wrap(packages, "_record_built", before=die)
        if meet:
            wrap(*((tarball, "claim_temporary") if options.at == "write"
                   else (packages, "_record_built")), before=meet)
        try:
            result = packages.build(opsdb, config, name).copy_id
        except OSError as exc:  # what the retry policy retries
            print(json.dumps({"error": str(exc)}))
            return 4

    elif options.action == "place":
        import ccat_dt.replicas as replicas
        import ccat_dt.transports.local as local

        name, site, kind = options.args
        if options.kill == "mid-write":  # bytes in the temporary file, not yet synced
            wrap(local.os, "fsync", before=die)
        elif options.kill == "hold-mid-write":  # the same point, waiting to be killed there
            wrap(local.os, "fsync", before=wait_to_be_killed(Path(options.marker)))
        elif options.kill == "pause-mid-write":  # the same point, going on once let go
            wrap(local.os, "fsync", before=wait_to_be_let_go(Path(options.marker)))
        elif options.kill == "before-record":  # renamed into place, not recorded
            wrap(replicas, "_record", before=die)
        if meet:
            wrap(*{"write": (local, "claim_temporary"), "record": (replicas, "_record"),
                   "claim": (replicas, "_claim")}[options.at], before=meet)
        placement = replicas.plan_placement(opsdb, config, name, site, LocationType(kind))
        try:
            placed = replicas.place(opsdb, config, placement, LocationType(kind))
            result = placed.ref.copy_id
        except TransferError as exc:  # what the IO manager hands to the retry policy
            print(json.dumps({"error": str(exc), "retryable": exc.retryable}))
            return 4

    elif options.action == "purge":
        import ccat_dt.reaper as reaper

        [name] = options.args
        if meet:  # the deletion of the copy at `--copy-at` (a location label) meets the others
            # about to unlink (`--at claim`: its certificate committed) or, unlinked, about to
            # be recorded (`--at record`)
            at_copy(reaper, "_execute" if options.at == "claim" else "_unlink_local",
                    options.copy_at, meet, after=options.at == "record")
        if options.kill == "after-certificate":  # certificate committed, nothing unlinked
            wrap(reaper, "_execute", before=die, nth=options.nth)
        elif options.kill == "after-unlink":  # unlinked, the deletion not recorded
            wrap(reaper, "_unlink_local", after=die, nth=options.nth)
        elif options.kill == "hold-before-unlink":  # the copy at --copy-at certified, its
            # unlink next: waits there to be killed
            at_copy(reaper, "_execute", options.copy_at, wait_to_be_killed(Path(options.marker)))
        elif options.kill == "pause-before-unlink":  # the same point, going on once let go
            at_copy(reaper, "_execute", options.copy_at, wait_to_be_let_go(Path(options.marker)))
        report = reaper.purge_package(opsdb, config, name)
        result = {"deleted": report.deleted, "failures": report.failures}

    elif options.action == "file":
        import ccat_dt.filing as filing

        observation, module, directory = options.args
        if meet:
            wrap(filing, "_record", before=meet)
        try:
            filed = filing.file_directory(opsdb, observation=observation, module=module,
                                          directory=directory)
        except filing.FilingError as exc:
            print(json.dumps({"error": str(exc)}))
            return 3
        result = {"filed": filed.filed, "unchanged": filed.unchanged}

    elif options.action == "stage":  # what the staged_copies asset does for its partition
        import ccat_dt.staging as staging

        [name] = options.args
        if meet:  # `claim`: past the look at what is staged, about to claim the staging;
            # `write`: claimed, about to write anything; `record`: its files renamed to their
            # staged names, about to record them
            if options.at == "claim":
                wrap(staging, "_nearest", after=meet)
            else:
                wrap(staging, "root_problem" if options.at == "write" else "_record_staged",
                     before=meet)
        try:
            done = staging.stage(opsdb, config, name)
        except (staging.StagingError, TransferError, OSError) as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return 4
        result = {"files": done.files, "bytes": done.bytes, "note": done.note}

    elif options.action == "drive":  # the real sensors and runs, as `ccat-dt drive` does
        import warnings

        from dagster import DagsterInstance

        from ccat_assets.definitions import build_definitions
        from ccat_assets.driver import drive

        warnings.filterwarnings("ignore")
        if options.kill == "package-before-record":  # tar in place, OpsDB not told
            import ccat_dt.packages as packages

            wrap(packages, "_record_built", before=die, nth=options.nth)
        elif options.kill == "copy-before-record":  # a copy landed and renamed, not recorded
            import ccat_dt.replicas as replicas

            wrap(replicas, "_record", before=die, nth=options.nth)
        elif options.kill == "purge-after-certificate":  # certificate committed, no unlink
            import ccat_dt.reaper as reaper

            wrap(reaper, "_execute", before=die, nth=options.nth)
        elif options.kill == "after-run":  # a run finished, later runs in flight or not
            import ccat_assets.driver as driver  # yet created

            wrap(driver, "_finished", after=die, nth=options.nth)
        elif options.kill == "hold-in-run":  # packaging runs wait to be killed, re-attempted
            import ccat_dt.packages as packages  # steps as well

            wrap(packages, "_record_built", before=wait_to_be_killed(Path(options.marker)),
                 nth=0)
        elif options.kill == "slow-copy":  # every local copy slow (a slow disk or link:
            import ccat_dt.transports.local as local  # --slow-s per 64 KiB slice), --marker
            # written (the landing temporary's path) as the first slice of a copy has landed

            local.SLICE_SIZE = 64 * 1024
            marker = Path(options.marker) if options.marker else None

            def slow_landing(self: object, temporary: Path) -> None:
                if marker is not None and not marker.exists():
                    written = marker.with_name(f".{marker.name}.{os.getpid()}")
                    written.write_text(str(temporary))
                    written.rename(marker)  # whole: the parent reads it as soon as it exists
                time.sleep(options.slow_s)

            local.LocalTransport._landed = slow_landing  # type: ignore[assignment,method-assign]
        elif options.kill == "hold":  # holds the drive lock until killed
            import ccat_assets.driver as driver

            wrap(driver, "close_dead_runs", after=wait_to_be_killed(Path(options.marker)))
        with DagsterInstance.from_config(options.home) as instance:
            driven = drive(build_definitions(config), instance, wait_s=options.wait,
                           log=lambda line: print(line, flush=True))
        result = {"launched": driven.launched, "failed": driven.failed}

    elif options.action == "instance":  # open the Dagster instance, as every process does
        import warnings

        from dagster import DagsterInstance
        from dagster._core.storage.event_log.sqlite import sqlite_event_log
        from dagster._core.storage.runs.sqlite import sqlite_run_storage
        from dagster._core.storage.schedules.sqlite import sqlite_schedule_storage

        warnings.filterwarnings("ignore")
        if options.slow_stamp:
            def slow() -> None:
                time.sleep(options.slow_stamp)
            for storage in (sqlite_run_storage, sqlite_event_log, sqlite_schedule_storage):
                wrap(storage, "stamp_alembic_rev", before=slow, nth=0)
        if meet:
            meet()  # every party is about to open the new instance
        with DagsterInstance.from_config(options.home) as instance:
            result = {"runs": len(instance.get_runs(limit=1)),
                      "states": len(instance.all_instigator_state())}

    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
