"""Real services for integration tests: skipped with a reason when absent on a developer's
machine, a failure when CCAT_REQUIRE_SERVICES=1 (CI), because a skipped test proves nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("CCAT_TEST_POSTGRES_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def unavailable(service: str, reason: str) -> None:
    message = f"{service} unavailable: {reason}"
    if os.environ.get("CCAT_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (CCAT_REQUIRE_SERVICES=1: integration tests must run)")
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    schema = f"ccat_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem means "not available"
        admin.dispose()
        unavailable("PostgreSQL", f"{POSTGRES_URL}: {exc.__class__.__name__}: {exc}")
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def own_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database of the calling test's own (a test may refuse its
    connections or terminate its backends: nobody else's), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem means "not available"
        admin.dispose()
        unavailable("PostgreSQL", f"{POSTGRES_URL}: {exc}")
    url = make_url(POSTGRES_URL).set(drivername="postgresql", database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def dagster_database() -> Iterator[str]:
    """A fresh PostgreSQL database for Dagster's run, event and schedule storage."""
    yield from own_database("ccat_dagster")


class RedisServer:
    """A redis-server of the test's own on a free port, keeping nothing on disk, or (`keep`)
    everything written, in an append-only file synced at each write."""

    def __init__(self, directory: Path, keep: bool = False) -> None:
        self.directory, self.port, self.keep = directory, free_port(), keep
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        import redis

        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.keep else "no", "--appendfsync", "always",
             "--dir", str(self.directory)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # gone is gone, unless kept on disk
            self.proc.wait(timeout=30)

    def down_for(self, seconds: float) -> None:
        """Killed, then started again after `seconds` (connections refused meanwhile)."""
        self.stop()
        time.sleep(seconds)
        self.start()

    def restart(self) -> None:
        """Stopped and started again at once, empty."""
        self.stop()
        self.start()

    def client(self) -> object:
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """The test's own Redis; `keep` (indirect parameter) keeps its data across a restart.
    Its own server, not a database of the shared one: a Celery worker left over by another
    test (or by another pytest on this machine) can never take this test's tasks."""
    if shutil.which("redis-server") is None:
        unavailable("Redis", "no redis-server on PATH (these tests restart their own)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, keep=getattr(request, "param", "") == "keep")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The broker URL of the test's own Redis (redis_server)."""
    return redis_server.url
