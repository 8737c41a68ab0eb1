"""`ccat-dt`: set up a deployment, file raw data, run the lifecycle, look at the result.

Exit status: 0 done; 1 done, with problems found (`audit` findings left unrepaired, `drive`,
`retry` or `demo` with a failed run, `purge` with deletions left undone); 2 bad input or an
unavailable service (configuration, OpsDB locked, read-only or unreachable, a missing file),
reported on stderr as one line `ccat-dt: error: ...` (with `-v`, the traceback too); 3 an
internal error (a bug: the one line says so, `-v` shows the traceback). Output cut short by
its reader (`ccat-dt status | head`) ends quietly with status 141, as for a command killed by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# These imports make tens of thousands of objects that live as long as the process (SQLAlchemy,
# pydantic, the ORM models, the configuration's schema): the garbage collector would walk them
# again and again while they are made, finding nothing (0.12 s of a 0.8 s `ccat-dt status`). It
# pauses for them, and what they made is then moved out of its sight (gc.freeze).
_collecting = gc.isenabled()
gc.disable()
try:
    from sqlalchemy.exc import DBAPIError, IntegrityError

    from ccat_dt.config import Config, load_config
    from ccat_dt.diskstate import disk_trouble, next_step
    from ccat_dt.jsonlog import configure_from_env
    from ccat_dt.opsdb.database import (
        LOCK_TIMEOUT_ENV,
        OpsDB,
        dispose_engines,
        lock_timeout_s,
        statement_canceled,
    )
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

# Each command imports the domain modules it uses: `status`, `why`, `purge --plan` and `file`
# answer in a fraction of a second, and importing what they do not use would be most of it.

if TYPE_CHECKING:
    from datetime import datetime

    from _typeshed import SupportsWrite

    from ccat_assets.driver import DriveReport
    from ccat_dt.client import FilingClient


class UsageError(Exception):
    """A command line that cannot be acted on; nothing was changed."""


EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR, EXIT_BUG = 0, 1, 2, 3
EXIT_PIPE = 128 + 13  # the reader closed the pipe (SIGPIPE), e.g. `ccat-dt status | head`


def init(directory: Path) -> Path:
    """Write the embedded default under `directory` (keeping an existing config), migrate the
    OpsDB, mirror the topology into it and prepare the Dagster home."""
    from ccat_assets.instance import write_instance_yaml
    from ccat_dt.defaults import CONFIG_NAME, write_default_config
    from ccat_dt.topology import prepare_opsdb

    path = directory / CONFIG_NAME
    if not path.exists():
        write_default_config(directory)
    config = load_config(path)
    prepare_opsdb(config)
    for site in config.settings.sites:
        for location in site.locations:
            if not location.is_object_store:
                config.resolve_root(location.root).mkdir(parents=True, exist_ok=True)
    write_instance_yaml(config, directory / "dagster_home")
    return path


def _opsdb(args: argparse.Namespace) -> OpsDB:
    return OpsDB(load_config(args.config).opsdb_url)


def _acting(config: Config) -> OpsDB:
    """The OpsDB of a command that acts on the storage: refused (exit 2, nothing changed)
    while the configuration and OpsDB disagree on the locations (ccat_dt/topology.py)."""
    from ccat_dt.topology import check_topology

    opsdb = OpsDB(config.opsdb_url)
    check_topology(opsdb, config)
    return opsdb


def cmd_init(args: argparse.Namespace) -> None:
    path = init(Path(args.directory).absolute())
    print(f"initialised {path.parent}\n  config: {path}\n"
          f"  export CCAT_DT_CONFIG={path} DAGSTER_HOME={path.parent / 'dagster_home'}")


def cmd_migrate(args: argparse.Namespace) -> None:
    from ccat_dt.topology import prepare_opsdb

    config = load_config(args.config)
    # `init` marks a held location's root, not migrate. Each location moved: how many of its
    # copies were re-identified at the new root (ccat_dt/reidentify.py).
    for line in prepare_opsdb(config, mark_held=False):
        print(line)
    print(f"OpsDB at {config.opsdb_url} is up to date")
    from ccat_assets.instance import stale_run_limits

    if stale := stale_run_limits(config):  # the daemon and drive take the limits from there
        print(f"warning: the run limits per link in {stale} differ from routes[].max_concurrent: "
              "run `ccat-dt init` on this deployment to write them (your other settings there "
              "are kept), then restart the daemon", file=sys.stderr)


def _client(args: argparse.Namespace) -> FilingClient:
    """The HTTP client for `--api` (imported only then: the other commands need no httpx)."""
    import os

    from ccat_dt.client import FilingClient

    token = args.token or os.environ.get("CCAT_DT_API_TOKEN")
    if not token:
        raise UsageError("--api needs a token: --token TOKEN or $CCAT_DT_API_TOKEN")
    return FilingClient(args.api, token)


def cmd_observation(args: argparse.Namespace) -> None:
    if args.api:
        with _client(args) as client:
            if args.action == "start":
                answer = client.start_observation(args.name)
                print(f"{answer['uuid']} ({answer['status']})")
            else:
                answer = client.finish_observation(args.name)
                print(f"observation {args.name} {answer['status']}")
        return
    from ccat_dt.filing import finish_observation, open_observation

    opsdb = _opsdb(args)
    if args.action == "start":
        # the answer of the start itself: of two at once, the second finds the first's
        # observation and says so (a look before the start found none for either)
        started = open_observation(opsdb, args.name)
        if not started.created:
            print(f"observation {args.name} is already open: it was already started (uuid "
                  f"{started.uuid}); nothing changed")
        else:
            print(f"observation {args.name} started (uuid {started.uuid}); file its data with "
                  f"`ccat-dt file --observation {args.name} ...`, then "
                  f"`ccat-dt observation finish {args.name}`")
    else:
        # the answer of the finish itself: of two at once, the second waits for the first's
        # and says so, instead of both saying "finished"
        earlier = finish_observation(opsdb, args.name)
        print(f"observation {args.name} was already finished at {earlier:%Y-%m-%d %H:%M:%S}"
              " UTC; nothing changed" if earlier else f"observation {args.name} finished")


def cmd_file(args: argparse.Namespace) -> None:
    if args.api:
        _file_via_api(args)
        return
    from ccat_dt.filing import FileSpec, file_directory, file_raw_files, read_manifest_file

    config = load_config(args.config)
    opsdb = _acting(config)
    where = {"observation": args.observation, "module": args.module, "site": args.site,
             "location": args.location}
    if args.manifest:
        if args.paths:
            raise UsageError("give either --manifest or paths, not both")
        result = file_raw_files(opsdb, files=read_manifest_file(Path(args.manifest)), **where)
    elif args.directory:
        result = file_directory(opsdb, directory=args.directory, **where)
    elif args.paths:
        result = file_raw_files(opsdb, files=[FileSpec(p) for p in args.paths], **where)
    else:
        raise UsageError("nothing to file: give paths, --directory or --manifest")
    print(f"filed {result.filed} file(s), {result.bytes} bytes; {result.unchanged} unchanged")
    if result.skipped:
        from ccat_dt.report import printable

        shown = ", ".join(map(printable, result.skipped[:5])) + (
            " ..." if len(result.skipped) > 5 else "")
        print(f"skipped {len(result.skipped)} entries that are not regular files (symlinks are "
              f"not followed: file the real path): {shown}", file=sys.stderr)
    _warn_oversized(opsdb, config, args.observation)


def _warn_oversized(opsdb: OpsDB, config: Config, observation: str) -> None:
    """The rule for a file bigger than policies.package_max_bytes, said when it is filed."""
    from sqlalchemy import select

    from ccat_dt.opsdb.models import ExecutedObsUnit, RawDataFile
    from ccat_dt.report import printable

    cap = config.settings.policies.package_max_bytes
    with opsdb.session() as session:
        big = session.execute(select(RawDataFile.relative_path, RawDataFile.size)
                              .join(ExecutedObsUnit).where(ExecutedObsUnit.name == observation,
                                                           RawDataFile.size > cap)).all()
    for path, size in big:
        print(f"ccat-dt: warning: {printable(path)} is {size} bytes, more than "
              f"policies.package_max_bytes ({cap}): it will travel in a package of its own, "
              "larger than the cap",
              file=sys.stderr)


def _file_via_api(args: argparse.Namespace) -> None:
    from ccat_dt.filing import FileSpec, read_manifest_file

    if args.manifest and args.paths:
        raise UsageError("give either --manifest or paths, not both")
    if args.directory:
        raise UsageError("--directory walks the source disk; with --api give paths or "
                         "--manifest")
    specs = (read_manifest_file(Path(args.manifest)) if args.manifest
             else [FileSpec(p) for p in args.paths])
    if not specs:
        raise UsageError("nothing to file: give paths or --manifest")
    with _client(args) as client:
        answers = client.file(args.observation, args.module, specs, site=args.site,
                              location=args.location)
    states = sorted({a["status"] for a in answers})
    print(f"{sum(a['count'] for a in answers)} file(s) {'/'.join(states)} in {len(answers)} "
          f"request(s)")


def cmd_serve(args: argparse.Namespace) -> None:
    from ccat_dt.service.app import serve

    serve(load_config(args.config), host=args.host, port=args.port, site=args.site,
          journal=args.journal, log_level=args.log_level)


def cmd_journal(args: argparse.Namespace) -> None:
    """Dead letters of the filing service's journal at this site: list, retry, discard."""
    from ccat_dt.service.journal import Journal

    config = load_config(args.config)
    path = config.resolve_root(args.journal or config.settings.service.journal)
    if not path.exists():
        raise UsageError(f"no filing journal at {path} (is `ccat-dt serve` run on this host? "
                         "--journal names another file)")
    if args.action != "list" and args.seq is None:
        raise UsageError(f"journal {args.action} needs the entry number (see `ccat-dt journal "
                         "list`)")
    if args.action == "discard" and not (args.reason or "").strip():
        raise UsageError("journal discard needs --reason (kept with the entry)")
    if args.action == "list" and args.seq is not None:
        raise UsageError("journal list takes no entry number")
    book = Journal(path)
    try:
        if args.action == "list":
            pending, oldest = book.pending()
            dead, letters = book.dead_letters(limit=10_000)
            age = f", oldest {oldest:.0f} s old" if oldest is not None else ""
            print(f"filing journal {path}: {pending} request(s) waiting for OpsDB{age}; "
                  f"{dead} dead letter(s)")
            for entry in letters:
                files = entry.payload.get("files")
                what = f"{len(files)} file(s)" if isinstance(files, list) else entry.kind
                print(f"  #{entry.seq} {entry.kind} {entry.observation} ({what}, request "
                      f"{entry.request_id}): {entry.error}")
            if dead:
                print("fix the cause, then `ccat-dt journal retry N`, or `ccat-dt journal "
                      "discard N --reason TEXT`")
                raise SystemExit(EXIT_PROBLEMS)
            return
        try:
            entry = (book.retry(args.seq) if args.action == "retry"
                     else book.discard(args.seq, args.reason.strip()))
        except (KeyError, ValueError) as exc:
            raise UsageError(str(exc).strip("'\"")) from None
    finally:
        book.close()
    if args.action == "retry":
        print(f"journal entry #{entry.seq} ({entry.kind} of {entry.observation}) is pending "
              "again: the running service applies it within a second, or files it as a dead "
              "letter again with the reason (`ccat-dt journal list`)")
    else:
        print(f"journal entry #{entry.seq} ({entry.kind} of {entry.observation}) discarded; "
              "it stays in the journal for the record, the notification about it resolves")


def cmd_token(args: argparse.Namespace) -> None:
    from ccat_dt.service.tokens import create_token, list_tokens, revoke_token

    config = load_config(args.config)
    opsdb = OpsDB(config.opsdb_url)
    if args.action == "create":
        if not args.name or not args.site:
            raise UsageError("token create needs --name and --site")
        secret = create_token(opsdb, config, name=args.name, site=args.site,
                              instruments=args.instrument or [])
        print(secret)
        print(f"token '{args.name}' for site {args.site}, instruments "
              f"{', '.join(args.instrument or []) or 'all'}: shown once, only its hash is kept",
              file=sys.stderr)
    elif args.action == "revoke":
        if not args.name:
            raise UsageError("token revoke needs --name")
        done = revoke_token(opsdb, args.name)
        print(f"token '{args.name}' {'revoked' if done else 'was already revoked'}; services "
              f"stop accepting it within service.token_refresh_s")
    else:
        for token in list_tokens(opsdb):
            state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
            print(f"{token.name:<24} {token.site:<10} "
                  f"{','.join(token.instruments) or '(all)':<20} {state}")


def cmd_drive(args: argparse.Namespace) -> None:
    _dagster()  # first: importing the Dagster layer warns
    from ccat_assets.definitions import build_definitions
    from ccat_assets.driver import drive
    from ccat_assets.instance import open_instance
    from ccat_assets.runlog import LOG_NAME, RunReporter, quiet_runs

    config = load_config(args.config)
    _acting(config)
    instance = open_instance(config)
    reporter = RunReporter(instance)
    with quiet_runs(config.log_dir / LOG_NAME, verbose=args.verbose > 0) as log_file:
        report = drive(build_definitions(config), instance, due_schedules=True, log=reporter,
                       wait_s=args.wait)
    print("; ".join([f"{reporter.summary()}", *_healed(report), f"{report.rounds} round(s)",
                     f"Dagster's event log: {log_file} (or -v)", *report.housekeeping()]))
    if report.next_due is not None:
        print(f"work waits for an automatic re-attempt; the next at "
              f"{report.next_due:%Y-%m-%d %H:%M:%S} UTC (`ccat-dt status` lists it)")
    for name, why in report.sensor_failures.items():
        print(f"sensor {name} still failing: {why}; what it would request did not run")
    if report.unhealed or report.sensor_failures or _report_danger(config):
        raise SystemExit(EXIT_PROBLEMS)


def _healed(report: DriveReport) -> list[str]:
    """The summary's words for failed runs whose work a later run did (they leave the exit
    status at 0: nothing is left to do and nobody needs to act)."""
    if not report.healed:
        return []
    return [f"{len(report.healed)} failed run(s) healed by a later run of the same work"]


def _report_danger(config: Config) -> bool:
    """Print every LOST or AT RISK package; True if any is LOST (a person must act)."""
    from ccat_dt.loss import Health, packages_in_danger

    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:
        danger = packages_in_danger(session, config)
    for name, assessment in danger:
        print(f"{assessment.health.value.upper()}: {name}: {assessment.reason}")
    return any(a.health == Health.LOST for _, a in danger)


def cmd_demo(args: argparse.Namespace) -> None:
    _dagster()  # first: importing the Dagster layer warns
    from ccat_assets.demo import run_demo

    ok = run_demo(Path(args.root).absolute(), observations=args.observations,
                  files_per_module=args.files, file_bytes=int(args.file_mb * 1e6),
                  verbose=args.verbose > 0)
    raise SystemExit(EXIT_OK if ok else EXIT_PROBLEMS)


def cmd_status(args: argparse.Namespace) -> None:
    from ccat_assets.status import print_status

    config = load_config(args.config)
    print_status(OpsDB(config.opsdb_url), config)
    journal = config.resolve_root(config.settings.service.journal)
    if journal.exists():
        from ccat_dt.service.journal import Journal

        book = Journal(journal)
        pending, oldest = book.pending()
        dead, letters = book.dead_letters()
        age = f", oldest {oldest:.0f} s old" if oldest is not None else ""
        print(f"filing journal {journal}: {pending} request(s) waiting for OpsDB{age}; "
              f"{dead} dead letter(s)")
        for entry in letters:
            print(f"  dead #{entry.seq} {entry.kind} {entry.observation}: {entry.error}")
        book.close()


def cmd_purge(args: argparse.Namespace) -> None:
    from ccat_dt.opsdb.models import utcnow
    from ccat_dt.purge_cycle import plan_cycle
    from ccat_dt.report import printable

    config = load_config(args.config)
    opsdb = _acting(config)
    _known_packages(opsdb, [args.package] if args.package else [])
    with opsdb.session() as session:
        plan = plan_cycle(session, config, utcnow())
        shown = [(p, d) for p, d in plan.deletions + plan.kept
                 if args.package in (None, p)]
        if args.package and not shown:  # nothing of it in the cycle: each copy, and why
            from ccat_dt.packages import get_package
            from ccat_dt.retention import plan_deletions

            shown = [(args.package, d) for d in plan_deletions(
                session, config, get_package(session, args.package), utcnow())]
    cycle = (f"{len(plan.deletions)} deletion(s), {plan.bytes / 1e6:.1f} MB "
             f"(budget {plan.budget_bytes / 1e6:.0f} MB)")
    if args.package:  # its own figures first: the cycle's are not what this command does
        mine = [d for p, d in plan.deletions if p == args.package]
        print(f"purge of {args.package}: {len(mine)} deletion(s) in the cycle's plan, "
              f"{sum(d.size for d in mine) / 1e6:.1f} MB; the whole cycle: {cycle}")
    else:
        print(f"purge cycle: {cycle}")
    for pressure in plan.pressure:
        print(pressure.said())
    for package, decision in shown:
        verb = "DELETE" if decision.action == "delete" else "keep  "
        where = f"{decision.site}/{decision.location}"
        print(f"{verb} {package:<32} {where:<20} {decision.size / 1e6:>9.1f} MB  "
              f"{printable(decision.path)}\n         why: {printable(decision.reason)}")
    if args.plan:
        # The purge looks at the LTA copies on their storage before it deletes: say now what
        # that look would find (existence, type, size; the content is hashed only then).
        planned = sorted({p for p, _ in plan.deletions if args.package in (None, p)})
        if planned:  # the storage modules are imported only when there is a look to take
            from ccat_dt.recheck import recheck_lta_copies
        for package in planned:
            for problem in recheck_lta_copies(opsdb, config, package, dry_run=True).problems:
                print(f"keep   {package:<32} storage re-check: {printable(problem)}; nothing "
                      "of this "
                      "package is deleted until it is repaired")
        return
    from ccat_dt.reaper import purge_package

    todo: dict[str, tuple[Collection[int] | None, Collection[int]]] = dict(plan.by_package())
    if args.package:  # that package alone; with nothing planned, its own plan (and a fresh
        # look at its unfinished or refused deletions)
        todo = {args.package: todo.get(args.package, (None, ()))}
    failed = False
    for package, (copy_ids, early_ids) in todo.items():
        report = purge_package(opsdb, config, package, copy_ids=copy_ids, early_ids=early_ids)
        print(f"{package}: deleted {report.deleted} copies ({report.deleted_bytes / 1e6:.1f} MB)"
              + "".join(f"\n  FAILED {f}" for f in report.failures))
        failed = failed or bool(report.failures)
    if failed:  # what could not be done now is done by running it again
        raise SystemExit(EXIT_PROBLEMS)


def _known_packages(opsdb: OpsDB, names: Collection[str], *,
                    staging_requests: bool = False) -> None:
    """Bad input changes nothing: a package name OpsDB does not know (or, with
    `staging_requests`, a staging request's) stops the command first."""
    from sqlalchemy import select

    from ccat_dt.opsdb.models import RawDataPackage, StagingRequest

    with opsdb.session() as session:
        known = set(session.scalars(select(RawDataPackage.name).where(
            RawDataPackage.name.in_(names)))) if names else set()
        if staging_requests and names:
            known |= set(session.scalars(select(StagingRequest.name).where(
                StagingRequest.name.in_(names))))
    for name in names:
        if name not in known:
            what = "package or staging request" if staging_requests else "package"
            raise UsageError(f"unknown {what} '{name}': `ccat-dt status` and `ccat-dt why` "
                             "name the packages")


def cmd_stage(args: argparse.Namespace) -> None:
    from datetime import datetime, timedelta

    from ccat_dt.staging import LONGEST_EXPIRY, Selection, release, request_staging

    config = load_config(args.config)
    opsdb = _acting(config)
    if args.release:
        before = release(opsdb, args.release)
        print(f"staging request {args.release} released; the next purge cycle removes its files"
              if before == "active" else f"staging request {args.release} was {before} "
              "already: nothing changed")
        return
    if not args.location:
        raise UsageError("give --location SITE/LOCATION (a processing location) or --release")

    def when(text: str | None) -> datetime | None:
        try:
            return datetime.fromisoformat(text) if text else None
        except ValueError:
            raise UsageError(f"not an ISO date/time: {text!r}") from None

    selection = Selection(observation=args.observation, module=args.module,
                          since=when(args.since), until=when(args.until),
                          packages=tuple(args.package or ()))
    if selection == Selection():
        raise UsageError("select packages: --observation, --module, --since/--until or --package")
    longest = LONGEST_EXPIRY.total_seconds() / 3600
    if not 0 < args.expires_hours <= longest:  # also NaN; inf and 1e12 would overflow
        raise UsageError(f"--expires-hours must be more than 0 and at most {longest:g} (ten "
                         f"years), got {args.expires_hours:g}")
    name = request_staging(opsdb, location=args.location, selection=selection,
                           expires_in=timedelta(hours=args.expires_hours),
                           requested_by=args.by or "", config=config)
    print(name)


def cmd_why(args: argparse.Namespace) -> None:
    from ccat_dt.diagnosis import diagnose
    from ccat_dt.opsdb.models import utcnow
    from ccat_dt.report import printable

    config = load_config(args.config)
    opsdb = OpsDB(config.opsdb_url)
    asked = utcnow()
    with opsdb.session() as session:
        try:
            stages = diagnose(session, config, args.package, asked)
        except LookupError as exc:
            raise UsageError(str(exc)) from None
    for stage in stages:
        print(f"{stage.stage:<20} {stage.state:<12} {printable(stage.detail)}")
    if any(stage.state != "done" for stage in stages):
        sys.stdout.flush()  # OpsDB's answer first: Dagster's runs take a second to ask
        for line in _runs_of(config, args.package, asked):
            print(line)


def _runs_of(config: Config, package: str, asked: datetime) -> list[str]:
    """What the Dagster instance says about the package's runs (when there is an instance):
    asked only about a package with a stage not done (nothing to explain otherwise), as
    importing Dagster takes over a second. Of each piece of work (job, assets, partition) only
    its newest run counts, oldest first: a failure a later run fixed explains nothing. Runs
    created after OpsDB was read (`asked`) are left out: under a working drive they are of work
    the answer above has not reached (a copy run started while it says "after packaging")."""
    from ccat_assets.instance import instance_home, open_instance

    if not (instance_home(config) / "dagster.yaml").exists():
        return []
    _dagster()
    from dagster import DagsterRun, DagsterRunStatus, RunRecord, RunsFilter

    def work(run: DagsterRun) -> tuple[object, ...]:
        return (run.job_name, tuple(sorted(str(key) for key in run.asset_selection or ())),
                tuple(sorted((k, v) for k, v in run.tags.items()
                             if k.startswith("dagster/partition"))))

    instance = open_instance(config)
    records: list[RunRecord] = []
    for tag in ("dagster/partition", "dagster/partition/package"):
        records += instance.get_run_records(RunsFilter(tags={tag: package}), limit=50)
    newest: dict[tuple[object, ...], RunRecord] = {}
    for record in sorted(records, key=lambda r: r.create_timestamp):
        if record.create_timestamp <= asked:
            newest[work(record.dagster_run)] = record
    lines = []
    for record in sorted(newest.values(), key=lambda r: r.create_timestamp):
        run = record.dagster_run
        if run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.QUEUED,
                          DagsterRunStatus.STARTED, DagsterRunStatus.CANCELED):
            lines.append(f"run {run.run_id[:8]} {record.create_timestamp:%Y-%m-%d %H:%M:%S} "
                         f"{run.tags.get('dagster/run_key', run.job_name)}: {run.status.value}")
    return lines


def cmd_audit(args: argparse.Namespace) -> None:
    from ccat_dt.audit import audit
    from ccat_dt.report import printable

    config = load_config(args.config)
    opsdb = _acting(config) if args.repair else OpsDB(config.opsdb_url)
    report = audit(opsdb, checksums=args.checksums, repair=args.repair, config=config)
    for finding in report.findings:
        print(f"{finding.kind:<13} {finding.location:<18} {printable(finding.path)}\n"
              f"              {printable(finding.detail)}")
    for line in report.repaired:
        print(f"repaired: {line}")
    in_flight = sum(f.kind == "in_flight" for f in report.findings)
    print(f"{report.checked_copies} copies checked, {report.scanned_files} files scanned, "
          f"{len(report.problems)} problem(s), {len(report.repaired)} repaired"
          + (f"; {in_flight} file(s) in flight (being written now)" if in_flight else ""))
    not_audited = [f for f in report.findings if f.kind == "skipped"]
    if not_audited:
        print(f"{len(not_audited)} location(s) or directories NOT audited (see 'skipped')")
    lost = _report_danger(config)
    if (report.problems and not _all_repaired(report)) or not_audited or lost:
        raise SystemExit(EXIT_PROBLEMS)


def _all_repaired(report: object) -> bool:
    """`audit --repair` that acted on every problem it found is done: exit 0. Dark files
    (only ever reported) and problems repair refused leave it at 1."""
    problems = list(getattr(report, "problems", []))
    repaired = getattr(report, "repaired", [])
    return bool(repaired) and len(repaired) >= len(problems)


def cmd_instance_yaml(args: argparse.Namespace) -> None:
    """The Dagster instance settings for this deployment: a template plus one run limit per
    route, on stdout (secrets stay `{env: ...}` references, as in the template)."""
    import yaml

    from ccat_assets.instance import TEMPLATE, instance_settings

    config = load_config(args.config)
    template = Path(args.template) if args.template else TEMPLATE
    if not template.is_file():
        raise UsageError(f"template {template} not found")
    print(yaml.safe_dump(instance_settings(config, template), sort_keys=False), end="")


def cmd_retry(args: argparse.Namespace) -> None:
    _dagster()  # first: importing the Dagster layer warns
    from ccat_assets.instance import open_instance
    from ccat_assets.retry import operator_retry
    from ccat_assets.runlog import LOG_NAME, RunReporter, quiet_runs

    config = load_config(args.config)
    _known_packages(_acting(config), args.package or [], staging_requests=True)
    instance = open_instance(config)
    reporter = RunReporter(instance)
    with quiet_runs(config.log_dir / LOG_NAME, verbose=args.verbose > 0):
        retried, report = operator_retry(config, instance, OpsDB(config.opsdb_url),
                                         packages=args.package or None,
                                         rebuild_failed=args.rebuild_failed, log=reporter)
    print("; ".join([f"{len(retried)} stalled partition(s) retried",
                     f"{len(report.launched)} run(s), {len(report.failed)} failed"
                     + (f", {len(report.canceled)} canceled by an operator"
                        if report.canceled else ""),
                     *_healed(report)]))
    if report.unhealed:
        raise SystemExit(EXIT_PROBLEMS)


def cmd_exclude(args: argparse.Namespace) -> None:
    """Take a raw file out of its package (recorded with who, when, why); the file stays."""
    import getpass

    from ccat_dt.recovery import ExcludeRefused, exclude_file
    from ccat_dt.report import printable

    config = load_config(args.config)
    try:
        done = exclude_file(_acting(config), config, args.file, reason=args.reason,
                            by=args.by or getpass.getuser())
    except ExcludeRefused as exc:
        raise UsageError(str(exc)) from None
    if done.package is None:
        print(f"{printable(done.path)} taken out: it is never packaged; the file is left alone")
    else:
        print(f"{printable(done.path)} taken out of {done.package}; the file is left alone (never "
              f"purged). {done.package} is rebuilt without it and goes on by itself "
              f"(`ccat-dt drive`, or the daemon); `ccat-dt why {done.package}` shows it")


def cmd_worker(args: argparse.Namespace) -> None:
    """Serve this site's queues, and only them: run it on a host that holds the site's data."""
    import os

    from ccat_dt.queues import site_queues

    config = load_config(args.config)
    if config.celery_broker is None:
        raise UsageError("no Celery broker: set execution.celery_broker in the configuration "
                         "or $CCAT_DT_CELERY_BROKER")
    try:
        queues = site_queues(config, args.site)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    env = {**os.environ, "CCAT_DT_CONFIG": str(config.path), "CCAT_DT_WORKER": args.site}
    argv = [sys.executable, "-m", "celery", "-A", "ccat_assets.celery_app", "worker",
            "-Q", ",".join(queues),
            "-n", f"{args.site}@%h", "--prefetch-multiplier=1", "--loglevel", args.loglevel,
            "--concurrency", str(args.concurrency)]
    print(f"worker {args.site}: queues {', '.join(queues)}", flush=True)
    os.execvpe(argv[0], argv, env)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a closed stdout is not swallowed (main() ends quietly on it), and
    that an empty value is refused: `purge --package ""` purged every package and `stage
    --observation ""` staged every archived one (a script's unset variable), as if the option
    had not been given."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            (file or sys.stderr).write(message)

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        if not arg_string.strip() and not isinstance(action, argparse._SubParsersAction):
            raise argparse.ArgumentError(action, "empty: give a value, or leave the option out")
        return super()._get_value(action, arg_string)  # type: ignore[misc]


def _at_least(least: float, kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` no smaller than `least` (else a usage
    error)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is below the least allowed, {least:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="ccat-dt", description=(__doc__ or "").split("\n")[0])
    top.add_argument("--config", help="configuration file (default: $CCAT_DT_CONFIG)")
    top.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("init", help="write the embedded default and create the OpsDB")
    p.add_argument("directory", nargs="?", default="ccat-data")
    p.set_defaults(run=cmd_init)

    p = commands.add_parser("migrate", help="apply OpsDB migrations and sync the topology")
    p.set_defaults(run=cmd_migrate)

    p = commands.add_parser("observation", help="start or finish an executed observation")
    p.add_argument("action", choices=["start", "finish"])
    p.add_argument("name")
    _api_arguments(p)
    p.set_defaults(run=cmd_observation)

    p = commands.add_parser("file", help="register raw files written at a source location")
    p.add_argument("--observation", required=True)
    p.add_argument("--module", required=True, help="instrument/module, e.g. primecam/f280")
    p.add_argument("--site", help="default: the observatory")
    p.add_argument("--location", help="LOCATION or SITE/LOCATION; default: the site's "
                   "highest-priority source location")
    p.add_argument("--directory", help="file every file under this directory (relative to "
                   "the source root)")
    p.add_argument("--manifest", help="JSON lines or list of {path, size?, checksum?}")
    p.add_argument("paths", nargs="*", help="paths relative to the source root")
    _api_arguments(p)
    p.set_defaults(run=cmd_file)

    p = commands.add_parser("serve", help="the HTTP filing service for instrument computers")
    p.add_argument("--host", default="127.0.0.1", help="bind address (TLS: a reverse proxy)")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--site", help="the site it files at (default: service.site or the "
                   "observatory)")
    p.add_argument("--journal", help="journal file (default: service.journal)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser("journal", help="the filing service's journal at this site: list "
                            "its dead letters (requests OpsDB refuses), retry or discard one")
    p.add_argument("action", choices=["list", "retry", "discard"])
    p.add_argument("seq", type=int, nargs="?", help="entry number, as `journal list` shows")
    p.add_argument("--reason", help="why it is discarded (required with discard)")
    p.add_argument("--journal", help="journal file (default: service.journal)")
    p.set_defaults(run=cmd_journal)

    p = commands.add_parser("token", help="API tokens of the filing service")
    p.add_argument("action", choices=["create", "revoke", "list"])
    p.add_argument("--name", help="who uses it, e.g. primecam-daq")
    p.add_argument("--site", help="the site it may file at")
    p.add_argument("--instrument", action="append",
                   help="an instrument it may file for (repeatable; default: all)")
    p.set_defaults(run=cmd_token)

    p = commands.add_parser("drive", help="tick the schedules that are due (the fixity "
                            "scrub) and the sensors, but those stopped in the UI, and run what "
                            "they request, until nothing is left to do (a second drive on the "
                            "same deployment waits for the first)")
    p.add_argument("--wait", type=_at_least(0.0, float), default=120.0, metavar="SECONDS",
                   help="also wait for automatic re-attempts due within this many seconds "
                   "(default 120; 0: stop at the first back-off)")
    p.set_defaults(run=cmd_drive)

    p = commands.add_parser("purge", help="run one purge cycle (with --plan: only show it)")
    p.add_argument("--plan", action="store_true",
                   help="dry run: what would be deleted, where, how many bytes, and why")
    p.add_argument("--package", help="only this package: show its copies, purge only it")
    p.set_defaults(run=cmd_purge)

    p = commands.add_parser("stage", help="stage archived packages at a processing location, "
                            "or release a staging request")
    p.add_argument("--location", help="SITE/LOCATION of a processing location, e.g. "
                   "ramses/processing")
    p.add_argument("--observation")
    p.add_argument("--module", help="instrument/module")
    p.add_argument("--since", help="observations started at or after (ISO date/time)")
    p.add_argument("--until", help="observations started before (ISO date/time)")
    p.add_argument("--package", action="append", help="a package name (repeatable)")
    p.add_argument("--expires-hours", type=float, default=72.0)
    p.add_argument("--by", help="who asks (recorded)")
    p.add_argument("--release", metavar="REQUEST", help="release this staging request")
    p.set_defaults(run=cmd_stage)

    p = commands.add_parser("audit", help="compare OpsDB with the disks (with --repair: mark "
                            "lost/changed copies corrupt, remove abandoned temporary files)")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--checksums", action="store_true", help="re-read every copy (slow)")
    p.set_defaults(run=cmd_audit)

    p = commands.add_parser("instance-yaml", help="print the Dagster instance settings with "
                            "one run limit per route (e.g. > $DAGSTER_HOME/dagster.yaml)")
    p.add_argument("--template", help="default: the repository's dagster.yaml; production: "
                   "deploy/dagster.yaml")
    p.set_defaults(run=cmd_instance_yaml)

    p = commands.add_parser("retry", help="after fixing a cause: finish abandoned deletions, "
                            "re-run every stalled partition once, then drive the sensors")
    p.add_argument("--package", action="append",
                   help="only this package, or staging request (repeatable)")
    p.add_argument("--rebuild-failed", action="store_true",
                   help="also rebuild FAILED packages (once their source files are restored)")
    p.set_defaults(run=cmd_retry)

    p = commands.add_parser("exclude", help="take a changed or unwanted raw file out of its "
                            "package (before it leaves the observatory); the file stays")
    p.add_argument("file", help="raw file id, path relative to its source root, or absolute "
                   "path")
    p.add_argument("--reason", required=True, help="why (recorded, shown by `why`)")
    p.add_argument("--by", help="who (recorded; default: the login name)")
    p.set_defaults(run=cmd_exclude)

    p = commands.add_parser("worker", help="a Celery worker serving one site's queues")
    p.add_argument("--site", required=True)
    p.add_argument("--concurrency", type=_at_least(1, int), default=2)
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(run=cmd_worker)

    p = commands.add_parser("why", help="each stage of one package and why it is not moving")
    p.add_argument("package", help="package name (or an observation still being filed)")
    p.set_defaults(run=cmd_why)

    p = commands.add_parser("status", help="packages, copies and bytes per location")
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("demo", help="simulate an observing night and run it to the end")
    p.add_argument("--root", default="demo-data", help="scratch data root (wiped first)")
    p.add_argument("--observations", type=_at_least(1, int), default=3)
    p.add_argument("--files", type=_at_least(1, int), default=20,
                   help="files per observation x module")
    p.add_argument("--file-mb", type=_at_least(0.001, float), default=2.0)
    p.set_defaults(run=cmd_demo)
    for sub in commands.choices.values():  # `ccat-dt drive -v` as well as `ccat-dt -v drive`
        sub.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help=VERBOSE_HELP)
    top.epilog = EPILOG
    top.formatter_class = argparse.RawDescriptionHelpFormatter
    return top


def _api_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL", help="go through the filing service at URL instead "
                   "of OpsDB (no database access needed)")
    p.add_argument("--token", help="API token for --api (default: $CCAT_DT_API_TOKEN)")


VERBOSE_HELP = "show Dagster's event log while runs execute, and tracebacks with errors"
EPILOG = """exit status:
  0    done
  1    done, with problems found: audit findings left unrepaired (`audit --repair` that
       repaired every finding exits 0), a failed run in drive, retry or demo
  2    bad input or an unavailable service (configuration, OpsDB locked, read-only or
       unreachable, a missing file): one line `ccat-dt: error: ...` on stderr
  3    internal error (a bug): one line; -v shows the traceback
  141  the reader of the output went away (`ccat-dt status | head`): stopped quietly
"""


def _dagster() -> None:
    """Import Dagster, for the commands that run or read runs (the others answer without it:
    importing it takes over a second). Partitioned asset checks are a Dagster preview feature
    we rely on knowingly: its warnings are off."""
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=PreviewWarning)
    warnings.filterwarnings("ignore", category=BetaWarning)


def _at_exit() -> None:
    """The command is over: close the OpsDB connections, then freeze what is left, so that
    the interpreter's shutdown does not walk it with the garbage collector (several full
    passes over every object the imports made: 0.3 s of a 1.1 s `ccat-dt status`)."""
    dispose_engines()
    gc.freeze()


atexit.register(_at_exit)


def main(argv: Sequence[str] | None = None) -> None:
    verbose, config_path = 0, None
    try:
        try:
            args = parser().parse_args(argv)  # --help writes to stdout too
            verbose, config_path = args.verbose, getattr(args, "config", None)
            _refuse_root_elsewhere(args, sys.argv[1:] if argv is None else list(argv))
            configure_from_env()
            args.run(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        _quiet_broken_pipe()
    except KeyboardInterrupt:
        print("ccat-dt: interrupted", file=sys.stderr)
        raise SystemExit(128 + 2) from None
    except Exception as exc:  # every error becomes one line and an exit status
        message, status = _explain(exc, config_path)
        if verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"ccat-dt: error: {message}", file=sys.stderr)
        raise SystemExit(status) from None


# Commands that write nothing on a deployment (`instance-yaml` prints; with --api, `file` and
# `observation` talk HTTP to the filing service).
_NO_DEPLOYMENT = frozenset({"instance-yaml"})


def _refuse_root_elsewhere(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """As root, refuse (exit 2) a command on a deployment another user owns before it opens
    anything that could create a file (ccat_dt/ownership.py). Not root: nothing is looked at."""
    if (os.geteuid() != 0 or args.command in _NO_DEPLOYMENT
            or getattr(args, "api", None)):
        return
    from ccat_assets.instance import instance_home
    from ccat_dt.config import ConfigError
    from ccat_dt.defaults import CONFIG_NAME
    from ccat_dt.ownership import refuse_root_on_foreign, written_first

    paths: list[Path] = []
    config_path: Path | str | None = args.config
    if args.command in ("init", "demo"):
        directory = Path(args.directory if args.command == "init" else args.root).absolute()
        paths.append(directory)
        config_path = directory / CONFIG_NAME if args.command == "init" else None
        if config_path is not None and not config_path.exists():
            config_path = None
    if args.command != "demo" and (config_path is not None or args.command != "init"):
        try:
            config = load_config(config_path)
        except ConfigError:
            config = None  # the command itself says what is wrong with it
        if config is not None:
            paths[:0] = written_first(config, instance_home(config))
    refuse_root_on_foreign(paths, argv)


def _explain(exc: BaseException, config_path: str | None = None) -> tuple[str, int]:
    """One line for an error (its cause and the next step) and the exit status. An OpsDB
    error wrapped by Dagster (e.g. raised in a sensor) counts as the OpsDB error; a SQLite
    file's disk full or read-only is said so, with the file."""
    if isinstance(exc, (UsageError, FileExistsError)) or any(
            isinstance(exc, getattr(sys.modules[module], name))
            for module, name in _STATED_ERRORS if module in sys.modules):
        return str(exc), EXIT_ERROR  # before its database cause: it says more
    chain = _chain(exc)
    for link in chain:
        if isinstance(link, DBAPIError) and not isinstance(link, IntegrityError):
            if _in_instance_storage(chain):
                return _instance_storage_unavailable(link), EXIT_ERROR
            return _opsdb_unavailable(link, config_path), EXIT_ERROR
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        trouble = (disk_trouble(Path(exc.filename)) if exc.filename
                   and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None)
        if trouble is not None:
            return (f"{exc.strerror}{where}: the disk holding it is {trouble}: "
                    f"{next_step(trouble)}", EXIT_ERROR)
        return (f"{exc.strerror or exc}{where}: check the path, its permissions and free "
                "space, then run the command again", EXIT_ERROR)
    first = " ".join(str(exc).split())[:300]
    return (f"internal error: {type(exc).__name__}: {first} (a bug; run again with -v for the "
            "traceback and report it)", EXIT_BUG)


# Errors whose message says all (cause and next step), by module: looked up only in modules
# already imported, since a command that did not import one cannot have raised its error.
_STATED_ERRORS = (("ccat_dt.config", "ConfigError"), ("ccat_dt.filing", "FilingError"),
                  ("ccat_dt.opsdb.database", "SchemaOutOfDate"),
                  ("ccat_dt.opsdb.database", "MigrationBlocked"),
                  ("ccat_dt.staging", "StagingError"), ("ccat_dt.service.tokens", "TokenError"),
                  ("ccat_dt.client", "ServiceError"), ("ccat_dt.topology", "TopologyDrift"),
                  ("ccat_dt.service.journal", "JournalInUse"),
                  ("ccat_dt.ownership", "WrongUser"))


def _chain(exc: BaseException) -> list[BaseException]:
    links: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in links and len(links) < 20:
        links.append(current)
        current = current.__cause__ or current.__context__
    return links


# Where Dagster's run, event and schedule storage is read and written: an error raised
# through these is the instance's database (DAGSTER_HOME/dagster.yaml), not OpsDB.
_INSTANCE_STORAGE = ("/dagster_postgres/", "/dagster/_core/storage/runs/",
                     "/dagster/_core/storage/event_log/", "/dagster/_core/storage/schedules/",
                     "/dagster/_core/storage/sql.py", "/ccat_assets/sqlite_storage.py")


def _in_instance_storage(chain: list[BaseException]) -> bool:
    for link in chain:
        if type(link).__module__.startswith("dagster_postgres"):
            return True
        frames = traceback.extract_tb(link.__traceback__) if link.__traceback__ else []
        if any(part in frame.filename.replace(os.sep, "/") for frame in frames
               for part in _INSTANCE_STORAGE):
            return True
    return False


def _instance_storage_unavailable(exc: DBAPIError) -> str:
    cause = " ".join(str(exc.orig or exc).split())[:300]
    home = os.environ.get("DAGSTER_HOME")
    where = (f"{Path(home) / 'dagster.yaml'}" if home
             else "dagster.yaml in the instance directory")
    trouble = disk_trouble(Path(home)) if home and _is_sqlite_error(exc) else None
    if trouble is not None:
        return (f"Dagster's instance storage unavailable (run and event storage, {where}): "
                f"{cause}: the disk holding {home} is {trouble}: {next_step(trouble)}")
    return (f"Dagster's instance storage unavailable (run and event storage, {where}): "
            f"{cause}: check that its database is running and reachable, then run the "
            "command again")


def _is_sqlite_error(exc: DBAPIError) -> bool:
    return type(exc.orig).__module__.startswith("sqlite3")


def _opsdb_file(config_path: str | None) -> Path | None:
    """The OpsDB's SQLite file of the configuration in use, if it is one."""
    try:
        url = load_config(config_path).opsdb_url
    except Exception:  # noqa: BLE001 - only a better error line is at stake
        return None
    database = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    return Path(database) if database and database != ":memory:" else None


def _opsdb_unavailable(exc: DBAPIError, config_path: str | None = None) -> str:
    cause = " ".join(str(exc.orig or exc).split())[:300]
    lowered = cause.lower()
    file = _opsdb_file(config_path) if _is_sqlite_error(exc) else None
    trouble = disk_trouble(file) if file is not None else None
    if file is not None and trouble is not None:
        step = f"the disk holding {file} is {trouble}: {next_step(trouble)}"
    elif "unable to open" in lowered:
        step = ("cannot open the SQLite file: check that its directory exists and is "
                "writable (not a read-only mount), then run the command again")
    elif getattr(exc.orig, "pgcode", None) == "55P03":  # PostgreSQL lock_not_available
        step = (f"another session has held a lock OpsDB needs for over {lock_timeout_s():g} s "
                f"(${LOCK_TIMEOUT_ENV}; pg_locks and pg_stat_activity name it): run the "
                "command again when it has finished (or end it)")
    elif statement_canceled(exc):
        step = ("the database server cancelled the statement, reachable and answering: a "
                "statement_timeout set for ccat-dt's role or database (lift it: ALTER ROLE ... "
                "SET statement_timeout = 0), or an administrator's pg_cancel_backend; nothing "
                "was changed, run the command again")
    elif "locked" in lowered or "busy" in lowered:
        step = ("another process holds a write lock on it; run the command again when that "
                "process has finished (or stop it)")
    elif getattr(exc.orig, "pgcode", None) == "25006" or "read-only transaction" in lowered:
        # PostgreSQL read_only_sql_transaction: the server, not a file, takes no writes
        step = ("the database server accepts only reads (a standby after a failover, or "
                "default_transaction_read_only set): point opsdb_url ($CCAT_DT_OPSDB_URL) at "
                "the primary, then run the command again")
    elif "readonly" in lowered or "read-only" in lowered or "read only" in lowered:
        step = "it is read-only here; make it writable (file, directory and mount) or use a " \
               "host that can write to it"
    else:
        step = "check that the database is running and reachable (opsdb_url, " \
               "$CCAT_DT_OPSDB_URL), then run the command again"
    return f"OpsDB unavailable: {cause}: {step}"


def _quiet_broken_pipe() -> None:
    """The reader went away (`| head`): stop without a traceback, as the Python docs advise
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe): point stdout at devnull
    so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_PIPE)


if __name__ == "__main__":
    main()
