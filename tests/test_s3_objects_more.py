"""S3 objects beyond bytes, on a real cluster with boto3 and raw requests: stored metadata
(PutObject, CopyObject, multipart), last-writer-wins for concurrent S3 writes of one key,
retried CompleteMultipartUpload, CopyObject preconditions and GET/HEAD ?partNumber=."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402
from test_s3 import client  # noqa: E402

from minikv.placement import key2path, key2volume  # noqa: E402

# every test that starts a cluster runs on both index engines (tests/conftest.py)
ENGINES = ["lmdb", "postgresql"]
MB = 1 << 20




@pytest.fixture(scope="module")
def s3(cluster):
    return client(cluster.port)


def bucket() -> str:
    return "ob" + uuid.uuid4().hex[:10]


def error(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


HEADERS = dict(ContentType="text/csv", CacheControl="max-age=60", ContentDisposition='attachment; filename="a.csv"',
               ContentEncoding="identity", ContentLanguage="fr", Metadata={"mtime": "1700000000.123456789",
                                                                          "md5chksum": "XUFAKrxLKna5cZ2REBfFkg=="})


def check_headers(answer: dict) -> None:
    assert answer["ContentType"] == "text/csv"
    assert answer["CacheControl"] == "max-age=60"
    assert answer["ContentDisposition"] == 'attachment; filename="a.csv"'
    assert answer["ContentEncoding"] == "identity"
    assert answer["ContentLanguage"] == "fr"
    assert answer["Metadata"] == {"mtime": "1700000000.123456789", "md5chksum": "XUFAKrxLKna5cZ2REBfFkg=="}


# ---------------------------------------------------------------- metadata


def test_put_object_metadata_round_trips_and_an_overwrite_replaces_it(s3):
    b = bucket()
    s3.put_object(Bucket=b, Key="m", Body=b"a,b\n", Expires="Wed, 21 Oct 2037 07:28:00 GMT", **HEADERS)
    for answer in (s3.get_object(Bucket=b, Key="m"), s3.head_object(Bucket=b, Key="m")):
        check_headers(answer)
        assert answer["ResponseMetadata"]["HTTPHeaders"]["expires"] == "Wed, 21 Oct 2037 07:28:00 GMT"
    assert s3.get_object(Bucket=b, Key="m")["Body"].read() == b"a,b\n"
    # a response-* override still wins over the stored header
    got = s3.get_object(Bucket=b, Key="m", ResponseContentType="text/plain")
    assert got["ContentType"] == "text/plain"
    # S3 replaces the metadata with the value: an overwrite without any clears it
    s3.put_object(Bucket=b, Key="m", Body=b"x")
    head = s3.head_object(Bucket=b, Key="m")
    assert head["Metadata"] == {} and head["ContentType"] == "binary/octet-stream"
    assert "CacheControl" not in head


def test_user_metadata_over_2kb_is_refused_and_nothing_is_stored(s3):
    b = bucket()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=b, Key="big", Body=b"x", Metadata={"a": "v" * 2100})
    assert error(e.value) == (400, "MetadataTooLarge")
    with pytest.raises(ClientError):
        s3.head_object(Bucket=b, Key="big")
    s3.put_object(Bucket=b, Key="big", Body=b"x", Metadata={"a": "v" * 2000})  # under the limit: fine
    assert s3.head_object(Bucket=b, Key="big")["Metadata"]["a"] == "v" * 2000


def test_copy_object_copies_or_replaces_metadata(s3):
    b = bucket()
    s3.put_object(Bucket=b, Key="src", Body=b"data", **HEADERS)
    s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "src"})
    check_headers(s3.head_object(Bucket=b, Key="copy"))
    s3.copy_object(Bucket=b, Key="repl", CopySource={"Bucket": b, "Key": "src"}, MetadataDirective="REPLACE",
                   ContentType="audio/ogg", Metadata={"k": "v"})
    head = s3.head_object(Bucket=b, Key="repl")
    assert head["ContentType"] == "audio/ogg" and head["Metadata"] == {"k": "v"} and "CacheControl" not in head
    assert s3.get_object(Bucket=b, Key="repl")["Body"].read() == b"data"


def test_copy_onto_itself_needs_replace_and_then_changes_only_the_metadata(s3):
    b = bucket()
    s3.put_object(Bucket=b, Key="self", Body=b"same", Metadata={"old": "1"})
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=b, Key="self", CopySource={"Bucket": b, "Key": "self"})
    assert error(e.value) == (400, "InvalidRequest")
    s3.copy_object(Bucket=b, Key="self", CopySource={"Bucket": b, "Key": "self"}, MetadataDirective="REPLACE",
                   Metadata={"new": "2"}, ContentType="text/plain")
    got = s3.get_object(Bucket=b, Key="self")
    assert got["Metadata"] == {"new": "2"} and got["ContentType"] == "text/plain"
    assert got["Body"].read() == b"same"


def test_copy_source_preconditions(s3):
    b = bucket()
    etag = s3.put_object(Bucket=b, Key="src", Body=b"v1")["ETag"]
    src = {"Bucket": b, "Key": "src"}
    past, future = "Mon, 01 Jan 2001 00:00:00 GMT", "Fri, 01 Jan 2100 00:00:00 GMT"
    refused = [dict(CopySourceIfMatch='"0123"'), dict(CopySourceIfNoneMatch=etag),
               dict(CopySourceIfModifiedSince=future), dict(CopySourceIfUnmodifiedSince=past)]
    for condition in refused:
        with pytest.raises(ClientError) as e:
            s3.copy_object(Bucket=b, Key="dst", CopySource=src, **condition)
        assert error(e.value) == (412, "PreconditionFailed"), condition
    with pytest.raises(ClientError):
        s3.head_object(Bucket=b, Key="dst")
    for condition in [dict(CopySourceIfMatch=etag), dict(CopySourceIfNoneMatch='"0123"'),
                      dict(CopySourceIfModifiedSince=past), dict(CopySourceIfUnmodifiedSince=future)]:
        s3.copy_object(Bucket=b, Key="dst", CopySource=src, **condition)
    assert s3.get_object(Bucket=b, Key="dst")["Body"].read() == b"v1"


# ---------------------------------------------------------------- multipart


def _multipart(s3, b: str, key: str, sizes: list[int], **create) -> tuple[str, list[dict], bytes]:
    upload = s3.create_multipart_upload(Bucket=b, Key=key, **create)["UploadId"]
    parts, data = [], b""
    for number, size in enumerate(sizes, 1):
        body = os.urandom(size)
        data += body
        etag = s3.upload_part(Bucket=b, Key=key, UploadId=upload, PartNumber=number, Body=body)["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    return upload, parts, data


def test_multipart_metadata_retried_complete_and_part_numbers(s3):
    b = bucket()
    sizes = [5 * MB, 5 * MB, 1234]
    upload, parts, data = _multipart(s3, b, "mp", sizes, **HEADERS)
    done = s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=upload, MultipartUpload={"Parts": parts})
    # an SDK that lost the answer retries: the same answer, not NoSuchUpload
    again = s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=upload, MultipartUpload={"Parts": parts})
    assert again["ETag"] == done["ETag"] and done["ETag"].endswith('-3"')
    check_headers(s3.head_object(Bucket=b, Key="mp"))
    first = 0
    for number, size in enumerate(sizes, 1):
        head = s3.head_object(Bucket=b, Key="mp", PartNumber=number)
        assert head["PartsCount"] == 3 and head["ContentLength"] == size and head["ETag"] == done["ETag"]
        got = s3.get_object(Bucket=b, Key="mp", PartNumber=number)
        assert got["PartsCount"] == 3 and got["ContentLength"] == size
        assert got["Body"].read() == data[first:first + size]
        first += size
    for method in (s3.get_object, s3.head_object):
        with pytest.raises(ClientError) as e:
            method(Bucket=b, Key="mp", PartNumber=4)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416
    # an object not made by multipart is one part
    s3.put_object(Bucket=b, Key="one", Body=b"body")
    got = s3.get_object(Bucket=b, Key="one", PartNumber=1)
    assert got["Body"].read() == b"body" and "PartsCount" not in got
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=b, Key="one", PartNumber=2)
    assert error(e.value) == (416, "InvalidPartNumber")
    # a retried Complete of an upload whose object was replaced since is no longer known
    s3.put_object(Bucket=b, Key="mp", Body=b"other")
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=upload, MultipartUpload={"Parts": parts})
    assert error(e.value) == (404, "NoSuchUpload")


def test_upload_part_copy_out_of_range_is_invalid_range(s3):
    b = bucket()
    s3.put_object(Bucket=b, Key="src", Body=b"12345")
    upload = s3.create_multipart_upload(Bucket=b, Key="dst")["UploadId"]
    with pytest.raises(ClientError) as e:
        s3.upload_part_copy(Bucket=b, Key="dst", UploadId=upload, PartNumber=1,
                            CopySource={"Bucket": b, "Key": "src"}, CopySourceRange="bytes=0-21")
    assert error(e.value) == (416, "InvalidRange")
    part = s3.upload_part_copy(Bucket=b, Key="dst", UploadId=upload, PartNumber=1,
                               CopySource={"Bucket": b, "Key": "src"}, CopySourceRange="bytes=1-3")
    assert part["CopyPartResult"]["ETag"] == f'"{hashlib.md5(b"234").hexdigest()}"'
    s3.abort_multipart_upload(Bucket=b, Key="dst", UploadId=upload)


# ---------------------------------------------------------------- last writer wins


def _files(cluster, key: bytes) -> list[bytes]:
    """What each replica holds of `key`, and no temp or stray file beside it."""
    out = []
    for vol in key2volume(key, cluster.names, cluster.replicas, cluster.subvolumes):
        path = cluster.volume_dir(vol) / key2path(key).lstrip("/")
        assert [p.name for p in path.parent.iterdir()] == [path.name], cluster.replica_report(key)
        out.append(path.read_bytes())
    return out


def test_concurrent_s3_puts_of_one_key_all_succeed_and_the_last_wins(s3, cluster):
    b = bucket()
    bodies = [bytes([i]) * (MB + i) for i in range(8)]
    start = threading.Barrier(len(bodies))

    def put(body: bytes):
        c = client(cluster.port)
        start.wait()
        return c.put_object(Bucket=b, Key="hot", Body=body, Metadata={"n": str(len(body))})["ETag"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        etags = list(pool.map(put, bodies))  # any 409 raises here
    assert etags == [f'"{hashlib.md5(x).hexdigest()}"' for x in bodies]
    got = s3.get_object(Bucket=b, Key="hot")
    value = got["Body"].read()
    assert value in bodies and got["Metadata"] == {"n": str(len(value))}  # headers of the same write
    assert _files(cluster, f"/{b}/hot".encode()) == [value] * cluster.replicas
    # the plain API keeps minikeyvalue's contract for its own writes
    assert cluster.put(f"/{b}/hot", b"x").status_code == 403


def test_a_retried_put_waits_for_the_stalled_one_instead_of_409(s3, cluster):
    b = bucket()
    sock = socket.create_connection(("127.0.0.1", cluster.port))
    try:
        sock.sendall(f"PUT /{b}/retry HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                     f"Content-Length: 1000000\r\n\r\n".encode() + b"a" * 1000)
        time.sleep(0.5)  # the first write holds the key now
        threading.Timer(1.0, sock.close).start()  # the SDK gives up on it, as on a timeout
        began = time.monotonic()
        etag = s3.put_object(Bucket=b, Key="retry", Body=b"second")["ETag"]
        assert time.monotonic() - began < 20
    finally:
        sock.close()
    assert etag == f'"{hashlib.md5(b"second").hexdigest()}"'
    assert s3.get_object(Bucket=b, Key="retry")["Body"].read() == b"second"
    assert _files(cluster, f"/{b}/retry".encode()) == [b"second"] * cluster.replicas


# ---------------------------------------------------------------- big objects


def _in_flight_most() -> int:
    """The most bytes of one answer the kernel can hold between a volume and a client reading
    nothing: the volume's send buffer, the index's receive buffer (autotuned up to tcp_rmem's
    maximum: 32 MB on some machines), the splice pipe, the index's send buffer."""
    def most(name: str) -> int:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return most("tcp_rmem") + 2 * most("tcp_wmem") + (1 << 20)


def test_a_volume_that_stalls_mid_s3_get_cuts_the_answer_short_within_the_stall_time(make_cluster):
    """A GET streamed through the index waits for the volume under the pool's watchdog: a
    volume gone silent mid-answer ends the client's connection short (the head is out already)."""
    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    size = max(32 * MB, _in_flight_most() + 16 * MB)  # more than every buffer on the way holds
    client(c.port).put_object(Bucket="st", Key="big", Body=os.urandom(size))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)  # set before connecting: no autotuning
    sock.settimeout(30)
    got = 0
    try:
        sock.connect(("127.0.0.1", c.port))
        sock.sendall(b"GET /st/big HTTP/1.1\r\nHost: x\r\nx-amz-date: 20250101T000000Z\r\n"
                     b"Connection: close\r\n\r\n")  # a whole answer ends with the connection
        while got < 2 * MB:
            got += len(sock.recv(1 << 16))
        time.sleep(0.5)  # every buffer on the way fills: the index waits for us, nginx for the index
        c.volumes[0].send(signal.SIGSTOP)
        began = time.monotonic()
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
        took = time.monotonic() - began
    finally:
        c.volumes[0].send(signal.SIGCONT)
        sock.close()
    assert got < size, "the whole value came although its volume was stopped"
    assert took < 12, f"the connection was cut after {took:.1f}s, not within the 5 s stall time"
    assert client(c.port).head_object(Bucket="st", Key="big")["ContentLength"] == size
