"""What the S3 conformance suite found, each checked on its own with boto3 (or raw HTTP where
boto3 hides the answer) against a real cluster: ListObjectVersions, listing details, buckets
that exist or not, server-side encryption refused, Expect values ignored, unclaimed operations
answered 501."""

from __future__ import annotations

import socket
import uuid

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402


def client(port: int):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1",
                        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def s3(cluster):
    return client(cluster.port)


def new_bucket() -> str:
    return "conf-" + uuid.uuid4().hex[:12]


def error(call, **kw) -> tuple[int, str]:
    with pytest.raises(ClientError) as e:
        call(**kw)
    return e.value.response["ResponseMetadata"]["HTTPStatusCode"], e.value.response["Error"]["Code"]


# ---------------------------------------------------------------- refusals

def test_expect_other_than_100_continue_is_ignored(cluster):
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as c:
        c.sendall(b"PUT /expect/odd HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: something\r\n\r\nabc")
        head = c.recv(4096)
    assert head.startswith(b"HTTP/1.1 201"), head[:200]
    assert cluster.get("/expect/odd").content == b"abc"
