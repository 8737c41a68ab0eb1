"""A throw-away S3 server (moto's standalone server, a real process on 127.0.0.1) for the
object-store tests and the benchmark: IAM authentication switched on, with one access key that
may do everything, so that wrong credentials are refused as a real store refuses them.

Import the fixtures into a test module: `from tests.s3server import s3, s3server` (with
`# noqa: F401`); `s3` also puts the key in the environment variables a location names by
default. Each test makes its own bucket (`new_bucket`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import DidNotStart, running
from tests.services import free_port, unavailable

START_TIMEOUT_S = 30.0
ACCESS_ENV, SECRET_ENV = "CCAT_DT_S3_ACCESS_KEY_ID", "CCAT_DT_S3_SECRET_ACCESS_KEY"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass(frozen=True)
class S3Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    access_key: str
    secret_key: str
    log: Path

    def client(self, endpoint_url: str | None = None, *, access_key: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint_url or self.url, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def new_bucket(self) -> str:
        name = f"ccat-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def available() -> str:
    """Empty when moto's server can run here, else why not."""
    for module in ("moto.server", "flask", "boto3"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module} is not installed (pip install -e '.[dev]' brings moto[server])"
    return ""


def _answers(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/moto-api/data.json", timeout=1):
            return ""
    except (OSError, urllib.error.URLError) as exc:
        return str(exc)


@contextmanager
def s3_server(directory: Path, port: int) -> Iterator[S3Server]:
    """moto_server on `port`, an admin access key made, authentication then enforced."""
    import boto3

    url = f"http://127.0.0.1:{port}"
    log = directory / "moto.log"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(command, log=log, name="moto S3 server", ready=lambda: _answers(url),
                 timeout_s=START_TIMEOUT_S):
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="ccat")
        policy = iam.create_policy(PolicyName="all", PolicyDocument=ALLOW_ALL)
        iam.attach_user_policy(UserName="ccat", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="ccat")["AccessKey"]
        request = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=5):
            pass  # from here on every request must be signed with a known key
        yield S3Server(url, port, key["AccessKeyId"], key["SecretAccessKey"], log)


@pytest.fixture(scope="session", name="s3server")  # named: importable under any alias
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3 server for the whole test session (each test makes its own bucket)."""
    problem = available()
    if problem:
        unavailable("moto S3 server", problem)
    with ExitStack() as stack:
        try:
            server = stack.enter_context(s3_server(tmp_path_factory.mktemp("moto"),
                                                   free_port()))
        except DidNotStart as exc:
            unavailable("moto S3 server", str(exc))
            raise
        yield server


@pytest.fixture(name="s3")
def s3(s3server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, its key in the credential variables a location names by default."""
    monkeypatch.setenv(ACCESS_ENV, s3server.access_key)
    monkeypatch.setenv(SECRET_ENV, s3server.secret_key)
    return s3server
