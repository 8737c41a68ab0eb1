"""Section 5's floor: what one Dagster run costs on this machine when its step does nothing.

One partitioned asset whose step returns at once, with one blocking check, is materialised
`--runs` times in-process on the embedded default's instance settings (dagster.yaml and the
SQLite storage `ccat-dt init` adds, in a fresh DAGSTER_HOME, no compute-log capture), by as
many processes at once as the machine has cores, all on one instance as the drive's parallel
runs are. The wall time per run is the
least orchestration a stage run can cost here, whatever the step does.

    python -m bench.empty_runs --home DIR --runs N --out FILE   (one worker)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from dagster import (
    AssetCheckResult,
    DagsterInstance,
    Definitions,
    DynamicPartitionsDefinition,
    MaterializeResult,
    asset,
    asset_check,
    define_asset_job,
)

from ccat_assets.instance import embedded_storage

REPO = Path(__file__).resolve().parent.parent


def floor_per_run_s(work: Path, runs: int) -> dict[str, float]:
    """Wall seconds per empty run with one worker per core on one instance."""
    home = work / "empty-runs-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())  # as `ccat-dt init` writes
    (home / "dagster.yaml").write_text(yaml.safe_dump({**settings, **embedded_storage(home)}))
    with DagsterInstance.from_config(str(home)) as instance:  # its databases made once, here
        instance.get_runs(limit=1)
    workers = os.cpu_count() or 1
    logs = [work / f"empty-runs-{n}.log" for n in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.empty_runs", "--home", str(home),
                               "--runs", str(runs), "--worker", str(n),
                               "--out", str(work / f"empty-runs-{n}.json")],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
             for n, log in enumerate(logs)]
    failed = [str(log) for proc, log in zip(procs, logs, strict=True) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"an empty-run worker failed: see {', '.join(failed)}")
    timed = [json.loads((work / f"empty-runs-{n}.json").read_text()) for n in range(workers)]
    shutil.rmtree(home, ignore_errors=True)
    # from the first worker's first timed run to the last one's end (imports not counted)
    wall = max(t["ended"] for t in timed) - min(t["started"] for t in timed)
    return {"per_run_s": wall / (runs * workers), "workers": workers, "runs": runs * workers,
            "per_run_in_one_worker_s": sorted(t["per_run_s"] for t in timed)[workers // 2]}


def _work(home: Path, runs: int, worker: int) -> dict[str, float]:
    os.environ["DAGSTER_HOME"] = str(home)
    partitions = DynamicPartitionsDefinition(name=f"empty{worker}")

    @asset(name=f"empty{worker}", partitions_def=partitions)
    def empty() -> MaterializeResult:
        return MaterializeResult()

    @asset_check(asset=empty, partitions_def=partitions, blocking=True)
    def nothing_to_check() -> AssetCheckResult:
        return AssetCheckResult(passed=True)

    job = Definitions(assets=[empty], asset_checks=[nothing_to_check], jobs=[
        define_asset_job("empty_job", [empty])]).resolve_job_def("empty_job")
    instance = DagsterInstance.get()
    keys = [f"p{n}" for n in range(runs + 1)]
    instance.add_dynamic_partitions(partitions.name or "", keys)
    job.execute_in_process(instance=instance, partition_key=keys[0])  # imports, first files
    started = time.time()
    for key in keys[1:]:
        if not job.execute_in_process(instance=instance, partition_key=key).success:
            raise SystemExit(f"empty run {key} failed")
    ended = time.time()
    return {"started": started, "ended": ended, "per_run_s": (ended - started) / runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(_work(args.home, args.runs, args.worker)))


if __name__ == "__main__":
    main()
