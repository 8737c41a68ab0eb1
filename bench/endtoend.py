"""Section 12: one large observation through the whole lifecycle (`drive()` on the embedded
default), against the limit of this machine's disk: the durable write rate measured in the
same run, divided by the bytes the lifecycle must write per raw byte (the tar, each archive's
buffer copy and LTA copy: five with two archives). Both are measured alternately, so that the
same background load hits both.

ratio = the disk's time for the lifecycle's writes ÷ the drive's time = the fraction of the
disk's limit the lifecycle reaches (goal ≥ 0.8).

The lifecycle also deletes (the raw files, the observatory's tar, the buffer copies), and on a
file system that discards freed blocks at once (ext4 `-o discard` on a virtual disk) freeing a
durably written GiB costs the disk time too. That time is measured on the same file, its unlink
timed, and a second, informational row compares the drive with the disk's time for its writes
and its deletions."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bench.common import MIB, Comparison, SectionResult, Settings, Stats, fmt_s, interleaved
from bench.lifecycle import _worker

CHUNK = 8 * MIB
SLICE = 64 * MIB


_WRITE, _WAIT = 2, 1 | 4  # sync_file_range: start write-back; wait before and after


def durable_write_s(path: Path, size: int) -> tuple[float, float]:
    """Seconds to write `size` random bytes to `path` durably, and then to delete it (the
    unlink and the directory's fsync, which frees the blocks): the disk's rate
    for one stream of large writes, written as a streaming tool writes (dd oflag=direct):
    each 64 MiB slice's write-back started as it is written, the slice before it waited for
    and let go of, then fsync. Writing through the page cache and keeping the pages ran at a
    fifth of that rate and less on these virtual machines (whose memory the host backs on
    first touch), which would understate the limit (docs/benchmarks.md, section 12)."""
    import ctypes
    import time

    sync_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    sync_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    block = os.urandom(CHUNK)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        offset = 0
        while offset < size:
            for _ in range(max(1, min(SLICE, size - offset) // CHUNK)):
                os.write(fd, block)
            sync_range(fd, offset, SLICE, _WRITE)
            if offset:
                sync_range(fd, offset - SLICE, SLICE, _WAIT | _WRITE)
                os.posix_fadvise(fd, offset - SLICE, SLICE, os.POSIX_FADV_DONTNEED)
            offset += SLICE
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    path.unlink()
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return seconds, time.perf_counter() - started


def bench_endtoend(settings: Settings, result: SectionResult,
                   log: Callable[[str], None]) -> None:
    modules, files = settings.e2e_modules, settings.e2e_files
    file_mib = max(1, settings.e2e_mib // (modules * files))
    raw = modules * files * file_mib * MIB
    runs: list[dict[str, object]] = []
    writes: list[float] = []
    frees: list[float] = []

    def lifecycle() -> dict[str, float]:
        data = _worker(settings, "endtoend", 1, log, "--modules", str(modules), "--no-data-work")
        shutil.rmtree(settings.work / "endtoend", ignore_errors=True)
        runs.append({k: v for k, v in data.items() if k != "runs"}
                    | {"max_parallel": _max_parallel(data["runs"])})
        writes.append(data["written_bytes"] / data["raw_bytes"])
        frees.append(data["deleted_bytes"] / data["raw_bytes"])
        return {"drive": float(data["drive_s"])}

    def disk() -> dict[str, float]:
        write_s, free_s = durable_write_s(settings.work / "disk-rate.bin", raw)
        return {"disk": write_s, "free": free_s}

    saved = (settings.files_per_lifecycle_package, settings.lifecycle_file_kib)
    settings.files_per_lifecycle_package, settings.lifecycle_file_kib = files, file_mib * 1024
    try:
        stats = interleaved({"lifecycle": lifecycle, "disk": disk}, settings.e2e_rounds,
                            warmup=0, log=log)
    finally:
        settings.files_per_lifecycle_package, settings.lifecycle_file_kib = saved
    per_raw = sorted(writes)[len(writes) // 2]
    freed_per_raw = sorted(frees)[len(frees) // 2]
    rate = Stats([raw / s / 1e6 for s in stats["disk"].values])
    # the disk's time for all the lifecycle's writes; and for its writes and deletions
    durable = Stats([s * per_raw for s in stats["disk"].values])
    with_frees = Stats([w * per_raw + f * freed_per_raw
                        for w, f in zip(stats["disk"].values, stats["free"].values, strict=True)])
    ours = Stats([raw / s / 1e6 for s in stats["drive"].values])
    result.facts.update({
        "size": (f"one observation of {raw / 2**30:.3g} GiB: {modules} instrument modules x "
                 f"{files} files of {file_mib} MiB (one package per module), embedded default "
                 "(SQLite OpsDB and Dagster instance, local transport, every site on this "
                 "machine's one disk)"),
        "writes_per_raw_byte": per_raw, "deletions_per_raw_byte": freed_per_raw,
        "free_s": stats["free"].as_dict(),
        "limit_with_deletions_raw_mb_s": raw / with_frees.median / 1e6,
        "durable_write_mb_s": rate.as_dict(), "raw_mb_s": ours.as_dict(),
        "limit_raw_mb_s": rate.median / per_raw, "runs": runs, "cores": os.cpu_count() or 1,
    })
    result.comparisons.append(Comparison(
        "endtoend", f"{raw / 2**30:.3g} GiB observation through drive(): fraction of the "
        "disk's limit (durable write time of the lifecycle's bytes / drive time)",
        stats["drive"], durable, 0.8, "drive", "durable writes"))
    result.comparisons.append(Comparison(
        "endtoend", f"{raw / 2**30:.3g} GiB observation through drive(): fraction of the "
        "disk's time for its writes and its deletions (informational)",
        stats["drive"], with_frees, None, "drive", "durable writes + deletions"))
    log(f"  raw {ours.median:.0f} MB/s; disk {rate.median:.0f} MB/s durable / {per_raw:.2f} "
        f"writes per raw byte = limit {rate.median / per_raw:.0f} MB/s of raw data")


def _max_parallel(runs: list[dict[str, float | None]]) -> int:
    """Most runs in flight at one moment (from their start and end times)."""
    edges = sorted([(r["start"], 1) for r in runs if r["start"] and r["end"]]
                   + [(r["end"], -1) for r in runs if r["start"] and r["end"]],
                   key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def render(r: SectionResult) -> list[str]:
    f = r.facts
    if not r.comparisons:
        return []
    c = r.comparisons[0]
    rate = Stats(f["durable_write_mb_s"]["values"])
    lines = [f"- size: {f['size']}",
             f"- the disk's durable write rate (one stream of 8 MiB writes, each 64 MiB slice "
             f"written back and let go of as the next is written, then fsync), measured "
             f"alternately with the drives: {rate.text('MB/s')}",
             f"- bytes written per raw byte, from OpsDB's copy records: "
             f"{f['writes_per_raw_byte']:.3f}",
             f"- the limit: {f['limit_raw_mb_s']:.0f} MB/s of raw data",
             *_deletions(r),
             f"- the drive: {Stats(f['raw_mb_s']['values']).text('MB/s')} of raw data, "
             f"{c.ours.text()}", ""]
    cores = int(f.get("cores", 2))
    lines += ["| round | drive | raw MB/s | runs | most runs at once | CPU s (cores busy) | "
              f"raw MB/s with all {cores} cores busy |", "|---|---|---|---|---|---|---|"]
    cpu_bound = []
    for n, run in enumerate(f["runs"], 1):
        drive_s, cpu_s = float(run["drive_s"]), float(run["cpu_s"])
        # the same CPU work with no core ever idle: the machine's CPU limit for this drive
        cpu_bound.append(run["raw_bytes"] / (cpu_s / cores) / 1e6)
        lines.append(f"| {n} | {fmt_s(drive_s)} s | {run['raw_bytes'] / drive_s / 1e6:.0f} | "
                     f"{run['launched']} | {run['max_parallel']} | {cpu_s:.0f} "
                     f"({cpu_s / drive_s:.2f}) | {cpu_bound[-1]:.0f} |")
    cpu_limit = Stats(cpu_bound).median
    lines += ["", f"Fraction of the limit (ratio of medians): **{c.ratio:.2f}** (best runs "
              f"{c.best_ratio:.2f}); goal ≥ {c.goal:g}: {c.verdict}.", "",
              f"**The CPU's limit.** The drive and its runs used the CPU seconds above (user + "
              "system, the drive's process and every run it waited for; the kernel's write-back "
              "threads are not counted). Had all "
              f"{cores} cores been busy the whole time, that work would have moved "
              f"{cpu_limit:.0f} MB/s of raw data (median): {cpu_limit / f['limit_raw_mb_s']:.2f} "
              f"of the disk's limit. The drive reached "
              f"{Stats(f['raw_mb_s']['values']).median / cpu_limit:.2f} of that CPU limit; "
              + ("closing the rest of the gap to the disk needs less CPU per byte, not only "
                 "more overlap." if cpu_limit < f["limit_raw_mb_s"] else
                 "the CPU is not what bounds the drive on this machine (it had cores to "
                 "spare): the disk's time is, its deletions included (above), with the waits "
                 "between runs.")]
    return lines


def _deletions(r: SectionResult) -> list[str]:
    """The deletions' share of the disk's time (results from before it was measured: none)."""
    f = r.facts
    if "free_s" not in f or len(r.comparisons) < 2:
        return []
    c = r.comparisons[1]
    return [f"- bytes deleted per raw byte (the raw files, the observatory's tar, the buffer "
            f"copies), from the same records: {f['deletions_per_raw_byte']:.3f}; the disk's "
            f"time to delete the durably written file of the rate above (unlink and the "
            f"directory's fsync): {Stats(f['free_s']['values']).text()}",
            f"- the limit counting the deletions too: "
            f"{f['limit_with_deletions_raw_mb_s']:.0f} MB/s of raw data; the drive reached "
            f"**{c.ratio:.2f}** of it (best runs {c.best_ratio:.2f}; informational, the goal "
            "is on the writes alone)",
            f"- the most one observation's drive can reach of the writes' limit: "
            f"{r.comparisons[0].tool.median / c.tool.median:.2f} (the disk's time for the "
            "writes ÷ for the writes and the deletions). A package's copies are deleted only "
            "once its last archive holds it, and one observation's packages move in step, so "
            "its deletions cannot overlap its writes; a stream of observations overlaps one's "
            "deletions with the next one's copies"]
