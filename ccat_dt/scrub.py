"""The fixity scrub: re-read a batch of LTA copies (an hour's share of the daily byte budget,
chosen by pending.scrub_due) and show, while it runs, how many of the batch's bytes are hashed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package, partition_problem
from ccat_dt.progress import Progress, labelled
from ccat_dt.replicas import Verification, newest_copy, verify

KIND = LocationType.LONG_TERM_ARCHIVE


def scrub(opsdb: OpsDB, config: Config,
          batch: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str, Verification]]:
    """Re-read each (package, site) LTA copy in turn (`replicas.verify`: a mismatch marks it
    CORRUPT); yields each outcome as soon as it is known."""
    with opsdb.session() as session:
        sizes = []
        for package, site in batch:
            copy = newest_copy(session, get_package(session, package), site, KIND)
            sizes.append(copy.size if copy is not None else 0)
    sites = sorted({site for _, site in batch})
    with labelled(site=",".join(sites)):
        progress = Progress("scrub", f"{len(batch)} LTA copies at {', '.join(sites)}",
                            sum(sizes))
    for (package, site), size in zip(batch, sizes, strict=True):
        result = verify(opsdb, config, package, site, KIND, reason="the fixity scrub")
        progress.update(progress.done_bytes + size)
        yield package, site, result
    progress.finish()


def batch_problems(opsdb: OpsDB, config: Config, keys: Sequence[str]) -> list[str]:
    """What is wrong with a batch of partition keys typed in by a person (the UI's Launchpad,
    `dagster job execute -c`), one line per bad entry: not PACKAGE|SITE, naming nothing OpsDB
    and the config hold, no LTA copy there to re-read, listed twice. [] when the batch can be
    scrubbed; a batch with any is refused whole, before anything is read or recorded."""
    problems = []
    with opsdb.session() as session:
        for key, times in Counter(keys).items():
            problem = partition_problem(session, config, key, per_site=True)
            if problem is None:
                package, site = key.split("|")
                if newest_copy(session, get_package(session, package), site, KIND) is None:
                    problem = (f"no LTA copy of {package} at {site} to re-read (OpsDB "
                               "records none present or corrupt)")
                elif times > 1:
                    problem = f"listed {times} times"
            if problem is not None:
                problems.append(f"{key!r}: {problem}")
    return problems
