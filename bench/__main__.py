"""`make bench` / `python -m bench`: run every benchmark section and write docs/benchmarks.md.

Sizes come from environment variables (see bench.common.Settings and docs/benchmarks.md);
CCAT_BENCH_QUICK=1 is a 1-2 minute smoke run; `python -m bench service purge` runs only
the sections named (as CCAT_BENCH_SECTIONS=service,purge does). A failing section is
reported in the document and makes the exit status non-zero; the other sections still run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import SECTIONS, SectionResult, Settings, fmt_s, machine, versions

REPO = Path(__file__).resolve().parent.parent

TITLES = {
    "hash": "1. Hashing: hash_file vs xxhsum",
    "package": "2. Packaging: build_package vs GNU tar",
    "copy": "3. Local copy with verification: LocalTransport.copy_file vs cp + xxhsum",
    "remote": "4. Remote copy: RsyncTransport vs rsync -e ssh (loopback)",
    "bbcp": "4b. Remote copy with bbcp (a stand-in where bbcp is not installed): BbcpTransport "
            "vs bbcp + ssh xxhsum (loopback)",
    "lifecycle": "5. Orchestration overhead: the whole lifecycle through drive()",
    "opsdb": "6. OpsDB at scale: sensor queries and the deletion planner",
    "years": "7. Five-year simulation",
    "service": "8. Filing service: acknowledgements and drain",
    "purge": "9. Deletion-time re-check: the purge of archived packages",
    "status": "10. Fast commands: on the demo instance, and `ccat-dt status` with 10^7 copies in "
              "OpsDB (PostgreSQL)",
    "s3": "11. Archiving to S3: S3Transport vs boto3 upload_file + download-and-hash",
    "endtoend": "12. End to end: one large observation through drive() vs the disk's limit",
}


def _runners() -> dict[str, Callable[[Settings, SectionResult, Callable[[str], None]], None]]:
    from bench.endtoend import bench_endtoend
    from bench.files import bench_copy, bench_hash, bench_package
    from bench.lifecycle import bench_lifecycle
    from bench.opsdb import bench_opsdb, bench_years
    from bench.purge import bench_purge
    from bench.remote import bench_bbcp, bench_remote
    from bench.s3 import bench_s3
    from bench.service import bench_service
    from bench.status import bench_status

    return {"hash": bench_hash, "package": bench_package, "copy": bench_copy,
            "remote": bench_remote, "bbcp": bench_bbcp, "lifecycle": bench_lifecycle,
            "opsdb": bench_opsdb,
            "years": bench_years, "service": bench_service, "purge": bench_purge,
            "status": bench_status, "s3": bench_s3, "endtoend": bench_endtoend}


def _jsonable(value: Any) -> Any:
    from bench.common import Comparison, Stats

    if isinstance(value, Stats):
        return value.as_dict()
    if isinstance(value, Comparison):
        return value.as_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def main() -> int:
    warnings.filterwarnings("ignore")
    settings = Settings.from_env(REPO)
    if sys.argv[1:]:
        settings.sections = sys.argv[1:]
    unknown = [s for s in settings.sections if s not in SECTIONS]
    if unknown:
        print(f"bench: unknown section(s) {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    settings.work.mkdir(parents=True, exist_ok=True)
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                          if k.startswith("CCAT_BENCH_")), "make bench"])
    print(f"bench: {command}\nbench: scratch directory {settings.work}", flush=True)
    started = time.perf_counter()
    run: dict[str, Any] = {
        "command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings.describe(), "machine": machine(settings.work),
        "versions": versions(), "sections": []}
    runners = _runners()
    results: list[SectionResult] = []
    for name in settings.sections:
        result = SectionResult(name, TITLES[name], load_before=os.getloadavg())
        print(f"\n== {result.title}", flush=True)
        section_started = time.perf_counter()
        try:
            runners[name](settings, result, lambda line: print(line, flush=True))
        except Exception as exc:  # reported in the document; the next section still runs
            result.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        result.seconds = time.perf_counter() - section_started
        result.load_after = os.getloadavg()
        for comparison in result.comparisons:
            print(f"  {comparison.verdict:4s} {comparison.ratio:6.2f} (goal "
                  f"{comparison.goal}) {comparison.label}", flush=True)
        print(f"  section took {fmt_s(result.seconds)} s", flush=True)
        results.append(result)
    run["seconds"] = time.perf_counter() - started
    run["sections"] = [_jsonable(r.__dict__) for r in results]

    raw = settings.work.parent / "ccat-bench-results.json"
    raw.write_text(json.dumps(run, indent=1, default=str))
    from bench.report import render

    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(render(run, results, settings))
    print(f"\nbench: wrote {settings.output} (raw numbers: {raw}) in {fmt_s(run['seconds'])} s")
    if not settings.keep:
        shutil.rmtree(settings.work, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
