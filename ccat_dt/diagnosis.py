"""`ccat-dt why PACKAGE`: each stage of one package, and where it is not moving, the reason,
read from OpsDB (the Dagster layer adds what its runs say). A staging request's name (the
partition of its staging runs) is understood too."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.health import describe, unhealthy
from ccat_dt.loss import Health, assess
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    ExecutedObsUnit,
    LocationType,
    ObservationStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    Reattempt,
    Site,
    StagingRequest,
    StagingState,
    _aware,
    staging_reason,
)
from ccat_dt.recovery import needs_rebuild
from ccat_dt.retention import Action, plan_deletions, verified_lta_copies
from ccat_dt.routing import (
    copies_at,
    refused_reread,
    replication_source,
    unreadable_reads,
)
from ccat_dt.staged_files import Damage, look_at_staged
from ccat_dt.stages import Stage
from ccat_dt.transports.base import IN_THE_WAY, TOO_LARGE, refused_source


@dataclass(frozen=True)
class StageState:
    stage: str  # e.g. "site copy us"
    state: str  # done | waiting | failed | quarantined
    detail: str


def diagnose(session: Session, config: Config, name: str, now: datetime) -> list[StageState]:
    """Stages of the package in order; `name` may also be an observation still being filed."""
    package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
    if package is None:
        request = session.scalar(select(StagingRequest).where(StagingRequest.name == name))
        if request is not None:
            return _staging(session, request, now)
        return _unpackaged(session, name)
    stages = [StageState("filing", "done", f"{len(package.files)} files, observation "
                         f"{package.observation.name} finished")]
    stages += [StageState("excluded", "done", f"{f.relative_path} (file {f.id}) taken out by "
                          f"{f.excluded_by} at {_aware(f.excluded_at):%Y-%m-%d %H:%M} UTC: "
                          f"{f.excluded_reason}; left alone: never packaged or purged")
               for f in session.scalars(select(RawDataFile).where(
                   RawDataFile.excluded_from == package.name).order_by(RawDataFile.id))
               if f.excluded_at is not None]
    if package.primary_site_note:
        stages.append(StageState("routing", "rerouted", package.primary_site_note))
    stages += [StageState(f"location {loc.label}", "unhealthy", describe(loc)
                          + "; new work goes to the next location by priority")
               for loc in unhealthy(session, now)]
    unreadable = unreadable_reads(session, package)
    stages += [StageState(f"copy at {copy.location.label}", "unreadable", (
        f"{read.error} (operation {read.id}, "
        f"{_aware(read.finished_at or read.started_at):%Y-%m-%d %H:%M} UTC); not proved bad: "
        "kept as it is, not sent from while another verified copy can be, and hashed again "
        "before a deletion relies on it")) for copy in package.copies
        if copy.status == CopyStatus.PRESENT and (read := unreadable.get(copy.id)) is not None]
    stages += [StageState(f"copy at {copy.location.label}", "refused", (
        f"{read.error} (operation {read.id}, "
        f"{_aware(read.finished_at or read.started_at):%Y-%m-%d %H:%M} UTC); not judged: "
        "kept as it is, its disk not at fault, not relied on for a deletion until it is read "
        "intact; re-read by the scrub once readable"))
        for copy in package.copies if copy.id not in unreadable
        and (read := refused_reread(session, copy)) is not None]
    reattempts = {(r.stage, r.site): r for r in session.scalars(
        select(Reattempt).where(Reattempt.package == package.name))}
    stages.append(_packaging(session, config, package, reattempts.get((Stage.PACKAGING, ""))))
    for site in config.settings.archive_sites:
        stages += _at_site(session, config, package, site.short_name, reattempts)
    stages.append(_purge(session, config, package, now,
                         [r for (stage, _), r in reattempts.items() if stage == Stage.PURGE]))
    assessment = assess(session, config, package)
    if assessment.health != Health.SAFE:  # first, in words: nothing else matters as much
        stages.insert(0, StageState("integrity", assessment.health.value, assessment.reason))
    return stages


def _unpackaged(session: Session, name: str) -> list[StageState]:
    observation = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == name))
    if observation is None:
        raise LookupError(f"no package, observation or staging request named '{name}'")
    files = session.scalars(select(RawDataFile).where(
        RawDataFile.observation_id == observation.id)).all()
    if observation.status == ObservationStatus.OPEN:
        return [StageState("filing", "waiting", f"observation {name} is still open "
                           f"({len(files)} files filed); packaging starts when it is finished")]
    out = [StageState("filing", "done", f"{len(files)} files")]
    packages = sorted({f.package for f in files if f.package is not None}, key=lambda p: p.name)
    for package in packages:  # each its own stages: `why PACKAGE`
        out.append(StageState("package", "done" if package.state == PackageState.ARCHIVED
                              else package.state.value,
                              f"{package.name}: {package.state.value}; `ccat-dt why "
                              f"{package.name}` shows its stages"))
    if unplanned := [f for f in files if f.package is None]:
        out.append(StageState("packaging", "waiting", f"{len(unplanned)} of {len(files)} files "
                              "in no package yet: the package sensor has not planned them"))
    return out


def _staging(session: Session, request: StagingRequest, now: datetime) -> list[StageState]:
    """A staging request: what it asks for, and whether its files are there or why not (the
    re-attempt sensor's row for its partition says what happens next)."""
    state = request.state.value
    if request.state == StagingState.ACTIVE and not request.is_active(now):
        state = "expired"
    out = [StageState("request", state, f"{len(request.packages)} package(s) for "
                      f"{request.location.label}, requested by {request.requested_by or '-'} "
                      f"at {_aware(request.created_at):%Y-%m-%d %H:%M} UTC, expires "
                      f"{_aware(request.expires_at):%Y-%m-%d %H:%M} UTC")]
    reattempt = session.scalar(select(Reattempt).where(Reattempt.stage == Stage.STAGING,
                                                       Reattempt.partition == request.name))
    failure = _failed(last_staging(session, request), reattempt)
    if failure is None and reattempt is not None:
        failure = f"its run failed or died ({reattempt.last_error or 'no error'})"
    damage = look_at_staged(list(session.scalars(select(RawDataFileCopy).where(
        RawDataFileCopy.staging_request_id == request.id,
        RawDataFileCopy.status == CopyStatus.STAGED))), rehash=False) if state == "active" \
        else None
    if damage:
        out.append(StageState("staging", "failed", _damage(damage, request.name, failure)))
    elif request.staged_at is not None:
        staged = f"staged at {_aware(request.staged_at):%Y-%m-%d %H:%M} UTC"
        out.append(StageState("staging", "done", staged if state == "active" else
                              f"{staged}; no longer wanted: the purge cycle removes the files"))
    elif state != "active":
        out.append(StageState("staging", "done", f"nothing to stage: the request is {state}"))
    elif lost := [p.name for p in request.packages if not verified_lta_copies(session, p)]:
        # said before the last attempt's error, which names a copy found gone since
        out.append(StageState("staging", "failed", (
            f"no verified LTA copy of {', '.join(lost)} to stage from: every archive copy is "
            f"gone or quarantined (`ccat-dt why {lost[0]}` says whether one is repaired or "
            f"the package is lost){_reattempt(reattempt)}; `ccat-dt stage --release "
            f"{request.name}` if no longer wanted")))
    elif failure:
        out.append(StageState("staging", "failed", f"{failure}{_reattempt(reattempt)}; "
                              f"`ccat-dt stage --release {request.name}` if no longer wanted"))
    else:
        out.append(StageState("staging", "waiting", "due; waiting for its run"))
    return out


def _damage(damage: Damage, name: str, failure: str | None) -> str:
    """What is wrong with a request's staged files now, and what brings them back."""
    said = [f"{len(files)} staged file(s) {how} ({files[0].relative_path}"
            f"{', …' if len(files) > 1 else ''})"
            for files, how in ((damage.missing, "gone from the processing location"),
                               (damage.changed, "changed there since staging"))
            if files]
    remedy = (f"Materialize staged_copies {name} (or `ccat-dt retry --package {name}`) stages "
              "the missing files again from the archive")
    if damage.changed:
        remedy += "; changed files are kept for their owner: move them away first"
    return "; ".join(said) + (f"; last attempt: {failure}" if failure else "") + f"; {remedy}"


def last_staging(session: Session, request: StagingRequest) -> Operation | None:
    """The newest staging operation of the request: one that names it, or, made before
    operations named their request, one of its packages into its location since it was made."""
    return session.scalars(select(Operation).where(
        Operation.operation_type == OperationType.STAGING,
        Operation.destination_location_id == request.location_id,
        Operation.package_id.in_([p.id for p in request.packages]),
        Operation.started_at >= request.created_at,
        or_(Operation.reason == staging_reason(request.name), Operation.reason.is_(None)),
    ).order_by(Operation.id.desc()).limit(1)).first()


def _last(session: Session, package: RawDataPackage, kind: OperationType,
          destination_ids: list[int] | None = None) -> Operation | None:
    query = select(Operation).where(Operation.package_id == package.id,
                                    Operation.operation_type == kind)
    if destination_ids is not None:
        query = query.where(Operation.destination_location_id.in_(destination_ids))
    return session.scalars(query.order_by(Operation.id.desc()).limit(1)).first()


def _locations(session: Session, site: str, kind: LocationType) -> list[int]:
    return list(session.scalars(select(DataLocation.id).join(Site).where(
        Site.short_name == site, DataLocation.location_type == kind)))


def _reattempt(row: Reattempt | None) -> str:
    """What the re-attempt sensor will do about a failed stage."""
    if row is None:
        return ""
    if row.escalated_at is not None:
        return (f"; {row.attempts} attempts did not finish it since "
                f"{_aware(row.first_failed_at):%Y-%m-%d %H:%M} UTC: escalated at "
                f"{_aware(row.escalated_at):%Y-%m-%d %H:%M} UTC, no "
                "automatic attempt any more; fix the cause, then `ccat-dt retry`")
    stopped = (f"; {stopped_reason(row.stopped_runs, row.stopped_since)} (a person told at "
               f"{_aware(row.stopped_told_at):%Y-%m-%d %H:%M} UTC)"
               if row.stopped_told_at is not None else "")
    if row.next_attempt_at is None:
        return stopped
    return (f"{stopped}; next attempt at {_aware(row.next_attempt_at):%H:%M:%S} UTC "
            f"({_aware(row.next_attempt_at):%Y-%m-%d}, attempt {row.attempts + 1}, "
            "automatic)")


def _failed(operation: Operation | None, reattempt: Reattempt | None = None) -> str | None:
    """The last failed attempt: its number counts the stage's failed runs when the re-attempt
    sensor keeps count (so that it precedes the "next attempt" it announces), else the step's
    tries within its one run."""
    if operation is None or operation.status != OperationStatus.FAILED:
        return None
    error = (operation.error or "").strip().splitlines()
    hint = ""
    text = " ".join(error).lower()
    if refused_source(text):  # before the words of its path or its note are looked at
        hint = "source file not readable by ccat-dt's user; "
    elif "disk quota exceeded" in text:
        hint = "destination over its quota; "
    elif "no space" in text or "disk full" in text:
        hint = "destination disk full; "
    elif "read-only file system" in text:
        hint = "destination disk read-only; "
    elif TOO_LARGE.lower() in text:
        hint = "the destination takes no file this big (its file-size limit); "
    elif IN_THE_WAY in text:
        hint = ("a file is where the package's directory should be at the destination (move "
                "it away; the next attempt then copies the package); ")
    elif "checksum mismatch" in text:
        hint = "checksum mismatch; "
    elif "refused" in text or "timed out" in text or "unreachable" in text:
        hint = "link down; "
    log = f" (log {operation.log_path})" if operation.log_path else ""
    attempt = reattempt.attempts if reattempt and reattempt.attempts else (
        operation.retry_count + 1)
    return (f"{hint}attempt {attempt} failed at "
            f"{_aware(operation.finished_at or operation.started_at):%Y-%m-%d %H:%M}: "
            f"{error[-1] if error else 'no error text'}{log}")


def _packaging(session: Session, config: Config, package: RawDataPackage,
               reattempt: Reattempt | None) -> StageState:
    if package.state == PackageState.FAILED:
        return StageState("packaging", "failed", (_failed(_last(
            session, package, OperationType.PACKAGING)) or "failed") + "; permanent: not "
            "retried by itself (restore the file, then `ccat-dt retry --rebuild-failed`; or "
            "take it out: `ccat-dt exclude FILE --reason ...`)")
    if package.checksum is not None and (rebuild := needs_rebuild(session, config, package)):
        return StageState("packaging", "waiting", f"to be rebuilt: {rebuild}"
                          + _reattempt(reattempt))
    if package.checksum is None:
        failure = _failed(_last(session, package, OperationType.PACKAGING), reattempt)
        if reattempt is not None and not failure:
            failure = f"its packaging run failed or died ({reattempt.last_error or 'no error'})"
        return StageState("packaging", "failed" if failure else "waiting",
                          (failure or "planned; waiting for its packaging run")
                          + _reattempt(reattempt))
    return StageState("packaging", "done", f"{package.size} bytes, {package.checksum}")


def _at_site(session: Session, config: Config, package: RawDataPackage, site: str,
             reattempts: dict[tuple[str, str], Reattempt]) -> list[StageState]:
    out = []
    for kind, work in ((LocationType.BUFFER, Stage.SITE_COPY),
                      (LocationType.LONG_TERM_ARCHIVE, Stage.LTA_COPY)):
        label = work.label
        copies = copies_at(session, package, kind, site)
        stage = f"{label} {site}"
        corrupt = [c for c in copies if c.status == CopyStatus.CORRUPT]
        if any(c.is_verified for c in copies):
            out.append(StageState(stage, "done", "verified"))
        elif corrupt:
            # Its repair's last attempt, if one failed since the copy was made: why.
            operation = _last(session, package, OperationType.TRANSFER if
                              kind == LocationType.BUFFER else OperationType.ARCHIVE,
                              _locations(session, site, kind))
            made = session.scalar(select(Operation.id).where(
                Operation.copy_id == corrupt[-1].id,
                Operation.operation_type.in_([OperationType.TRANSFER, OperationType.ARCHIVE])))
            reattempt = reattempts.get((work, site))
            failure = (_failed(operation, reattempt) if operation is not None
                       and operation.id > (made or 0) else None)
            out.append(StageState(stage, "quarantined", f"copy {corrupt[-1].id} failed its "
                                  "integrity check; it is kept and blocks the purge"
                                  + (f"; its repair failed: {failure}{_reattempt(reattempt)}"
                                     if failure else "")))
        elif any(c.status == CopyStatus.DELETED for c in copies):
            out.append(StageState(stage, "done", "verified, then purged after archiving"))
        else:
            # This site's own attempts (not another site's), archive attempts too before
            # any copy row exists.
            operation = _last(session, package, OperationType.TRANSFER if
                              kind == LocationType.BUFFER else OperationType.ARCHIVE,
                              _locations(session, site, kind))
            reattempt = reattempts.get((work, site))
            failure = _failed(operation, reattempt)
            if failure is None and reattempt is not None:
                failure = f"its run failed or died ({reattempt.last_error or 'no error'})"
            if failure:
                out.append(StageState(stage, "failed", failure + _reattempt(reattempt)))
            elif package.checksum is None:
                out.append(StageState(stage, "waiting", "after packaging"))
            elif kind == LocationType.BUFFER and replication_source(
                    session, config, package, site) is None:
                out.append(StageState(stage, "waiting", "no verified source copy yet (an "
                                      "archive copy elsewhere is needed first)"))
            elif kind == LocationType.LONG_TERM_ARCHIVE and out[-1].state != "done":
                out.append(StageState(stage, "waiting", f"after the {Stage.SITE_COPY.label} "
                                      f"to {site} (archived from that buffer copy)"))
            else:
                out.append(StageState(stage, "waiting", "due; waiting for its run"))
    return out


def _purge(session: Session, config: Config, package: RawDataPackage, now: datetime,
           failing: list[Reattempt]) -> StageState:
    decisions = plan_deletions(session, config, package, now)
    left = [d for d in decisions if d.location_type != LocationType.LONG_TERM_ARCHIVE]
    if not left:
        return StageState("purge", "done", "nothing left outside the long-term archives")
    if failing:  # its last run failed: why, and when it is tried again
        row = failing[-1]
        return StageState("purge", "failed", f"its run failed ({row.last_error or 'no error'})"
                          + _reattempt(row))
    deletable = [d for d in left if d.action == Action.DELETE]
    if deletable:
        return StageState("purge", "waiting", f"{len(deletable)} copies may be deleted now; "
                          "waiting for the purge cycle")
    reasons = sorted({d.reason for d in left})
    return StageState("purge", "waiting", f"{len(left)} copies kept: " + "; ".join(reasons[:3]))


def stopped_reason(runs: int, since: datetime | None) -> str:
    """What a person is told of work stopped again and again (`Decision.stopped_told`)."""
    when = f" since {_aware(since):%Y-%m-%d %H:%M} UTC" if since is not None else ""
    return (f"canceled {runs} times{when}, each before it finished: a drive stopped by a "
            "timeout or a shutdown? give it longer")
