"""One sensor per stage. Cursors are monotonic OpsDB ids; run keys are deterministic
(`stage:package:site`), so a replayed tick launches nothing twice."""


import hashlib
from collections import Counter
from datetime import timedelta

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ccat_assets.execution import on_queue
from ccat_assets.inflight import in_flight, not_in_flight, packages_in_flight
from ccat_assets.partitions import (
    package_partitions,
    package_site_key,
    revived,
    staging_partitions,
)
from ccat_assets.runlog import run_failure
from ccat_assets.stages import JOBS, copy_job, site_copy
from ccat_assets.tags import AGAIN_TAG, LINK_TAG, WORK_TAG
from ccat_dt.failover import fail_over
from ccat_dt.failover import unsent as failover_unsent
from ccat_dt.opsdb.models import _aware, utcnow
from ccat_dt.packages import plan_new_packages
from ccat_dt.pending import (
    Due,
    lta_copies_due,
    new_packages,
    new_staging_requests,
    newest_package_id,
    repairs_due,
    seeds_due,
    site_copies_due,
    staged_files_gone,
)
from ccat_dt.purge_cycle import newest_package_copies, plan_cycle
from ccat_dt.queues import (
    archive_queue,
    deletion_queue,
    packaging_queue,
    staging_queue,
    transfer_queue,
)
from ccat_dt.reattempt import (
    Backoff,
    Decision,
    RunOutcome,
    State,
    Work,
    decide,
    idle_error,
    record,
)
from ccat_dt.recovery import rebuilds_due
from ccat_dt.retry import abandoned_deletions
from ccat_dt.stages import Stage
from ccat_dt.staging import get_request
from resources.deployment import Deployment
from sensors.cursor import read_cursor
from sensors.reattempt import history, next_at_cursor, reattempt_sensor
from sensors.stopped import held

INTERVAL = 15
RUNNING = DefaultSensorStatus.RUNNING


@sensor(job=JOBS[Stage.PACKAGING], minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def package_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """Finished observations become packages: a partition and a packaging run each."""
    stopped = held(context, "package_sensor")
    planned = plan_new_packages(deployment.opsdb, deployment.config, dry_run=stopped)
    if planned:
        context.log.info(f"would plan {len(planned)} package(s); nothing planned: the sensor "
                         "is stopped" if stopped else f"planned {len(planned)} package(s)")
    with deployment.opsdb.session() as session:
        page = new_packages(session, read_cursor(context, int, 0), _page(deployment))
    names = [due.package for due in page.items]
    queue = packaging_queue(deployment.config)
    return SensorResult(
        run_requests=_idle(context, [RunRequest(partition_key=due.package,
                                                run_key=due.run_key("package"),
                                                run_config=on_queue(deployment.config, queue))
                                     for due in page.items], Stage.PACKAGING),
        dynamic_partitions_requests=[package_partitions.build_add_request(names)] if names else [],
        cursor=str(page.cursor))


COPY_JOBS = [JOBS[Stage.SITE_COPY], site_copy.with_archive]


@sensor(jobs=COPY_JOBS, minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def site_copy_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """A verified copy somewhere makes the next site copy possible (observatory -> primary
    archive once, then archive -> archive); in the embedded default its run archives it into
    that site's LTA too (stages.copy_job)."""
    with deployment.opsdb.session() as session:
        page = site_copies_due(session, deployment.config, read_cursor(context, int, 0),
                               _page(deployment))
    return _placed(context, [_placement(deployment, due, Stage.SITE_COPY) for due in page.items],
                   Stage.SITE_COPY, cursor=str(page.cursor))


@sensor(jobs=COPY_JOBS, minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def new_site_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """An archive site added to a running deployment receives every package archived before
    it was there, from the nearest verified LTA copy: once, a page of packages per tick, up to
    the newest package when the site first appeared here (later ones reach it as every
    package does). A site with a page's worth of copies queued or running gets no more until
    they are done: years of packages never wait in the run queue at once."""
    config, requests = deployment.config, []
    sweeps = read_cursor(context, _sweeps, dict[str, tuple[int, int]](),
                         "sweeps every archive site again (what a site has is not sent again)")
    sites = [site.short_name for site in config.settings.archive_sites]
    with deployment.opsdb.session() as session:
        newest = newest_package_id(session)
        for site in sites:  # a sweep ahead of OpsDB (set by hand, OpsDB restored): again
            if sweeps.setdefault(site, (0, newest))[0] > newest:
                sweeps[site] = (0, newest)
        sweeping = [site for site in sites if sweeps[site][0] < sweeps[site][1]]
        queued = Counter(site for stage, _, site in in_flight(context.instance)
                         if stage == Stage.SITE_COPY) if sweeping else Counter[str | None]()
        for site in sweeping:
            if queued[site] >= _page(deployment):
                continue
            done, until = sweeps[site]
            page = seeds_due(session, config, site, done, until, _page(deployment))
            sweeps[site] = (page.cursor if page.cursor > done else until, until)
            requests += [_placement(deployment, due, Stage.SITE_COPY, why="seed")
                         for due in page.items]
    # "site=done/until ...": a position, not JSON, so `drive` ticks again while it moves
    # (driver._is_position)
    return _placed(context, requests, Stage.SITE_COPY, cursor=" ".join(
        f"{site}={done}/{until}" for site, (done, until) in sorted(sweeps.items())))


def _sweeps(cursor: str) -> dict[str, tuple[int, int]]:
    """new_site_sensor's cursor: "site=done/until ..." read."""
    sweeps = {}
    for item in cursor.split():
        site, span = item.split("=", 1)
        done, until = map(int, span.split("/"))
        sweeps[site] = (done, until)
    return sweeps


@sensor(job=JOBS[Stage.LTA_COPY], minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def lta_copy_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """A verified copy in an archive site's buffer is archived into that site's LTA: under
    Celery every copy's; in the embedded default (where the copy's run archived it) one whose
    archiving failed or that a repair made."""
    with deployment.opsdb.session() as session:
        page = lta_copies_due(session, deployment.config, read_cursor(context, int, 0),
                              _page(deployment))
    return _placed(context, [_placement(deployment, due, Stage.LTA_COPY) for due in page.items],
                   Stage.LTA_COPY, cursor=str(page.cursor))


@sensor(job=JOBS[Stage.PURGE], minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def purge_sensor(context: SensorEvaluationContext,
                 deployment: Deployment) -> SensorResult | SkipReason:
    """One purge cycle: the planner picks what may go now (within the byte budget, early where
    a disk is under pressure); each package with deletions gets one run, told exactly which
    copies (under Celery one per site with deletions, on that site's worker: the executor sends
    a run's steps to one queue). The run key names those copies and the package's newest copy:
    a replayed tick launches nothing twice, a repair makes a kept purge due again. A failed
    purge run (a locked OpsDB, say) is requested again after a back-off, and deletions a dead
    process left half done are finished once they count as abandoned."""
    config, now = deployment.config, utcnow()
    with deployment.opsdb.session() as session:
        plan = plan_cycle(session, config, now)
    busy = packages_in_flight(context.instance)  # a copy reading a buffer, an earlier purge
    runs = {key: value for key, value in
            plan.runs(per_site=config.celery_broker is not None).items() if key[0] not in busy}
    with deployment.opsdb.session() as session:
        newest = newest_package_copies(session, {package for package, _ in runs})
    backoff = Backoff.of(config)
    quiet = timedelta(seconds=config.settings.policies.unattended_after_s)
    requests, decisions, planned, works = [], [], set(), []
    for (package, site), (copy_ids, early_ids, locations) in runs.items():
        planned.add(package)
        # A new copy of the package (a repaired LTA copy, say) is a new reason to try: the
        # same copies kept by an earlier purge for a bad LTA copy may go now.
        basis = [*sorted(copy_ids), newest.get(package, 0)]
        digest = hashlib.sha1(",".join(map(str, basis)).encode()).hexdigest()[:12]
        work = f"purge:{package}:{site or '*'}:{digest}"  # "*": every site, one run
        attempts = history(context.instance, Stage.PURGE, package, site, tags={WORK_TAG: work})
        decision = decide(attempts, backoff, now)
        works.append(Work(Stage.PURGE, f"{package}|{site}" if site else package, package, site,
                          decision, idle_error(decision, "the same copies planned for "
                                               "deletion again") if decision.idle else
                          _failure(context.instance, attempts, decision) or
                          "its purge run failed or died (`ccat-dt why` shows the deletions)"))
        if decision.state in (State.IN_FLIGHT, State.WAITING, State.ESCALATED):
            decisions.append(decision)
            continue
        key = work if decision.state == State.NONE else f"{work}:{decision.runs + 1}"
        if decision.state == State.NONE and attempts:
            # A run of this very work succeeded, yet the same copies are planned again: OpsDB
            # went back (restored from a backup) or a deletion went unrecorded. The purge
            # looks at the storage again, once the work has been quiet a while.
            again = _aware(attempts[-1].ended_at or now) + quiet
            if again > now:
                decisions.append(Decision(State.WAITING, next_at=again))
                continue
            key = f"{work}:again:{len(attempts)}"
        cycle = {"ops": {"purge_status": {"config": {"copy_ids": copy_ids,
                                                     "early_ids": early_ids}}}}
        asked_again = {AGAIN_TAG: "1"} if key.startswith(f"{work}:again:") else {}
        requests.append(RunRequest(
            partition_key=package, run_key=key, tags={WORK_TAG: work, **asked_again},
            run_config=on_queue(config, deletion_queue(config, site, locations[0]), cycle)
            if site else cycle))
    for abandoned in abandoned_deletions(deployment.opsdb, now):
        if abandoned.package in planned or abandoned.package in busy:
            continue  # the planned purge (or the one running) finishes it first
        planned.add(abandoned.package)
        # Its process died, or its rm failed (the link cut it): again after a back-off while
        # the storage cannot be looked at, a person told if that lasts.
        work = f"purge-unfinished:{abandoned.package}:{abandoned.copy_id}"
        attempts = history(context.instance, Stage.PURGE, abandoned.package, "",
                           tags={WORK_TAG: work})
        decision = decide(attempts, backoff, now)
        works.append(Work(Stage.PURGE, abandoned.package, abandoned.package, "", decision,
                          _failure(context.instance, attempts, decision) or
                          f"its deletion of {abandoned.path} did not finish "
                          "(`ccat-dt why` shows the operation)"))
        if decision.state in (State.IN_FLIGHT, State.WAITING, State.ESCALATED):
            decisions.append(decision)
            continue
        requests.append(RunRequest(
            partition_key=abandoned.package, tags={WORK_TAG: work},
            run_key=work if decision.state == State.NONE else f"{work}:{decision.runs + 1}",
            run_config=on_queue(config, deletion_queue(config, abandoned.site,
                                                       abandoned.location), {
                "ops": {"purge_status": {"config": {"copy_ids": [], "early_ids": []}}}})))
    # failing purges, for status and notices (not by a stopped sensor's test)
    with deployment.opsdb.session(undo=held(context, "purge_sensor")) as session:
        record(session, works, now, keep=[(w.stage, w.partition) for w in works
                                          if w.decision.state == State.IN_FLIGHT],
               stages=[Stage.PURGE])
    if not requests and not decisions:
        return SkipReason("nothing may be deleted now")
    return SensorResult(run_requests=requests, cursor=next_at_cursor(decisions),
                        dynamic_partitions_requests=revived(context.instance, requests))


def _failure(instance: DagsterInstance, attempts: list[RunOutcome], decision: Decision) -> str:
    """Why the newest failed run of failing work failed, or that it was canceled (for `why`
    and the notices)."""
    failed = [run for run in attempts if run.failed or run.canceled]
    return run_failure(instance, failed[-1].run_id) if failed and decision.runs else ""


@sensor(job=JOBS[Stage.STAGING], minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def staging_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """New staging requests become partitions of staged_copies and a staging run each; an
    active request whose staged files were removed from the disk is staged again."""
    config, requests = deployment.config, []
    # The cursor: the last request seen, then the last staged file looked at.
    new_after, looked_after = read_cursor(context, _staging_cursor, (0, 0))
    with deployment.opsdb.session() as session:
        page = new_staging_requests(session, new_after, _page(deployment))
        busy = {package for stage, package, _ in in_flight(context.instance)
                if stage == Stage.STAGING}
        gone, looked = staged_files_gone(session, utcnow(), looked_after,
                                         10 * _page(deployment))
        gone = [due for due in gone if due.package not in busy]
        for due, key in [*((d, f"stage:{d.package}") for d in page.items),
                         *((d, d.run_key("restage")) for d in gone)]:
            location = get_request(session, due.package).location
            queue = staging_queue(config, location.site.short_name, location.name)
            requests.append(RunRequest(partition_key=due.package, run_key=key,
                                       run_config=on_queue(config, queue)))
    names = [due.package for due in page.items]
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[staging_partitions.build_add_request(names)] if names else [],
        cursor=f"{page.cursor}:{looked}")


def _staging_cursor(cursor: str) -> tuple[int, int]:
    """staging_sensor's cursor: "last request seen:last staged file looked at" read."""
    new_after, _, looked_after = cursor.partition(":")
    return int(new_after), int(looked_after or 0)


@sensor(jobs=[JOBS[Stage.PACKAGING], JOBS[Stage.SITE_COPY], JOBS[Stage.LTA_COPY]],
        minimum_interval_seconds=INTERVAL,
        default_status=RUNNING)
def repair_sensor(context: SensorEvaluationContext,
                  deployment: Deployment) -> SensorResult | SkipReason:
    """A copy found corrupt (by a check, the scrub or the audit) is made again from a verified
    LTA copy elsewhere; the corrupt one is replaced, never used as a source. A package whose
    observatory tar is corrupt (or that lost a file to `ccat-dt exclude`) and that has not left
    is rebuilt from its raw files (ccat_dt/recovery.py)."""
    config = deployment.config
    with deployment.opsdb.session() as session:
        due = repairs_due(session, config, _page(deployment))
        rebuilds = rebuilds_due(session, config, _page(deployment))
    if not due and not rebuilds:
        return SkipReason("no corrupt copy can be repaired now")
    for rebuild in rebuilds:
        context.log.info(f"rebuild {rebuild.package}: {rebuild.reason}")
    return _placed(context, [
        *(_placement(deployment, item, stage, why="repair") for stage, item in due),
        *(RunRequest(partition_key=r.package, run_key=r.run_key,
                     job_name=JOBS[Stage.PACKAGING].name,
                     run_config=on_queue(config, packaging_queue(config))) for r in rebuilds)])


@sensor(jobs=COPY_JOBS, minimum_interval_seconds=INTERVAL, default_status=RUNNING)
def failover_sensor(context: SensorEvaluationContext,
                    deployment: Deployment) -> SensorResult | SkipReason:
    """Packages not yet sent whose primary archive site is down past the failover horizon go
    to another archive site (ccat_dt/failover.py): re-routed, and sent now when built. The
    sends are asked for from OpsDB (every re-routed package built and not yet sent), not
    from the re-routes this tick made: a tick whose runs were not launched (the UI's "Test
    sensor") leaves the re-route made and the send still asked for by the next tick; the
    run key and the runs in flight keep it from being launched twice."""
    stopped = held(context, "failover_sensor")
    rerouted = fail_over(deployment.opsdb, deployment.config, utcnow(), dry_run=stopped)
    for item in rerouted:
        context.log.warning(f"{item.package}: primary site {item.old_site} down past the "
                            f"failover horizon; " + (
                                f"would be re-routed to {item.new_site} (not now: the sensor "
                                "is stopped)" if stopped else f"re-routed to {item.new_site}"))
    with deployment.opsdb.session() as session:
        due = failover_unsent(session, deployment.config)
    if not due:
        return SkipReason("no re-routed package is waiting to be sent")
    observatory = deployment.config.settings.observatory
    return _placed(context, [
        _placement(deployment, Due(r.package, r.new_site, r.copy_id or 0, observatory),
                   Stage.SITE_COPY, why="failover")
        for r in due], Stage.SITE_COPY)


def _idle(context: SensorEvaluationContext, requests: list[RunRequest],
          stage: Stage | None = None) -> list[RunRequest]:
    """Leave out partitions that already have a run in flight for the same stage (a
    backfill's, the UI's, another sensor's this round): that run does the work; if it fails,
    the re-attempt sensor requests it again. Every lifecycle sensor's requests pass here."""
    return not_in_flight(context.instance, requests, stage)


def _placed(context: SensorEvaluationContext, requests: list[RunRequest],
            stage: Stage | None = None, cursor: str | None = None) -> SensorResult:
    """The requests not in flight (_idle), with the partitions of the packages among them that
    were retired: a repair or a new site's copy of a package archived long ago."""
    requests = _idle(context, requests, stage)
    return SensorResult(run_requests=requests, cursor=cursor,
                        dynamic_partitions_requests=revived(context.instance, requests))


def _placement(deployment: Deployment, due: Due, stage: Stage, why: str = "") -> RunRequest:
    """A run for one package x site partition, tagged with the link it loads and sent to the
    destination site's queue; `why` names a run that is not the stage's first (its run key).
    A first site copy (or a failover's) archives in the same run where the executor allows
    (stages.copy_job); a repair only replaces the bad copy."""
    config = deployment.config
    tags = {LINK_TAG: f"{due.origin}->{due.site}"} if due.origin else {}
    queue = (archive_queue if stage == Stage.LTA_COPY else transfer_queue)(config, due.site)
    job = (copy_job(config) if stage == Stage.SITE_COPY and why != "repair" else JOBS[stage])
    # A corrupt LTA copy whose site's buffer copy was purged is repaired in two runs for one
    # trigger (the corrupt copy): the buffer refilled, then archived again. The second needs
    # a key of its own, or Dagster skips it as the first's ("already completed"): before, the
    # LTA copy stayed missing, no run asking for it, whenever lta_copy_sensor had passed the
    # refilled copy over (a run of the partition in flight at its tick, the sensor stopped).
    suffix = ":archive" if why == "repair" and stage == Stage.LTA_COPY else ""
    return RunRequest(partition_key=package_site_key(due.package, due.site),
                      run_key=due.run_key(why or stage) + suffix, job_name=job.name, tags=tags,
                      run_config=on_queue(config, queue))


def _page(deployment: Deployment) -> int:
    return deployment.config.settings.policies.sensor_page_rows


def lifecycle_sensors() -> list[SensorDefinition]:
    return [package_sensor, site_copy_sensor, new_site_sensor, lta_copy_sensor, purge_sensor,
            staging_sensor, repair_sensor, failover_sensor, reattempt_sensor]
