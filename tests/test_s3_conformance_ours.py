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


# ---------------------------------------------------------------- ListObjectVersions

def test_list_object_versions_gives_one_null_version_per_object(s3):
    b = new_bucket()
    s3.create_bucket(Bucket=b)
    keys = ["a", "b/1", "b/2", "c", "d"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=k.encode())
    r = s3.list_object_versions(Bucket=b)
    assert [v["Key"] for v in r["Versions"]] == keys
    assert all(v["VersionId"] == "null" and v["IsLatest"] and v["Size"] == len(v["Key"]) for v in r["Versions"])
    assert r["IsTruncated"] is False
    # pages as the suite's clean-up walks them: KeyMarker + VersionIdMarker
    seen, kw = [], {"Bucket": b, "MaxKeys": 2}
    for _ in range(10):
        r = s3.list_object_versions(**kw)
        seen += [v["Key"] for v in r.get("Versions", [])]
        if not r["IsTruncated"]:
            break
        assert r["NextVersionIdMarker"] == "null"
        kw.update(KeyMarker=r["NextKeyMarker"], VersionIdMarker=r["NextVersionIdMarker"])
    assert seen == keys
    r = s3.list_object_versions(Bucket=b, Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["b/"]
    assert [v["Key"] for v in r["Versions"]] == ["a", "c", "d"]
    # and the versions can be deleted by id, as the suite's clean-up does
    s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k, "VersionId": "null"} for k in keys], "Quiet": True})
    assert "Versions" not in s3.list_object_versions(Bucket=b)



# ---------------------------------------------------------------- listings

def test_v1_pages_that_end_on_a_common_prefix_do_not_loop(s3):
    b = new_bucket()
    for k in ["asdf", "boo/bar", "boo/baz/xyzzy", "cquux/thud", "cquux/bla"]:
        s3.put_object(Bucket=b, Key=k, Body=b"x")
    pages = s3.get_paginator("list_objects").paginate(Bucket=b, Delimiter="/", PaginationConfig={"PageSize": 1})
    seen = []
    for page in pages:  # botocore raises if a next marker repeats
        seen += [c["Key"] for c in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert len(seen) < 10
    assert seen == ["asdf", "boo/", "cquux/"]


def test_max_keys_zero_is_not_truncated(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    for r in (s3.list_objects(Bucket=b, MaxKeys=0), s3.list_objects_v2(Bucket=b, MaxKeys=0)):
        assert r["IsTruncated"] is False and "Contents" not in r


def test_an_empty_continuation_token_is_echoed(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    r = s3.list_objects_v2(Bucket=b, ContinuationToken="")
    assert r["ContinuationToken"] == "" and [c["Key"] for c in r["Contents"]] == ["k"]


def test_fetch_owner(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    assert "Owner" not in s3.list_objects_v2(Bucket=b)["Contents"][0]
    assert s3.list_objects_v2(Bucket=b, FetchOwner=True)["Contents"][0]["Owner"]["ID"]
    assert s3.list_objects(Bucket=b)["Contents"][0]["Owner"]["ID"]  # V1 always names it


def test_v1_url_encoding_leaves_the_prefix_as_given(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="a b+c/d", Body=b"x")
    # asked for by the caller, the encoding is left to it to undo: S3 encodes V1's keys and
    # common prefixes, not the Prefix it echoes
    r = s3.list_objects(Bucket=b, Prefix="a b+c", EncodingType="url", Delimiter="/")
    assert r["Prefix"] == "a b+c"
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a%20b%2Bc/"]



# ---------------------------------------------------------------- refusals

def test_expect_other_than_100_continue_is_ignored(cluster):
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as c:
        c.sendall(b"PUT /expect/odd HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: something\r\n\r\nabc")
        head = c.recv(4096)
    assert head.startswith(b"HTTP/1.1 201"), head[:200]
    assert cluster.get("/expect/odd").content == b"abc"
