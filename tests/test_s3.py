"""The S3 API with the real client libraries (boto3, pyarrow, s3fs) against a real cluster,
plus the pieces clients cannot reach alone: SigV4 vectors, aws-chunked bodies, hostile XML."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
import requests

boto3 = pytest.importorskip("boto3")
from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from minikv.placement import key2path, key2volume  # noqa: E402
from minikv.s3.errors import S3Error  # noqa: E402
from minikv.s3.payload import Payload  # noqa: E402
from minikv.s3.sigv4 import verify  # noqa: E402
from minikv.s3.xml import parse  # noqa: E402

# every test that starts a cluster runs on both index engines (tests/conftest.py: pytest_generate_tests)
ENGINES = ["lmdb", "postgresql"]
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def client(port: int, access: str = "test", secret: str = "test"):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=access,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def s3(cluster):
    return client(cluster.port)


def bucket() -> str:
    return "bk" + uuid.uuid4().hex[:10]


def code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


# ---------------------------------------------------------------- boto3


def test_put_get_head_delete_and_the_plain_api_sees_the_same(s3, cluster):
    b = bucket()
    put = s3.put_object(Bucket=b, Key="dir/k", Body=b"hello")
    assert put["ETag"] == f'"{hashlib.md5(b"hello").hexdigest()}"'
    # S3 semantics: overwrite allowed (the plain API would answer 403)
    put = s3.put_object(Bucket=b, Key="dir/k", Body=b"hello, again")
    assert put["ETag"] == f'"{hashlib.md5(b"hello, again").hexdigest()}"'
    got = s3.get_object(Bucket=b, Key="dir/k")
    assert got["Body"].read() == b"hello, again" and got["ETag"] == put["ETag"]
    head = s3.head_object(Bucket=b, Key="dir/k")
    assert head["ContentLength"] == 12 and head["ETag"] == put["ETag"]
    assert head["ResponseMetadata"]["HTTPHeaders"]["last-modified"].endswith(" GMT")
    # the same value under the key /b/dir/k of the plain API, which still redirects
    plain = cluster.get(f"/{b}/dir/k", allow_redirects=False)
    assert plain.status_code == 302 and plain.headers["Content-Md5"] == hashlib.md5(b"hello, again").hexdigest()
    assert cluster.get(f"/{b}/dir/k").content == b"hello, again"
    assert cluster.put(f"/{b}/dir/k", b"x").status_code == 403
    s3.delete_object(Bucket=b, Key="dir/k")
    s3.delete_object(Bucket=b, Key="dir/k")  # S3: deleting a missing key is fine too
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=b, Key="dir/k")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert cluster.get(f"/{b}/dir/k", allow_redirects=False).status_code == 404


def test_empty_object_and_odd_keys(s3):
    b = bucket()
    s3.put_object(Bucket=b, Key="empty", Body=b"")
    assert s3.get_object(Bucket=b, Key="empty")["Body"].read() == b""
    assert s3.head_object(Bucket=b, Key="empty")["ContentLength"] == 0
    for key in ["with space/ü+ñ%20.txt", "a&b<c>.bin", "dir/"]:
        s3.put_object(Bucket=b, Key=key, Body=key.encode())
        assert s3.get_object(Bucket=b, Key=key)["Body"].read() == key.encode()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]]
    assert keys == sorted(["empty", "with space/ü+ñ%20.txt", "a&b<c>.bin", "dir/"], key=str.encode)


def test_get_with_range(s3):
    b = bucket()
    data = bytes(range(256)) * 64
    s3.put_object(Bucket=b, Key="r", Body=data)
    got = s3.get_object(Bucket=b, Key="r", Range="bytes=100-299")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 100-299/{len(data)}"
    assert got["Body"].read() == data[100:300]
    assert s3.get_object(Bucket=b, Key="r", Range="bytes=-10")["Body"].read() == data[-10:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=b, Key="r", Range=f"bytes={len(data) + 5}-")
    assert code(e.value) == "InvalidRange"


def test_errors_are_s3_xml(s3, cluster):
    b = bucket()
    s3.create_bucket(Bucket=b)  # in a bucket that does not exist, a missing key is NoSuchBucket
    r = requests.get(cluster.url(f"/{b}/missing"), headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/xml"
    root = ET.fromstring(r.content)
    assert root.tag == "Error" and root.findtext("Code") == "NoSuchKey" and root.findtext("Key") == "missing"
    r = requests.head(cluster.url(f"/{b}/missing"), headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 404 and r.content == b""
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=b, Key="missing")
    assert code(e.value) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=b, Key="k", UploadId="0" * 32, PartNumber=1, Body=b"x")
    assert code(e.value) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        s3.get_object_acl(Bucket=b, Key="k")
    assert code(e.value) == "NotImplemented"
    s3.create_bucket(Bucket=b)  # again: 200, as in us-east-1
    s3.head_bucket(Bucket=b)


def test_list_prefix_delimiter_and_pages(s3, cluster):
    b = bucket()
    keys = [f"logs/2024/{i:02d}.txt" for i in range(12)] + [f"logs/2025/{i:02d}.txt" for i in range(3)] \
        + [f"logs/top{i}.txt" for i in range(7)] + ["other.txt"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=k.encode())
    page = s3.list_objects_v2(Bucket=b, Prefix="logs/", Delimiter="/")
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["logs/2024/", "logs/2025/"]
    assert [c["Key"] for c in page["Contents"]] == [f"logs/top{i}.txt" for i in range(7)]
    assert page["KeyCount"] == 9 and page["IsTruncated"] is False
    # more than one page, keys and common prefixes counted together
    seen, token, pages = [], None, 0
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=b, Prefix="logs/", Delimiter="/", MaxKeys=4, **kw)
        pages += 1
        seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])] + [c["Key"] for c in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert pages == 3 and sorted(seen) == sorted(["logs/2024/", "logs/2025/"] + [f"logs/top{i}.txt" for i in range(7)])
    # the paginator, without delimiter: every key once, in order
    listed = [c["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=b, PaginationConfig={"PageSize": 5})
              for c in p.get("Contents", [])]
    assert listed == sorted(keys)
    assert [c["Key"] for c in s3.list_objects_v2(Bucket=b, StartAfter="logs/top5.txt")["Contents"]] == \
        ["logs/top6.txt", "other.txt"]
    # s3fs's folder test: MaxKeys=1 with a delimiter
    assert s3.list_objects_v2(Bucket=b, Prefix="logs/2025", Delimiter="/", MaxKeys=1)["CommonPrefixes"] == \
        [{"Prefix": "logs/2025/"}]
    # V1 too
    v1 = s3.list_objects(Bucket=b, Prefix="logs/2024/", MaxKeys=5)
    assert len(v1["Contents"]) == 5 and v1["IsTruncated"]
    # the XML itself: namespace, timestamps, quoted ETags, page fields
    r = requests.get(cluster.url(f"/{b}?list-type=2&prefix=logs/&max-keys=2"))
    root = ET.fromstring(r.content)
    assert r.headers["Content-Type"] == "application/xml" and root.tag == NS + "ListBucketResult"
    assert root.findtext(NS + "IsTruncated") == "true" and root.findtext(NS + "NextContinuationToken")
    first = root.find(NS + "Contents")
    assert ISO.match(first.findtext(NS + "LastModified"))
    assert first.findtext(NS + "ETag") == f'"{hashlib.md5(b"logs/2024/00.txt").hexdigest()}"'
    # a plain-API user is not affected by any of this
    assert cluster.get(f"/{b}/logs/2024?list").json()["keys"] == [f"/{b}/logs/2024/{i:02d}.txt" for i in range(12)]
    assert cluster.get(f"/{b}/other.txt", allow_redirects=False).status_code == 302


def test_delete_objects(s3):
    b = bucket()
    for i in range(30):
        s3.put_object(Bucket=b, Key=f"d/{i}", Body=b"x")
    out = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": f"d/{i}"} for i in range(20)] + [{"Key": "nope"}]})
    assert len(out["Deleted"]) == 21 and not out.get("Errors")
    assert sorted(c["Key"] for c in s3.list_objects_v2(Bucket=b)["Contents"]) == sorted(f"d/{i}" for i in range(20, 30))
    quiet = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": f"d/{i}"} for i in range(20, 30)], "Quiet": True})
    assert not quiet.get("Deleted") and s3.list_objects_v2(Bucket=b)["KeyCount"] == 0


def test_copy_object(s3):
    b = bucket()
    data = os.urandom(300_000)
    s3.put_object(Bucket=b, Key="src", Body=data)
    out = s3.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"})
    assert out["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert s3.get_object(Bucket=b, Key="dst")["Body"].read() == data


def test_multipart_upload_and_download_20mb(s3, cluster, tmp_path):
    from boto3.s3.transfer import TransferConfig

    b = bucket()
    data = os.urandom(20 << 20)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    s3.upload_file(str(src), b, "big.bin", Config=cfg)
    head = s3.head_object(Bucket=b, Key="big.bin")
    assert head["ContentLength"] == len(data)
    parts = [data[i:i + (8 << 20)] for i in range(0, len(data), 8 << 20)]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert head["ETag"] == f'"{expected}"'
    assert s3.list_objects_v2(Bucket=b)["Contents"][0]["ETag"] == f'"{expected}"'
    s3.download_file(b, "big.bin", str(dst), Config=cfg)
    assert dst.read_bytes() == data
    # the plain API streams it (its parts are other keys' files: nothing to redirect to); the md5
    # of the whole is not computed (Complete reads no byte), so no Content-Md5, as with -md5sum=false
    plain = cluster.get(f"/{b}/big.bin", allow_redirects=False)
    assert plain.status_code == 200 and plain.content == data and "Content-Md5" not in plain.headers
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []


def test_abort_multipart_leaves_nothing(s3, cluster):
    b = bucket()
    up = s3.create_multipart_upload(Bucket=b, Key="aborted")
    uid = up["UploadId"]
    s3.upload_part(Bucket=b, Key="aborted", UploadId=uid, PartNumber=1, Body=os.urandom(5 << 20))
    s3.upload_part(Bucket=b, Key="aborted", UploadId=uid, PartNumber=2, Body=b"tail")
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=b, Key="aborted", UploadId=uid)["Parts"]] == [1, 2]
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=b)["Uploads"]] == [uid]
    part_files = []
    for n in (1, 2):
        key = b"\x00s3/mpu/" + uid.encode() + b"/%05d" % n
        for vol in key2volume(key, cluster.names, cluster.replicas, cluster.subvolumes):
            path = cluster.volume_dir(vol) / key2path(key).lstrip("/")
            assert path.exists(), cluster.replica_report(key)
            part_files.append(path)
    s3.abort_multipart_upload(Bucket=b, Key="aborted", UploadId=uid)
    assert not any(p.exists() for p in part_files)
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=b, Key="aborted", UploadId=uid,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"x"'}]})
    assert code(e.value) == "NoSuchUpload"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=b, Key="aborted")


def test_multipart_checks_parts(s3):
    b = bucket()
    uid = s3.create_multipart_upload(Bucket=b, Key="m")["UploadId"]
    e1 = s3.upload_part(Bucket=b, Key="m", UploadId=uid, PartNumber=1, Body=b"small")["ETag"]
    e2 = s3.upload_part(Bucket=b, Key="m", UploadId=uid, PartNumber=2, Body=b"tail")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=b, Key="m", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert code(e.value) == "EntityTooSmall"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=b, Key="m", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 2, "ETag": '"0123"'}]})
    assert code(e.value) == "InvalidPart"
    # a single (last) part may be small
    out = s3.complete_multipart_upload(Bucket=b, Key="m", UploadId=uid,
                                       MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}]})
    assert out["ETag"].endswith('-1"') and s3.get_object(Bucket=b, Key="m")["Body"].read() == b"tail"


def test_failed_overwrite_keeps_the_old_value(s3, cluster):
    b = bucket()
    s3.put_object(Bucket=b, Key="keep", Body=b"old value")
    wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=b, Key="keep", Body=b"new value", ContentMD5=wrong)
    assert code(e.value) == "BadDigest"
    assert s3.get_object(Bucket=b, Key="keep")["Body"].read() == b"old value"
    # a client that goes away mid-body: nothing changes either
    with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
        sock.sendall(f"PUT /{b}/keep HTTP/1.1\r\nHost: x\r\nx-amz-date: 20260101T000000Z\r\n"
                     f"Content-Length: 3000000\r\n\r\n".encode() + b"n" * 500_000)
    for _ in range(50):
        if cluster.get(f"/{b}/keep", allow_redirects=False).status_code == 302:
            break
        time.sleep(0.05)
    assert s3.get_object(Bucket=b, Key="keep")["Body"].read() == b"old value"
    assert cluster.get(f"/{b}/keep").content == b"old value"


def test_hostile_xml_is_refused(cluster):
    b = bucket()
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            b"<Delete><Object><Key>&lol2;</Key></Object></Delete>")
    r = requests.post(cluster.url(f"/{b}?delete"), data=bomb)
    assert r.status_code == 400 and ET.fromstring(r.content).findtext("Code") == "MalformedXML"
    external = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Delete><Object><Key>&e;</Key></Object></Delete>'
    assert requests.post(cluster.url(f"/{b}?delete"), data=external).status_code == 400
    many = b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>"
    r = requests.post(cluster.url(f"/{b}?delete"), data=many)
    assert r.status_code == 400 and ET.fromstring(r.content).findtext("Code") == "MalformedXML"
    with pytest.raises(S3Error):
        parse(b"<a>" * 100 + b"</a>" * 100, 1 << 20)
    with pytest.raises(S3Error) as e:
        parse(b"<a>" + b" " * (1 << 20) + b"</a>", 1 << 20)
    assert e.value.code == "MaxMessageLengthExceeded"


# ---------------------------------------------------------------- pyarrow


def test_pyarrow_parquet_round_trip(cluster):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from pyarrow import fs

    b = bucket()
    s3fs_ = fs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{cluster.port}",
                            scheme="http", region="us-east-1")
    n = 500_000
    table = pa.table({"id": pa.array(range(n), pa.int64()),
                      "x": pa.array([i * 0.5 for i in range(n)]),
                      "name": pa.array([f"row-{i % 1000}" for i in range(n)])})
    pq.write_table(table, f"{b}/data/table.parquet", filesystem=s3fs_)
    info = s3fs_.get_file_info(f"{b}/data/table.parquet")
    assert info.type == fs.FileType.File and info.size > 1_000_000
    assert pq.read_table(f"{b}/data/table.parquet", filesystem=s3fs_).equals(table)
    assert s3fs_.get_file_info(f"{b}/data").type == fs.FileType.Directory
    with s3fs_.open_output_stream(f"{b}/data/small.bin") as f:
        f.write(b"tiny")
    with s3fs_.open_input_file(f"{b}/data/small.bin") as f:
        assert f.read() == b"tiny"
    s3fs_.delete_file(f"{b}/data/small.bin")
    assert s3fs_.get_file_info(f"{b}/data/small.bin").type == fs.FileType.NotFound
    with s3fs_.open_output_stream(f"{b}/data/sub/more.bin") as f:
        f.write(b"more")
    s3fs_.delete_dir_contents(f"{b}/data")
    left = s3fs_.get_file_info(fs.FileSelector(f"{b}/data", recursive=True, allow_not_found=True))
    assert [i.path for i in left] == []


# ---------------------------------------------------------------- s3fs


def test_s3fs_ls_open_put_get(cluster, tmp_path):
    s3fs = pytest.importorskip("s3fs")
    b = bucket()
    fs = s3fs.S3FileSystem(key="test", secret="test", skip_instance_cache=True, use_listings_cache=False,
                           client_kwargs={"endpoint_url": f"http://127.0.0.1:{cluster.port}", "region_name": "us-east-1"},
                           config_kwargs={"s3": {"addressing_style": "path"}})
    with fs.open(f"{b}/folder/a.txt", "wb") as f:
        f.write(b"alpha")
    fs.pipe(f"{b}/folder/deeper/b.txt", b"beta")
    assert sorted(fs.ls(f"{b}/folder")) == [f"{b}/folder/a.txt", f"{b}/folder/deeper"]
    assert fs.isdir(f"{b}/folder/deeper") and fs.isfile(f"{b}/folder/a.txt")
    assert fs.info(f"{b}/folder/a.txt")["size"] == 5
    with fs.open(f"{b}/folder/a.txt", "rb") as f:
        assert f.read() == b"alpha"
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(3 << 20))
    fs.put(str(local), f"{b}/up/local.bin")
    fs.get(f"{b}/up/local.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    fs.mv(f"{b}/up/local.bin", f"{b}/up/moved.bin")
    assert fs.exists(f"{b}/up/moved.bin") and not fs.exists(f"{b}/up/local.bin")
    fs.rm(f"{b}/folder", recursive=True)
    assert not fs.exists(f"{b}/folder/a.txt")


# ---------------------------------------------------------------- SigV4


def test_sigv4_checked_when_credentials_are_set(make_cluster):
    c = make_cluster(volumes=2, replicas=1, workers=1,
                     flags=["-s3-access-key", "AKIDMINIKV", "-s3-secret-key", "s3cr3t/with+chars"])
    good = client(c.port, "AKIDMINIKV", "s3cr3t/with+chars")
    good.put_object(Bucket="sec", Key="k", Body=b"signed")
    assert good.get_object(Bucket="sec", Key="k")["Body"].read() == b"signed"
    assert good.list_objects_v2(Bucket="sec", Prefix="k")["KeyCount"] == 1
    with pytest.raises(ClientError) as e:
        client(c.port, "AKIDMINIKV", "wrong").get_object(Bucket="sec", Key="k")
    assert code(e.value) == "SignatureDoesNotMatch"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as e:
        client(c.port, "AKIDOTHER", "s3cr3t/with+chars").put_object(Bucket="sec", Key="k", Body=b"x")
    assert code(e.value) == "InvalidAccessKeyId"
    r = requests.get(c.url("/sec/k"), headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 403
    v4 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{c.port}", aws_access_key_id="AKIDMINIKV",
                      aws_secret_access_key="s3cr3t/with+chars", region_name="us-east-1",
                      config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"}))
    url = v4.generate_presigned_url("get_object", Params={"Bucket": "sec", "Key": "k"}, ExpiresIn=60)
    assert requests.get(url).content == b"signed"
    assert requests.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    # SigV2 presigned URLs are S3's too (not plain GETs), and refused
    v2 = good.generate_presigned_url("get_object", Params={"Bucket": "sec", "Key": "k"}, ExpiresIn=60)
    assert "AWSAccessKeyId=" in v2 and requests.get(v2).status_code == 403
    # aws-sdk-cpp signs differently from botocore (more headers, aws-chunked bodies): pyarrow too
    pafs = pytest.importorskip("pyarrow.fs")

    def arrow(secret):
        return pafs.S3FileSystem(access_key="AKIDMINIKV", secret_key=secret, endpoint_override=f"127.0.0.1:{c.port}",
                                 scheme="http", region="us-east-1", retry_strategy=pafs.AwsStandardS3RetryStrategy(1))

    with arrow("s3cr3t/with+chars").open_output_stream("sec/arrow.bin") as f:
        f.write(os.urandom(100_000))
    assert arrow("s3cr3t/with+chars").get_file_info("sec/arrow.bin").size == 100_000
    with pytest.raises(OSError, match="ACCESS_DENIED|SignatureDoesNotMatch"):
        arrow("wrong").get_file_info("sec/arrow.bin")


def _signed(method: str, url: str, headers: dict, body: bytes = b"") -> AWSRequest:
    req = AWSRequest(method=method, url=url, headers=headers, data=body)
    S3SigV4Auth(Credentials("AK", "SK"), "s3", "us-east-1").add_auth(req)
    return req


def _verify(req: AWSRequest, secret: str = "SK"):
    from urllib.parse import urlsplit

    parts = urlsplit(req.url)
    headers = [(k.lower().encode(), v.encode() if isinstance(v, str) else v) for k, v in req.headers.items()]
    from urllib.parse import unquote_to_bytes

    return verify(req.method.encode(), parts.path.encode(), unquote_to_bytes(parts.path), parts.query.encode(),
                  headers, "AK", secret)


def test_sigv4_matches_botocore_signer():
    req = _signed("GET", "http://h:1/b/some%20key/%C3%BC~x?list-type=2&prefix=a%2Fb&max-keys=3",
                  {"Host": "h:1", "Range": "bytes=0-9"})
    signed = _verify(req)
    assert signed.signature == req.headers["Authorization"].rsplit("=", 1)[1]
    with pytest.raises(S3Error) as e:
        _verify(req, secret="other")
    assert e.value.code == "SignatureDoesNotMatch"


def test_aws_documented_chunk_signatures():
    """The STREAMING-AWS4-HMAC-SHA256-PAYLOAD example of AWS's S3 documentation."""
    from minikv.s3.sigv4 import Signed, signing_key

    s = Signed(signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524", "us-east-1", "s3"),
               "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
               "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9")
    chunks = [b"a" * 65536, b"a" * 1024, b""]
    sigs = []
    prev = s.signature
    for c in chunks:
        prev = s.chunk_signature(prev, hashlib.sha256(c).hexdigest())
        sigs.append(prev)
    assert sigs == ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
                    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
                    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]
    body = b"".join(b"%x;chunk-signature=%s\r\n%s\r\n" % (len(c), sig.encode(), c) for c, sig in zip(chunks, sigs))
    headers = [(b"x-amz-content-sha256", b"STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
               (b"content-encoding", b"aws-chunked"), (b"x-amz-decoded-content-length", b"66560")]
    assert asyncio.run(_decode(body, headers, s)) == b"a" * 66560
    tampered = body.replace(b"a" * 1024, b"b" + b"a" * 1023)
    with pytest.raises(S3Error) as e:
        asyncio.run(_decode(tampered, headers, s))
    assert e.value.code == "SignatureDoesNotMatch"


async def _decode(body: bytes, headers, signed=None) -> bytes:
    pieces = [body[i:i + 7001] for i in range(0, len(body), 7001)]

    async def read() -> bytes:
        return pieces.pop(0) if pieces else b""

    return await Payload(read, headers, signed).read_all(1 << 30)


def test_aws_chunked_with_checksum_trailer():
    import zlib

    data = os.urandom(100_000)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    body = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (len(data), data, crc)
    headers = [(b"x-amz-content-sha256", b"STREAMING-UNSIGNED-PAYLOAD-TRAILER"), (b"content-encoding", b"aws-chunked"),
               (b"x-amz-trailer", b"x-amz-checksum-crc32"), (b"x-amz-decoded-content-length", b"100000")]
    assert asyncio.run(_decode(body, headers)) == data
    with pytest.raises(S3Error) as e:
        asyncio.run(_decode(body.replace(crc, base64.b64encode(b"\0\0\0\0")), headers))
    assert e.value.code == "BadDigest"
