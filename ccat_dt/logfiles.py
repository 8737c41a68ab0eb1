"""Log files that never fail what is being logged.

The log directory shares the control host's disk with OpsDB and the Dagster instance: it
fills (a runaway log, another program) or is remounted read-only. Python's file handlers
then print a traceback per record on stderr ("--- Logging error ---", hundreds of KB for one
drive), raise from `close()` (a drive that did all its work ended with exit 2), or refuse to
open (a drive that would not start at all). A log line is never worth a transfer or a purge:
here a record that cannot be written is dropped, one line on stderr says which file and why
(once per process and cause), and writing resumes by itself once the disk takes it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from logging.handlers import WatchedFileHandler
from pathlib import Path
from typing import Any

TELL_EVERY_S = 600.0  # a log file that cannot be written is told again after this


def _told_lately(path: str, errno: int | None) -> bool:
    """Whether a process on this host (a drive, each of its forked runs) told this already in
    the last TELL_EVERY_S: a note in the temporary directory (which may be that full disk
    too: then each process tells once)."""
    digest = hashlib.sha256(f"{path}\0{errno}".encode()).hexdigest()[:16]
    note = Path(tempfile.gettempdir()) / f"ccat-dt-log-unwritable-{digest}"
    with contextlib.suppress(OSError):
        if time.time() - note.stat().st_mtime < TELL_EVERY_S:
            return True
    with contextlib.suppress(OSError):
        note.touch()
    return False


_told: set[tuple[str, int | None]] = set()  # (file, errno) already told by this process


def tell(path: Path | str, exc: OSError, what: str = "its records are dropped") -> None:
    """One line on stderr for a log file that cannot be written, once per file and cause."""
    key = (str(path), exc.errno)
    if key in _told:
        return
    _told.add(key)
    if _told_lately(*key):
        return
    cause = exc.strerror or str(exc)
    with contextlib.suppress(OSError, ValueError):
        print(f"ccat-dt: warning: the log file {path} cannot be written ({cause}): {what} "
              "until it can; runs go on (free space on its disk, or make it writable)",
              file=sys.stderr, flush=True)


class _Tolerant(logging.FileHandler):
    """A FileHandler opened on first use, whose open and write errors drop the record."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # logging opens it outside its own try
            try:
                self.stream = self._open()
            except OSError as exc:
                tell(self.baseFilename, exc)
                return
        logging.StreamHandler.emit(self, record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        tell(self.baseFilename, exc)
        self._drop_stream()

    def _drop_stream(self) -> None:
        """Close the stream, discarding what it could not write; the next record opens the
        file again (delay), so writing resumes once there is room."""
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last flush had no room: those records are lost, not the run
            self._drop_stream()


class LogFile(_Tolerant):
    """`logging.FileHandler(path)` that never fails what is being logged."""

    def __init__(self, path: Path | str, **kwargs: Any) -> None:
        super().__init__(path, encoding="utf-8", delay=True, **kwargs)


class WatchedLogFile(WatchedFileHandler, _Tolerant):
    """`WatchedFileHandler(path)` (reopened when logrotate moves it) that never fails what is
    being logged."""

    def __init__(self, path: Path | str, **kwargs: Any) -> None:
        super().__init__(path, encoding="utf-8", delay=True, **kwargs)

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the reopen's flush of the old stream is outside logging's own try
            self.reopenIfNeeded()
        except OSError:
            self.handleError(record)
            return
        _Tolerant.emit(self, record)


def prepare_directory(path: Path) -> None:
    """`path`'s directory made if it can be; a read-only or full disk is told by the first
    record that cannot be written, not here."""
    with contextlib.suppress(OSError):
        os.makedirs(path.parent, exist_ok=True)
