"""Where a drive's time went, run by run, from the instance's records: per package, each run's
creation, its wait to start (queue: creation -> RUN_START), its set-up (-> first step), its
steps (each step's duration), its teardown (last step -> run end), and the gap between the
end of the package's previous run and this run's creation (the drive noticing the end, a
round of sensor ticks, the run's creation). Times in seconds from the first run's creation.

python -m bench.timeline ROOT   (ROOT: a lifecycle worker's --root, with dagster_home in it)
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import defaultdict

PACKAGE = re.compile(r"(obs-\d+_[a-z0-9-]+_p\d+)")


def timeline(root: str) -> list[str]:
    os.environ["DAGSTER_HOME"] = os.path.join(root, "dagster_home")
    from dagster import DagsterEventType, DagsterInstance

    lines: list[str] = []
    totals: dict[str, float] = defaultdict(float)
    with DagsterInstance.get() as instance:
        records = [r for r in instance.get_run_records() if r.start_time and r.end_time]
        if not records:
            return ["no finished run"]
        t0 = min(r.create_timestamp.timestamp() for r in records)
        by_package: dict[str, list] = defaultdict(list)  # type: ignore[type-arg]
        for record in records:
            key = record.dagster_run.tags.get("dagster/run_key", "")
            found = PACKAGE.search(key)
            by_package[found.group(1) if found else key].append(record)
        for package, runs in sorted(by_package.items()):
            lines.append(package)
            previous_end: float | None = None
            for record in sorted(runs, key=lambda r: r.create_timestamp):
                run = record.dagster_run
                created = record.create_timestamp.timestamp() - t0
                started = float(record.start_time or 0) - t0
                ended = float(record.end_time or 0) - t0
                steps: dict[str, list[float]] = {}
                for event in instance.all_logs(run.run_id):
                    kind, step = event.dagster_event_type, event.step_key
                    if not step:
                        continue
                    if kind == DagsterEventType.STEP_START:
                        steps[step] = [event.timestamp - t0, event.timestamp - t0]
                    elif kind in (DagsterEventType.STEP_SUCCESS,
                                  DagsterEventType.STEP_FAILURE) and step in steps:
                        steps[step][1] = event.timestamp - t0
                first = min((s[0] for s in steps.values()), default=started)
                last = max((s[1] for s in steps.values()), default=ended)
                gap = created - previous_end if previous_end is not None else 0.0
                parts = {"gap": gap, "queue": started - created, "setup": first - started,
                         "steps": last - first, "teardown": ended - last}
                for name, value in parts.items():
                    totals[name] += value
                lines.append(
                    f"  {run.job_name[:22]:22s} created {created:7.2f} end {ended:7.2f} "
                    + " ".join(f"{name} {value:5.2f}" for name, value in parts.items())
                    + " | " + " ".join(f"{step}={end - begin:.2f}"
                                       for step, (begin, end) in steps.items()))
                previous_end = ended
        last_end = max(float(r.end_time or 0) for r in records) - t0
    lines.append(f"{len(records)} runs, the last ended at {last_end:.2f} s; summed over the "
                 "runs: " + ", ".join(f"{k} {v:.2f} s" for k, v in totals.items()))
    return lines


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    print("\n".join(timeline(sys.argv[1])))
