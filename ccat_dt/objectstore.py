"""S3-compatible object storage seen as a location, for everything that reads or writes LTA
copies there (the S3 transport, the re-read, the deletion-time re-check, the audit).

A location with `storage: s3` is a bucket and key prefix; OpsDB records its root as
`s3://bucket/prefix` and a copy's relative path is the key below the prefix. As on disk, the
root carries the marker `ccat-dt init` writes (an object `<prefix>/.ccat-dt-location`), so a
wrong bucket or prefix is refused rather than seen as "everything lost".

Failures are StorageUnavailable: `transient` when the endpoint could not be reached or answered
that it is busy (a retry helps), permanent when credentials are missing or refused or the bucket
does not exist (a person must act; retrying cannot help).

boto3 is imported here only, and only when an object store is used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from ccat_dt.checksums import CHUNK_SIZE, new_hasher
from ccat_dt.config import MIB, S3_MAX_PARTS, Config, S3Config
from ccat_dt.marker import MARKER, another_location, label_in, marker_text
from ccat_dt.storage import (
    Entry,
    Listing,
    Seen,
    StorageUnavailable,
    Wanted,
    listing,
    look,
)
from ccat_dt.transports.base import (
    SOURCE_UNREADABLE,
    UNREADABLE,
    Endpoint,
    Identity,
    SshSettings,
    denied_source,
)

SCHEME = "s3://"
CHECKSUM_METADATA = "xxh3-128"  # our checksum of the whole object, as x-amz-meta-xxh3-128
# Refused credentials or permissions: retrying cannot help.
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
            "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
            "AllAccessDisabled", "InvalidClientTokenId", "UnrecognizedClientException",
            "AccountProblem", "403"}
_BUSY = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling",
         "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
# One object refused to a key the store accepts (a policy, an ACL, a KMS key), not the key.
_OBJECT_DENIED = {"AccessDenied", "403", "Forbidden"}


class SourceReadFailed(OSError):
    """The file an upload sends could not be read: its disk failed the read (a bad sector), or
    its open was refused (errno EACCES). The source's fault, not the store's; the upload was
    aborted."""


class _NotedReads:
    """A file opened for an upload whose failed read is noted in `reads.failed`: the error
    reaches the uploader through s3transfer and botocore as if the link to the store had
    failed (an OSError, perhaps wrapped)."""

    def __init__(self, stream: BinaryIO, reads: Any) -> None:
        self._stream, self._reads = stream, reads

    def read(self, *args: Any) -> bytes:
        try:
            return self._stream.read(*args)
        except OSError as exc:
            self._reads.failed = self._reads.failed or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@lru_cache(maxsize=1)
def _noting_osutil() -> type:
    """s3transfer's file access (OSUtils) opening the uploaded file as _NotedReads."""
    from s3transfer.utils import OSUtils

    class NotingOSUtils(OSUtils):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.failed: OSError | None = None

        def open(self, filename: str, mode: str) -> Any:
            try:
                opened = super().open(filename, mode)
            except OSError as exc:  # refused (a file of another user, mode 0600), say
                self.failed = self.failed or exc
                raise
            return _NotedReads(opened, self)

    return NotingOSUtils


def is_object_root(root: str) -> bool:
    return root.startswith(SCHEME)


@dataclass(frozen=True)
class Head:
    """An object as its store describes it, without reading it."""

    size: int
    etag: str
    mtime_ns: int
    stored_checksum: str | None

    @property
    def identity(self) -> int:
        """The ETag as a number that fits OpsDB's inode column: a rewritten object gets
        another ETag, as a replaced file gets another inode."""
        return int(hashlib.sha256(self.etag.encode()).hexdigest()[:15], 16)


def _cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's wrappers (S3UploadFailedError keeps it as cause)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ClientError, BotoCoreError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    cause = _cause(exc)
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""


def upload_part_size(settings: S3Config, source: Path) -> int:
    """The part size of an upload of `source`: the configured one, or, left at its default
    and too small for this file, the smallest whole number of MiB that carries it in
    S3_MAX_PARTS parts (a part size set on purpose is checked against
    policies.package_max_bytes when the configuration is loaded instead)."""
    part = settings.part_size_mib * MIB
    if "part_size_mib" in settings.model_fields_set:
        return part
    try:
        size = source.stat().st_size
    except OSError:
        return part  # the upload says why it cannot read it
    return max(part, -(-size // (S3_MAX_PARTS * MIB)) * MIB)


class ObjectStore:
    """One S3 location: its bucket and prefix, reached with its own credentials."""

    def __init__(self, label: str, settings: S3Config) -> None:
        self.label, self.settings = label, settings
        self.root = settings.url

    # -- connection ---------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        s = self.settings
        missing = [name for name in (s.access_key_id_env, s.secret_access_key_env)
                   if not os.environ.get(name)]
        if missing:
            raise StorageUnavailable(
                f"{self.label} ({self.root}): no credentials: environment variable(s) "
                f"{', '.join(missing)} not set (s3.access_key_id_env / "
                "s3.secret_access_key_env name them)")
        token = os.environ.get(s.session_token_env) if s.session_token_env else None
        return _client(s, os.environ[s.access_key_id_env], os.environ[s.secret_access_key_env],
                       token)

    def key(self, relative_path: str) -> str:
        parts = relative_path.split("/")
        if not relative_path or relative_path.startswith("/") or any(
                p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a plain relative path: {relative_path!r}")
        return f"{self.settings.prefix}/{relative_path}" if self.settings.prefix \
            else relative_path

    def problem(self, exc: BaseException, what: str) -> StorageUnavailable:
        """A boto3/botocore failure as StorageUnavailable, transient or not (module doc)."""
        if isinstance(exc, StorageUnavailable):
            return exc
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
        )

        cause = _cause(exc)
        where = f"{self.label} ({self.root}): {what}"
        if isinstance(cause, ClientError):
            code = error_code(cause)
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in _REFUSED or status in (401, 403):
                s = self.settings
                why = code if code and not code.isdigit() else f"HTTP {status}"
                return StorageUnavailable(
                    f"{where}: credentials refused ({why}): check the key in "
                    f"${s.access_key_id_env} and ${s.secret_access_key_env} and its permissions "
                    "on the bucket; not retried", transient=False)
            if code == "NoSuchBucket":
                return StorageUnavailable(f"{where}: bucket {self.settings.bucket} does not "
                                          "exist (create it, or fix s3.bucket)", transient=False)
            busy = code in _BUSY or status >= 500
            return StorageUnavailable(f"{where}: {code or status}: {cause}", transient=busy)
        if isinstance(cause, NoCredentialsError):
            return StorageUnavailable(f"{where}: {cause}", transient=False)
        if isinstance(cause, (HTTPClientError, ConnectionError, IncompleteReadError, OSError)):
            # connection refused, reset, timed out, closed mid-stream: the link, not the data
            endpoint = self.settings.endpoint_url or "AWS S3"
            return StorageUnavailable(f"{where}: cannot reach {endpoint}: {cause}",
                                      transient=True)
        return StorageUnavailable(f"{where}: {exc.__class__.__name__}: {exc}", transient=False)

    # -- the location root --------------------------------------------------------------------

    def check_marker(self) -> None:
        """Raise StorageUnavailable unless the bucket holds this location's marker (one
        naming another location: another location's bucket or prefix)."""
        if wrong := another_location(self.root, self.label, self.marked_label(),
                                     "another location's bucket and prefix (swapped or "
                                     "mistyped in the configuration?)"):
            raise StorageUnavailable(wrong, transient=False)

    def marked_label(self) -> str | None:
        """The location the marker names (None: none named); StorageUnavailable when there
        is no marker or it cannot be read."""
        try:
            answer = self.client.get_object(Bucket=self.settings.bucket, Key=self.key(MARKER))
            return label_in(answer["Body"].read().decode("utf-8", errors="replace"))
        except Exception as exc:  # noqa: BLE001 - classified below
            if error_code(exc) in _MISSING:
                raise StorageUnavailable(
                    f"location root {self.root} has no {MARKER} marker: not the bucket and "
                    "prefix `ccat-dt init` prepared; run `ccat-dt init` once they are right"
                ) from None
            raise self.problem(exc, "looking for the location marker") from exc

    def mark(self) -> str | None:
        """Write the marker naming this location (set-up, `ccat-dt init`, which refuses a
        bucket and prefix marked for another configured location before it gets here);
        returns a problem or None."""
        try:
            self.client.put_object(Bucket=self.settings.bucket, Key=self.key(MARKER),
                                   Body=marker_text(self.label).encode())
        except Exception as exc:  # noqa: BLE001
            return f"cannot prepare location root {self.root}: {self.problem(exc, 'marking')}"
        return None

    # -- looking ------------------------------------------------------------------------------

    def head(self, relative_path: str) -> Head | None:
        """The object's size, ETag, time and stored checksum; None if there is none."""
        try:
            answer = self.client.head_object(Bucket=self.settings.bucket,
                                             Key=self.key(relative_path))
        except Exception as exc:  # noqa: BLE001
            if error_code(exc) in _MISSING:
                return None
            raise self.problem(exc, f"looking at {relative_path}") from exc
        modified: datetime = answer["LastModified"]
        return Head(int(answer["ContentLength"]), str(answer.get("ETag", "")),
                    int(modified.timestamp()) * 1_000_000_000,
                    answer.get("Metadata", {}).get(CHECKSUM_METADATA))

    def read_hash(self, relative_path: str, etag: str | None = None) -> tuple[str, int]:
        """xxh3-128 and size of the object, streamed (never whole in memory). With `etag`, a
        rewrite during the read is refused by the store (412) instead of hashed half-and-half."""
        checksum, size, _ = self.read_back(relative_path, etag)
        return checksum, size

    def read_back(self, relative_path: str, etag: str | None = None) -> tuple[str, int, str]:
        """read_hash, and the ETag of the very object read: what `remove_unverified` may
        remove if it is bad, and nothing written at the key after it."""
        extra = {"IfMatch": etag} if etag else {}
        try:
            answer = self.client.get_object(Bucket=self.settings.bucket,
                                            Key=self.key(relative_path), **extra)
            hasher, size = new_hasher(), 0
            body = answer["Body"]
            while chunk := body.read(CHUNK_SIZE):
                hasher.update(chunk)
                size += len(chunk)
        except Exception as exc:  # noqa: BLE001
            code = error_code(exc)
            if code in _MISSING:
                raise FileNotFoundError(f"missing: {relative_path} is not on the storage") \
                    from None
            if code == "PreconditionFailed":
                raise FileNotFoundError(f"{relative_path} changed while it was read") from None
            raise self.problem(exc, f"reading {relative_path}") from exc
        return hasher.hexdigest(), size, str(answer.get("ETag") or "")

    def look(self, wanted: Sequence[Wanted]) -> list[Seen]:
        """storage.look for objects: HEAD each (and when asked, re-read and hash it)."""
        self.check_marker()
        return [self._look_one(item) for item in wanted]

    def _look_one(self, wanted: Wanted) -> Seen:
        rel = wanted.relative_path
        try:
            head = self.head(rel)
            if head is None:
                return Seen(rel, f"missing: {rel} is not on the storage")
            checksum = None
            if wanted.rehash:
                try:
                    checksum, size = self.read_hash(rel, head.etag or None)
                except FileNotFoundError as exc:
                    return Seen(rel, str(exc))
                if size != head.size:
                    return Seen(rel, f"{rel} changed while it was read")
        except StorageUnavailable as exc:
            code = error_code(exc.__cause__) if exc.__cause__ is not None else ""
            if code not in _OBJECT_DENIED:
                raise
            # The marker was read with this key just now (look): the key works here, and this
            # one object is refused to it (a bucket policy, an object ACL, a KMS key). As a
            # file refused on a disk: told as a permission, the copy not judged, the store not
            # marked failing. Before: "credentials refused" and the whole archive marked.
            return Seen(rel, f"{UNREADABLE} {rel}: " + self._denied(rel, code, what=None))
        return Seen(rel, None, head.size, head.identity, head.mtime_ns, checksum,
                    head.stored_checksum)

    def _denied(self, relative_path: str, code: str, *, what: str | None) -> str:
        """What a read of one object refused to a key the store accepts says (denied_source)."""
        return denied_source(
            f"{self.root}/{relative_path}", f"the store refused it ({code}) while it answers "
            "this key for the location's marker: a bucket policy, an object ACL or a KMS key",
            f"the key in ${self.settings.access_key_id_env}", what=what)

    def listing(self) -> Listing:
        """Every object below the prefix (but the marker), and unfinished multipart uploads."""
        self.check_marker()
        prefix = f"{self.settings.prefix}/" if self.settings.prefix else ""
        found = Listing()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix):]
                    if relative != MARKER:
                        found.entries.append(Entry(relative, False, int(item["Size"]),
                                                   item["LastModified"].timestamp()))
            for key, upload_id, initiated in self._uploads(prefix):
                found.uploads.append(Entry(key[len(prefix):], False, 0, initiated.timestamp(),
                                           target=upload_id))
        except StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.problem(exc, "listing") from exc
        return found

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.settings.bucket, Prefix=prefix)
        for page in pages:
            for upload in page.get("Uploads", []):
                yield upload["Key"], upload["UploadId"], upload["Initiated"]

    # -- writing ------------------------------------------------------------------------------

    def abort_uploads(self, relative_path: str, *, upload_id: str | None = None) -> int:
        """Abort the unfinished multipart uploads of one key (or one of them): what a killed
        or cut-off attempt left behind. Returns how many were aborted."""
        key = self.key(relative_path)
        aborted = 0
        try:
            for found, found_id, _ in list(self._uploads(key)):
                if found == key and upload_id in (None, found_id):
                    self.client.abort_multipart_upload(Bucket=self.settings.bucket, Key=key,
                                                       UploadId=found_id)
                    aborted += 1
        except Exception as exc:  # noqa: BLE001
            raise self.problem(exc, f"aborting unfinished uploads of {relative_path}") from exc
        return aborted

    def upload(self, source: Path, relative_path: str, checksum: str,
               progress: Callable[[int], None] | None = None, *,
               replaces: Identity | None = None) -> None:
        """Multipart upload in parallel parts, each part checked by the store with the
        configured checksum, our checksum of the whole stored as metadata. Before, and after
        it, whatever uploads of the key are unfinished are aborted (an earlier, killed
        attempt's; an upload the store created twice because its first answer was lost, the
        client then uploading into the second), so no parts linger.

        A failed read of `source` (its disk failed it) raises SourceReadFailed.

        The object is written only if none is at the key when it completes (a conditional
        write, If-None-Match: *), or, for a repair, only over the quarantined object `replaces`
        names, found there just before (If-Match: its ETag): any other object there is left as
        it is (FileExistsError). A store that ignores the condition writes anyway; the look
        before the transfer is then the only guard."""
        from boto3.s3.transfer import S3Transfer, TransferConfig

        s = self.settings
        part = upload_part_size(s, source)
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                  max_concurrency=s.max_concurrency, use_threads=True,
                                  preferred_transfer_client="classic")
        reads = _noting_osutil()()
        self.abort_uploads(relative_path)
        key = (s.bucket, self.key(relative_path))
        there = self.head(relative_path) if replaces is not None else None
        _CONDITIONS[key] = ({"IfMatch": there.etag} if there is not None and replaces == Identity(
            there.size, there.identity, there.mtime_ns) else {"IfNoneMatch": "*"})
        try:
            # client.upload_file, but with our file access: a failed read of `source` is seen
            with S3Transfer(self.client, transfer, osutil=reads) as uploader:
                uploader.upload_file(
                    str(source), s.bucket, self.key(relative_path), callback=progress,
                    extra_args={"ChecksumAlgorithm": s.checksum_algorithm,
                                "Metadata": {CHECKSUM_METADATA: checksum}})
        except BaseException as exc:
            with suppress(Exception):  # best effort: the endpoint may be the failure
                self.abort_uploads(relative_path)
            if reads.failed is not None:
                raise SourceReadFailed(reads.failed.errno, reads.failed.strerror,
                                       str(source)) from exc
            if error_code(exc) == "PreconditionFailed":
                raise FileExistsError(errno.EEXIST, f"{self.root}/{relative_path} was written "
                                      "by another while this upload ran",
                                      relative_path) from None
            if isinstance(exc, Exception):
                raise self.problem(exc, f"uploading {relative_path}") from exc
            raise
        finally:
            _CONDITIONS.pop(key, None)
        with suppress(Exception):  # best effort: the object is written, whatever this says
            self.abort_uploads(relative_path)

    def download(self, relative_path: str, into: BinaryIO,
                 progress: Callable[[int], None] | None = None) -> None:
        """The object's bytes into an open, seekable file, in parallel ranges. No object at the
        key: FileNotFoundError (the copy is gone, as a file from a disk: the transport says
        "source missing", so the source is re-read and quarantined, not the store blamed). The
        object refused to a key the store accepts: PermissionError, "source unreadable: ...
        permission denied", so the next attempt reads another copy and a person is told."""
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        part = s.part_size_mib * MIB
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                  max_concurrency=s.max_concurrency, use_threads=True,
                                  preferred_transfer_client="classic")
        try:
            self.client.download_fileobj(s.bucket, self.key(relative_path), into,
                                         Config=transfer, Callback=progress)
        except Exception as exc:  # noqa: BLE001
            code = error_code(exc)
            if code in _MISSING:
                raise FileNotFoundError(f"{self.label}: missing: {relative_path} is not on "
                                        "the storage") from None
            if code in _OBJECT_DENIED:
                self.check_marker()  # refused too: the key is (credentials refused)
                raise PermissionError(self._denied(relative_path, code,
                                                   what=SOURCE_UNREADABLE)) from None
            raise self.problem(exc, f"downloading {relative_path}") from exc

    def remove_unverified(self, relative_path: str, etag: str) -> bool:
        """Remove the object this attempt wrote and read back bad (never recorded, so nothing
        relies on it), only while it is still the object read (If-Match: its ETag): one
        written at the key since (a concurrent run's, a repair's) stays. A store without
        conditional deletes (501 NotImplemented) gets a plain delete, as before they existed.
        Best effort; whether it was removed. Without the ETag nothing is removed."""
        if not etag:
            return False
        key = self.key(relative_path)
        try:
            try:
                self.client.delete_object(Bucket=self.settings.bucket, Key=key, IfMatch=etag)
            except Exception as exc:
                if error_code(exc) != "NotImplemented":
                    raise
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)
        except Exception:  # noqa: BLE001 - replaced since (412), gone, or unreachable: kept
            return False
        return True


# (bucket, key) of the uploads in flight, and the condition their PutObject or
# CompleteMultipartUpload carries (s3transfer's upload_file cannot pass it): If-None-Match: *
# (replace nothing), or If-Match: the ETag of the quarantined object a repair replaces.
_CONDITIONS: dict[tuple[str, str], dict[str, str]] = {}


def _conditional_write(params: dict[str, Any], **_: Any) -> None:
    params.update(_CONDITIONS.get((str(params.get("Bucket")), str(params.get("Key"))), {}))


@lru_cache(maxsize=32)
def _client(settings: S3Config, access_key: str, secret_key: str, token: str | None) -> Any:
    """One client per location and credentials (boto3 clients are thread-safe and slow to
    make: the service model is loaded each time)."""
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        aws_session_token=token,
        config=BotoConfig(
            s3={"addressing_style": settings.addressing_style},
            connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=max(10, settings.max_concurrency + 2)))
    for operation in ("PutObject", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", _conditional_write)
    return client


# A forked child (the drive's run processes) makes its own clients: a client's pooled HTTP
# connections are sockets the parent may be using.
os.register_at_fork(after_in_child=_client.cache_clear)


class Stores:
    """The object-store locations of a deployment, found by the root OpsDB records; every
    other root is passed on to storage.look/listing (disk, local or over ssh) with its
    location's label: a root whose marker names another location is refused there."""

    def __init__(self, locations: dict[str, tuple[str, S3Config]],
                 disks: dict[tuple[str, str | None], str] | None = None) -> None:
        self._locations = locations
        self._disks = disks or {}  # (root, host) -> label of each disk location
        self._lock = threading.Lock()
        self._open: dict[str, ObjectStore] = {}

    @classmethod
    def of(cls, config: Config | None) -> Stores:
        if config is None:
            return cls({})
        found: dict[str, tuple[str, S3Config]] = {}
        disks: dict[tuple[str, str | None], str] = {}
        for site in config.settings.sites:
            for location in site.locations:
                label = f"{site.short_name}/{location.name}"
                if location.s3 is not None:
                    found[location.s3.url] = (label, location.s3)
                else:
                    disks[(config.location_root(location), location.host)] = label
        return cls(found, disks)

    def at(self, root: str) -> ObjectStore:
        with self._lock:
            if root not in self._open:
                if root not in self._locations:
                    raise StorageUnavailable(f"{root}: no s3 location with this bucket and "
                                             "prefix in the configuration", transient=False)
                self._open[root] = ObjectStore(*self._locations[root])
            return self._open[root]

    def of_endpoint(self, where: Endpoint) -> ObjectStore:
        assert where.store is not None
        return self.at(where.store)

    def look(self, root: str, host: str | None, ssh: SshSettings,
             wanted: Sequence[Wanted]) -> list[Seen]:
        if is_object_root(root):
            return self.at(root).look(wanted)
        return look(root, host, ssh, wanted, self._disks.get((root, host)))

    def listing(self, root: str, host: str | None, ssh: SshSettings,
                skip: Collection[str] = ()) -> Listing:
        if is_object_root(root):
            return self.at(root).listing()
        return listing(root, host, ssh, skip, self._disks.get((root, host)))

    def identity(self, where: Endpoint) -> tuple[int | None, int | None]:
        """(ETag as a number, last-modified ns) of an object, as (inode, mtime_ns)."""
        try:
            head = self.of_endpoint(where).head(str(where.path))
        except StorageUnavailable:
            return None, None
        return (head.identity, head.mtime_ns) if head else (None, None)
