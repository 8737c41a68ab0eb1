"""The lifecycle across three sites reached through a real sshd with rsync: observatory ->
first archive once, archive -> archive for the second, verified on arrival, purge only after."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.transports.rsync as rsync
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataPackage,
    Site,
    _aware,
    utcnow,
)
from ccat_dt.report import disagreements
from ccat_dt.storage import files_under
from ccat_dt.topology import prepare_opsdb
from ccat_dt.transports.factory import endpoint, ssh_settings
from ccat_dt.transports.remote import remote_xxh128
from tests.helpers import observe
from tests.sshd import SshServer


def multisite(tmp_path: Path, sshd: SshServer, transport: str = "rsync",
              bbcp: dict[str, object] | None = None, ssh: dict[str, object] | None = None,
              route_settings: dict[str, object] | None = None, **policies: object
              ) -> Config:
    """The embedded default, but each archive site is a host reached through sshd with
    `transport` (and, for bbcp, the routes' `bbcp` settings); `ssh`: more `ssh` settings,
    `route_settings`: more settings of every route."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    for site in settings["sites"]:  # type: ignore[attr-defined]
        if site["short_name"] in ("cologne", "us"):
            for location in site["locations"]:
                location["host"] = sshd.destination
                location["root"] = str(sshd.root / tmp_path.name / site["short_name"]
                                       / location["name"])
    for route in settings["routes"]:  # type: ignore[attr-defined]
        route["transport"] = transport
        if bbcp:
            route["bbcp"] = bbcp
        route.update(route_settings or {})
    settings["policies"] = {**settings["policies"], **policies}  # type: ignore[dict-item]
    reach = sshd.ssh
    settings["ssh"] = {"port": reach.port, "identity_file": reach.identity_file,
                       "known_hosts_file": reach.known_hosts_file, **(ssh or {})}
    config = load_config(write_default_config(tmp_path / "deploy", overrides=settings))
    prepare_opsdb(config)
    return config


def transfers(session, package: RawDataPackage) -> list[Operation]:  # type: ignore[no-untyped-def]
    return list(session.scalars(select(Operation).where(
        Operation.package_id == package.id, Operation.operation_type == OperationType.TRANSFER)
        .order_by(Operation.id)))


@pytest.mark.parametrize("transport", [
    "rsync",
    pytest.param("bbcp", marks=pytest.mark.skipif(
        shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged for Debian); "
        "tests/test_bbcp.py runs the transport against captured real output"))])
def test_lifecycle_across_sites_over_ssh(tmp_path: Path, sshd: SshServer,
                                         instance: DagsterInstance, transport: str) -> None:
    config = multisite(tmp_path, sshd, transport)
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb, observations=1, files=2)

    report = drive(build_definitions(config), instance)

    assert report.failed == []
    ssh = ssh_settings(config)
    with opsdb.session() as session:
        observatory_buffer = session.scalar(select(DataLocation).join(Site).where(
            Site.short_name == "ccat", DataLocation.location_type == LocationType.BUFFER))
        assert observatory_buffer is not None
        packages = session.scalars(select(RawDataPackage)).all()
        assert len(packages) == 2
        for package in packages:
            done = [op for op in transfers(session, package)
                    if op.status == OperationStatus.COMPLETED]
            out_of_observatory = [op for op in done
                                  if op.source_location_id == observatory_buffer.id]
            assert len(out_of_observatory) == 1  # left the observatory exactly once
            primary = package.primary_site.short_name
            secondary = ({"cologne", "us"} - {primary}).pop()
            [replication] = [op for op in done if op.source_location_id != observatory_buffer.id]
            source_location = session.get_one(DataLocation, replication.source_location_id)
            assert (source_location.site.short_name, source_location.location_type) == (
                primary, LocationType.LONG_TERM_ARCHIVE)
            assert session.get_one(DataLocation, replication.destination_location_id) \
                .site.short_name == secondary
            assert all(op.transport is None or op.transport == transport for op in done)
            assert all(op.log_path and Path(op.log_path).is_file() for op in done)

            lta = [c for c in package.copies
                   if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
            assert sorted(c.location.site.short_name for c in lta) == ["cologne", "us"]
            for lta_copy in lta:
                assert lta_copy.is_verified and lta_copy.location.host == sshd.destination
                where = endpoint(lta_copy.location, lta_copy.relative_path)
                assert remote_xxh128(ssh, where) == package.checksum  # read over ssh
            archived = session.scalars(select(Operation.finished_at).where(
                Operation.package_id == package.id, Operation.status == OperationStatus.COMPLETED,
                Operation.operation_type == OperationType.ARCHIVE)).all()
            assert len(archived) == 2
            at_observatory = session.scalars(select(Operation).join(
                DataLocation, Operation.source_location_id == DataLocation.id).join(Site).where(
                Operation.package_id == package.id, Site.short_name == "ccat",
                Operation.operation_type == OperationType.DELETION)).all()
            assert len(at_observatory) == 3  # 2 raw files + the observatory buffer copy
            assert all(_aware(op.started_at) >= max(_aware(t) for t in archived)  # type: ignore[arg-type]
                       for op in at_observatory)
            assert all(c.status == CopyStatus.DELETED for c in package.copies
                       if c.location.location_type == LocationType.BUFFER)
    assert files_under(source) == []
    assert disagreements(opsdb, ssh) == []


def test_corruption_on_arrival_is_retried_then_reported_never_verified(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = multisite(tmp_path, sshd, max_attempts=2)
    opsdb = OpsDB(config.opsdb_url)
    source = observe(config, opsdb, observations=1, files=1)

    def flip_a_byte(self, temporary):  # type: ignore[no-untyped-def]
        path = Path(str(temporary.path))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))

    monkeypatch.setattr(rsync.RsyncTransport, "_after_rsync", flip_a_byte)
    report = drive(build_definitions(config), instance)

    assert {key.split(":")[0] for key in report.failed} == {"site_copy"}
    with opsdb.session() as session:
        for package in session.scalars(select(RawDataPackage)).all():
            attempts = [op for op in transfers(session, package)
                        if op.status == OperationStatus.FAILED]
            assert len(attempts) == 2  # policies.max_attempts
            assert all("checksum mismatch" in (op.error or "") for op in attempts)
            arrived = session.scalars(select(PackageCopy).join(DataLocation).join(Site).where(
                PackageCopy.package_id == package.id, Site.short_name != "ccat")).all()
            assert arrived == []  # never recorded, let alone verified
            stages = {s.stage: s for s in diagnose(session, config, package.name, utcnow())}
            site_copy = stages[f"site copy {package.primary_site.short_name}"]
            assert site_copy.state == "failed" and "checksum mismatch" in site_copy.detail
    remote_root = sshd.root / tmp_path.name
    assert [p for p in remote_root.rglob("*.tar")] == []  # nothing under a final name
    assert [p for p in remote_root.rglob("*.part")] == []  # the bad bytes were not kept
    assert len(files_under(source)) == 2  # nothing purged
