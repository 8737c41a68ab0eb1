"""Configuration: the embedded default loads; every bad file is rejected naming the file and key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccat_dt.config import MODULE_NAME, ConfigError, load_config
from ccat_dt.defaults import CONFIG_NAME, EMBEDDED_DEFAULT, write_default_config
from ccat_dt.filing import OBSERVATION_NAME
from ccat_dt.opsdb.models import RawDataPackage
from ccat_dt.packages import package_name


def default() -> dict[str, Any]:
    return copy.deepcopy(EMBEDDED_DEFAULT)


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / CONFIG_NAME
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rejected(path: Path, *keys: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for key in keys:
        assert key in message
    return message


# --- the embedded default ---------------------------------------------------------------------


def test_embedded_default_loads(tmp_path: Path) -> None:
    config = load_config(write_default_config(tmp_path))
    settings = config.settings
    assert settings.observatory == "ccat"
    assert [s.short_name for s in settings.sites] == ["ccat", "cologne", "us", "ramses"]
    assert [s.short_name for s in settings.archive_sites] == ["cologne", "us"]
    assert config.path == tmp_path / CONFIG_NAME


def test_required_lta_copies_defaults_to_number_of_archive_sites(tmp_path: Path) -> None:
    config = load_config(write_default_config(tmp_path))
    assert config.settings.policies.required_lta_copies is None
    assert config.settings.required_lta_copies == 2


def test_explicit_required_lta_copies_is_kept(tmp_path: Path) -> None:
    data = default()
    data["policies"]["required_lta_copies"] = 1
    assert load_config(write_config(tmp_path, data)).settings.required_lta_copies == 1


def test_relative_roots_resolve_against_config_directory(tmp_path: Path, monkeypatch:
                                                         pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    config = load_config(write_default_config(tmp_path / "deploy"))
    assert config.resolve_root("sites/ccat/instruments") == \
        tmp_path / "deploy" / "sites" / "ccat" / "instruments"
    assert config.resolve_root("/abs/root") == Path("/abs/root")


def test_relative_config_path_is_made_absolute(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_default_config(tmp_path / "deploy")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("deploy") / CONFIG_NAME)
    assert config.directory == tmp_path / "deploy"
    assert config.resolve_root("sites/us/lta") == tmp_path / "deploy" / "sites" / "us" / "lta"


def test_sqlite_relative_opsdb_url_resolves_against_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    config = load_config(write_default_config(tmp_path / "deploy"))
    assert config.opsdb_url == f"sqlite:///{tmp_path / 'deploy' / 'opsdb.sqlite'}"


def test_absolute_sqlite_and_other_urls_are_kept(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_OPSDB_URL", raising=False)
    data = default()
    data["opsdb_url"] = "sqlite:////var/lib/ccat/opsdb.sqlite"
    assert load_config(write_config(tmp_path, data)).opsdb_url == \
        "sqlite:////var/lib/ccat/opsdb.sqlite"
    data["opsdb_url"] = "postgresql://ccat@db/opsdb"
    assert load_config(write_config(tmp_path, data)).opsdb_url == "postgresql://ccat@db/opsdb"


def test_env_overrides_opsdb_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write_default_config(tmp_path))
    monkeypatch.setenv("CCAT_DT_OPSDB_URL", "postgresql://ccat@db/opsdb")
    assert config.opsdb_url == "postgresql://ccat@db/opsdb"
    monkeypatch.setenv("CCAT_DT_OPSDB_URL", "sqlite:///other.sqlite")
    assert config.opsdb_url == f"sqlite:///{tmp_path / 'other.sqlite'}"


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_default_config(tmp_path)
    monkeypatch.setenv("CCAT_DT_CONFIG", str(path))
    assert load_config().path == path


def test_no_config_and_no_env_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCAT_DT_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="CCAT_DT_CONFIG.*ccat-dt init"):
        load_config()


def test_write_default_config_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write_default_config(tmp_path)
    path.write_text(path.read_text() + "# edited\n")
    with pytest.raises(FileExistsError):
        write_default_config(tmp_path)
    assert path.read_text().endswith("# edited\n")


# --- invalid files: each names the file and the offending key -----------------------------------


def _typo_top_level(data: dict[str, Any]) -> None:
    data["polices"] = data.pop("policies")


def _bad_location_type(data: dict[str, Any]) -> None:
    data["sites"][0]["locations"][1]["type"] = "bufer"


def _bad_location_name(data: dict[str, Any]) -> None:
    data["sites"][1]["locations"][0]["name"] = "Big Buffer"


def _duplicate_site(data: dict[str, Any]) -> None:
    data["sites"][2]["short_name"] = "cologne"


def _duplicate_module(data: dict[str, Any]) -> None:
    instrument = data["instruments"][0]
    instrument["modules"].append(instrument["modules"][0])


def _duplicate_instrument(data: dict[str, Any]) -> None:
    data["instruments"].append({"name": data["instruments"][0]["name"], "modules": ["x"]})


def _route_to_unknown_site(data: dict[str, Any]) -> None:
    data["routes"].append({"origin": "ccat", "destination": "mars"})


def _missing_route(data: dict[str, Any]) -> None:
    data["routes"] = [r for r in data["routes"]
                      if (r["origin"], r["destination"]) != ("ccat", "us")]


def _too_many_lta_copies(data: dict[str, Any]) -> None:
    data["policies"]["required_lta_copies"] = 3


def _no_source(data: dict[str, Any]) -> None:
    data["sites"][0]["locations"] = [loc for loc in data["sites"][0]["locations"]
                                     if loc["type"] != "source"]


def _mail_to_a_malformed_address(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["ops at example.org"]}}


def _mail_server_with_its_port_in_the_host(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org:587", "to": ["a@example.org"]}}


def _webhook_without_a_scheme(data: dict[str, Any]) -> None:
    data["notifications"] = {"webhook": {"url": "hooks.example.org/T0/B0/secret"}}


def _mail_login_in_clear_text(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "username": "ccat"}}


def _mail_ca_file_without_starttls(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "ca_file": CONFIG_NAME}}


def _mail_tls_said_twice(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "starttls": True, "tls": "implicit"}}


def _mail_tls_unknown(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "tls": "ssl"}}


def _mail_ca_file_missing(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "starttls": True, "ca_file": "tls/site-ca.pem"}}


def _mail_ca_file_not_a_certificate(data: dict[str, Any]) -> None:
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "starttls": True, "ca_file": CONFIG_NAME}}


@pytest.mark.parametrize(("edit", "keys"), [
    (_typo_top_level, ["polices", "Extra inputs are not permitted"]),
    (_bad_location_type, ["sites[0].locations[1].type", "'buffer'"]),
    (_bad_location_name, ["sites[1].locations[0].name", "lower-case"]),
    (_duplicate_site, ["duplicate site short_name", "cologne"]),
    (_duplicate_module, ["instruments[0]", "module(s) listed twice"]),
    (_duplicate_instrument, ["instrument(s) listed twice"]),
    (_route_to_unknown_site, ["ccat->mars", "unknown site 'mars'"]),
    (_missing_route, ["routes missing", "ccat->us"]),
    (_too_many_lta_copies, ["policies.required_lta_copies=3", "2 archive site(s)"]),
    (_no_source, ["observatory site 'ccat' has no source location"]),
    # Refused by the mail server for good at the first problem, when nobody hears of it.
    (_mail_to_a_malformed_address, ["notifications.smtp.to", "'ops at example.org' is not one "
                                    "e-mail address"]),
    (_mail_server_with_its_port_in_the_host, ["notifications.smtp.host", "goes in `port`"]),
    (_webhook_without_a_scheme, ["notifications.webhook.url", "http(s)://"]),
    # The password would cross the network as it is, to anybody on the way.
    (_mail_login_in_clear_text, ["notifications.smtp", "the password would go to "
                                 "smtp.example.org in clear text", "`tls: starttls`",
                                 "`tls: implicit`"]),
    (_mail_ca_file_without_starttls, ["notifications.smtp", "ca_file is set but tls is none"]),
    (_mail_tls_said_twice, ["notifications.smtp", "starttls: true and tls: implicit say two "
                            "things"]),
    (_mail_tls_unknown, ["notifications.smtp.tls", "'none', 'starttls' or 'implicit'"]),
    # Else found only at the first problem, as a relay whose certificate is not trusted.
    (_mail_ca_file_missing, ["notifications.smtp.ca_file", "tls/site-ca.pem: no such file",
                             "PEM file of the CA"]),
    (_mail_ca_file_not_a_certificate, ["notifications.smtp.ca_file",
                                       "not a readable PEM certificate file"]),
], ids=["unknown-top-level-key", "location-type", "location-name", "duplicate-site",
        "duplicate-module", "duplicate-instrument", "route-unknown-site", "missing-route",
        "too-many-lta-copies", "no-source", "mail-address", "mail-host", "webhook-url",
        "mail-login-in-clear", "mail-ca-file-without-starttls", "mail-tls-said-twice",
        "mail-tls-unknown", "mail-ca-file-missing",
        "mail-ca-file-not-a-certificate"])
def test_invalid_config_names_file_and_key(tmp_path: Path, edit: Callable[[dict[str, Any]], None],
                                           keys: list[str]) -> None:
    data = default()
    edit(data)
    rejected(write_config(tmp_path, data), *keys)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_a_mail_login_without_starttls_is_accepted_to_a_relay_on_this_host(
        tmp_path: Path, host: str) -> None:
    data = default()
    data["notifications"] = {"smtp": {"host": host, "to": ["a@example.org"], "username": "u"}}
    smtp = load_config(write_config(tmp_path, data)).settings.notifications.smtp
    assert smtp is not None and smtp.username == "u" and smtp.tls == "none"


@pytest.mark.parametrize(("smtp", "tls", "port"), [
    ({}, "none", 25),
    ({"port": 465}, "implicit", 465),  # SMTPS: the port says it
    ({"tls": "implicit"}, "implicit", 465),
    ({"tls": "implicit", "port": 2465}, "implicit", 2465),
    ({"tls": "none", "port": 465}, "none", 465),  # said: kept (a plain relay there)
    ({"starttls": True}, "starttls", 25),  # as configurations said it before `tls`
    ({"starttls": True, "port": 587, "tls": "starttls"}, "starttls", 587),
    ({"starttls": False, "port": 465}, "implicit", 465),
], ids=["default", "port-465", "implicit", "implicit-other-port", "none-at-465",
        "starttls-true", "starttls-both", "starttls-false"])
def test_the_mail_tls_mode_and_port_follow_each_other_when_one_is_left_out(
        tmp_path: Path, smtp: dict[str, Any], tls: str, port: int) -> None:
    data = default()
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      **smtp}}
    loaded = load_config(write_config(tmp_path, data)).settings.notifications.smtp
    assert loaded is not None and (loaded.tls, loaded.port) == (tls, port)


def test_a_mail_ca_file_is_read_relative_to_the_configuration_file(tmp_path: Path) -> None:
    from ccat_dt.notify import SmtpChannel, channels
    from tests.notify_servers import certificate

    certificate(tmp_path / "tls")
    data = default()
    data["notifications"] = {"smtp": {"host": "smtp.example.org", "to": ["a@example.org"],
                                      "starttls": True, "username": "u",
                                      "ca_file": "tls/relay.pem"}}
    [channel] = channels(load_config(write_config(tmp_path, data)))
    assert isinstance(channel, SmtpChannel) and channel.ca_file == str(tmp_path / "tls/relay.pem")


# What a package name (a file name at every hop, a partition key, an ssh argument) cannot hold.
AWKWARD_NAMES = ["f/280", "-rf", "f 280", "q'\"$(id)", "a|b", "a:b", "日本", "..", ".hidden",
                 "tab\tx", "f280\n", "x" * 33, ""]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
@pytest.mark.parametrize("where", ["module", "instrument"])
def test_instrument_and_module_names_a_package_name_cannot_carry_are_refused(
        tmp_path: Path, name: str, where: str) -> None:
    """Before, accepted: 'a|b' left its package WAITING forever (the package x site partition
    key splits at '|'), '\n' failed each copy over ssh, 'f/280' put the tar in a directory."""
    data = default()
    if where == "module":
        data["instruments"][0]["modules"].append(name)
    else:
        data["instruments"].append({"name": name, "modules": ["m"]})
    rejected(write_config(tmp_path, data), "instruments[", repr(name), "1-32 letters")


@pytest.mark.parametrize("edit", [
    lambda data: data["sites"][1].update(short_name="cologne\n"),
    lambda data: data["sites"][1]["locations"][0].update(name="buffer\n")],
    ids=["site", "location"])
def test_a_trailing_line_break_is_no_part_of_a_name(tmp_path: Path,
                                                    edit: Callable[[dict[str, Any]], None]
                                                    ) -> None:
    data = default()
    edit(data)
    rejected(write_config(tmp_path, data), "sites[1]")


def test_the_longest_names_make_a_package_name_opsdb_and_a_disk_hold() -> None:
    name = package_name("o" * 128, "i" * 32, "m" * 32, 999)
    assert OBSERVATION_NAME.fullmatch("o" * 128) and MODULE_NAME.fullmatch("m" * 32)
    assert len(name) <= RawDataPackage.__table__.c.name.type.length  # type: ignore[attr-defined]
    assert len(f".{name}.tar.part".encode()) <= 255


def test_edits_do_not_leak_into_embedded_default(tmp_path: Path) -> None:
    # guards the tests above: they must edit a copy, and the default must stay valid
    for edit in (_typo_top_level, _bad_location_type, _missing_route):
        edit(default())
    load_config(write_config(tmp_path, EMBEDDED_DEFAULT))


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text("sites: [unclosed\n  observatory: : :\n")
    message = rejected(path, "not valid YAML", "line 2, column 14")
    assert "  observatory: : :\n" in message  # the offending line itself (config._parse)


def test_top_level_list(tmp_path: Path) -> None:
    rejected(write_config(tmp_path, [default()]), "expected a mapping at the top level")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text("")
    rejected(path, "expected a mapping at the top level")


def test_file_not_found(tmp_path: Path) -> None:
    rejected(tmp_path / "missing.yaml", "not found")
