"""JSON-lines logging for Promtail/Loki: one object per line, fields instead of prose.

Loki indexes labels and filters on parsed fields (`| json | outcome="failed"`), so each record
carries the package, site, stage and outcome as keys rather than inside the message. Logging
must never break a transfer: a value that JSON cannot represent is written as its str().

Switch it on with `configure()` or the environment (`CCAT_DT_LOG_JSON=/var/log/ccat-dt.jsonl`,
or `-` for stderr) and `configure_from_env()`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

LOGGER = "ccat_dt"
ENV = "CCAT_DT_LOG_JSON"
STDERR = "-"
FIELDS = ("package", "site", "stage", "operation_id", "run_id", "copy_id", "bytes", "seconds",
          "outcome")  # the keys dashboards and alerts filter on, first after the core keys
CORE = ("ts", "level", "logger", "message")
OK_OUTCOMES = frozenset({"ok", "skipped", "unchanged"})

# Attributes every LogRecord has: anything else on a record came in through `extra=`.
_STANDARD = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
_MARK = "_ccat_dt_json"  # set on our handlers, so configure() can find and replace them


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never raises, whatever the message or the extras hold."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        extras = {key: value for key, value in record.__dict__.items()
                  if key not in _STANDARD and not key.startswith("_")}
        for key in [*(f for f in FIELDS if f in extras),
                    *sorted(k for k in extras if k not in FIELDS)]:
            out[key + "_" if key in CORE else key] = _jsonable(extras[key])
        if record.exc_info:
            out["exc"] = _safe_str(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = _safe_str(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, allow_nan=False, default=_safe_str)


def configure(path: Path | str | None = None, level: int = logging.INFO) -> None:
    """Send the "ccat_dt" logger's records as JSON lines to `path`, or to stderr.

    Without a path, CCAT_DT_LOG_JSON decides (a path, or "-" for stderr); without either, stderr.
    Calling it again replaces the handler it installed before, so it is safe to call at every
    entry point. Records still propagate to the root logger (Dagster's and pytest's handlers).
    A file is reopened when logrotate moves it, so Promtail keeps following the live file.
    """
    target = str(path) if path is not None else os.environ.get(ENV, "").strip() or STDERR
    handler: logging.Handler
    if target == STDERR:
        handler = logging.StreamHandler(sys.stderr)
    else:
        from ccat_dt.logfiles import WatchedLogFile, prepare_directory  # a file only

        file = Path(target).expanduser()
        prepare_directory(file)
        handler = WatchedLogFile(file)  # its disk full or read-only never fails the caller
    handler.setFormatter(JsonFormatter())
    setattr(handler, _MARK, True)
    logger = logging.getLogger(LOGGER)
    unconfigure()
    logger.addHandler(handler)
    logger.setLevel(level)


def configure_from_env(level: int = logging.INFO) -> bool:
    """`configure()` only when CCAT_DT_LOG_JSON is set; True if it was."""
    if not os.environ.get(ENV, "").strip():
        return False
    configure(level=level)
    return True


def unconfigure() -> None:
    """Remove (and close) the handler `configure()` installed, if any."""
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(old)
        old.close()


def log_operation(logger: logging.Logger, *, stage: str, package: str, site: str, outcome: str,
                  level: int | None = None, **fields: Any) -> None:
    """Log one finished operation as one record: INFO when it went well, else WARNING.

    Keys that LogRecord reserves (e.g. `module`, `name`) are logged with a trailing underscore,
    since `extra=` refuses them.
    """
    extra = {"stage": stage, "package": package, "site": site, "outcome": outcome}
    for key, value in fields.items():
        extra[key + "_" if key in _STANDARD else key] = value
    if level is None:
        level = logging.INFO if outcome in OK_OUTCOMES else logging.WARNING
    logger.log(level, "%s %s: %s at %s", stage, outcome, package, site, extra=extra)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not lose the record
        return f"{_safe_str(record.msg)} % {_safe_str(record.args)}"


def _jsonable(value: Any) -> Any:
    """The value if JSON represents it faithfully (finite numbers, str keys), else its str()."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return _safe_str(value)
    return value


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - str() of a foreign object can raise anything
        return f"<unprintable {type(value).__name__}>"
