"""S3 endpoint faults that leave the store and the client disagreeing, checked on the bucket:
an upload the store committed whose answer was lost is our copy, not a foreign object; an
emptied bucket is told to a person."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus, Operation, OperationType, RawDataPackage, utcnow
from ccat_dt.storage import files_under
from tests.s3faults import LostAnswerEndpoint
from tests.s3server import S3Server, s3, s3server  # noqa: F401 - fixtures
from tests.test_s3 import lta, object_hash, observe, s3_deployment


def errors(opsdb: OpsDB, kind: OperationType) -> list[str]:
    with opsdb.session() as session:
        return [e or "" for e in session.scalars(select(Operation.error).where(
            Operation.operation_type == kind).order_by(Operation.id))]


def problems(opsdb: OpsDB, config: Any) -> list[str]:
    with opsdb.session() as session:
        return [f"{p.key}: {p.subject}" for p in current_problems(session, config, utcnow())]


def test_put_committed_but_its_answer_lost_is_not_a_foreign_file(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """The store writes the package object, then the connection drops before it answers
    (endpoint killed/restarted right after committing). botocore resends the PutObject with
    If-None-Match: * and gets 412: the object there is our own bytes. It is recognised as the
    package's copy (re-read), archived in this drive, nobody told about a foreign file."""
    bucket = s3.new_bucket()
    proxy = LostAnswerEndpoint(s3.port)
    config = s3_deployment(tmp_path / "deploy", proxy.url, bucket)
    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        observe(config, opsdb, size=200_000, modules=("primecam/f280",))
        proxy.lose_answer_after = 150_000  # the package's PUT (~400 kB), not the small calls

        report = drive(build_definitions(config), instance, in_process=True)

        assert proxy.lost == 1
        with opsdb.session() as session:
            [package] = session.scalars(select(RawDataPackage)).all()
            checksum = package.checksum
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
        [key] = [k for k in keys if k.endswith(".tar")]
        assert object_hash(client, bucket, key) == checksum  # the store holds our package
        archive_errors = errors(opsdb, OperationType.ARCHIVE)
        told = problems(opsdb, config)
        assert not any("does not record there" in e for e in archive_errors), archive_errors
        assert not any(p.startswith("foreign") for p in told), told
        assert report.failed == []
        assert [c.is_verified for c in lta(opsdb, "cologne")] == [True]
    finally:
        proxy.close()
        opsdb.dispose()


def test_an_emptied_bucket_is_told_to_a_person(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """After the package is archived at both sites and the observatory copies purged, the
    bucket is emptied (marker included: a lifecycle rule, a wrong `aws s3 rm --recursive`, a
    store restarted without persistence). The S3 copy is gone; OpsDB still counts it as a
    verified copy; the scrub fails every time (marker missing) and only marks the location
    unhealthy. A person is told once that lasts past the failover horizon (before, nobody
    ever was, and the package was not even 'at risk')."""
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", s3.url, bucket)
    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        source = observe(config, opsdb, size=200_000, modules=("primecam/f280",))
        assert drive(build_definitions(config), instance, in_process=True).failed == []
        assert files_under(source) == []  # the observatory copies are gone
        for item in client.list_objects_v2(Bucket=bucket)["Contents"]:
            client.delete_object(Bucket=bucket, Key=item["Key"])

        drive(build_definitions(config), instance, in_process=True, schedules=True)  # scrub

        assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # the store: nothing
        assert [c.status for c in lta(opsdb, "cologne", None)] == [CopyStatus.PRESENT]  # OpsDB
        horizon = config.settings.policies.site_failover_hours
        with opsdb.session() as session:
            told = [f"{p.key}: {p.subject} {p.detail}" for p in current_problems(
                session, config, utcnow() + timedelta(hours=horizon + 1))]
        assert any("cologne/lta" in p for p in told), told
    finally:
        opsdb.dispose()


def test_a_multipart_upload_created_twice_leaves_no_unfinished_upload(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """The store created the multipart upload, then its answer was lost: botocore asks again
    and uploads into the second. The first holds no parts but stays an unfinished upload of
    the key, invisible in a listing of objects (a leftover the bucket keeps, and bills, until
    aborted). Once the package is archived, the bucket holds no unfinished upload."""
    bucket = s3.new_bucket()
    proxy = LostAnswerEndpoint(s3.port)
    config = s3_deployment(tmp_path / "deploy", proxy.url, bucket)
    opsdb = OpsDB(config.opsdb_url)
    client = s3.client()
    try:
        observe(config, opsdb, size=3_000_000, modules=("primecam/f280",))  # two 5 MiB parts
        proxy.lose_answer_to = b"?uploads HTTP/"  # POST /bucket/key?uploads: its creation

        report = drive(build_definitions(config), instance, in_process=True)

        assert proxy.lost == 1
        assert report.failed == []
        assert [c.is_verified for c in lta(opsdb, "cologne")] == [True]
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        proxy.close()
        opsdb.dispose()
