"""S3 objects beyond bytes, on a real cluster with boto3 and raw requests: last-writer-wins for
concurrent S3 writes of one key."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from minikv.placement import key2path, key2volume  # noqa: E402

MB = 1 << 20


def client(port: int):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1",
                        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


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
        return c.put_object(Bucket=b, Key="hot", Body=body)["ETag"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        etags = list(pool.map(put, bodies))  # any 409 raises here
    assert etags == [f'"{hashlib.md5(x).hexdigest()}"' for x in bodies]
    got = s3.get_object(Bucket=b, Key="hot")
    value = got["Body"].read()
    assert value in bodies
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
