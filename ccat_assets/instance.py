"""The Dagster instance of a deployment: where it lives and its per-link run limits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ccat_assets.tags import LINK_TAG
from ccat_dt.config import Config, ConfigError

if TYPE_CHECKING:  # `ccat-dt init` and `why` use this module without loading Dagster
    from dagster import DagsterInstance

TEMPLATE = Path(__file__).resolve().parent.parent / "dagster.yaml"


def instance_home(config: Config) -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or config.directory / "dagster_home")


def open_instance(config: Config) -> DagsterInstance:
    """The deployment's Dagster instance; a dagster.yaml Dagster refuses is a ConfigError
    naming the file (an operator's edit, not a bug)."""
    from dagster import DagsterInstance
    from dagster._core.errors import DagsterInvalidConfigError

    home = instance_home(config)
    home.mkdir(parents=True, exist_ok=True)
    try:
        return DagsterInstance.from_config(str(home))
    except DagsterInvalidConfigError as exc:
        first = " ".join(str(exc).split())[:400]
        raise ConfigError(f"{home / 'dagster.yaml'}: {first} (a `storage:` section replaces "
                          "`run_storage`, `event_log_storage` and `schedule_storage`: keep "
                          "one or the other)") from None


def instance_settings(config: Config, template: Path = TEMPLATE) -> dict[str, Any]:
    """The template's settings with one run limit per configured route."""
    settings: dict[str, Any] = yaml.safe_load(template.read_text()) or {}
    runs = settings.setdefault("concurrency", {}).setdefault("runs", {})
    runs["tag_concurrency_limits"] = [
        {"key": LINK_TAG, "value": route.link, "limit": route.max_concurrent}
        for route in config.settings.routes]
    return settings


def embedded_storage(home: Path) -> dict[str, Any]:
    """Dagster's SQLite storage in `home` (the default files), by the classes that keep their
    connections open and make a new instance's files one process at a time
    (ccat_assets/sqlite_storage.py)."""
    history, schedules = home.absolute() / "history", home.absolute() / "schedules"
    return {f"{kind}_storage": {"module": "ccat_assets.sqlite_storage", "class": name,
                                "config": {"base_dir": str(path)}}
            for kind, name, path in (("run", "SqliteRuns", history),
                                     ("event_log", "SqliteEventLog", history / "runs"),
                                     ("schedule", "SqliteSchedules", schedules))}


def stale_run_limits(config: Config) -> Path | None:
    """The instance's dagster.yaml when its run limits per link differ from the routes'
    `max_concurrent` (written by `init`: a route edited or added since is not applied until
    `init` runs again); None when they agree or there is no such file."""
    path = instance_home(config) / "dagster.yaml"
    if not path.is_file():
        return None
    written = (((yaml.safe_load(path.read_text()) or {}).get("concurrency") or {})
               .get("runs") or {}).get("tag_concurrency_limits") or []
    wanted = instance_settings(config)["concurrency"]["runs"]["tag_concurrency_limits"]
    return None if sorted(map(_limit_key, written)) == sorted(map(_limit_key, wanted)) else path


def _limit_key(limit: dict[str, Any]) -> tuple[str, str, int]:
    return str(limit.get("key")), str(limit.get("value")), int(limit.get("limit") or 0)


def write_instance_yaml(config: Config, home: Path) -> Path:
    """The embedded instance's dagster.yaml: the template's settings, what an operator set in
    the file already (kept: `init` runs again after every change of routes), one run limit per
    route and the embedded storage."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    header = ("# Written by `ccat-dt init` from the repository's dagster.yaml and the routes of\n"
              f"# {config.path}; re-run `ccat-dt init` after changing routes (settings edited\n"
              "# here are kept; the run limits per route are rewritten, and so is the embedded\n"
              "# storage, but not a storage set here, e.g. dagster-postgres).\n")
    kept = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    settings = _merged(instance_settings(config), kept)
    settings["concurrency"]["runs"]["tag_concurrency_limits"] = (
        instance_settings(config)["concurrency"]["runs"]["tag_concurrency_limits"])
    if not _storage_set_by_hand(kept):  # `init` again on a production instance keeps its
        settings.update(embedded_storage(home))  # database (was: switched back to SQLite)
    # Whole or not at all: a process opening the instance meanwhile (the daemon's run
    # workers, a cron `drive`, the UI, another `init`) reads the old file or the new one,
    # never a truncated one (a YAML error, or Dagster's defaults: no run limits, another
    # storage; another `init` would have kept nothing of the operator's settings).
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        partial.write_text(header + yaml.safe_dump(settings, sort_keys=False))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _storage_set_by_hand(settings: dict[str, Any]) -> bool:
    """Whether a dagster.yaml names a storage other than the embedded one."""
    return any(isinstance(section, dict) and section.get("module") != "ccat_assets.sqlite_storage"
               for key in ("storage", "run_storage", "event_log_storage", "schedule_storage")
               if (section := settings.get(key)) is not None)


def _merged(template: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    """`template` with the values of `kept` over it, section by section."""
    merged = dict(template)
    for key, value in kept.items():
        merged[key] = (_merged(merged[key], value)
                       if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged
