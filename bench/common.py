"""Settings from the environment, interleaved repeated timing, machine and version facts."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
GIB = 1 << 30


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_ints(name: str, default: Sequence[int]) -> list[int]:
    value = os.environ.get(name, "").strip()
    return [int(v) for v in value.split(",") if v.strip()] if value else list(default)


@dataclass
class Settings:
    """Every size is an environment variable; CCAT_BENCH_QUICK=1 picks a 1-2 minute smoke run."""

    quick: bool
    work: Path  # scratch directory (all data written here)
    keep: bool
    output: Path
    sections: list[str]
    repeat: int
    hash_mib: int
    tree_files: int
    tree_file_mib: int
    copy_mib: int
    remote_mib: int
    packages: int
    profile_packages: int
    event_log_packages: int
    files_per_lifecycle_package: int
    lifecycle_file_kib: int
    opsdb_sizes: list[int]
    opsdb_files_per_package: int
    in_flight: int
    years_packages: int
    years_files_per_package: int
    service_files: int = 5000  # defaults: results saved before section 8 existed still load
    service_singles: int = 300
    status_copies: int = 10**7
    s3_mib: int = 1024  # package archived to the S3 server in section 11
    e2e_mib: int = 4096  # the observation of section 12
    e2e_modules: int = 4
    e2e_files: int = 16  # per module
    e2e_rounds: int = 3
    bbcp_mib: int = 1024  # one file sent with bbcp (or its stand-in) in section 4b
    bbcp_packages: int = 20  # small packages in one bbcp session vs as many calls (4b)
    bbcp_package_kib: int = 1024

    @classmethod
    def from_env(cls, repo: Path) -> Settings:
        quick = os.environ.get("CCAT_BENCH_QUICK", "") not in ("", "0")
        q = (lambda full, small: small if quick else full)  # noqa: E731
        base = os.environ.get("CCAT_BENCH_DIR") or os.environ.get("TMPDIR") or "/tmp"
        work = Path(base) / f"ccat-bench-{os.getpid()}"
        return cls(
            quick=quick,
            work=work,
            keep=os.environ.get("CCAT_BENCH_KEEP", "") not in ("", "0"),
            output=Path(os.environ.get("CCAT_BENCH_OUTPUT") or repo / "docs" / "benchmarks.md"),
            sections=[s.strip() for s in os.environ.get(
                "CCAT_BENCH_SECTIONS", ",".join(SECTIONS)).split(",") if s.strip()],
            repeat=max(3, _env_int("CCAT_BENCH_REPEAT", q(5, 3))),
            hash_mib=_env_int("CCAT_BENCH_HASH_MIB", q(1024, 256)),
            tree_files=_env_int("CCAT_BENCH_TREE_FILES", q(100, 20)),
            tree_file_mib=_env_int("CCAT_BENCH_TREE_FILE_MIB", q(10, 5)),
            copy_mib=_env_int("CCAT_BENCH_COPY_MIB", q(1024, 256)),
            remote_mib=_env_int("CCAT_BENCH_REMOTE_MIB", q(512, 64)),
            packages=_env_int("CCAT_BENCH_PACKAGES", q(500, 2)),
            profile_packages=_env_int("CCAT_BENCH_PROFILE_PACKAGES", q(4, 1)),
            event_log_packages=_env_int("CCAT_BENCH_EVENT_LOG_PACKAGES", q(6, 0)),
            files_per_lifecycle_package=_env_int("CCAT_BENCH_LIFECYCLE_FILES", 4),
            lifecycle_file_kib=_env_int("CCAT_BENCH_LIFECYCLE_FILE_KIB", 64),
            opsdb_sizes=_env_ints("CCAT_BENCH_OPSDB_SIZES",
                                  q([10**4, 10**5, 10**6], [10**4, 10**5])),
            opsdb_files_per_package=_env_int("CCAT_BENCH_OPSDB_FILES_PER_PACKAGE", 100),
            in_flight=_env_int("CCAT_BENCH_IN_FLIGHT", 60),
            years_packages=_env_int("CCAT_BENCH_YEARS_PACKAGES", q(100_000, 4_000)),
            years_files_per_package=_env_int("CCAT_BENCH_YEARS_FILES_PER_PACKAGE", q(100, 10)),
            service_files=_env_int("CCAT_BENCH_SERVICE_FILES", q(5000, 1000)),
            service_singles=_env_int("CCAT_BENCH_SERVICE_SINGLES", q(300, 50)),
            status_copies=_env_int("CCAT_BENCH_STATUS_COPIES", q(10**7, 10**5)),
            s3_mib=_env_int("CCAT_BENCH_S3_MIB", q(1024, 128)),
            e2e_mib=_env_int("CCAT_BENCH_E2E_MIB", q(4096, 256)),
            e2e_rounds=_env_int("CCAT_BENCH_E2E_ROUNDS", q(3, 1)),
            bbcp_mib=_env_int("CCAT_BENCH_BBCP_MIB", q(1024, 64)),
            bbcp_packages=_env_int("CCAT_BENCH_BBCP_PACKAGES", q(20, 5)),
            bbcp_package_kib=_env_int("CCAT_BENCH_BBCP_PACKAGE_KIB", 1024),
        )

    def describe(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


SECTIONS = ["hash", "package", "copy", "remote", "bbcp", "lifecycle", "opsdb", "years", "service",
            "purge", "status", "s3", "endtoend"]


# -- timing -------------------------------------------------------------------------------------

@dataclass
class Stats:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def text(self, unit: str = "s") -> str:
        return f"{fmt_s(self.median)} ({fmt_s(self.min)}–{fmt_s(self.max)}) {unit}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "values": self.values}


def fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 10:
        return f"{seconds:.1f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    if seconds >= 0.01:
        return f"{seconds:.3f}"
    return f"{seconds:.4f}"


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_tool(argv: Sequence[str]) -> float:
    """Wall time of one external command (output discarded; failure raises)."""
    started = time.perf_counter()
    subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - started


def interleaved(variants: dict[str, Callable[[], dict[str, float]]], repeat: int, *,
                prepare: Callable[[], None] = lambda: None, warmup: int = 1,
                log: Callable[[str], None] = print) -> dict[str, Stats]:
    """Run every variant `repeat` times (after `warmup` discarded rounds), rotating the order
    each round so that a drifting background load hits every variant alike. A variant returns
    named timings (a tool pipeline reports each step); `prepare` runs untimed before each."""
    samples: dict[str, list[float]] = {}
    names = list(variants)
    for round_ in range(warmup + repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            prepare()
            timings = variants[name]()
            if round_ >= warmup:
                for key, value in timings.items():
                    samples.setdefault(key, []).append(value)
        if round_ >= warmup:
            log(f"    round {round_ - warmup + 1}/{repeat}: " + ", ".join(
                f"{k} {fmt_s(v[-1])}" for k, v in samples.items()))
    return {key: Stats(values) for key, values in samples.items()}


def summed(stats: dict[str, Stats], *keys: str) -> Stats:
    """Per-round sums of pipeline steps (e.g. tar then xxhsum), as one distribution."""
    return Stats([sum(parts) for parts in zip(*(stats[k].values for k in keys), strict=True)])


@dataclass
class Comparison:
    """ratio = tool time / our time (medians): above 1 means we are faster."""

    section: str
    label: str
    ours: Stats
    tool: Stats
    goal: float | None  # None: informational row, no PASS/MISS
    ours_label: str = "ours"
    tool_label: str = "tool"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.tool.median / self.ours.median

    @property
    def best_ratio(self) -> float:
        return self.tool.min / self.ours.min

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return "info"
        return "PASS" if self.ratio >= self.goal else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {"section": self.section, "label": self.label, "ours_label": self.ours_label,
                "tool_label": self.tool_label, "ours": self.ours.as_dict(),
                "tool": self.tool.as_dict(), "ratio": self.ratio, "best_ratio": self.best_ratio,
                "goal": self.goal, "verdict": self.verdict, "note": self.note}


@dataclass
class SectionResult:
    name: str
    title: str
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    comparisons: list[Comparison] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # section-specific numbers and tables
    error: str | None = None


# -- files --------------------------------------------------------------------------------------

def write_random(path: Path, size: int, chunk: int = 64 * MIB) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        left = size
        while left > 0:
            n = min(chunk, left)
            stream.write(os.urandom(n))
            left -= n


def drop_outputs(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def settle() -> None:
    """Flush dirty pages of earlier runs untimed, so no run pays for another's writeback."""
    os.sync()


def cache(*paths: Path) -> None:
    """Read each file through once, untimed, so that it is in the page cache: our readers let
    go of what they read (ccat_dt/pagecache.py), the tools do not, and every variant must find
    its source cached alike, whichever ran before it."""
    buffer = bytearray(MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass


def fresh(*paths: Path, sources: Sequence[Path] = ()) -> Callable[[], None]:
    """A `prepare` step: remove the outputs of the previous run, settle(), then cache() the
    sources."""
    def prepare() -> None:
        drop_outputs(*paths)
        settle()
        cache(*sources)
    return prepare


# -- the machine --------------------------------------------------------------------------------

def first_line(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[0].strip() if text else "(no output)"


def versions() -> dict[str, str]:
    import sqlite3
    import zlib

    import dagster
    import sqlalchemy
    import xxhash

    return {
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        "xxhash (Python)": f"{xxhash.VERSION} (libxxhash {xxhash.XXHASH_VERSION})",
        "xxhsum": first_line(["xxhsum", "--version"]),
        "GNU tar": first_line(["tar", "--version"]),
        "rsync": first_line(["rsync", "--version"]),
        "cp": first_line(["cp", "--version"]),
        "ssh": first_line(["ssh", "-V"]),
        "bbcp": first_line(["bbcp", "--version"]),
        "dagster": dagster.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite (library)": sqlite3.sqlite_version,
        "zlib (adler32)": zlib.ZLIB_RUNTIME_VERSION,
        "kernel": platform.release(),
    }


def _meminfo_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    simd = []
    if flags:
        have = set(flags.group(1).split())
        simd = [f for f in ("sse4_2", "avx2", "avx512f") if f in have]
    hypervisor = " (virtual machine)" if flags and "hypervisor" in flags.group(1) else ""
    return f"{match.group(1).strip() if match else 'unknown'}{hypervisor}; SIMD: " \
           f"{', '.join(simd) or 'none'}"


def _disk(directory: Path) -> str:
    try:
        done = subprocess.run(["findmnt", "-n", "-T", str(directory), "-o", "SOURCE,FSTYPE"],
                              capture_output=True, text=True, timeout=10)
        source, fstype = (done.stdout.split() + ["?", "?"])[:2]
    except (OSError, subprocess.TimeoutExpired):
        source, fstype = "?", "?"
    usage = shutil.disk_usage(directory)
    kind = ""
    device = Path(source).name
    rotational = Path(f"/sys/block/{re.sub(r'[0-9]+$', '', device)}/queue/rotational")
    if rotational.exists():
        kind = "rotational" if rotational.read_text().strip() == "1" else "non-rotational"
        kind += " (as the kernel reports it; on a VM this says little)"
    return (f"{source} {fstype}, {usage.total / 1e9:.0f} GB ({usage.free / 1e9:.0f} GB free)"
            f"{', ' + kind if kind else ''}")


def disk_throughput(directory: Path, size: int = 512 * MIB) -> dict[str, float]:
    """MB/s writing `size` bytes buffered, and with fsync at the end (what durable copies pay);
    the better of two tries each, since the disk is shared."""
    path = directory / "disk-probe.bin"
    data = os.urandom(8 * MIB)
    out: dict[str, float] = {}
    for durable in (False, True, False, True):
        settle()
        started = time.perf_counter()
        with open(path, "wb") as stream:
            for _ in range(size // len(data)):
                stream.write(data)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        key = "write_fsync_MBps" if durable else "write_buffered_MBps"
        out[key] = max(out.get(key, 0.0), size / 1e6 / (time.perf_counter() - started))
        path.unlink()
    settle()
    return out


def machine(directory: Path) -> dict[str, str]:
    probe = disk_throughput(directory)
    return {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical",
        "RAM": f"{_meminfo_gib():.1f} GiB",
        "disk (bench directory)": _disk(directory),
        "disk write, 512 MiB (best of 2)": (
            f"{probe['write_buffered_MBps']:.0f} MB/s into the page cache, "
            f"{probe['write_fsync_MBps']:.0f} MB/s with fsync"),
        "OS": f"{platform.system()} {platform.release()}",
    }
