"""Long-term archives on S3-compatible object storage, against a real S3 server process (moto's
standalone server on loopback, IAM authentication on): Cologne's LTA is a bucket, Cornell's a
directory. Every fault test reads the bucket itself for its verdict, not OpsDB."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import xxhash
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.audit import DARK, LOST, PARTIAL, audit
from ccat_dt.checksums import hash_file, new_hasher
from ccat_dt.config import MIB, Config, ConfigError, S3Config, load_config
from ccat_dt.defaults import CONFIG_NAME, EMBEDDED_DEFAULT, write_default_config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.objectstore import CHECKSUM_METADATA, ObjectStore, Stores, upload_part_size
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataPackage,
    Site,
)
from ccat_dt.reaper import certificate_problems
from ccat_dt.staging import Selection, request_staging, stage, staged_problems
from ccat_dt.storage import files_under
from ccat_dt.topology import prepare_opsdb
from ccat_dt.transports.base import Endpoint, Identity, Occupied, TransferError
from ccat_dt.transports.s3 import S3Transport
from tests.helpers import (
    SHM,
    copied_tree,
    driven_template,
    new_instance_home,
    reinoded,
    relocated,
    template_directory,
)
from tests.s3server import S3Server, s3, s3server  # noqa: F401 - fixtures

MB = 1_000_000
PREFIX = "ccat/lta"


def s3_deployment(directory: Path, endpoint: str, bucket: str,
                  policies: dict[str, Any] | None = None, **options: Any) -> Config:
    """The embedded default with Cologne's LTA in `bucket` (5 MiB parts, so that a few MB
    already make a multipart upload), migrated and marked; `policies` over the default's."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    settings["policies"] = {**settings["policies"], **(policies or {})}  # type: ignore[dict-item]
    for site in settings["sites"]:  # type: ignore[attr-defined]
        if site["short_name"] == "cologne":
            site["locations"] = [
                {"name": "buffer", "type": "buffer", "root": "sites/cologne/buffer"},
                {"name": "lta", "type": "long_term_archive", "storage": "s3",
                 "s3": {"endpoint_url": endpoint, "bucket": bucket, "prefix": PREFIX,
                        "part_size_mib": 5, "max_concurrency": 4, **options}}]
    config = load_config(write_default_config(directory, overrides=settings))
    prepare_opsdb(config)
    return config


def observe(config: Config, opsdb: OpsDB, *, size: int, modules: tuple[str, ...] = (
        "primecam/f280", "chai/lfa")) -> Path:
    """One observation, two files of `size` bytes per module: one package per module."""
    source = config.resolve_root("sites/ccat/instruments")
    start_observation(opsdb, "obs-0")
    for module in modules:
        for i in range(2):
            path = source / "obs-0" / module / f"scan-{i}.dat"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size + i))
        file_directory(opsdb, observation="obs-0", module=module, directory=f"obs-0/{module}")
    finish_observation(opsdb, "obs-0")
    return source


def object_hash(client: Any, bucket: str, key: str) -> str:
    hasher = new_hasher()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    while chunk := body.read(MB):
        hasher.update(chunk)
    return hasher.hexdigest()


def lta(opsdb: OpsDB, site: str, status: CopyStatus | None = CopyStatus.PRESENT
        ) -> list[PackageCopy]:
    with opsdb.session() as session:
        query = select(PackageCopy).join(DataLocation).join(Site).where(
            Site.short_name == site, DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
        if status is not None:
            query = query.where(PackageCopy.status == status)
        found = session.scalars(query.order_by(PackageCopy.id)).all()
        for item in found:
            _ = item.location.root, item.package.checksum, item.package.name
        return list(found)


@pytest.fixture
def bucket(s3: S3Server) -> str:  # noqa: F811
    return s3.new_bucket()


@pytest.fixture
def deployment(tmp_path: Path, s3: S3Server, bucket: str) -> Config:  # noqa: F811
    return s3_deployment(tmp_path / "deploy", s3.url, bucket)


@pytest.mark.slow
def test_lifecycle_with_one_archive_on_s3_and_one_on_disk(
        deployment: Config, s3: S3Server, bucket: str,  # noqa: F811
        instance: DagsterInstance) -> None:  # noqa: F811
    config = deployment
    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        source = observe(config, opsdb, size=3 * MB)  # ~6 MB packages: two 5 MiB parts

        report = drive(build_definitions(config), instance)

        assert report.failed == []
        with opsdb.session() as session:
            packages = session.scalars(select(RawDataPackage)).all()
            assert len(packages) == 2
            names = {p.name: p.checksum for p in packages}
            assert all(p.state == PackageState.ARCHIVED for p in packages)
            primaries = {p.name: p.primary_site.short_name for p in packages}
            cologne_lta = session.scalar(select(DataLocation.id).join(Site).where(
                Site.short_name == "cologne",
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE))
            replications = session.execute(
                select(RawDataPackage.name, Operation.transport, Operation.status)
                .join(Operation, Operation.package_id == RawDataPackage.id)
                .where(Operation.source_location_id == cologne_lta,
                       Operation.operation_type == OperationType.TRANSFER)).all()
        # Archived and verified on both: the bucket itself holds each package, with our
        # checksum as metadata and S3's own per-part CRC32C, and nothing half-uploaded.
        on_s3 = lta(opsdb, "cologne")
        assert sorted(c.package.name for c in on_s3) == sorted(names)
        for item in on_s3:
            assert item.is_verified and item.location.root == f"s3://{bucket}/{PREFIX}"
            key = f"{PREFIX}/{item.relative_path}"
            head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            assert head["Metadata"][CHECKSUM_METADATA] == names[item.package.name]
            assert head["ContentLength"] == item.size and "ChecksumCRC32C" in head
            assert head["ETag"].strip('"').endswith("-2")  # a multipart upload, two parts
            assert object_hash(client, bucket, key) == names[item.package.name]
            assert item.inode is not None and item.mtime_ns is not None  # identity recorded
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        for item in lta(opsdb, "us"):
            assert item.is_verified
            assert hash_file(Path(item.location.root) / item.relative_path)[0] == \
                names[item.package.name]
        # Replicated from the S3 copy: what Cologne archived first went on to Cornell from S3.
        from_s3 = {name for name, transport, status in replications
                   if transport == "s3" and status == OperationStatus.COMPLETED}
        assert from_s3 == {n for n, site in primaries.items() if site == "cologne"} != set()
        # Sources purged, every deletion certificate re-checked the S3 copies just before.
        assert files_under(source) == []
        for name in names:
            assert certificate_problems(opsdb, config, name) == []

        # Staged from S3 to RAMSES (Cologne is its cheapest archive), every file verified.
        request = request_staging(opsdb, location="ramses/processing",
                                  selection=Selection(observation="obs-0"),
                                  expires_in=__import__("datetime").timedelta(days=1))
        staged = stage(opsdb, config, request)
        assert staged.files == 4 and staged_problems(opsdb, request) == []
        with opsdb.session() as session:
            sources = set(session.scalars(select(Operation.source_location_id).where(
                Operation.operation_type == OperationType.STAGING,
                Operation.status == OperationStatus.COMPLETED)))
        assert sources == {cologne_lta}
        staged_root = config.resolve_root("sites/ramses/processing") / request
        assert len([p for p in staged_root.rglob("*") if p.is_file()]) == 4
        assert audit(opsdb, checksums=True, config=config).problems == []
    finally:
        opsdb.dispose()


def archived(config: Config, opsdb: OpsDB, instance: DagsterInstance,  # noqa: F811
             size: int = 200_000) -> dict[str, str]:
    """Two packages archived at both sites; their checksums by name."""
    observe(config, opsdb, size=size)
    assert drive(build_definitions(config), instance).failed == []
    with opsdb.session() as session:
        return {p.name: p.checksum or "" for p in session.scalars(select(RawDataPackage))}


@dataclass(frozen=True)
class Template:
    """A deployment driven once per test process (tests.helpers.driven_template): its
    directory, its instance, its bucket and the bytes it filed (by path under the source)."""

    deploy: Path
    home: Path
    bucket: str
    written: dict[str, bytes]


_templates: dict[float | None, Template] = {}


def s3_template(s3: S3Server, retention_hours: float | None = None) -> Template:  # noqa: F811
    """What `s3_deployment` with one observation of two 200 kB files per module (observe)
    and a drive of it to the end leave (with `retention_hours` for sources and buffers: the
    sources kept), made once per test process: the set-up of most tests here (~8-12 s of
    CPU each)."""
    if retention_hours not in _templates:
        directory = template_directory(f"s3-{retention_hours}")
        bucket = s3.new_bucket()
        config = s3_deployment(directory / "deploy", s3.url, bucket)
        if retention_hours is not None:
            config = with_retention(config, retention_hours)
        opsdb = OpsDB(config.opsdb_url)
        source = observe(config, opsdb, size=200_000)
        written = {str(p.relative_to(source)): p.read_bytes() for p in files_under(source)}
        deploy, home = driven_template(config, opsdb)
        _templates[retention_hours] = Template(deploy, home, bucket, written)
    return _templates[retention_hours]


def copied_bucket(client: Any, old: str, new: str) -> dict[tuple[int, int], int]:
    """Every object of bucket `old` copied into bucket `new` (server-side, metadata kept: a
    package below the part size keeps its ETag); each (identity, mtime_ns) an object had
    there (what OpsDB records of it: ObjectStore.head) -> its copy's mtime_ns."""
    from ccat_dt.objectstore import Head

    def head(bucket: str, key: str) -> Head:
        answer = client.head_object(Bucket=bucket, Key=key)
        return Head(int(answer["ContentLength"]), str(answer["ETag"]),
                    int(answer["LastModified"].timestamp()) * 1_000_000_000, None)

    moved = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=old):
        for item in page.get("Contents", []):
            key = item["Key"]
            client.copy_object(Bucket=new, Key=key, CopySource={"Bucket": old, "Key": key})
            before, after = head(old, key), head(new, key)
            assert before.identity == after.identity, f"{key}: the copy has another ETag"
            moved[(before.identity, before.mtime_ns)] = after.mtime_ns
    return moved


def remtimed(database: Path, moved: dict[tuple[int, int], int]) -> None:
    """Every (inode, mtime_ns) the SQLite `database` records of an object in `moved`
    (copied_bucket) made to name its copy's time."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(database)) as connection, connection:
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        for table in tables:
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            if "inode" in columns and "mtime_ns" in columns:
                connection.executemany(
                    f'UPDATE "{table}" SET mtime_ns = ? WHERE inode = ? AND mtime_ns = ?',
                    [(new, identity, old) for (identity, old), new in moved.items()])


@contextmanager
def s3_copy(template: Template, s3: S3Server, tmp_path: Path  # noqa: F811
            ) -> Iterator[tuple[Config, str, DagsterInstance]]:
    """The test's own copy of `template` (s3_template): its deployment directory (as
    tests.helpers.copied_deployment makes it), a new bucket holding a copy of each of the
    template's objects, and what the copy's OpsDB, configuration and instance record of
    them (the bucket's name, each object's time) made the copy's. The configuration, the
    bucket's name and the instance."""
    bucket = s3.new_bucket()
    objects = copied_bucket(s3.client(), template.bucket, bucket)
    copy = tmp_path / "deploy"
    inodes = copied_tree(template.deploy, copy)
    for database in copy.glob("*.sqlite"):
        relocated(database, str(template.deploy), str(copy))
        relocated(database, template.bucket, bucket)
        reinoded(database, inodes)
        remtimed(database, objects)
    path = copy / CONFIG_NAME
    path.write_text(path.read_text().replace(template.bucket, bucket)
                    .replace(str(template.deploy), str(copy)))
    import shutil
    import tempfile

    # on tmpfs where there is one, as tests.helpers.scratch_instance makes it
    scratch = Path(tempfile.mkdtemp(prefix="ccat-test-instance-", dir=SHM)) \
        if os.access(SHM, os.W_OK) else tmp_path
    try:
        home = new_instance_home(scratch / "dagster_home", template.home)
        for database in home.rglob("*.db"):
            relocated(database, str(template.deploy), str(copy))
            relocated(database, template.bucket, bucket)
        with DagsterInstance.from_config(str(home)) as instance:
            yield load_config(path), bucket, instance
    finally:
        if scratch != tmp_path:
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def archived_copy(s3: S3Server, tmp_path: Path  # noqa: F811
                  ) -> Iterator[tuple[Config, str, DagsterInstance]]:
    """`s3_deployment` with its two packages archived at both sites, the sources purged, as a
    copy of the test process's `s3_template`: the configuration, the bucket, the instance."""
    with s3_copy(s3_template(s3), s3, tmp_path) as made:
        yield made


def checksums_of(opsdb: OpsDB) -> dict[str, str]:
    """The packages' checksums by name (what `archived` returns)."""
    with opsdb.session() as session:
        return {p.name: p.checksum or "" for p in session.scalars(select(RawDataPackage))}


def forge(client: Any, bucket: str, key: str) -> None:
    """Rewrite an object behind the system's back: one bit flipped, same size, and the
    metadata still claiming the old checksum (only a re-read can tell)."""
    answer = client.get_object(Bucket=bucket, Key=key)
    data = bytearray(answer["Body"].read())
    data[len(data) // 3] ^= 0x10
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=answer["Metadata"])


@pytest.mark.slow
def test_object_rewritten_behind_our_back_is_found_by_the_scrub_and_repaired(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    deployment, bucket, instance = archived_copy
    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        checksums = checksums_of(opsdb)
        victim = lta(opsdb, "cologne")[0]
        key = f"{PREFIX}/{victim.relative_path}"
        forge(client, bucket, key)
        assert object_hash(client, bucket, key) != checksums[victim.package.name]

        report = drive(build_definitions(deployment), instance, schedules=True)

        assert [k for k in report.launched if k.startswith("scrub:")]
        assert [k for k in report.launched if k.startswith("repair:")]
        assert report.failed == []
        # The bucket holds the right bytes again, put there from Cornell's disk copy.
        assert object_hash(client, bucket, key) == checksums[victim.package.name]
        copies = {c.id: c for c in lta(opsdb, "cologne", status=None)}
        assert copies[victim.id].status == CopyStatus.DELETED  # superseded by the repair
        [new] = [c for c in copies.values() if c.package_id == victim.package_id
                 and c.status == CopyStatus.PRESENT]
        assert new.is_verified and new.id > victim.id
        with opsdb.session() as session:  # from Cornell's LTA, by way of Cologne's buffer
            scrubbed = min(session.scalars(select(Operation.id).where(
                Operation.copy_id == victim.id, Operation.status == OperationStatus.FAILED)))
            hops = [(session.get_one(DataLocation, o.source_location_id).label,
                     session.get_one(DataLocation, o.destination_location_id).label)
                    for o in session.scalars(select(Operation).where(
                        Operation.package_id == victim.package_id, Operation.id > scrubbed,
                        Operation.status == OperationStatus.COMPLETED,
                        Operation.operation_type.in_([OperationType.TRANSFER,
                                                      OperationType.ARCHIVE]))
                        .order_by(Operation.id))]
        assert hops == [("us/lta", "cologne/buffer"), ("cologne/buffer", "cologne/lta")]
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_audit_finds_a_deleted_object_a_dark_one_and_an_unfinished_upload(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    deployment, bucket, instance = archived_copy
    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        assert audit(opsdb, checksums=True, config=deployment).problems == []
        lost = lta(opsdb, "cologne")[0]
        client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{lost.relative_path}")
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/stray/file.bin", Body=b"x" * 10)
        begun = client.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/stray/big.tar")

        report = audit(opsdb, checksums=True, config=deployment)

        found = {(f.kind, f.path): f for f in report.problems}
        root = f"s3://{bucket}/{PREFIX}"
        assert set(found) == {(LOST, f"{root}/{lost.relative_path}"),
                              (DARK, f"{root}/stray/file.bin"),
                              (PARTIAL, f"{root}/stray/big.tar")}
        assert found[(LOST, f"{root}/{lost.relative_path}")].copy_id == lost.id
        assert begun["UploadId"] in found[(PARTIAL, f"{root}/stray/big.tar")].detail

        # Repair: the lost copy stops counting; an upload abandoned for a day is aborted.
        later = datetime.now(UTC) + timedelta(hours=25)
        repaired = audit(opsdb, config=deployment, repair=True, now=later)
        assert any("aborted abandoned multipart upload of stray/big.tar" in r
                   for r in repaired.repaired)
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert [c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)] == [lost.id]
        assert client.head_object(Bucket=bucket, Key=f"{PREFIX}/stray/file.bin")  # left alone
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_deletion_recheck_looks_at_the_bucket(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    deployment, bucket, instance = archived_copy

    from ccat_dt.opsdb.models import utcnow
    from ccat_dt.recheck import recheck_lta_copies

    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        rewritten, deleted = lta(opsdb, "cologne")
        name = rewritten.package.name

        fresh = recheck_lta_copies(opsdb, deployment, name)  # verified just now: HEAD only
        assert fresh.problems == [] and not fresh.passed[rewritten.id].rehashed
        stale = recheck_lta_copies(opsdb, deployment, name, now=utcnow() + timedelta(hours=25))
        assert stale.problems == [] and stale.passed[rewritten.id].rehashed  # re-read now

        forge(client, bucket, f"{PREFIX}/{rewritten.relative_path}")  # new ETag: re-read
        client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{deleted.relative_path}")
        first = recheck_lta_copies(opsdb, deployment, name)
        second = recheck_lta_copies(opsdb, deployment, deleted.package.name)

        assert rewritten.id not in first.passed and deleted.id not in second.passed
        assert any("checksum mismatch" in p for p in first.problems)
        assert any("missing" in p for p in second.problems)
        assert {c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)} == {rewritten.id,
                                                                           deleted.id}
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_upload_cut_in_the_middle_leaves_nothing_and_the_next_attempt_succeeds(
        tmp_path: Path, s3: S3Server, bucket: str,  # noqa: F811
        instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The link to the store goes down after 4 MB of a 3-part upload (every connection reset,
    new ones refused): the abort cannot reach the store either. The step's own retry, the link
    back, aborts the leftover upload and archives the package."""
    from ccat_dt.objectstore import ObjectStore
    from tests.faults.link import Link

    link = Link(s3.port)
    client = s3.client()  # the test's own view of the bucket, not through the link
    # A part whose connection the cut leaves hanging waits out the read timeout before the
    # step's retry: 120 s by default (this test took 129-137 s in some runs), 10 s here.
    config = s3_deployment(tmp_path / "deploy", f"http://127.0.0.1:{link.port}", bucket,
                           read_timeout_s=10)
    opsdb = OpsDB(config.opsdb_url)
    real_upload = ObjectStore.upload
    at_failure: dict[str, Any] = {}

    def cut_once(self: ObjectStore, source: Path, relative: str, checksum: str,
                 progress: Any = None, **options: Any) -> None:
        if at_failure:
            return real_upload(self, source, relative, checksum, progress, **options)
        sent = [0]

        def counting(count: int) -> None:
            sent[0] += count
            if sent[0] > 4 * MB and not link.down:
                link.cut()

        try:
            real_upload(self, source, relative, checksum, counting, **options)
        except Exception:
            key = self.key(relative)
            at_failure["uploads"] = [u["Key"] for u in client.list_multipart_uploads(
                Bucket=bucket).get("Uploads", [])]
            at_failure["objects"] = [o["Key"] for o in client.list_objects_v2(
                Bucket=bucket, Prefix=key).get("Contents", [])]
            at_failure["verified"] = [c.id for c in lta(opsdb, "cologne") if c.is_verified]
            at_failure["key"] = key
            link.restore()
            raise
        raise AssertionError("the upload was not cut")

    monkeypatch.setattr(ObjectStore, "upload", cut_once)
    try:
        observe(config, opsdb, size=6 * MB, modules=("primecam/f280",))  # ~12 MB: 3 parts

        # in_process=True: the relay that cuts the link is a thread of this process, and what the
        # cut left behind is noted in this process's memory
        report = drive(build_definitions(config), instance, in_process=True)

        assert report.failed == []  # no `ccat-dt retry`: the step's own retry got through
        key = at_failure["key"]
        # Cut: no object, no verified copy, and one upload the abort could not reach.
        assert at_failure["objects"] == [] and at_failure["verified"] == []
        assert at_failure["uploads"] == [key] and link.refused + link.cuts >= 1
        # Then: the leftover aborted, the package archived and re-read from the bucket.
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        [copy_] = lta(opsdb, "cologne")
        assert f"{PREFIX}/{copy_.relative_path}" == key and copy_.is_verified
        assert object_hash(client, bucket, key) == copy_.package.checksum
        with opsdb.session() as session:
            archives = session.execute(select(Operation.status, Operation.error).where(
                Operation.operation_type == OperationType.ARCHIVE,
                Operation.destination_location_id == copy_.location_id)
                .order_by(Operation.id)).all()
        assert [s for s, _ in archives] == [OperationStatus.FAILED, OperationStatus.COMPLETED]
        assert "cannot reach" in (archives[0][1] or "")
    finally:
        link.close()
        opsdb.dispose()


@pytest.mark.slow
def test_an_upload_never_writes_over_an_object_that_appeared_at_its_key(
        tmp_path: Path, s3: S3Server, bucket: str, deployment: Config) -> None:  # noqa: F811
    """An object written at the package's key while the upload ran (here: before it; the
    transport itself does not look first) is left as it is: the upload is conditional
    (If-None-Match: *) and refused, for a person; a repair of a quarantined object replaces.
    (moto applies the condition to PutObject, not to a multipart completion: this package is
    below the part size.)"""
    client = s3.client()
    key = f"{PREFIX}/obs-0/pkg.tar"
    client.put_object(Bucket=bucket, Key=key, Body=b"someone else's object")
    source = tmp_path / "pkg.tar"
    source.write_bytes(os.urandom(200_000))
    checksum = hash_file(source)[0]
    transport = S3Transport(Stores.of(deployment))
    destination = Endpoint(PurePosixPath("obs-0/pkg.tar"), store=f"s3://{bucket}/{PREFIX}")

    with pytest.raises(Occupied, match="does not record there") as refused:
        transport.copy(Endpoint(PurePosixPath(source)), destination, checksum)
    assert not refused.value.retryable
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"someone else's object"

    store = Stores.of(deployment).of_endpoint(destination)
    found = store.head("obs-0/pkg.tar")
    assert found is not None
    quarantined = Identity(found.size, found.identity, found.mtime_ns)  # as a repair found it
    client.put_object(Bucket=bucket, Key=key, Body=b"an object put there since")
    with pytest.raises(Occupied):  # not the object the repair was to replace: kept
        transport.copy(Endpoint(PurePosixPath(source)),
                       replace(destination, replaces=quarantined), checksum)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"an object put there since"

    found = store.head("obs-0/pkg.tar")
    assert found is not None
    repaired = transport.copy(Endpoint(PurePosixPath(source)), replace(
        destination, replaces=Identity(found.size, found.identity, found.mtime_ns)), checksum)
    assert repaired.checksum == checksum == object_hash(client, bucket, key)


@pytest.mark.slow
def test_a_bad_upload_is_removed_but_never_an_object_written_at_its_key_after_it(
        tmp_path: Path, s3: S3Server, bucket: str, deployment: Config,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload whose read-back does not match is removed (nothing records it; the next
    attempt uploads again), but only while the object at the key is still the one read:
    another run's (or a repair's) object written there meanwhile stays, byte for byte."""
    client = s3.client()
    key = f"{PREFIX}/obs-0/pkg.tar"
    source = tmp_path / "pkg.tar"
    source.write_bytes(os.urandom(200_000))
    wrong = "0" * 32  # what the read-back is compared with: never the bytes uploaded
    transport = S3Transport(Stores.of(deployment))
    destination = Endpoint(PurePosixPath("obs-0/pkg.tar"), store=f"s3://{bucket}/{PREFIX}")

    with pytest.raises(TransferError, match="checksum mismatch on re-reading") as bad:
        transport.copy(Endpoint(PurePosixPath(source)), destination, wrong)
    assert bad.value.retryable
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)

    read_back = ObjectStore.read_back

    def then_another_writes(store: ObjectStore, *args: Any, **kwargs: Any
                            ) -> tuple[str, int, str]:
        found = read_back(store, *args, **kwargs)
        client.put_object(Bucket=bucket, Key=key, Body=b"another run's verified object")
        return found

    monkeypatch.setattr(ObjectStore, "read_back", then_another_writes)
    with pytest.raises(TransferError, match="checksum mismatch on re-reading"):
        transport.copy(Endpoint(PurePosixPath(source)), destination, wrong)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"another run's verified object"


def test_wrong_credentials_give_a_clear_error_that_is_not_retried(
        deployment: Config, s3: S3Server, bucket: str,  # noqa: F811
        instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from tests.s3server import SECRET_ENV

    opsdb = OpsDB(deployment.opsdb_url)
    try:
        observe(deployment, opsdb, size=100_000, modules=("primecam/f280",))
        monkeypatch.setenv(SECRET_ENV, "not-the-secret")

        report = drive(build_definitions(deployment), instance)

        assert report.failed  # the archive at Cologne
        with opsdb.session() as session:
            errors = session.scalars(select(Operation.error).join(
                DataLocation, Operation.destination_location_id == DataLocation.id).join(Site)
                .where(Site.short_name == "cologne",
                       Operation.operation_type == OperationType.ARCHIVE)).all()
        assert len(errors) == 1  # one attempt: not retried
        assert "credentials refused" in (errors[0] or "") and "not retried" in (errors[0] or "")
        assert "CCAT_DT_S3_SECRET_ACCESS_KEY" in (errors[0] or "")
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"{PREFIX}/.ccat-dt-location"]  # nothing was written
        skipped = audit(opsdb, config=deployment).findings
        assert any("credentials refused" in f.detail for f in skipped)
    finally:
        opsdb.dispose()


@pytest.mark.parametrize(("location", "message"), [
    ({"storage": "s3"}, "storage: s3 needs an 's3' section"),
    ({"storage": "s3", "s3": {"bucket": "b-1", "secret_access_key_env": "wJalrXUtnFEMI/K7MDENG"}},
     "is not an environment variable name: give the NAME"),
    ({"storage": "s3", "s3": {"bucket": "b-1"}, "root": "sites/x"}, "has no 'root' or 'host'"),
    ({"storage": "s3", "s3": {"bucket": "Not_A_Bucket"}}, "is not an S3 bucket name"),
    ({"storage": "s3", "s3": {"bucket": "b-1", "prefix": "../up"}}, "relative key prefix"),
    ({"storage": "s3", "s3": {"bucket": "b-1", "endpoint_url": "s3.example.org"}},
     "must be http(s)://HOST[:PORT]"),
    ({"storage": "s3", "s3": {"bucket": "b-1", "addressing_style": "sideways"}},
     "addressing_style"),
    ({"storage": "s3", "s3": {"bucket": "b-1", "part_size_mib": 5}, "policies": 10**12},
     "cannot carry a package of policies.package_max_bytes"),
    ({"s3": {"bucket": "b-1"}, "root": "sites/x"}, "an 's3' section needs storage: s3"),
])
def test_bad_s3_configuration_is_refused_with_the_key_named(
        tmp_path: Path, location: dict[str, Any], message: str) -> None:
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    location = dict(location)
    if "policies" in location:  # a package larger than 10,000 parts of this size
        settings["policies"] = {"package_max_bytes": location.pop("policies")}
    cologne = settings["sites"][1]  # type: ignore[index]
    lta_location = {"name": "lta", "type": "long_term_archive", **location}
    cologne["locations"] = [cologne["locations"][0], lta_location]
    path = write_default_config(tmp_path, overrides=settings)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert "sites[1].locations[1]" in str(error.value) or "cologne/lta" in str(error.value)


def test_s3_location_root_is_its_bucket_and_prefix(tmp_path: Path) -> None:
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    cologne = settings["sites"][1]  # type: ignore[index]
    cologne["locations"][1] = {"name": "lta", "type": "long_term_archive", "storage": "s3",
                               "s3": {"bucket": "ccat-lta", "prefix": "/archive/raw/"[1:]}}
    config = load_config(write_default_config(tmp_path, overrides=settings))
    location = config.location("cologne", "lta")
    assert config.location_root(location) == "s3://ccat-lta/archive/raw"
    assert location.s3 is not None and location.s3.access_key_id_env == \
        "CCAT_DT_S3_ACCESS_KEY_ID" and location.s3.checksum_algorithm == "CRC32C"


def test_an_upload_with_the_default_settings_is_sent_in_8_mib_parts(
        s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    """boto3's part size and concurrency (8 MiB, 10 in flight), not 64 MiB and 8: measured
    interleaved against boto3's upload_file on 1 GiB (docs/benchmarks.md section 11), the
    larger parts took longer and more CPU (client and store) for the same bytes. The stored
    object shows the parts it was sent in, and it reads back as the package."""
    bucket = s3.new_bucket()
    settings = S3Config(endpoint_url=s3.url, bucket=bucket, prefix=PREFIX)
    assert (settings.part_size_mib, settings.max_concurrency) == (8, 10)
    source = tmp_path / "pkg.tar"
    data = os.urandom(20 * MIB + 5)
    source.write_bytes(data)
    checksum = xxhash.xxh3_128(data).hexdigest()
    S3Transport(Stores({settings.url: ("cologne/lta", settings)})).copy(
        Endpoint(PurePosixPath(source)), Endpoint(PurePosixPath("p/pkg.tar"), store=settings.url),
        checksum)
    client = s3.client()
    key = f"{PREFIX}/p/pkg.tar"
    assert client.head_object(Bucket=bucket, Key=key, PartNumber=1)["PartsCount"] == 3
    assert xxhash.xxh3_128(client.get_object(Bucket=bucket, Key=key)["Body"].read()
                           ).hexdigest() == checksum


def test_the_default_part_grows_for_a_package_that_needs_more_than_10000_parts(
        tmp_path: Path) -> None:
    """With the smaller default part, a package over 10,000 x 8 MiB (84 GB) is still carried:
    the part grows (a part size set on purpose is checked when the configuration loads)."""
    sparse = tmp_path / "huge.tar"
    with open(sparse, "wb") as handle:
        handle.truncate(100 * 10**9)
    assert upload_part_size(S3Config(bucket="b-1"), sparse) == 10 * MIB  # 100 GB / 10,000
    assert upload_part_size(S3Config(bucket="b-1"), tmp_path / "gone") == 8 * MIB
    assert upload_part_size(S3Config(bucket="b-1", part_size_mib=8), sparse) == 8 * MIB
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    settings["policies"] = {"package_max_bytes": 10**12}
    settings["sites"][1]["locations"][1] = {  # type: ignore[index]
        "name": "lta", "type": "long_term_archive", "storage": "s3", "s3": {"bucket": "b-1"}}
    load_config(write_default_config(tmp_path / "config", overrides=settings))  # accepted


def test_an_endpoint_that_refuses_connections_is_a_transient_fault(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the endpoint (the store down, the link cut before the connection):
    a transient fault, retried and re-attempted, never a permanent one."""
    from ccat_dt.objectstore import Stores
    from ccat_dt.storage import StorageUnavailable
    from ccat_dt.transports.factory import ssh_settings
    from tests.services import free_port

    monkeypatch.setenv("CCAT_DT_S3_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("CCAT_DT_S3_SECRET_ACCESS_KEY", "not-used-nothing-listens")
    config = s3_deployment(tmp_path / "deploy", f"http://127.0.0.1:{free_port()}", "nowhere",
                           connect_timeout_s=1)
    root = next(location.root for site in config.settings.sites for location in site.locations
                if location.storage == "s3")
    with pytest.raises(StorageUnavailable) as refused:
        Stores.of(config).look(root, None, ssh_settings(config), [])
    assert refused.value.transient, refused.value
    assert "cannot reach" in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deleted", "rewritten"])
def test_staging_from_an_s3_copy_gone_or_rewritten_moves_on_to_the_other_archive(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server,  # noqa: F811
        fault: str) -> None:
    """The nearest archive copy a staging reads is an object deleted from its bucket (or
    rewritten with other bytes): the source is re-read on the store, quarantined, and the next
    attempt stages from Cornell's disk copy, with no person; the repair puts the object back.
    Before, a deleted object failed as "missing: ... is not on the storage", not as a source
    missing: the source was never re-read, every attempt read the bucket again (until the
    horizon), the other archive never, and nobody learnt Cologne had lost it."""
    deployment, bucket, instance = archived_copy
    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        written = s3_template(s3).written  # filed, driven to the end: the copy's
        checksums = {c.package.name: c.package.checksum for c in lta(opsdb, "cologne")}
        victim = lta(opsdb, "cologne")[0]
        key = f"{PREFIX}/{victim.relative_path}"
        if fault == "deleted":
            client.delete_object(Bucket=bucket, Key=key)
        else:
            forge(client, bucket, key)
        request = request_staging(opsdb, location="ramses/processing",
                                  selection=Selection(observation="obs-0"),
                                  expires_in=timedelta(days=1))

        with pytest.raises(Exception, match="quarantined"):  # the first attempt, from S3
            stage(opsdb, deployment, request)
        staged = stage(opsdb, deployment, request)  # the re-attempt: from Cornell's disk

        assert staged.files == 4 and staged_problems(opsdb, request) == []
        root = deployment.resolve_root("sites/ramses/processing") / request
        assert {str(p.relative_to(root)).split("/", 1)[1]: p.read_bytes()
                for p in files_under(root)} == written  # the filed bytes, on the disk
        assert [c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)] == [victim.id]
        # The repair puts the package's own bytes back in the bucket.
        assert drive(build_definitions(deployment), instance).failed == []
        assert object_hash(client, bucket, key) == checksums[victim.package.name]
    finally:
        opsdb.dispose()


def test_a_download_of_an_object_gone_from_its_bucket_says_source_missing(
        tmp_path: Path, s3: S3Server, bucket: str, deployment: Config) -> None:  # noqa: F811
    """Every copy read from an object store (a staging, a replication, a repair) downloads it:
    an object not at its key is the source's loss, said as a file gone from a disk is ("source
    missing": the caller re-reads the source and quarantines it), not the destination's fault,
    and nothing is left at the destination. Before: "missing: ... is not on the storage",
    which no caller took for a lost source, and which blamed the destination's location."""
    from ccat_dt.health import location_failure
    from ccat_dt.transports.base import SOURCE_MISSING

    client = s3.client()
    key = f"{PREFIX}/obs-0/pkg.tar"
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)  # the bucket
    transport = S3Transport(Stores.of(deployment))
    target = tmp_path / "disk" / "obs-0" / "pkg.tar"

    with pytest.raises(TransferError) as failed:
        transport.copy(Endpoint(PurePosixPath("obs-0/pkg.tar"), store=f"s3://{bucket}/{PREFIX}"),
                       Endpoint(PurePosixPath(target)), "0" * 32)

    assert str(failed.value).startswith(SOURCE_MISSING) and not failed.value.retryable
    assert not location_failure(failed.value)  # the destination's disk is not blamed
    assert files_under(tmp_path / "disk") == []  # no partial left there


def with_retention(config: Config, hours: float) -> Config:
    """The deployment with another retention for sources and buffers (an operator's edit)."""
    import yaml

    settings = yaml.safe_load(config.path.read_text())
    for site in settings["sites"]:
        for location in site["locations"]:
            if location["type"] in ("source", "buffer"):
                location["retention_hours"] = hours
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deleted", "forged", "resized"])
def test_a_purge_deletes_nothing_relying_on_an_s3_copy_gone_or_changed(
        s3: S3Server, tmp_path: Path, fault: str) -> None:  # noqa: F811
    """During the sources' retention Cologne's object is deleted, rewritten with other bytes of
    the same size and its metadata still claiming the package's checksum (only the ETag
    tells), or replaced by other bytes of another size: the purge's look at the bucket, just
    before it deletes, refuses to rely on it; the sources stay (read on their disk) until the
    repair has put the package's bytes back in the bucket, then they go."""

    with s3_copy(s3_template(s3, retention_hours=1000), s3, tmp_path) as (config, bucket,
                                                                            instance):
        purge_while_the_object_is(fault, config, bucket, instance, s3)


def purge_while_the_object_is(fault: str, config: Config, bucket: str,
                              instance: DagsterInstance, s3: S3Server) -> None:  # noqa: F811
    from ccat_dt.reaper import purge_package

    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        # observed, filed and driven to the end with retention_hours 1000: the copy's
        source = config.resolve_root("sites/ccat/instruments")
        kept = files_under(source)
        assert len(kept) == 4  # retention keeps them
        victim = lta(opsdb, "cologne")[0]
        name, checksum = victim.package.name, victim.package.checksum
        key = f"{PREFIX}/{victim.relative_path}"
        if fault == "deleted":
            client.delete_object(Bucket=bucket, Key=key)
        elif fault == "forged":
            forge(client, bucket, key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=b"not the package",
                              Metadata={CHECKSUM_METADATA: checksum or ""})
        config = with_retention(config, 0)

        report = purge_package(opsdb, config, name)

        assert report.deleted == 0
        assert files_under(source) == kept  # the storage: every source file still there
        assert [c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)] == [victim.id]

        assert drive(build_definitions(config), instance).failed == []
        assert object_hash(client, bucket, key) == checksum  # repaired in the bucket
        assert files_under(source) == []  # then, under a fresh look, the sources went
        assert certificate_problems(opsdb, config, name) == []
    finally:
        opsdb.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deleted", "forged"])
def test_filed_bytes_safe_run_alone_looks_at_the_bucket(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server,  # noqa: F811
        fault: str) -> None:
    """`filed_bytes_safe` (also executed alone from the UI) stands on the LTA copies of a
    purged package as they are in the bucket, not on OpsDB's last verification: an object
    deleted, or rewritten under its old metadata, is quarantined and the package told at
    risk; the repair puts the package's bytes back in the bucket."""
    deployment, bucket, instance = archived_copy
    from ccat_dt.loss import Health
    from ccat_dt.recheck import assess_on_storage

    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        checksums = checksums_of(opsdb)  # sources purged
        victim = lta(opsdb, "cologne")[0]
        name = victim.package.name
        key = f"{PREFIX}/{victim.relative_path}"
        assert assess_on_storage(opsdb, deployment, name).health == Health.SAFE
        if fault == "deleted":
            client.delete_object(Bucket=bucket, Key=key)
        else:
            forge(client, bucket, key)

        found = assess_on_storage(opsdb, deployment, name)

        assert found.health == Health.AT_RISK and "cologne/lta" in found.reason
        assert [c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)] == [victim.id]
        assert drive(build_definitions(deployment), instance).failed == []
        assert object_hash(client, bucket, key) == checksums[name]
        assert assess_on_storage(opsdb, deployment, name).health == Health.SAFE
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_a_repair_read_from_an_s3_object_gone_tells_the_loss_and_blames_no_disk(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    """Cornell's disk copy of a purged package found gone; its repair reads Cologne's object,
    which is gone from the bucket too: the object is re-read on the store and quarantined,
    the package is LOST (a person is told), and Cornell's archive disk, which only received,
    is not marked failing. Before, the download said "missing: ... is not on the storage":
    the object was never re-read (OpsDB went on counting it verified, the package
    TRANSFERRING, nobody told of the loss) and the repair was tried again until the
    horizon."""
    deployment, bucket, instance = archived_copy
    from ccat_dt.replicas import reread

    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        victim = lta(opsdb, "cologne")[0]
        [disk] = [c for c in lta(opsdb, "us") if c.package_id == victim.package_id]
        tar = Path(disk.location.root) / disk.relative_path
        tar.unlink()
        client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{victim.relative_path}")
        assert not reread(opsdb, deployment, disk.id).passed  # found gone: quarantined

        drive(build_definitions(deployment), instance, wait_s=5)

        assert [p for p in files_under(tar.parent)  # nothing of it half-made there
                if victim.package.name in p.name] == []
        assert "Contents" not in client.list_objects_v2(
            Bucket=bucket, Prefix=f"{PREFIX}/{victim.relative_path}")
        with opsdb.session() as session:
            package = session.get_one(RawDataPackage, victim.package_id)
            assert package.state == PackageState.LOST
            us_lta = session.get_one(DataLocation, disk.location_id)
            assert us_lta.failing_since is None, us_lta.unhealthy_reason
        assert [c.id for c in lta(opsdb, "cologne", CopyStatus.CORRUPT)] == [victim.id]
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_an_object_the_store_refuses_to_read_is_told_as_a_permission_not_the_store(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    """One archived object refused to ccat-dt's key (a bucket policy denying GetObject on it;
    an object ACL or a KMS key it may not use does the same) while the key reads the bucket:
    its re-read (its check, the scrub) says so, naming the object and the key's variable, the
    copy is not judged (PRESENT, nothing written over it, relied on for no deletion) and the
    location is not marked failing, as for a file refused on a disk. Before: "credentials
    refused ... not retried" and the whole S3 archive marked failing (passed over, past the
    failover horizon re-routed) for one object's permission."""
    deployment, bucket, instance = archived_copy
    import json

    from ccat_dt.recheck import recheck_lta_copies
    from ccat_dt.replicas import reread

    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        checksums = checksums_of(opsdb)
        victim = lta(opsdb, "cologne")[0]
        key = f"{PREFIX}/{victim.relative_path}"
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/{key}"}]}))

        with pytest.raises(TransferError, match="permission denied") as refused:
            reread(opsdb, deployment, victim.id)
        looked = recheck_lta_copies(opsdb, deployment, victim.package.name,
                                    now=datetime.now(UTC) + timedelta(hours=25))

        assert not refused.value.retryable and key in str(refused.value)
        assert victim.id not in looked.passed and victim.id in looked.unavailable
        with opsdb.session() as session:
            location = session.get_one(DataLocation, victim.location_id)
            assert location.failing_since is None, location.unhealthy_reason
        assert [c.id for c in lta(opsdb, "cologne")][0] == victim.id  # PRESENT, not judged
        client.delete_bucket_policy(Bucket=bucket)  # granted again: the same bytes, read fine
        assert object_hash(client, bucket, key) == checksums[victim.package.name]
        assert reread(opsdb, deployment, victim.id).passed
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_staging_from_an_s3_object_refused_to_the_key_reads_the_other_archive(
        archived_copy: tuple[Config, str, DagsterInstance], s3: S3Server  # noqa: F811
        ) -> None:
    """The nearest archive copy a staging reads is an object the store refuses to ccat-dt's key
    (a bucket policy denying GetObject on it) while the key reads the bucket: as a source file
    refused on a disk, the attempt says "source unreadable ... permission denied" naming the
    key's variable, the copy is not judged (PRESENT, the object left as it is), no location
    is marked failing, and the re-attempt stages from Cornell's disk copy. Before:
    "credentials refused ... not retried" and every attempt read the refused object again."""
    deployment, bucket, instance = archived_copy
    import json

    from ccat_dt.transports.base import SOURCE_UNREADABLE

    opsdb = OpsDB(deployment.opsdb_url)
    client = s3.client()
    try:
        written = s3_template(s3).written  # filed, driven to the end: the copy's
        victim = lta(opsdb, "cologne")[0]
        key = f"{PREFIX}/{victim.relative_path}"
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/{key}"}]}))
        request = request_staging(opsdb, location="ramses/processing",
                                  selection=Selection(observation="obs-0"),
                                  expires_in=timedelta(days=1))

        with pytest.raises(TransferError) as refused:  # the first attempt, from S3
            stage(opsdb, deployment, request)
        staged = stage(opsdb, deployment, request)  # the re-attempt: from Cornell's disk

        said = str(refused.value)
        assert SOURCE_UNREADABLE in said and "permission denied" in said and key in said
        assert "$CCAT_DT_S3_ACCESS_KEY_ID" in said and not refused.value.retryable
        assert staged.files == 4 and staged_problems(opsdb, request) == []
        root = deployment.resolve_root("sites/ramses/processing") / request
        assert {str(p.relative_to(root)).split("/", 1)[1]: p.read_bytes()
                for p in files_under(root)} == written  # the filed bytes, on the disk
        assert victim.id in [c.id for c in lta(opsdb, "cologne")]  # PRESENT: not judged
        with opsdb.session() as session:
            assert all(location.failing_since is None for location in session.scalars(
                select(DataLocation)))
        client.delete_bucket_policy(Bucket=bucket)
        assert object_hash(client, bucket, key) == victim.package.checksum  # left as it was
    finally:
        opsdb.dispose()


@pytest.mark.slow
def test_staging_while_the_s3_archive_is_down_reads_the_other_archive_then_s3_again(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """Cologne's S3 endpoint, the nearest archive to the processing area, refuses every
    connection (the store down, its link cut) when a staging comes: the staging reads
    Cornell's disk copy at once, in the same attempt, with no person; Cologne's copies are not
    judged (PRESENT, their objects untouched); Cologne's LTA is marked down as a source, naming
    the staging; once the endpoint answers and the hold ended, the next staging reads Cologne
    again (the cheapest route) and the mark is cleared. Before: the staging failed on the
    endpoint, nothing was marked, and every re-attempt read the endpoint again until it came
    back (or the horizon), the other archive never."""
    from tests.faults.link import Link

    link = Link(s3.port)
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", f"http://127.0.0.1:{link.port}", bucket,
                           {"location_unhealthy_minutes": 0.05}, connect_timeout_s=1)
    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        source = observe(config, opsdb, size=200_000)
        written = {str(p.relative_to(source)): p.read_bytes() for p in files_under(source)}
        assert drive(build_definitions(config), instance).failed == []
        before = {c.id: object_hash(client, bucket, f"{PREFIX}/{c.relative_path}")
                  for c in lta(opsdb, "cologne")}
        assert len(before) == 2

        link.cut()  # every connection to the store refused from here on
        request = request_staging(opsdb, location="ramses/processing",
                                  selection=Selection(observation="obs-0"),
                                  expires_in=timedelta(days=1))
        staged = stage(opsdb, config, request)  # one attempt: from Cornell's disk

        assert staged.files == 4 and staged_problems(opsdb, request) == []
        root = config.resolve_root("sites/ramses/processing") / request
        assert {str(p.relative_to(root)).split("/", 1)[1]: p.read_bytes()
                for p in files_under(root)} == written  # the filed bytes, on the disk
        assert sorted(c.id for c in lta(opsdb, "cologne")) == sorted(before)  # not judged
        from ccat_dt.health import SOURCE_DOWN
        with opsdb.session() as session:
            cologne = session.scalars(select(DataLocation).join(Site).where(
                Site.short_name == "cologne",
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)).one()
            assert cologne.failing_since is not None
            assert SOURCE_DOWN in (cologne.unhealthy_reason or "")
            assert request in (cologne.unhealthy_reason or "")
            sources = {s.short_name for s in session.scalars(
                select(Site).join(DataLocation).join(
                    Operation, Operation.source_location_id == DataLocation.id).where(
                    Operation.operation_type == OperationType.STAGING,
                    Operation.status == OperationStatus.COMPLETED))}
            assert sources == {"us"}
            cologne_id = cologne.id

        link.restore()  # the store answers again; the hold (3 s here) ends
        import time
        time.sleep(4)
        again = request_staging(opsdb, location="ramses/processing",
                                selection=Selection(observation="obs-0"),
                                expires_in=timedelta(days=1))
        assert stage(opsdb, config, again).files == 4 and staged_problems(opsdb, again) == []
        assert {str(p.relative_to(root.parent / again)).split("/", 1)[1]: p.read_bytes()
                for p in files_under(root.parent / again)} == written
        with opsdb.session() as session:
            last = session.scalars(select(Operation).where(
                Operation.operation_type == OperationType.STAGING,
                Operation.status == OperationStatus.COMPLETED)
                .order_by(Operation.id.desc())).first()
            assert last is not None and last.source_location_id == cologne_id
            assert session.get_one(DataLocation, cologne_id).failing_since is None
        assert {c.id: object_hash(client, bucket, f"{PREFIX}/{c.relative_path}")
                for c in lta(opsdb, "cologne")} == before  # the bucket as it was
    finally:
        link.close()
        opsdb.dispose()


@pytest.mark.slow
def test_a_repair_read_from_an_s3_archive_that_is_down_blames_the_store_not_the_disk(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """Cornell's disk copy of a purged package found gone; its repair reads Cologne's object
    while the S3 endpoint refuses every connection: Cologne's LTA is marked down as a source
    (the store's fault), Cornell's locations, which only receive, are not marked failing,
    nothing is left half-made there and Cologne's copy is not judged. Once the endpoint
    answers, the re-attempt repairs the copy with no person and Cologne's mark is cleared.
    Before: the unreachable source marked Cornell's buffer (the repair's way to its LTA)
    failing: new work passed it over, and past `site_failover_hours` Cornell counted as
    down and new packages were re-routed away from it."""
    from ccat_dt.health import SOURCE_DOWN
    from ccat_dt.replicas import reread
    from tests.faults.link import Link

    link = Link(s3.port)
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", f"http://127.0.0.1:{link.port}", bucket,
                           {"retry_backoff_first_s": 0.5}, connect_timeout_s=1)
    opsdb = OpsDB(config.opsdb_url)
    try:
        checksums = archived(config, opsdb, instance)  # sources purged
        victim = lta(opsdb, "cologne")[0]
        [disk] = [c for c in lta(opsdb, "us") if c.package_id == victim.package_id]
        tar = Path(disk.location.root) / disk.relative_path
        tar.unlink()
        assert not reread(opsdb, config, disk.id).passed  # found gone: quarantined

        link.cut()
        drive(build_definitions(config), instance, wait_s=3)

        assert not tar.exists() and [p for p in files_under(tar.parent)
                                     if victim.package.name in p.name] == []
        with opsdb.session() as session:
            assert [(loc.label, loc.unhealthy_reason) for loc in session.scalars(
                select(DataLocation).join(Site).where(Site.short_name == "us",
                                                      DataLocation.failing_since.is_not(None)))
                    ] == []  # neither Cornell's buffer (the repair's way) nor its LTA
            cologne = session.get_one(DataLocation, victim.location_id)
            assert SOURCE_DOWN in (cologne.unhealthy_reason or "")
        assert victim.id in [c.id for c in lta(opsdb, "cologne")]  # PRESENT: not judged

        link.restore()
        assert drive(build_definitions(config), instance, wait_s=60).failed == []

        assert hash_file(tar)[0] == checksums[victim.package.name]  # repaired, on the disk
        with opsdb.session() as session:
            assert session.get_one(DataLocation, victim.location_id).failing_since is None
    finally:
        link.close()
        opsdb.dispose()
