"""What the S3 conformance suite found, each checked on its own with boto3 (or raw HTTP where
boto3 hides the answer) against a real cluster: ListObjectVersions, listing details, buckets
that exist or not, server-side encryption and conditional writes refused, Expect values
ignored, unclaimed operations answered 501."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import requests

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402
from cluster import Cluster, open_dir  # noqa: E402
from test_s3 import client  # noqa: E402

from minikv.s3.buckets import check_name  # noqa: E402
from minikv.s3.errors import S3Error  # noqa: E402

# every test that starts a cluster runs on both index engines (tests/conftest.py)
ENGINES = ["lmdb", "postgresql"]

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



# ---------------------------------------------------------------- buckets

def test_bucket_names_are_checked_as_s3_does():
    for name in [b"abc", b"my.bucket-1", b"a" * 63, b"0ab"]:
        check_name(name)
    for name in [b"ab", b"a" * 64, b"Upper", b"under_score", b"-start", b"end-", b"a..b", b"a.-b",
                 b"192.168.5.4", b"xn--abc", b"abc-s3alias", b"sp ace"]:
        with pytest.raises(S3Error) as e:
            check_name(name)
        assert e.value.code == "InvalidBucketName", name


def test_create_head_list_delete_bucket(s3, cluster):
    b = new_bucket()
    assert error(s3.head_bucket, Bucket=b) == (404, "404")  # HEAD: no body, so no code but the status
    assert error(s3.delete_bucket, Bucket=b) == (404, "NoSuchBucket")
    assert error(s3.list_objects_v2, Bucket=b) == (404, "NoSuchBucket")
    assert error(s3.list_object_versions, Bucket=b) == (404, "NoSuchBucket")
    assert error(s3.get_object, Bucket=b, Key="k") == (404, "NoSuchBucket")
    before = time.time()
    s3.create_bucket(Bucket=b)
    s3.create_bucket(Bucket=b)  # again: 200, as S3 answers in us-east-1
    s3.head_bucket(Bucket=b)
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    assert error(s3.get_object, Bucket=b, Key="k") == (404, "NoSuchKey")
    listed = {x["Name"]: x["CreationDate"] for x in s3.list_buckets()["Buckets"]}
    assert b in listed, "an empty bucket is listed"
    assert before - 2 <= listed[b].timestamp() <= time.time() + 2
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    assert error(s3.delete_bucket, Bucket=b) == (409, "BucketNotEmpty")
    s3.delete_object(Bucket=b, Key="k")
    s3.delete_bucket(Bucket=b)
    assert error(s3.head_bucket, Bucket=b) == (404, "404")
    assert b not in {x["Name"] for x in s3.list_buckets()["Buckets"]}
    assert error(s3.create_bucket, Bucket="Bad_Name") == (400, "InvalidBucketName")


def test_keys_of_the_plain_api_make_their_bucket(s3, cluster):
    b = new_bucket()
    before = time.time()
    assert cluster.put(f"/{b}/plain", b"hello").status_code == 201
    s3.head_bucket(Bucket=b)
    listed = {x["Name"]: x["CreationDate"] for x in s3.list_buckets()["Buckets"]}
    assert before - 2 <= listed[b].timestamp() <= time.time() + 2  # dated by its key, not 1970
    assert s3.get_object(Bucket=b, Key="plain")["Body"].read() == b"hello"
    assert error(s3.delete_bucket, Bucket=b) == (409, "BucketNotEmpty")


def test_an_s3_write_makes_its_bucket_which_outlives_its_keys(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"x")  # no CreateBucket first, as the README's example
    s3.delete_object(Bucket=b, Key="k")
    s3.head_bucket(Bucket=b)
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    assert b in {x["Name"] for x in s3.list_buckets()["Buckets"]}
    s3.delete_bucket(Bucket=b)
    assert error(s3.head_bucket, Bucket=b) == (404, "404")


def test_list_buckets_pages_over_made_and_key_buckets(s3, cluster):
    tag = uuid.uuid4().hex[:8]
    names = [f"pg{tag}-a", f"pg{tag}-b", f"pg{tag}-c", f"pg{tag}-d"]
    s3.create_bucket(Bucket=names[0])
    cluster.put(f"/{names[1]}/k", b"x")
    s3.create_bucket(Bucket=names[2])
    s3.put_object(Bucket=names[3], Key="k", Body=b"x")
    s3.create_bucket(Bucket=names[3])  # both made and with keys: listed once
    seen, kw = [], {"Prefix": f"pg{tag}", "MaxBuckets": 1}
    for _ in range(10):
        r = s3.list_buckets(**kw)
        seen += [x["Name"] for x in r["Buckets"]]
        if "ContinuationToken" not in r:
            break
        kw["ContinuationToken"] = r["ContinuationToken"]
    assert seen == names



# The index's disk fills up: making a bucket answers 503 with the reason, as writes do (not a
# 500), and an S3 write into a new bucket fails as any write does, by the index's 503.
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root (mount a tmpfs)")
def test_buckets_on_a_full_index_disk_answer_503():
    root = open_dir()
    db = root / "index"
    db.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(db)], check=True)
    c = Cluster(root)
    try:
        c.start()
        s3 = client(c.port)
        s3.create_bucket(Bucket="before")
        with open(db / "ballast", "wb") as f:  # all but the last 64 KB of the tmpfs
            f.write(b"\0" * (shutil.disk_usage(db).free - (64 << 10)))
        made = None
        for i in range(3000):  # a small commit may still fit in pages LMDB freed: until one fails
            try:
                s3.create_bucket(Bucket=f"full-{i:05d}-" + "b" * 40)
            except ClientError as e:
                made = e.response
                break
        assert made is not None, "the index never ran out of space"
        assert (made["ResponseMetadata"]["HTTPStatusCode"], made["Error"]["Code"]) == (503, "ServiceUnavailable")
        assert "could not be recorded" in made["Error"]["Message"]
        status, code = error(s3.put_object, Bucket="new-after-full", Key="k" * 100, Body=b"x")
        assert (status, code) == (503, "ServiceUnavailable")
        s3.head_bucket(Bucket="before")  # reads go on
    finally:
        c.stop()
        subprocess.run(["umount", "-l", str(db)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

# ---------------------------------------------------------------- refusals

def test_server_side_encryption_is_refused_and_nothing_stored(s3):
    b = new_bucket()
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"x", ServerSideEncryption="AES256") == \
        (501, "NotImplemented")
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"x", SSECustomerAlgorithm="AES256",
                 SSECustomerKey="k" * 32) == (501, "NotImplemented")
    assert error(s3.create_multipart_upload, Bucket=b, Key="k", ServerSideEncryption="aws:kms") == \
        (501, "NotImplemented")
    assert error(s3.head_object, Bucket=b, Key="k")[0] == 404


def test_object_lock_and_tagging_are_refused_not_ignored(s3):
    b = new_bucket()
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"x", ObjectLockMode="COMPLIANCE",
                 ObjectLockRetainUntilDate="2099-01-01T00:00:00Z") == (501, "NotImplemented")
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"x", ObjectLockLegalHoldStatus="ON") == \
        (501, "NotImplemented")
    assert error(s3.create_bucket, Bucket=b, ObjectLockEnabledForBucket=True) == (501, "NotImplemented")
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"x", Tagging="a=b") == (501, "NotImplemented")
    assert error(s3.head_bucket, Bucket=b)[0] == 404  # nothing made


def test_conditional_writes_are_refused_not_ignored(s3):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"old")
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"new", IfNoneMatch="*") == (501, "NotImplemented")
    assert error(s3.put_object, Bucket=b, Key="k", Body=b"new", IfMatch='"0"') == (501, "NotImplemented")
    assert error(s3.delete_object, Bucket=b, Key="k", IfMatch='"0"') == (501, "NotImplemented")
    assert error(s3.delete_objects, Bucket=b, Delete={"Objects": [{"Key": "k", "ETag": '"0"'}]}) == \
        (501, "NotImplemented")
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"old"


@pytest.mark.parametrize("method,query", [
    ("GET", "acl"), ("PUT", "acl"), ("GET", "tagging"), ("PUT", "lifecycle"), ("GET", "policy"),
    ("PUT", "encryption"), ("GET", "object-lock"), ("POST", "select"),
])
def test_unclaimed_operations_answer_501(s3, cluster, method, query):
    b = new_bucket()
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    for target in (f"/{b}?{query}", f"/{b}/k?{query}"):
        r = requests.request(method, cluster.url(target), data=b"<x/>" if method != "GET" else None,
                             headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
        assert r.status_code == 501 and b"<Code>NotImplemented</Code>" in r.content, (target, r.text[:200])
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"x"


def test_expect_other_than_100_continue_is_ignored(cluster):
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as c:
        c.sendall(b"PUT /expect/odd HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: something\r\n\r\nabc")
        head = c.recv(4096)
    assert head.startswith(b"HTTP/1.1 201"), head[:200]
    assert cluster.get("/expect/odd").content == b"abc"
