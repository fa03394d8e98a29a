"""Big S3 GETs forwarded socket to socket (http/splice.py), S3 overwrites whose volumes fall
silent at the commit (s3/values.py), and `minikv gc` for abandoned multipart uploads
(admin/uploads.py), on real clusters."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from cluster import HOST

from minikv.http.splice import SPLICE_MIN
from minikv.placement import key2path, key2volume
from minikv.s3.multipart import PART_PREFIX

S3 = {"x-amz-date": "20250101T000000Z"}  # an S3 request, unsigned (no credentials configured)
MB = 1 << 20


def _fds(c) -> int:
    """Open descriptors of the index's processes (the server and its workers)."""
    pids = [c.index.proc.pid]
    with open(f"/proc/{pids[0]}/task/{pids[0]}/children") as f:
        pids += [int(p) for p in f.read().split()]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def _get_head(port: int, target: str) -> tuple[socket.socket, int, bytes]:
    """An S3 GET on a raw socket: (the socket, Content-Length, the body bytes read with the head)."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nx-amz-date: 20250101T000000Z\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return sock, length, rest


def test_big_s3_gets_are_whole_in_full_in_ranges_and_on_one_kept_connection(cluster):
    value = os.urandom(3 * MB + 12345)
    assert cluster.put("/big/whole", value).status_code == 201
    with requests.Session() as s:  # one keep-alive connection for all of them
        url = cluster.url("/big/whole")
        for _ in range(2):
            r = s.get(url, headers=S3)
            assert r.status_code == 200 and hashlib.md5(r.content).digest() == hashlib.md5(value).digest()
        first, last = 1000, 1000 + SPLICE_MIN + 54321
        r = s.get(url, headers={**S3, "Range": f"bytes={first}-{last}"})
        assert r.status_code == 206 and r.content == value[first:last + 1]
        r = s.get(url, headers={**S3, "Range": "bytes=10-20"})  # a short one is copied, on the same connection
        assert r.status_code == 206 and r.content == value[10:21]
        assert s.get(url, allow_redirects=False).status_code == 302  # and the plain API after it


def test_clients_that_leave_mid_answer_leave_no_descriptor_behind(cluster):
    value = os.urandom(16 * MB)
    assert cluster.put("/big/left", value).status_code == 201

    def leave_mid_answer(times: int) -> None:
        for _ in range(times):
            sock, length, _ = _get_head(cluster.port, "/big/left")
            sock.recv(256 << 10)
            sock.close()  # mid-answer
        time.sleep(1)
        r = requests.get(cluster.url("/big/left"), headers=S3)
        assert r.status_code == 200 and r.content == value

    # a first round warms every worker's pools (which worker takes a connection is the
    # kernel's choice: two GETs first left one worker cold, its new volume connections
    # counted as left behind); a descriptor left per answer shows in the second
    leave_mid_answer(10)
    before = _fds(cluster)
    leave_mid_answer(20)
    assert _fds(cluster) <= before + 4, (before, _fds(cluster))


def test_volumes_that_stop_mid_answer_cut_the_answer_short_and_the_index_serves_on(make_cluster):
    c = make_cluster(volumes=2, replicas=2, workers=1)
    value = os.urandom(64 * MB)
    assert c.put("/big/cut", value).status_code == 201
    sock, length, got = _get_head(c.port, "/big/cut")
    got = len(got)
    try:
        while got < 2 * MB:
            got += len(sock.recv(1 << 20))
        for v in c.volumes:
            v.send(signal.SIGSTOP)
        t0 = time.monotonic()
        while more := sock.recv(1 << 20):  # the index gives up on the volume and closes
            got += len(more)
        took = time.monotonic() - t0
    finally:
        sock.close()
        for v in c.volumes:
            v.send(signal.SIGCONT)
    assert got < length and took < 15, (got, length, took)
    r = requests.get(c.url("/big/cut"), headers=S3)
    assert r.status_code == 200 and r.content == value


# -- an S3 overwrite of the same size whose volumes fall silent at the commit --

def _overwrite_held(port: int, target: str, new: bytes) -> socket.socket:
    """An S3 PUT sent whole but its chunked terminator: the index holds the commit back."""
    sock = socket.create_connection((HOST, port))
    sock.settimeout(60)
    half = len(new) // 2
    sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode()
                 + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (new[:half], new[half:])))
    time.sleep(0.5)  # the body is read; its end is to come
    return sock


def _answer(sock: socket.socket) -> bytes:
    answer = b""
    while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
        answer += more
    return answer


def test_every_volume_silent_at_the_commit_of_a_same_size_overwrite_keeps_a_whole_value(make_cluster):
    """Every volume stops as the last bytes go out and resumes only once the index has given
    up waiting for their answers: it asks each what it holds. The old and new values have the
    same size, so the size could not tell, and the key was deleted ("the replicas could not be
    made equal"); now the file's md5 tells, and the key keeps a whole value, the one its record
    says."""
    c = make_cluster(volumes=3, replicas=3, workers=1, flags=["-voltimeout", "3s"])
    old, new = b"o" * 300_000, b"n" * 300_000
    r = c.request("PUT", "/sv/obj", data=old, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    assert r.status_code == 200, r.text
    sock = _overwrite_held(c.port, "/sv/obj", new)
    try:
        for v in c.volumes:
            v.send(signal.SIGSTOP)
        t0 = time.monotonic()
        sock.sendall(b"0\r\n\r\n")
        # the commit waits 5 s for the volumes (STALL_MIN), then asks each with a HEAD that
        # may take -voltimeout (3 s): they resume in between
        time.sleep(6.5)
        for v in c.volumes:
            v.send(signal.SIGCONT)
        answer = _answer(sock)
    finally:
        sock.close()
        for v in c.volumes:
            v.send(signal.SIGCONT)
    assert time.monotonic() - t0 > 5, answer  # the volumes' silence was seen
    r = requests.get(c.url("/sv/obj"), headers=S3)
    assert r.status_code == 200 and r.content in (old, new), (answer, r.status_code, r.content[:100])
    # and the record knows which: its md5 (the ETag) is the one of the bytes served
    assert r.headers["ETag"].strip('"') == hashlib.md5(r.content).hexdigest(), answer


def test_one_volume_hung_at_the_commit_of_an_overwrite_keeps_the_new_value_on_the_others(make_cluster):
    """One volume hangs as the last bytes go out: the others rename the new value into place.
    The hung one cannot take a copy, and the key was deleted everywhere; now the record names
    the volumes that hold the new value, the client gets 503 (write again), and REBALANCE
    completes the replicas once the volume is back."""
    c = make_cluster(volumes=3, replicas=3, workers=1)
    old, new = b"o" * 300_000, b"n" * 300_000
    r = c.request("PUT", "/sv/one", data=old, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    assert r.status_code == 200, r.text
    sock = _overwrite_held(c.port, "/sv/one", new)
    try:
        c.volumes[0].send(signal.SIGSTOP)
        sock.sendall(b"0\r\n\r\n")
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"2 of 3 replicas" in answer, answer
        r = requests.get(c.url("/sv/one"), headers=S3)
        assert r.status_code == 200 and r.content == new
    finally:
        sock.close()
        c.volumes[0].send(signal.SIGCONT)
    assert c.get("/sv/one", allow_redirects=False).headers["Key-Balance"] == "unbalanced"
    assert c.request("REBALANCE", "/sv/one").status_code == 204
    for volume in key2volume(b"/sv/one", c.names, c.replicas, c.subvolumes):
        assert (c.volume_dir(volume) / key2path(b"/sv/one").lstrip("/")).read_bytes() == new, volume


# -- minikv gc: abandoned multipart uploads --

def _gc(c, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minikv", "gc", "-volumes", ",".join(c.names), "-db", c.db,
                           "-replicas", str(c.replicas), "-subvolumes", str(c.subvolumes), *flags],
                          capture_output=True, text=True, timeout=120)


def _part_files(c, upload_id: str) -> int:
    """The part files of an upload on the volumes' disks."""
    n = 0
    for v in c.volumes:
        for number in range(1, 4):
            name = key2path(PART_PREFIX + upload_id.encode() + b"/%05d" % number).rsplit("/", 1)[1]
            n += sum(1 for _ in c.volume_dir(f"{HOST}:{v.port}").rglob(name))
    return n


@pytest.mark.parametrize("engine", ["lmdb", "postgresql"], indirect=True)
def test_gc_aborts_uploads_older_than_its_age_and_keeps_younger_ones(make_cluster):
    boto3 = pytest.importorskip("boto3")  # noqa: F841
    from test_s3 import client

    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    s3.create_bucket(Bucket="mpu")
    old = s3.create_multipart_upload(Bucket="mpu", Key="old")["UploadId"]
    old_made = time.time()  # after the answer: the upload started before this
    for n in (1, 2):
        s3.upload_part(Bucket="mpu", Key="old", UploadId=old, PartNumber=n, Body=b"p" * 1000)
    time.sleep(6)
    dry = _gc(c, "-uploads-older-than", "5s", "-dry-run")
    assert dry.returncode == 0 and "1 multipart uploads aborted (dry run)" in dry.stderr, dry.stderr
    assert _part_files(c, old) == 4
    default = _gc(c)  # 7 days: it is young
    assert default.returncode == 0 and "aborted" not in default.stderr, default.stderr
    young_made = time.time()  # before the request: the upload starts after this
    young = s3.create_multipart_upload(Bucket="mpu", Key="young")["UploadId"]
    s3.upload_part(Bucket="mpu", Key="young", UploadId=young, PartNumber=1, Body=b"y" * 1000)
    assert _part_files(c, old) == 4 and _part_files(c, young) == 2
    # an age just under the old upload's: the young one is at least young_made - old_made (over
    # 6 s) younger. Not a fixed 5s: on a loaded machine the young upload had passed 5 s by the
    # time gc (a new process) looked at it, and it was aborted too.
    age = time.time() - old_made - 1
    assert age - (time.time() - young_made) > 5, "the young upload is too close to the old one"
    done = _gc(c, "-uploads-older-than", f"{age:.1f}s")
    assert done.returncode == 0 and "1 multipart uploads aborted, 2 their parts" in done.stderr, done.stderr

    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket="mpu").get("Uploads", [])}
    assert left == {young}
    assert _part_files(c, old) == 0 and _part_files(c, young) == 2
    s3.complete_multipart_upload(Bucket="mpu", Key="young", UploadId=young,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": hashlib.md5(b"y" * 1000).hexdigest()}]})
    assert s3.get_object(Bucket="mpu", Key="young")["Body"].read() == b"y" * 1000


def test_gc_deletes_parts_whose_upload_is_gone(make_cluster):
    """A crash between the two steps of an abort (its upload dropped, its parts not yet)
    leaves parts no upload names: gc deletes them, and leaves the parts of live uploads."""
    boto3 = pytest.importorskip("boto3")  # noqa: F841
    from test_s3 import client

    from minikv.s3.meta import Meta

    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    s3.create_bucket(Bucket="orph")
    gone = s3.create_multipart_upload(Bucket="orph", Key="a")["UploadId"]
    kept = s3.create_multipart_upload(Bucket="orph", Key="b")["UploadId"]
    for upload_id, key in ((gone, "a"), (kept, "b")):
        s3.upload_part(Bucket="orph", Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 500)
    meta = Meta(os.path.join(c.db, "s3"))  # the crash: the upload is dropped, its part stays
    try:
        assert meta.drop_upload(gone)
    finally:
        meta.close()
    done = _gc(c)
    assert done.returncode == 0 and "1 orphan parts deleted" in done.stderr, done.stderr
    assert _part_files(c, gone) == 0 and _part_files(c, kept) == 2
    assert [p["PartNumber"] for p in s3.list_parts(Bucket="orph", Key="b", UploadId=kept)["Parts"]] == [1]


def test_durations_take_days_as_s3_lifecycle_rules_count_them():
    from minikv.cli import parse_args, parse_duration

    assert parse_duration("7d") == parse_duration("168h") == 7 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_args(["gc"]).flags["uploads-older-than"] == 7 * 86400


def test_splice_forward_moves_exact_bytes_and_tells_an_early_end():
    """forward() on real loopback sockets: exactly `count` bytes reach the client, a source that
    closes before them is SourceFailed, and no link can be made on a closed transport (the
    answer is then copied)."""
    import uvloop

    from minikv.http import splice

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list = []
        server = await loop.create_server(lambda: _Keep(accepted), HOST, 0)
        port = server.sockets[0].getsockname()[1]

        async def pair():
            transport, _ = await loop.create_connection(asyncio.Protocol, HOST, port)
            while len(accepted) < 1:
                await asyncio.sleep(0.01)
            return transport, accepted.pop()

        src_local, src_peer = await pair()  # the volume writes at src_peer; we read src_local
        dst_local, dst_peer = await pair()  # we write dst_local; the client reads at dst_peer
        src_local.pause_reading()
        data = os.urandom(3 * MB)
        src_peer.write(data + b"trailing bytes of the next answer")
        await splice.forward(splice.link(src_local, dst_local), len(data), 5.0)
        got = dst_peer.get_protocol()
        while len(got.data) < len(data):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert bytes(got.data) == data  # not a byte more

        short_local, short_peer = await pair()
        short_local.pause_reading()
        short_peer.write(b"x" * 1000)
        short_peer.close()
        with pytest.raises(splice.SourceFailed, match="bytes of its answer to come"):
            await splice.forward(splice.link(short_local, dst_local), 5000, 5.0)
        short_local.close()
        await asyncio.sleep(0.05)
        assert splice.link(short_local, dst_local) is None
        for t in (src_local, src_peer, dst_local, dst_peer):
            t.close()
        server.close()

    uvloop.run(main())


class _Keep(asyncio.Protocol):
    """A server side that hands its transport over and keeps what it receives."""

    def __init__(self, accepted: list):
        self.accepted = accepted
        self.data = bytearray()

    def connection_made(self, transport) -> None:
        self.accepted.append(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
