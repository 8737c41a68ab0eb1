"""The deployment files parse, and say what the code expects: the production dagster.yaml is a
valid Dagster instance configuration whose secrets all come from the environment, the systemd
units start our commands, and the compose stack has a worker for every configured site."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from ccat_dt.config import load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb.database import LINK_TIMEOUT_ENV, link_connect_args
from ccat_dt.queues import all_queues

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_production_instance_config_is_valid_and_keeps_secrets_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY / "dagster.yaml").read_text()
    for name, value in {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432",
                        "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "dagster",
                        "DAGSTER_PG_PASSWORD": "secret"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(tmp_path))  # raises on any schema error
    assert "postgres" in config["storage"]
    assert config["run_monitoring"]["enabled"] is True
    postgres = yaml.safe_load(text)["storage"]["postgres"]["postgres_db"]
    params = postgres.pop("params")
    assert all(isinstance(value, dict) and "env" in value for value in postgres.values())
    # Dagster's database gives a silent network path up as the OpsDB does
    monkeypatch.delenv(LINK_TIMEOUT_ENV, raising=False)
    assert params == link_connect_args("postgresql://db/dagster")


@pytest.mark.parametrize("unit", ["ccat-dt-webserver.service", "ccat-dt-daemon.service",
                                  "ccat-dt-worker@.service"])
def test_systemd_units_parse_and_read_secrets_from_the_env_file(unit: str) -> None:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    assert service["EnvironmentFile"] == "/etc/ccat-dt/ccat-dt.env"
    assert service["ExecStart"].startswith("/opt/ccat-dt/.venv/bin/")
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    example = (DEPLOY / "systemd" / "ccat-dt.env.example").read_text()
    assert "CCAT_DT_CONFIG=" in example and "DAGSTER_HOME=" in example


def test_compose_stack_runs_a_worker_per_site_of_the_default(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "webserver", "daemon"} <= set(services)
    config = load_config(write_default_config(tmp_path))
    archive_and_observatory = [s for s in all_queues(config) if s != "ramses"]
    for site in archive_and_observatory:
        worker = services[f"worker-{site}"]
        assert worker["command"] == ["ccat-dt", "worker", "--site", site]
        assert worker["environment"]["CCAT_DT_CELERY_BROKER"].startswith("redis://")
    assert services["webserver"]["command"][0] == "dagster-webserver"
