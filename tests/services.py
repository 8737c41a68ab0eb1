"""Real services for integration tests: skipped with a reason when absent on a developer's
machine, a failure when CCAT_REQUIRE_SERVICES=1 (CI), because a skipped test proves nothing."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

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
