"""Progress of long work (a transfer, building a package) while it runs.

Whoever moves bytes makes a `Progress` and calls `update(done)` as they go by; it reports at
most once per `interval_s` (and once at the end) as a `ProgressEvent` to every sink:

- always a log record on the "ccat_dt.progress" logger (INFO, with the fields as extras), so
  the JSON-lines log (ccat_dt.jsonlog) and Dagster's run log get progress when no one watches
  a terminal;
- on a terminal, `terminal_bars()` (used by the CLI) adds a live tqdm bar per piece of work;
- with metrics on, `Metrics.watch_progress()` adds a `ccat_progress` point per event, so a long
  transfer is seen in Grafana while it runs.

Who knows where the work happens (the site, the route) but does not make the `Progress` itself
(a transport does) wraps the call in `labelled(site=..., route=...)`; every `Progress` made
inside carries those labels into its events.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger("ccat_dt.progress")
INTERVAL_ENV = "CCAT_DT_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 2.0
_labels: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("ccat_dt_progress_labels",
                                                             default=())
_works = itertools.count(1)


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "transfer", "packaging", ...
    name: str  # what is being worked on: a file or a package
    done_bytes: int
    total_bytes: int | None  # None: unknown
    bytes_per_s: float
    finished: bool = False
    labels: tuple[tuple[str, str], ...] = ()  # from labelled(): site, route, ...
    work: int = 0  # tells apart the events of pieces of work running at once
    reported_percent: float | None = None  # from a tool that says "N% done" of an unknown size

    @property
    def percent(self) -> float | None:
        if self.total_bytes:
            return min(100.0, 100.0 * self.done_bytes / self.total_bytes)
        return self.reported_percent


Sink = Callable[[ProgressEvent], None]
_sinks: list[Sink] = []
_lock = threading.Lock()


def add_sink(sink: Sink) -> Callable[[], None]:
    """Also send every event to `sink`; returns the function that removes it again."""
    with _lock:
        _sinks.append(sink)

    def remove() -> None:
        with _lock:
            if sink in _sinks:
                _sinks.remove(sink)
    return remove


def _emit(event: ProgressEvent) -> None:
    percent = event.percent
    LOG.info("%s %s: %s%.1f MB, %.1f MB/s%s", event.stage, event.name,
             f"{percent:.0f}% " if percent is not None else "", event.done_bytes / 1e6,
             event.bytes_per_s / 1e6, " (done)" if event.finished else "",
             extra={**dict(event.labels), "stage": event.stage, "progress_of": event.name,
                    "bytes": event.done_bytes, "total_bytes": event.total_bytes,
                    "percent": None if percent is None else round(percent, 1),
                    "bytes_per_s": round(event.bytes_per_s), "finished": event.finished})
    with _lock:
        sinks = list(_sinks)
    for sink in sinks:
        try:
            sink(event)
        except Exception:  # noqa: BLE001 - progress must never break the work it reports on
            LOG.debug("progress sink failed", exc_info=True)


@contextmanager
def labelled(**labels: str) -> Iterator[None]:
    """Every `Progress` made inside (in this thread or task) carries these labels too."""
    token = _labels.set((*_labels.get(), *sorted(labels.items())))
    try:
        yield
    finally:
        _labels.reset(token)


class Progress:
    """Reports the progress of one piece of work, at most once per `interval_s`."""

    def __init__(self, stage: str, name: str, total_bytes: int | None = None, *,
                 interval_s: float | None = None) -> None:
        self.stage, self.name, self.total_bytes = stage, name, total_bytes
        self.interval_s = (float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL_S)
                           if interval_s is None else interval_s)
        self.started = time.monotonic()
        self._last = self.started
        self.done_bytes = 0
        self.events = 0
        self.labels = _labels.get()
        self.work = next(_works)
        self._percent: float | None = None

    def update(self, done_bytes: int, *, bytes_per_s: float | None = None,
               total_bytes: int | None = None) -> None:
        self.done_bytes = done_bytes
        if total_bytes:
            self.total_bytes = total_bytes
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        self._report(bytes_per_s, finished=False)

    def update_percent(self, percent: float, *, bytes_per_s: float | None = None) -> None:
        """For tools that report a share, not bytes: bytes from the total when it is known."""
        self._percent = percent
        done = int(self.total_bytes * percent / 100) if self.total_bytes else self.done_bytes
        self.update(done, bytes_per_s=bytes_per_s)

    def finish(self, done_bytes: int | None = None) -> None:
        """The work is done (with `done_bytes`, when the last update did not say all)."""
        if done_bytes is not None:
            self.done_bytes = done_bytes
        if self.events:  # short work that never reported needs no "done" either
            if self.total_bytes is None and self._percent is not None:
                self._percent = 100.0
            self._report(None, finished=True)

    def _report(self, bytes_per_s: float | None, *, finished: bool) -> None:
        elapsed = time.monotonic() - self.started
        rate = bytes_per_s if bytes_per_s is not None else (
            self.done_bytes / elapsed if elapsed > 0 else 0.0)
        self.events += 1
        _emit(ProgressEvent(self.stage, self.name, self.done_bytes, self.total_bytes, rate,
                            finished, self.labels, self.work, self._percent))


@contextmanager
def terminal_bars(stream: Any = None) -> Iterator[None]:
    """While inside: a live tqdm bar per piece of work on `stream` (stderr), if it is a
    terminal; otherwise nothing is added (the log records are the progress then)."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        yield
        return
    from tqdm import tqdm

    bars: dict[int, Any] = {}

    def show(event: ProgressEvent) -> None:
        key = event.work
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(total=event.total_bytes, desc=f"{event.stage} {event.name}",
                                   unit="B", unit_scale=True, file=stream, leave=False,
                                   mininterval=0)  # Progress already throttles
        bar.update(event.done_bytes - bar.n)
        if event.finished:
            bar.close()
            del bars[key]

    remove = add_sink(show)
    try:
        yield
    finally:
        remove()
        for bar in bars.values():
            bar.close()
