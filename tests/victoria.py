"""A throw-away VictoriaMetrics server on 127.0.0.1, so metrics are tested against what a real
time-series database accepts and how it names series, instead of mocks of the client.

Import the fixture into a test module: `from tests.victoria import victoria as victoria_fixture`
(with `# noqa: F401`); it is named "victoria" whatever the alias, and the alias keeps ruff from
seeing test arguments as redefinitions (F811).
VictoriaMetrics takes InfluxDB line protocol at /write and /api/v2/write and stores each field
as a series named `{measurement}_{field}` with the tags as labels (see docs/metrics.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import DidNotStart, running
from tests.services import free_port, unavailable

BINARY = "victoria-metrics"  # from the Debian package of the same name (/usr/bin)
PACKAGE = "victoria-metrics"
START_TIMEOUT_S = 15.0
EXPORT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class VictoriaMetrics:
    url: str  # http://127.0.0.1:PORT
    log: Path

    def export(self, match: str, *, min_series: int = 1,
               until: Callable[[list[dict[str, Any]]], bool] = lambda _: True,
               timeout_s: float = EXPORT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Series matching a selector (e.g. `{__name__=~"ccat_transfer_.*"}`) from
        /api/v1/export, one dict per series with "metric", "values" and "timestamps".

        Freshly written rows take seconds to become searchable, so this forces a flush and
        polls until `min_series` series are there and `until` holds of them (or returns what
        there is at the deadline).
        """
        deadline = time.monotonic() + timeout_s
        series: list[dict[str, Any]] = []
        while True:
            self._get("/internal/force_flush")
            query = urllib.parse.urlencode({"match[]": match})
            body = self._get(f"/api/v1/export?{query}")
            series = [json.loads(line) for line in body.splitlines() if line.strip()]
            if (len(series) >= min_series and until(series)) or time.monotonic() >= deadline:
                return series
            time.sleep(0.2)

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return str(response.read().decode())


def _binary() -> str | None:
    return shutil.which(BINARY) or (f"/usr/bin/{BINARY}" if os.access(f"/usr/bin/{BINARY}",
                                                                       os.X_OK) else None)



def _healthy(url: str) -> str:
    """Empty string once /health answers OK, else why not."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return "" if response.status == 200 else f"/health answered {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        return f"/health: {exc}"


@pytest.fixture(scope="session", name="victoria")  # named: importable under any alias
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """A running VictoriaMetrics with empty storage, for the whole test session."""
    binary = _binary()
    if binary is None:
        unavailable("VictoriaMetrics", f"no {BINARY} binary: run `make test-deps` "
                    f"(scripts/setup-test-host installs the {PACKAGE} package)")
        return
    directory = tmp_path_factory.mktemp("victoria")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / "victoria-metrics.log"
    command = [binary, f"-httpListenAddr=127.0.0.1:{port}",
               f"-storageDataPath={directory / 'data'}", "-retentionPeriod=1"]  # 1 month
    with ExitStack() as stack:
        try:
            stack.enter_context(running(command, log=log, name="VictoriaMetrics",
                                        ready=lambda: _healthy(url),
                                        timeout_s=START_TIMEOUT_S))
        except DidNotStart as exc:
            unavailable("VictoriaMetrics", str(exc))
        yield VictoriaMetrics(url=url, log=log)
