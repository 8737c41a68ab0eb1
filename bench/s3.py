"""Section 10: archiving a package to an S3 server with S3Transport (multipart upload with
CRC32C parts and our checksum as metadata, then the object re-read and hashed) against boto3's
own `upload_file` followed by a download-and-hash of the object: the same work, done plainly.

The server is moto's standalone server on 127.0.0.1, started as tests/s3server.py does (IAM
authentication on), with the start/stop helper of tests/processes.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import PurePosixPath
from unittest import mock

from bench.common import (
    Comparison,
    SectionResult,
    Settings,
    interleaved,
    settle,
    summed,
    timed,
)
from bench.files import source_file
from ccat_dt.checksums import hash_file, new_hasher
from ccat_dt.config import S3Config
from ccat_dt.objectstore import Stores
from ccat_dt.transports.base import Endpoint
from ccat_dt.transports.s3 import S3Transport
from tests.s3server import ACCESS_ENV, SECRET_ENV, available, s3_server
from tests.services import free_port

READ_CHUNK = 8 * 2**20


def bench_s3(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    problem = available()
    if problem:
        raise RuntimeError(problem)
    source = source_file(settings, settings.s3_mib, log)
    expected, _ = hash_file(source)
    with ExitStack() as stack:
        (settings.work / "moto").mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(s3_server(settings.work / "moto", free_port()))
        stack.enter_context(mock.patch.dict(os.environ, {ACCESS_ENV: server.access_key,
                                                         SECRET_ENV: server.secret_key}))
        bucket = server.new_bucket()
        s3 = S3Config(endpoint_url=server.url, bucket=bucket, prefix="bench")
        transport = S3Transport(Stores({s3.url: ("bench/lta", s3)}))
        # the defaults until issue 17's measurement (64 MiB parts, 8 in flight), for comparison
        s3_old = S3Config(endpoint_url=server.url, bucket=bucket, prefix="bench-old",
                          part_size_mib=64, max_concurrency=8)
        transport_old = S3Transport(Stores({s3_old.url: ("bench/lta-old", s3_old)}))
        client = server.client()
        ours_key, tool_key = "ours.tar", "tool.tar"

        def ours() -> dict[str, float]:
            return {"ours": timed(lambda: transport.copy(
                Endpoint(PurePosixPath(source)), Endpoint(PurePosixPath(ours_key),
                                                          store=s3.url), expected))}

        def ours_old() -> dict[str, float]:
            return {"ours, 64 MiB x 8": timed(lambda: transport_old.copy(
                Endpoint(PurePosixPath(source)), Endpoint(PurePosixPath(ours_key),
                                                          store=s3_old.url), expected))}

        def tool() -> dict[str, float]:
            def download_and_hash() -> None:
                hasher = new_hasher()
                body = client.get_object(Bucket=bucket, Key=tool_key)["Body"]
                while chunk := body.read(READ_CHUNK):
                    hasher.update(chunk)
                assert hasher.hexdigest() == expected

            return {"upload_file": timed(lambda: client.upload_file(str(source), bucket,
                                                                    tool_key)),
                    "download and hash": timed(download_and_hash)}

        def prepare() -> None:  # the server holds objects in memory: keep one of each at most
            for key in (f"bench/{ours_key}", f"bench-old/{ours_key}", tool_key):
                client.delete_object(Bucket=bucket, Key=key)
            settle()

        stats = interleaved({"ours": ours, "tool": tool, "ours-old": ours_old},
                            settings.repeat, prepare=prepare, log=log)

    result.comparisons.append(Comparison(
        "s3", f"archive {settings.s3_mib} MiB to S3: S3Transport.copy vs boto3 upload_file, "
        "then download and hash", stats["ours"], summed(stats, "upload_file",
                                                        "download and hash"),
        goal=0.9, ours_label="S3Transport.copy", tool_label="upload_file; get + xxh3"))
    result.comparisons.append(Comparison(
        "s3", "the same with the defaults before issue 17's measurement (64 MiB parts, 8 in "
        "flight)", stats["ours, 64 MiB x 8"], summed(stats, "upload_file", "download and hash"),
        goal=None, ours_label="S3Transport.copy, 64 MiB x 8",
        tool_label="upload_file; get + xxh3"))
    result.facts["size"] = f"{settings.s3_mib} MiB, source in the page cache"
    result.facts["server"] = "moto_server (Python, objects in memory) on 127.0.0.1, same machine"
    result.facts["ours"] = (f"{s3.part_size_mib} MiB parts, {s3.max_concurrency} in flight "
                            f"(the defaults), {s3.checksum_algorithm} per part, re-read streamed")
    result.facts["tool"] = ("boto3 defaults (8 MiB parts, 10 in flight, CRC32), then one "
                            "get_object streamed into xxh3-128")
    result.facts["steps"] = {k: v.text() for k, v in stats.items()}
