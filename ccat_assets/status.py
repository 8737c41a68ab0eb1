"""`ccat-dt status`: the table an operator reads first."""

from __future__ import annotations

from datetime import timedelta

from ccat_dt.config import Config
from ccat_dt.diagnosis import stopped_reason
from ccat_dt.forecast import forecast_buffers
from ccat_dt.health import describe, sites_down, unhealthy
from ccat_dt.loss import packages_in_danger
from ccat_dt.metrics import service_level_figures
from ccat_dt.notify import (
    failing_channels,
    fix_for,
    open_problems,
    undeliverable,
)
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import _aware, utcnow
from ccat_dt.reattempt import unsettled
from ccat_dt.report import Summary, printable, refused_deletions, summarize, throughput
from ccat_dt.stages import Stage
from ccat_dt.topology import topology_drift


def print_status(opsdb: OpsDB, config: Config | None = None) -> Summary:
    """Totals, then one row per location grouped by type (source, buffer, long-term archive,
    processing); "present" counts what is on disk there: raw files at a source, packages at
    buffers and archives, staged files at a processing location."""
    s = summarize(opsdb)
    if config is not None:
        with opsdb.session() as session:
            danger = packages_in_danger(session, config)
            drift = topology_drift(session, config)
        for name, assessment in danger:  # before anything else: a person must act
            print(f"{assessment.health.value.upper()}: {name}: {assessment.reason}")
        for problem in drift:  # nothing acts until this is settled
            print(f"STOPPED: {problem}")
    print(f"raw files: {s.files} ({s.file_bytes / 1e6:.1f} MB)   packages: "
          + (", ".join(f"{n} {state}" for state, n in sorted(s.packages.items())) or "none")
          + f" ({s.package_bytes / 1e6:.1f} MB)")
    print(f"{'location':<22}{'kind':<19}{'present':>8}{'MB':>10}{'deleted':>9}{'corrupt':>9}")
    # A location `migrate` let leave the configuration holds nothing and is looked after no
    # more: left out (one still holding copies is shown, and STOPPED says why).
    configured = (None if config is None else {f"{site.short_name}/{location.name}" for site
                                               in config.settings.sites
                                               for location in site.locations})
    for line in s.locations:
        if configured is not None and line.location not in configured and not (
                line.present or line.corrupt):
            continue
        print(f"{line.location:<22}{line.kind:<19}{line.present:>8}"
              f"{line.present_bytes / 1e6:>10.1f}{line.deleted:>9}{line.corrupt:>9}")
    print(f"deletions: {s.deletions} ({s.deleted_bytes / 1e6:.1f} MB); "
          f"failed operations: {s.failed_operations}"
          + (f"; deletions REFUSED: {s.refused_deletions}" if s.refused_deletions else ""))
    if s.refused_deletions:  # rare, and a person's to settle
        for where, path, package in refused_deletions(opsdb):
            print(f"deletion REFUSED at {where}: {printable(path)} is not the recorded copy "
                  f"(take it away or put the recorded bytes back, then `ccat-dt purge "
                  f"--package {package}`)")
        if s.refused_deletions > 5:
            print(f"... and {s.refused_deletions - 5} more")
    if config is None:
        return s
    now = utcnow()
    with opsdb.session() as session:
        level = service_level_figures(session, config.settings.required_lta_copies, now)
        forecasts = forecast_buffers(session, now,
                                     warn_below_hours=config.settings.metrics.warn_below_hours)
    oldest = (f"; oldest {level.oldest_unsafe_package}, "
              f"{level.oldest_unsafe_age_s / 3600:.1f} h old" if level.packages_unsafe else "")
    print(f"not yet in {config.settings.required_lta_copies} verified LTA copies: "
          f"{level.packages_unsafe} packages ({level.bytes_unsafe / 1e6:.1f} MB){oldest}")
    links = throughput(opsdb, now - timedelta(hours=1))
    print("last hour: " + ("; ".join(f"{t.link} {t.transfers} transfers "
                                      f"{t.bytes / 1e6:.1f} MB at {t.mb_per_s:.1f} MB/s"
                                      for t in links) or "no transfers"))
    kinds = {line.location: line.kind for line in s.locations}
    for forecast in forecasts:  # sources and buffers: each named by its own type
        if configured is not None and forecast.location not in configured:
            continue
        hours = ("not filling" if forecast.hours_until_full is None
                 else f"full in {until(forecast.hours_until_full)}")
        warn = "  WARNING: below threshold" if forecast.below_threshold else ""
        print(f"{kinds.get(forecast.location, 'buffer'):<7}{forecast.location:<20} "
              f"{hours}{warn}")
    with opsdb.session() as session:
        for location in unhealthy(session, now):
            print(f"location {describe(location)}: new work goes to the next by priority")
        for site, location in sites_down(session, config, now).items():
            print(f"archive site {site} DOWN past the failover horizon (failing since "
                  f"{_aware(location.failing_since or now):%Y-%m-%d %H:%M} UTC): packages not "
                  "yet sent go to another archive site")
        for row in unsettled(session, config):  # done work's, by whatever did it: none
            if row.escalated_at is not None:
                when = (f"ESCALATED at {_aware(row.escalated_at):%Y-%m-%d %H:%M} UTC (no "
                        "automatic attempt any more; `ccat-dt retry` after fixing the cause)")
            elif row.next_attempt_at is not None:
                when = f"next attempt at {_aware(row.next_attempt_at):%Y-%m-%d %H:%M:%S} UTC"
            else:
                when = "waiting"
            done = (f"{row.attempts} failed" if row.attempts  # none: its runs were canceled
                    else "canceled by an operator")
            if row.stopped_told_at is not None:  # again and again, by no person: told
                done = (f"{done}; {stopped_reason(row.stopped_runs, row.stopped_since)} "
                        f"(a person told at {_aware(row.stopped_told_at):%Y-%m-%d %H:%M} UTC; "
                        "still re-attempted automatically)")
            print(f"re-attempt {Stage(row.stage).label} {row.partition}: {done}; {when}")
        for refusal in undeliverable(session, config):  # nobody hears of the problems below
            print(f"notifications undeliverable: {refusal.reason} (over {refusal.channel} "
                  f"since {_aware(refusal.since):%Y-%m-%d %H:%M} UTC; "
                  + ("its messages wait" if refusal.held else "the other recipients get them")
                  + f": {fix_for(refusal.channel, refusal.reason)})")
        for down in failing_channels(session, config, now):  # its messages wait, tried again
            print(f"notifications failing: {down.error} (over {down.channel}: nothing delivered "
                  f"since {_aware(down.since):%Y-%m-%d %H:%M} UTC; tried again at every tick, "
                  "its messages go once it delivers: check its server)")
        for told in open_problems(session):
            state = "notified" if told.sent_at else f"not yet delivered ({told.last_error})"
            print(f"problem [{told.channel}] {told.subject}: {state}")
    return s


def until(hours: float) -> str:
    """A forecast as an operator reads it: hours while it is near, then days, then "over a
    year" (a rate measured over the last hours says nothing precise that far ahead)."""
    if hours < 48:
        return f"{hours:.1f} h"
    if hours < 24 * 365:
        return f"{hours / 24:.0f} days"
    return "over a year"
