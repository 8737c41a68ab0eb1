"""The fixity scrub: re-read a batch of LTA copies (an hour's share of the daily byte budget,
chosen by pending.scrub_due) and show, while it runs, how many of the batch's bytes are hashed."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package, partition_problem
from ccat_dt.progress import Progress, labelled
from ccat_dt.replicas import Verification, newest_copy, verify

KIND = LocationType.LONG_TERM_ARCHIVE
LOG = logging.getLogger(__name__)


def scrub(opsdb: OpsDB, config: Config,
          batch: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str, Verification]]:
    """Re-read each (package, site) LTA copy in turn (`replicas.verify`: a mismatch marks it
    CORRUPT); yields each outcome as soon as it is known. A copy OpsDB records no more (gone
    since the batch was chosen: a repair replacing it) is passed over, judged neither way."""
    with opsdb.session() as session:
        sizes = {}
        for package, site in batch:
            copy = newest_copy(session, get_package(session, package), site, KIND)
            if copy is None:
                LOG.info("scrub: no LTA copy of %s at %s to re-read any more (OpsDB records "
                         "none present or corrupt): passed over", package, site)
            else:
                sizes[(package, site)] = copy.size
    batch = [item for item in batch if item in sizes]
    sites = sorted({site for _, site in batch})
    with labelled(site=",".join(sites)):
        progress = Progress("scrub", f"{len(batch)} LTA copies at {', '.join(sites)}",
                            sum(sizes.values()))
    for (package, site), size in sizes.items():
        result = verify(opsdb, config, package, site, KIND, reason="the fixity scrub")
        progress.update(progress.done_bytes + size)
        yield package, site, result
    progress.finish()


def batch_problems(opsdb: OpsDB, config: Config, keys: Sequence[str]) -> list[str]:
    """What is wrong with a batch of partition keys typed in by a person (the UI's Launchpad,
    `dagster job execute -c`), one line per bad entry: not PACKAGE|SITE, naming nothing OpsDB
    and the config hold, listed twice. [] when the batch can be scrubbed; a batch with any is
    refused whole, before anything is read or recorded. (A copy OpsDB records no more is not
    a typing error but a moment: scrub passes it over, as in a scheduled batch.)"""
    problems = []
    with opsdb.session() as session:
        for key, times in Counter(keys).items():
            problem = partition_problem(session, config, key, per_site=True)
            if problem is None and times > 1:
                problem = f"listed {times} times"
            if problem is not None:
                problems.append(f"{key!r}: {problem}")
    return problems
