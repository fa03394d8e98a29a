"""A second look at S3 writes that take their key's lock only once their body is complete
(s3/values.py): what waiting writers may hold meanwhile, shown on real clusters."""

from __future__ import annotations

import resource
import socket
import time

import pytest
from cluster import HOST, wait_closed

from minikv.placement import key2path, key2volume
from minikv.s3.multipart import part_key

MB = 1 << 20


def _nofile(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _started_put(port: int, target: str, length: int) -> socket.socket:
    """An S3 PUT whose head is sent and whose body is not: the index opens its uploads to the
    replicas at once, and they stay open while the client takes its time."""
    sock = socket.create_connection((HOST, port))
    sock.settimeout(10)
    sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + b"x" * 1000)
    return sock


def _answer(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    except OSError as e:
        return answer + f" ({e})".encode()
    return answer


def _s3_get(port: int, target: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                     "Connection: close\r\n\r\n".encode())
        out = b""
        try:
            while more := sock.recv(1 << 20):
                out += more
        except OSError as e:
            out += f" ({e})".encode()
        return out


def test_s3_writes_mid_body_count_against_the_upload_file_budget(make_cluster):
    """S3 writes hold a volume connection per replica from the start of their body (and, since
    the lock is taken at its end, while they queue for their key too), but they did not count
    in the budget of files kept for uploads that plain PUTs keep to: clients that start many S3
    writes and send their bodies slowly used up the index's open files, and reads that need a
    volume connection (an S3 GET) failed. Now an S3 write past the budget gets 503 SlowDown at
    once, and the files kept for reads stay free."""
    c = make_cluster(volumes=3, replicas=3, workers=1)
    c.index.stop()
    wait_closed(c.port)
    c.index.start(preexec=_nofile(256, 256))  # 64 files kept back, 32 of them for uploads
    value = b"r" * (200 << 10)  # streamed from a volume: a GET needs a connection of its own
    with socket.create_connection((HOST, c.port), timeout=10) as sock:
        sock.sendall(b"PUT /fb/read-me HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(value) + value)
        assert _answer(sock).startswith(b"HTTP/1.1 200 "), "the object to read could not be written"
    socks = []
    try:
        for i in range(70):  # 70 clients (of the 192 allowed), each with 3 volume connections
            socks.append(_started_put(c.port, f"/fb/slow{i % 5}", MB))
        time.sleep(1)
        got = _s3_get(c.port, "/fb/read-me")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(value), got[:600]
        refused = []
        for s in socks:
            s.settimeout(0.2)
            refused.append(_answer(s))
        slowed = [a for a in refused if a.startswith(b"HTTP/1.1 503 ") and b"SlowDown" in a]
        assert 50 <= len(slowed) <= 70 - 9, refused[:3]
    finally:
        for s in socks:
            s.close()


def test_a_write_whose_end_comes_late_and_then_queues_is_refused_before_the_volumes_drop_it(make_cluster):
    """The uploads to the replicas are opened with the body and wait, their last bytes held
    back, while the write queues for its key; nginx drops an upload that sends it nothing for
    60 s (client_body_timeout). A client whose body's end came late (the index allows it 60 s
    between two reads) then queued behind a long write of the key (a plain PUT of a new key,
    sent slowly) had its commit fail on every volume ("volume closed the connection", each
    volume marked down for a moment). With a value of the same size as the one before, the
    volumes' state could not be told, and the key was deleted: the plain PUT, answered 201 a
    moment before, was lost. Now the wait for the key ends before the volumes would drop the
    uploads: 409, nothing changed, no volume marked down."""
    c = make_cluster(volumes=3, replicas=3, workers=1)
    key = "/late/obj"
    w = socket.create_connection((HOST, c.port))
    w.settimeout(120)
    w.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (100_000, b"a" * 100_000))
    time.sleep(0.3)
    w.sendall(b"%x\r\n%s\r\n" % (100_000, b"b" * 100_000))  # the first part goes on to the volumes now
    time.sleep(0.3)
    began = time.monotonic()
    # a plain PUT of the same (new) key, sent slowly: holds the key for ~65 s
    p = socket.create_connection((HOST, c.port))
    p.settimeout(120)
    p.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n".encode() + b"p" * 20_000)
    try:
        for i in range(1, 5):  # a byte every 13 s: within the index's body timeouts (20 kB sent: 80 s)
            time.sleep(began + 13 * i - time.monotonic())
            p.sendall(b"p")
            if i == 3:  # at 39 s: the end of the S3 body (its uploads have had nothing for 39 s)
                w.sendall(b"0\r\n\r\n")
        time.sleep(max(0.0, began + 66 - time.monotonic()))
        p.sendall(b"p" * (200_000 - 20_004))
        assert _answer(p).startswith(b"HTTP/1.1 201 ")
        answer = _answer(w)
        # the write did not wait past what the volumes allow, and said why it gave up
        assert answer.startswith(b"HTTP/1.1 409 "), answer
        assert b"nothing was changed" in answer, answer
        # no volume was taken for down: a write of another key goes through at once
        assert c.put("/late/other", b"x").status_code == 201
    finally:
        w.close()
        p.close()
    assert c.get(key, allow_redirects=True).content == b"p" * 200_000


def _part_files(c, upload: str, number: int) -> list:
    key = part_key(upload, number)
    return [p for vol in key2volume(key, c.names, c.replicas, c.subvolumes)
            if (p := c.volume_dir(vol) / key2path(key).lstrip("/")).exists()]


def test_a_part_whose_body_ends_after_its_upload_was_aborted_is_not_kept(make_cluster):
    """A part takes its key only once its body is complete, so an Abort (or the Complete) of
    its upload, which deletes the parts it finds, does not find one still being sent. The
    part was then stored anyway and answered 200, for an upload that no longer exists: its
    record and files stayed for good (no Abort can name the upload again, and nothing else
    removes a part). Now a part that finds its upload gone once stored is deleted: 404
    NoSuchUpload, nothing left."""
    boto3 = pytest.importorskip("boto3")  # noqa: F841
    from test_s3 import client

    c = make_cluster(volumes=3, replicas=3, workers=1)
    s3 = client(c.port)
    upload = s3.create_multipart_upload(Bucket="ab", Key="obj")["UploadId"]
    body = b"q" * (256 << 10)
    sock = socket.create_connection((HOST, c.port))
    sock.settimeout(30)
    sock.sendall(f"PUT /ab/obj?partNumber=1&uploadId={upload} HTTP/1.1\r\nHost: x\r\n"
                 "x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-1])
    try:
        time.sleep(0.5)
        s3.abort_multipart_upload(Bucket="ab", Key="obj", UploadId=upload)
        sock.sendall(body[-1:])
        answer = _answer(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 404 ") and b"NoSuchUpload" in answer, answer
    assert _part_files(c, upload, 1) == []
    assert s3.list_multipart_uploads(Bucket="ab").get("Uploads", []) == []


def test_a_part_replaced_while_complete_streams_the_parts_does_not_slip_into_the_object(make_cluster):
    """Complete checks the parts' ETags first, then streams them one after the other. A part
    sent again meanwhile no longer holds its key while its body comes (it takes it only to
    commit), so Complete did not see it coming: when it was stored while Complete streamed an
    earlier part, Complete read the new part's bytes, and the object held a value no ETag the
    client named stands for (a mix of the parts it named and one it did not). Now Complete
    checks each part's record after streaming it: replaced -> InvalidPart, nothing changed."""
    import threading

    boto3 = pytest.importorskip("boto3")  # noqa: F841
    from botocore.exceptions import ClientError
    from test_s3 import client

    c = make_cluster(volumes=3, replicas=3, workers=2)
    s3 = client(c.port)
    s3.put_object(Bucket="mx", Key="obj", Body=b"old")
    upload = s3.create_multipart_upload(Bucket="mx", Key="obj")["UploadId"]
    first = b"1" * (64 * MB)  # long to stream: the part sent again is stored meanwhile
    named, other = b"A" * 1000, b"B" * 1000
    etags = [s3.upload_part(Bucket="mx", Key="obj", UploadId=upload, PartNumber=n, Body=body)["ETag"]
             for n, body in ((1, first), (2, named))]
    sock = socket.create_connection((HOST, c.port))
    sock.settimeout(60)
    sock.sendall(f"PUT /mx/obj?partNumber=2&uploadId={upload} HTTP/1.1\r\nHost: x\r\n"
                 "x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 f"Content-Length: {len(other)}\r\n\r\n".encode() + other[:-1])
    temps = [v.args[-1] + "/body_temp" for v in c.volumes]
    done: dict = {}

    def complete():
        try:
            done["answer"] = s3.complete_multipart_upload(
                Bucket="mx", Key="obj", UploadId=upload,
                MultipartUpload={"Parts": [{"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)]})
        except ClientError as e:
            done["error"] = e.response["Error"]["Code"]

    t = threading.Thread(target=complete)
    try:
        t.start()
        import os

        deadline = time.monotonic() + 30
        while not any(files for d in temps if os.path.isdir(d) for _, _, files in os.walk(d)):
            if time.monotonic() > deadline:
                break  # a composite Complete streams nothing: the race below is run all the same
            time.sleep(0.005)
        sock.sendall(other[-1:])  # the part sent again is stored while part 1 streams
        answer = _answer(sock)
    finally:
        t.join(60)
        sock.close()
    # a composite Complete (s3/composite.py) reads no part: the part sent again is stored before
    # Complete's manifest (and Complete then fails) or is refused once the manifest exists
    refused = answer.startswith(b"HTTP/1.1 404 ") and b"NoSuchUpload" in answer
    assert answer.startswith(b"HTTP/1.1 200 ") or refused, answer
    got = s3.get_object(Bucket="mx", Key="obj")["Body"].read()
    if refused:
        assert "answer" in done and got == first + named, done
    elif "error" in done:
        assert done["error"] == "InvalidPart", done
        assert got == b"old"
    else:
        assert got[-1000:] == named and len(got) == len(first) + 1000, got[-1000:][:20]


def test_volumes_restarted_before_the_end_of_an_overwrite_keep_the_old_value(make_cluster):
    """The uploads of a write wait open for its last bytes (the body's end, then the key's
    lock). Volumes that restart meanwhile drop them, and nothing of the new value reaches any
    of them; but the commit only saw its last bytes fail on every volume, could not tell the
    old file from the new by size (an overwrite of the same size), and deleted the key: the
    old value, acknowledged long before, was lost. Now a write whose upload connections closed
    before its end is refused with nothing changed: 503, the old value stays."""
    boto3 = pytest.importorskip("boto3")  # noqa: F841
    from test_s3 import client

    c = make_cluster(volumes=3, replicas=3, workers=1)
    s3 = client(c.port)
    old, new = b"o" * 300_000, b"n" * 300_000
    s3.put_object(Bucket="vr", Key="obj", Body=old)
    sock = socket.create_connection((HOST, c.port))
    sock.settimeout(30)
    sock.sendall(b"PUT /vr/obj HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p)
                                                               for p in (new[:150_000], new[150_000:])))
    try:
        time.sleep(0.5)  # all the value is read; its end (the chunked terminator) is to come
        for v in c.volumes:
            v.stop()
        for v in c.volumes:
            v.start()
        time.sleep(1)
        sock.sendall(b"0\r\n\r\n")
        answer = _answer(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"nothing was changed" in answer, answer
    assert s3.get_object(Bucket="vr", Key="obj")["Body"].read() == old
