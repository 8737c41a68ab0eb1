"""Real services for integration tests: skipped with a reason when absent on a developer's
machine, a failure when CCAT_REQUIRE_SERVICES=1 (CI), because a skipped test proves nothing."""

from __future__ import annotations

import os
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
