"""The configuration and OpsDB agree on the locations before anything acts: a location that
holds copies cannot leave the configuration or change its type (its copies would stop or start
counting as archive copies), and a location moved in the configuration is used only once
`ccat-dt migrate` has recorded its new place. Checked on the disks and in OpsDB."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ccat_dt.config import Config, load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.topology import TopologyDrift, check_topology
from tests.helpers import run_cli
from tests.test_retention import FILES, archived, copies, make_package


def edited(config: Config, edit: dict[str, object]) -> None:
    """The configuration file with `edit` applied to its sites (site -> new site entry, or
    None to remove the site and its routes)."""
    settings = yaml.safe_load(config.path.read_text())
    for name, replacement in edit.items():
        index = next(i for i, site in enumerate(settings["sites"]) if site["short_name"] == name)
        if replacement is None:
            del settings["sites"][index]
            settings["routes"] = [r for r in settings["routes"]
                                  if name not in (r["origin"], r["destination"])]
        else:
            settings["sites"][index] = replacement
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))


def site_entry(config: Config, name: str) -> dict[str, object]:
    settings = yaml.safe_load(config.path.read_text())
    entry: dict[str, object] = next(s for s in settings["sites"] if s["short_name"] == name)
    return entry


def sources_on_disk(config: Config) -> list[Path]:
    root = config.resolve_root("sites/ccat/instruments")
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and not path.name.startswith(".ccat-dt"))


@pytest.mark.parametrize("change", ["site removed", "types swapped"])
def test_a_location_holding_copies_cannot_leave_the_configuration_or_change_type(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str], change: str) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    recorded = {label: copy.location.location_type for (label, _, _), copy in
                copies(opsdb).items()}
    if change == "site removed":
        edited(config, {"us": None})
        expected = "location us/lta holds 1 copy in OpsDB but is no longer in the configuration"
    else:
        cologne = site_entry(config, "cologne")
        for location in cologne["locations"]:  # type: ignore[attr-defined]
            location["type"] = {"buffer": "long_term_archive",
                                "long_term_archive": "buffer"}[location["type"]]
        edited(config, {"cologne": cologne})
        expected = ("location cologne/buffer holds 1 copy in OpsDB as a buffer location; the "
                    "configuration makes it a long_term_archive")
    capsys.readouterr()

    for command in (["migrate"], ["purge"], ["drive"], ["file", "obs1/f280/a.dat",
                                                        "--observation", "obs1",
                                                        "--module", "primecam/f280"]):
        assert run_cli("--config", str(config.path), *command) == 2, command
        assert expected in capsys.readouterr().err, command

    assert run_cli("--config", str(config.path), "status") == 0  # looking still works,
    assert f"STOPPED: {expected}" in capsys.readouterr().out  # and says why nothing acts
    assert len(sources_on_disk(config)) == len(FILES)  # nothing was deleted
    assert {label: copy.location.location_type for (label, _, _), copy in
            copies(opsdb).items()} == recorded  # nor re-typed


def test_a_location_moved_in_the_configuration_is_used_once_migrate_recorded_it(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str]) -> None:
    make_package(opsdb)
    archived(opsdb, "cologne", "us")
    old = config.resolve_root("sites/cologne/lta")
    cologne = site_entry(config, "cologne")
    for location in cologne["locations"]:  # type: ignore[attr-defined]
        if location["name"] == "lta":
            location["root"] = "disks/cologne-lta-2"
    edited(config, {"cologne": cologne})
    capsys.readouterr()

    assert run_cli("--config", str(config.path), "purge") == 2
    assert (f"location cologne/lta is at {config.resolve_root('disks/cologne-lta-2')} in the "
            f"configuration, at {old} in OpsDB: run `ccat-dt migrate` once its data is at the "
            "new place") in capsys.readouterr().err
    assert len(sources_on_disk(config)) == len(FILES)

    new = config.resolve_root("disks/cologne-lta-2")
    new.parent.mkdir(parents=True)
    old.rename(new)  # the operator moves the data, then records its new place
    assert run_cli("--config", str(config.path), "migrate") == 0
    assert run_cli("--config", str(config.path), "purge") == 0

    assert sources_on_disk(config) == []  # deleted, the LTA copy re-checked at its new place
    assert [path.name for path in new.rglob("*.tar")] != []


def test_the_check_every_tick_and_run_makes_agrees_with_the_full_comparison(
        config: Config, opsdb: OpsDB) -> None:
    """check_topology answers from one plain query when OpsDB records exactly the configured
    locations, and compares in full otherwise: a site without copies dropped still passes (no
    copy there to misplace); a location recorded elsewhere (its host) or not yet recorded is
    refused, as before."""
    check_topology(opsdb, load_config(config.path))  # as `ccat-dt init` recorded it
    original = config.path.read_text()

    edited(config, {"us": None})  # no copies there (none made)
    check_topology(opsdb, load_config(config.path))
    config.path.write_text(original)

    cologne = site_entry(config, "cologne")
    lta = next(loc for loc in cologne["locations"]  # type: ignore[attr-defined]
               if loc["name"] == "lta")
    lta["host"], lta["root"] = "cologne-archive", str(config.resolve_root("sites/cologne/lta"))
    edited(config, {"cologne": cologne})
    settings = yaml.safe_load(config.path.read_text())
    for route in settings["routes"]:  # a remote location is reached by rsync, not `local`
        if "cologne" in (route["origin"], route["destination"]):
            route["transport"] = "rsync"
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(TopologyDrift, match="location cologne/lta is at cologne-archive:"):
        check_topology(opsdb, load_config(config.path))
    config.path.write_text(original)

    cologne = site_entry(config, "cologne")
    cologne["locations"].append(  # type: ignore[attr-defined]
        {"name": "lta2", "type": "long_term_archive", "root": "sites/cologne/lta2"})
    edited(config, {"cologne": cologne})
    with pytest.raises(TopologyDrift, match="location cologne/lta2 is in the configuration, "
                                            "not yet in OpsDB"):
        check_topology(opsdb, load_config(config.path))
    config.path.write_text(original)
    check_topology(opsdb, load_config(config.path))
