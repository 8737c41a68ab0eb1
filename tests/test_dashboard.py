"""The Grafana dashboard: valid JSON, every panel titled and queried, and every series name in
its PromQL one that ccat_dt.metrics actually writes; then each query run against a real
VictoriaMetrics holding real points, so a typo or a query VictoriaMetrics rejects fails here
rather than as an empty panel in production."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from influxdb_client import Point

from ccat_dt import metrics as metrics_module
from ccat_dt.metrics import Metrics, MetricsSettings
from ccat_dt.opsdb.models import CopyStatus
from ccat_dt.progress import ProgressEvent
from tests.victoria import VictoriaMetrics
from tests.victoria import victoria as victoria_fixture  # noqa: F401 - named "victoria"

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ccat-dt-dashboard.json"
DOCS = ROOT / "docs" / "metrics.md"

# Grafana's variables as they are substituted before a query reaches the data source.
VARIABLES = {"$__interval_ms": "300000", "$__interval": "5m", "$__rate_interval": "5m",
             "$__range": "1h", "$site": ".*", "$route": ".*"}
# PromQL/MetricsQL functions, aggregations and keywords the expressions may use.
FUNCTIONS = {"sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "increase",
             "sum_over_time", "count_over_time", "max_over_time", "min_over_time",
             "avg_over_time", "last_over_time", "clamp_min", "clamp_max", "abs", "time",
             "vector", "scalar", "label_values", "and", "or", "unless", "bool", "offset"}


# -- the schema: what ccat_dt.metrics writes, and what the docs say it writes -------------------


def _series(points: list[Point]) -> set[str]:
    """`{measurement}_{field}` of each field, as VictoriaMetrics names the series."""
    names = set()
    for point in points:
        head, fields, *_ = point.to_line_protocol().split(" ")
        measurement = head.split(",")[0]
        names |= {f"{measurement}_{field.split('=')[0]}" for field in fields.split(",")}
    return names


def _write_everything(metrics: Metrics) -> None:
    """One call of every point method, every optional field known, so every series appears."""
    metrics.transfer(route="ccat->cologne", origin="ccat", destination="cologne",
                     transport="bbcp", bytes=50_000_000, seconds=2.0, streams=4, attempts=2,
                     outcome="ok", package="p1")
    metrics.transfer(route="ccat->us", origin="ccat", destination="us", transport="rsync",
                     bytes=10, seconds=1.0, streams=1, attempts=3, outcome="failed",
                     package="p2")
    metrics.stage(stage="transfer", outcome="ok", seconds=2.0, package="p1")
    metrics.stage(stage="archive", outcome="failed", seconds=1.0, package="p2")
    metrics.location(site="ccat", location="buffer", kind="buffer", used_bytes=700,
                     free_bytes=300, copies_by_status={s.value: 1 for s in CopyStatus},
                     present_bytes=600)
    metrics.service_level(packages_unsafe=3, bytes_unsafe=530, oldest_unsafe_age_s=18000.0,
                          buffer_hours_left={"ccat/buffer": 36.5})
    metrics.progress(ProgressEvent("transfer", "p1", 10, 20, 5.0, labels=(
        ("route", "ccat->cologne"), ("site", "cologne")), work=1))


@pytest.fixture(scope="module")
def emitted() -> set[str]:
    """The series names ccat_dt.metrics produces, from the points its methods build."""
    points: list[Point] = []
    metrics = Metrics.disabled()
    metrics._emit = lambda build, about: points.extend(build())  # type: ignore[method-assign]
    _write_everything(metrics)
    return _series(points)


def _documented() -> set[str]:
    """`{measurement}_{field}` from the schema table of docs/metrics.md."""
    names = set()
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`ccat_\w+`", cells[0]):
            continue
        measurement = cells[0].strip("`")
        fields = re.sub(r"\([^()]*\)", "", cells[2])  # drop "(int, B, ... `present`)"
        names |= {f"{measurement}_{field}" for field in re.findall(r"`(\w+)`", fields)}
    return names


def test_the_docs_table_matches_what_the_code_writes(emitted: set[str]) -> None:
    measurements = {getattr(metrics_module, name) for name in
                    ("TRANSFER", "STAGE", "LOCATION", "LOCATION_COPIES", "SERVICE_LEVEL",
                     "BUFFER", "PROGRESS")}
    assert all(any(name.startswith(m + "_") for m in measurements) for name in emitted)
    assert _documented() == emitted
    assert "ccat_transfer_bytes" in emitted and "ccat_buffer_hours_left" in emitted


# -- the dashboard -------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are neither labels, strings nor variables."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # label values
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "1", text)  # Grafana variables
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"label_values(\1)", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", text)  # numbers, 1e6 included
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))


def test_names_are_found_in_expressions() -> None:
    assert _names('sum by (route) (sum_over_time(ccat_transfer_bytes{outcome="ok",'
                  'route=~"$route"}[$__interval])) / ($__interval_ms / 1000) / 1e6') == {
        "sum", "sum_over_time", "ccat_transfer_bytes"}
    assert _names("label_values(ccat_location_copies_count, site)") == {
        "label_values", "ccat_location_copies_count"}
    assert _names("ccat_transfer_byte + nonsense") == {"ccat_transfer_byte", "nonsense"}


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_VM"]["type"] == "datasource"
    assert variables["DS_VM"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_title_and_a_query_on_the_chosen_data_source() -> None:
    dashboard = _dashboard()
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel.get("title", "").strip(), panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_VM}"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no target"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), f"{panel['title']}: empty expression"
            assert target["datasource"]["uid"] == "${DS_VM}", panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_series_in_the_dashboard_is_one_we_write(emitted: set[str]) -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for expr in _queries(dashboard):
        names = _names(expr)
        unknown = names - FUNCTIONS - emitted
        assert not unknown, f"{expr}: not a series ccat_dt.metrics writes: {sorted(unknown)}"
        assert names & emitted, f"{expr}: reads no ccat_dt series"
        used |= names & emitted
    assert {"ccat_transfer_bytes", "ccat_service_level_packages_unsafe",
            "ccat_service_level_bytes_unsafe", "ccat_service_level_oldest_unsafe_age_s",
            "ccat_buffer_hours_left", "ccat_location_used_bytes", "ccat_location_free_bytes",
            "ccat_location_copies_count", "ccat_stage_seconds"} <= used


# -- the queries against a real VictoriaMetrics ----------------------------------------------------


def _substitute(expr: str) -> str:
    for variable in sorted(VARIABLES, key=len, reverse=True):  # $__interval_ms first
        expr = expr.replace(variable, VARIABLES[variable])
    assert "$" not in expr, expr
    return expr


def _get(server: VictoriaMetrics, path: str, **params: str) -> dict[str, Any]:
    url = f"{server.url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert isinstance(answer, dict)
    return answer


def test_every_query_answers_with_data(victoria: VictoriaMetrics, emitted: set[str]) -> None:
    metrics = Metrics(MetricsSettings(url=victoria.url, flush_interval_ms=100))
    _write_everything(metrics)
    metrics.close()
    assert metrics.dropped == 0
    victoria.export('{__name__=~"ccat_.*"}', min_series=len(emitted))

    dashboard = _dashboard()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = _substitute(target["expr"])
            deadline = time.monotonic() + 10
            while True:  # nocache: else VictoriaMetrics hides the last 30 s (latency offset)
                answer = _get(victoria, "/api/v1/query", query=expr, nocache="1")
                assert answer["status"] == "success", (panel["title"], expr, answer)
                if answer["data"]["result"] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert answer["data"]["result"], f"{panel['title']}: no data for {expr}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        values = _get(victoria, f"/api/v1/label/{match[2]}/values", **{"match[]": match[1]})
        assert values["data"], f"variable {variable['name']}: no values"
