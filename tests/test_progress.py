"""Progress while bytes move: events before the transfer completes, for rsync (rate-limited
over the test sshd) and local copies (slowed by a hook); a bar on a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from pathlib import Path, PurePosixPath

import pytest

from ccat_dt import jsonlog, progress
from ccat_dt.checksums import hash_file
from ccat_dt.metrics import Metrics, MetricsSettings
from ccat_dt.progress import ProgressEvent
from ccat_dt.transports import local as local_module
from ccat_dt.transports.base import Endpoint
from ccat_dt.transports.local import LocalTransport
from ccat_dt.transports.rsync import RsyncTransport
from tests.sshd import SshServer
from tests.sshd import sshd as sshd_fixture  # noqa: F401 - registers the "sshd" fixture
from tests.victoria import VictoriaMetrics
from tests.victoria import victoria as victoria_fixture  # noqa: F401 - named "victoria"


def source_file(path: Path, size: int) -> tuple[Path, str]:
    path.write_bytes(os.urandom(size))
    return path, hash_file(path)[0]


@pytest.mark.slow
def test_a_rate_limited_rsync_reports_progress_before_it_completes(
        sshd: SshServer, tmp_path: Path, progress_events: list[ProgressEvent],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.2")  # rate-limited, as in use
    size = 2_000_000  # at 500 kB/s: about 4 s
    source, checksum = source_file(tmp_path / "big.dat", size)
    transport = RsyncTransport(sshd.ssh, tmp_path / "logs", bandwidth_limit_kbps=500)
    destination = sshd.root / "progress" / "big.dat"
    with caplog.at_level(logging.INFO, logger="ccat_dt.progress"):
        result = transport.copy(Endpoint(PurePosixPath(source)), sshd.endpoint(destination),
                                checksum)
    assert result.bytes == size
    running = [e for e in progress_events if not e.finished]
    assert len(running) >= 2, progress_events
    assert all(e.stage == "transfer" and e.name == "big.dat" for e in running)
    assert all(0 < e.done_bytes < size for e in running[:-1])  # before the end
    assert [e.done_bytes for e in running] == sorted(e.done_bytes for e in running)
    assert progress_events[-1].finished and progress_events[-1].done_bytes == size
    # without a terminal, progress is in the structured log
    records = [r for r in caplog.records if r.name == "ccat_dt.progress"]
    assert len(records) == len(progress_events)
    assert records[0].__dict__["progress_of"] == "big.dat"
    log = next((tmp_path / "logs").glob("*.log")).read_text()
    assert "to-chk" not in log  # the meter stays out of the transfer log


def test_a_slow_local_copy_reports_progress_before_it_completes(
        tmp_path: Path, progress_events: list[ProgressEvent],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.2")  # rate-limited, as in use
    monkeypatch.setattr(local_module, "SLICE_SIZE", 256 * 1024)
    done_when_landed: list[int] = []

    class Throttled(LocalTransport):
        def _landed(self, temporary: Path) -> None:  # a slow disk: 0.1 s per slice
            done_when_landed.append(temporary.stat().st_size)
            time.sleep(0.1)

    size = 2 * 1024 * 1024  # 8 slices
    source, checksum = source_file(tmp_path / "pkg.tar", size)
    destination = tmp_path / "out" / "pkg.tar"
    Throttled().copy_file(source, destination, checksum)
    assert destination.read_bytes() == source.read_bytes()
    running = [e for e in progress_events if not e.finished]
    assert len(running) >= 2, progress_events
    assert all(e.name == "pkg.tar" and e.total_bytes == size for e in running)
    assert all(e.done_bytes < size for e in running[:-1])
    assert progress_events[-1].finished and progress_events[-1].percent == 100.0


def test_a_terminal_gets_a_progress_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with progress.terminal_bars(screen):
        job = progress.Progress("transfer", "pkg.tar", 10_000_000, interval_s=0)
        job.update(5_000_000)
        job.finish()
    assert "transfer pkg.tar" in screen.getvalue()
    assert "50%" in screen.getvalue()


def test_not_a_terminal_gets_no_bar() -> None:
    screen = io.StringIO()
    with progress.terminal_bars(screen):
        job = progress.Progress("transfer", "pkg.tar", 10, interval_s=0)
        job.update(5)
        job.finish()
    assert screen.getvalue() == ""


def test_packaging_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccat_dt.tarball import PackageMember, build_package

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    seen: list[ProgressEvent] = []
    remove = progress.add_sink(seen.append)
    try:
        members = []
        for i in range(4):
            path, checksum = source_file(tmp_path / f"scan-{i}.dat", 1000)
            members.append(PackageMember(path, f"obs/scan-{i}.dat", 1000, checksum))
        build_package(members, tmp_path / "out" / "p.tar", package_name="p")
    finally:
        remove()
    assert [e.done_bytes for e in seen if not e.finished] == [1000, 2000, 3000, 4000]
    assert all(e.stage == "packaging" and e.name == "p" and e.total_bytes == 4000 for e in seen)
    assert seen[-1].finished


@pytest.mark.slow
def test_off_a_terminal_a_long_transfer_shows_in_the_log_and_the_metrics_while_it_runs(
        sshd: SshServer, victoria: VictoriaMetrics, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance test of issue 18: a rate-limited transfer (rsync --bwlimit over the real
    sshd, ~4 s) reports at least twice before it completes, in the JSON-lines log and in the
    metrics a real VictoriaMetrics received."""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    size = 2_000_000  # at 500 kB/s: about 4 s
    source, checksum = source_file(tmp_path / "big.dat", size)
    route = f"ccat->{uuid.uuid4().hex[:10]}"  # this test's own series
    log_file = tmp_path / "ccat-dt.jsonl"
    metrics = Metrics(MetricsSettings(url=victoria.url, flush_interval_ms=100))
    metrics.watch_progress()
    logger = logging.getLogger("ccat_dt")
    saved = list(logger.handlers), logger.level
    jsonlog.configure(log_file)
    try:
        with progress.labelled(site="cologne", route=route):
            RsyncTransport(sshd.ssh, tmp_path / "logs", bandwidth_limit_kbps=500).copy(
                Endpoint(PurePosixPath(source)), sshd.endpoint(sshd.root / "big.dat"), checksum)
        completed_ms = time.time() * 1000
    finally:
        jsonlog.unconfigure()
        logger.handlers[:], _ = saved
        logger.setLevel(saved[1])
        metrics.close()

    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    running = [r for r in records if r["logger"] == "ccat_dt.progress" and not r["finished"]]
    assert len(running) >= 2, records
    assert all(r["site"] == "cologne" and r["route"] == route and r["stage"] == "transfer"
               and r["progress_of"] == "big.dat" and 0 <= r["bytes"] < size
               and r["percent"] < 100 for r in running[:-1]), running

    [done] = victoria.export(  # the last sample (the finished point) may be flushed later
        f'{{__name__="ccat_progress_done_bytes",route="{route}"}}',
        until=lambda series: max(series[0]["values"]) == size)
    assert {k: v for k, v in done["metric"].items() if k != "__name__"} == {
        "site": "cologne", "route": route, "stage": "transfer", "slot": "0"}
    before_end = [v for v, t in zip(done["values"], done["timestamps"], strict=True)
                  if t < completed_ms and v < size]
    assert len(before_end) >= 2, done
    assert before_end == sorted(before_end) and max(done["values"]) == size
    [finished] = victoria.export(f'{{__name__="ccat_progress_finished",route="{route}"}}',
                                 until=lambda series: 1 in series[0]["values"])
    # the last point says "finished" (rsync's 100% line and the end can share a millisecond,
    # so the order of the two last samples is not known)
    assert sorted(finished["values"]) == [0] * (len(finished["values"]) - 1) + [1]
    assert finished["timestamps"][finished["values"].index(1)] == max(finished["timestamps"])
    assert metrics.dropped == 0


def test_concurrent_work_gets_its_own_metric_slot_and_frees_it() -> None:
    metrics = Metrics.disabled()
    first, second = ProgressEvent("transfer", "a", 1, 2, 1.0, work=1), \
        ProgressEvent("transfer", "b", 1, 2, 1.0, work=2)
    assert [metrics._slot(first), metrics._slot(second), metrics._slot(first)] == [0, 1, 0]
    assert metrics._slot(ProgressEvent("transfer", "a", 2, 2, 1.0, finished=True, work=1)) == 0
    assert metrics._slot(ProgressEvent("transfer", "c", 1, 2, 1.0, work=3)) == 0  # freed
