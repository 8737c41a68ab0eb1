"""JSON-lines logging: every record one parseable line with its fields, exceptions as text,
unserialisable extras as str(), and configure() idempotent."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ccat_dt import jsonlog
from ccat_dt.jsonlog import JsonFormatter, configure, configure_from_env, log_operation


@pytest.fixture
def ccat_logger() -> Iterator[logging.Logger]:
    """The "ccat_dt" logger, restored afterwards so other tests see it untouched."""
    logger = logging.getLogger("ccat_dt")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield logger
    jsonlog.unconfigure()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def _capture(logger: logging.Logger) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return stream


def _records(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert all(line.strip() for line in lines)
    return [json.loads(line) for line in lines]


def test_a_record_is_one_json_line_with_its_fields(ccat_logger: logging.Logger) -> None:
    stream = _capture(ccat_logger)
    before = datetime.now(UTC)
    logging.getLogger("ccat_dt.transfer").info(
        "sent %s\nin two lines", "pkg", extra={
            "package": "chai_lfa_obs1_0", "site": "cologne", "stage": "transfer",
            "operation_id": 17, "run_id": "abc", "copy_id": 4, "bytes": 50_000_000,
            "seconds": 2.5, "outcome": "ok", "route": "ccat->cologne"})
    [record] = _records(stream.getvalue())
    assert list(record) == ["ts", "level", "logger", "message", "package", "site", "stage",
                            "operation_id", "run_id", "copy_id", "bytes", "seconds", "outcome",
                            "route"]
    assert record["level"] == "INFO" and record["logger"] == "ccat_dt.transfer"
    assert record["message"] == "sent pkg\nin two lines"
    assert record["bytes"] == 50_000_000 and record["seconds"] == 2.5
    assert record["operation_id"] == 17 and record["route"] == "ccat->cologne"
    assert record["ts"].endswith("Z")
    ts = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= ts <= datetime.now(UTC)
    assert "exc" not in record


def test_exceptions_are_text_in_exc(ccat_logger: logging.Logger) -> None:
    stream = _capture(ccat_logger)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        ccat_logger.exception("archive failed", extra={"package": "p", "outcome": "failed"})
    [record] = _records(stream.getvalue())
    assert record["level"] == "ERROR" and record["outcome"] == "failed"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: disk on fire" in record["exc"]


class _Unprintable:
    def __str__(self) -> str:
        raise ValueError("no")


def test_unserialisable_extras_never_raise(ccat_logger: logging.Logger) -> None:
    stream = _capture(ccat_logger)
    loop: list[Any] = []
    loop.append(loop)
    moment = datetime(2026, 1, 1, 12, tzinfo=UTC)
    ccat_logger.warning("odd values", extra={
        "package": Path("/data/p.tar"), "bytes": {1, 2}, "seconds": math.nan, "copy_id": loop,
        "site": {("a", "b"): 1}, "run_id": _Unprintable(), "stage": moment,
        "outcome": {"nested": [1, 2.5, None]}, "ts": "mine"})
    [record] = _records(stream.getvalue())  # NaN would not be valid JSON
    assert record["package"] == "/data/p.tar"
    assert record["bytes"] == "{1, 2}"
    assert record["seconds"] == "nan"
    assert record["copy_id"] == "[[...]]"
    assert record["site"] == "{('a', 'b'): 1}"
    assert record["run_id"] == "<unprintable _Unprintable>"
    assert record["stage"] == "2026-01-01T12:00:00+00:00"
    assert record["outcome"] == {"nested": [1, 2.5, None]}  # JSON-able values stay structured
    assert record["ts"] != "mine" and record["ts_"] == "mine"  # the core keys are never replaced


def test_a_bad_format_string_keeps_the_record(ccat_logger: logging.Logger) -> None:
    stream = _capture(ccat_logger)
    ccat_logger.propagate = False  # pytest's own handler would fail the test on this record
    ccat_logger.info("%d files", "many")
    [record] = _records(stream.getvalue())
    assert record["message"] == "%d files % ('many',)"


def test_log_operation_logs_one_record_per_operation(ccat_logger: logging.Logger) -> None:
    stream = _capture(ccat_logger)
    log = logging.getLogger("ccat_dt.assets")
    log_operation(log, stage="transfer", package="p1", site="cologne", outcome="ok",
                  bytes=10, seconds=1.5, operation_id=3, module="lfa", name="clash")
    log_operation(log, stage="archive", package="p2", site="us", outcome="failed",
                  error="checksum mismatch")
    log_operation(log, stage="deletion", package="p3", site="ccat", outcome="failed",
                  level=logging.ERROR)
    ok, failed, error = _records(stream.getvalue())
    assert ok["level"] == "INFO" and ok["message"] == "transfer ok: p1 at cologne"
    assert {k: ok[k] for k in ("stage", "package", "site", "outcome", "bytes", "seconds",
                               "operation_id", "module_", "name_")} == {
        "stage": "transfer", "package": "p1", "site": "cologne", "outcome": "ok", "bytes": 10,
        "seconds": 1.5, "operation_id": 3, "module_": "lfa", "name_": "clash"}
    assert failed["level"] == "WARNING" and failed["error"] == "checksum mismatch"
    assert error["level"] == "ERROR"


def test_configure_to_a_file_is_idempotent(ccat_logger: logging.Logger, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "ccat-dt.jsonl"
    configure(path)
    configure(path)
    ours = [h for h in ccat_logger.handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1  # the second call replaced the first handler
    assert ccat_logger.level == logging.INFO
    ccat_logger.getChild("x").debug("below the level")
    log_operation(ccat_logger.getChild("x"), stage="packaging", package="p", site="ccat",
                  outcome="ok")
    ccat_logger.info("second")
    records = _records(path.read_text(encoding="utf-8"))
    assert [r["message"] for r in records] == ["packaging ok: p at ccat", "second"]

    other = tmp_path / "other.jsonl"
    configure(other, level=logging.DEBUG)
    ccat_logger.debug("now debug")
    assert len([h for h in ccat_logger.handlers if isinstance(h.formatter, JsonFormatter)]) == 1
    assert [r["message"] for r in _records(other.read_text())] == ["now debug"]
    assert len(_records(path.read_text())) == 2  # the old file is no longer written


def test_configure_follows_the_environment(ccat_logger: logging.Logger, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CCAT_DT_LOG_JSON", raising=False)
    assert not configure_from_env()
    assert not [h for h in ccat_logger.handlers if isinstance(h.formatter, JsonFormatter)]

    path = tmp_path / "env.jsonl"
    monkeypatch.setenv("CCAT_DT_LOG_JSON", str(path))
    assert configure_from_env()
    ccat_logger.info("to the file", extra={"site": "ccat"})
    assert _records(path.read_text())[0]["site"] == "ccat"

    monkeypatch.setenv("CCAT_DT_LOG_JSON", "-")
    configure()  # the stream handler looks sys.stderr up now: capsys sees it
    ccat_logger.warning("to stderr", extra={"outcome": "failed"})
    [record] = _records(capsys.readouterr().err)
    assert record["message"] == "to stderr" and record["outcome"] == "failed"
    assert len(_records(path.read_text())) == 1
