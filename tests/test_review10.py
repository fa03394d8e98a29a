"""A red-team round of the admin commands and the S3 paths they meet: one server named two ways,
a subvolume folder linked to another, multipart objects and -rebalance -server, limits, and
listings that are not nginx's. Each test here failed on the code reviewed, against real nginx
volumes and a real index."""

from __future__ import annotations

import os
import time

import pytest
from cluster import HOST
from test_admin import admin, all_files


def _values(c) -> dict:
    """Every key file on the volumes with its bytes (not the disk reports the volumes rewrite)."""
    return {p: p.read_bytes() for p in all_files(c) if not p.name.startswith(".minikv")}


def _written(make_cluster, n: int = 30):
    c = make_cluster(volumes=3, replicas=2, subvolumes=2)
    for i in range(n):
        assert c.put(f"/alias/{i}", b"value %d" % i).status_code == 201
    return c


# Volumes are compared by name: with -volumes naming one server `localhost:P` where the records
# say `127.0.0.1:P`, a rebalance "moved" keys onto their own files and deleted them as stale
# copies, and gc -delete-orphans deleted every file of that volume as no record's.
def test_a_volume_named_two_ways_is_refused_before_anything_is_moved_or_deleted(make_cluster):
    c = _written(make_cluster)
    before = _values(c)
    c.index.stop()
    respelled = [n.replace(HOST, "localhost") if i == 1 else n for i, n in enumerate(c.names)]
    for command, flags in (("rebalance", []), ("gc", ["-delete-orphans", "-age", "0s"]),
                           ("repair", ["-delete-orphans"]), ("repair", []), ("verify", [])):
        r = admin(command, c, *flags, volumes=respelled)
        assert r.returncode == 2 and "one server under two names" in r.stderr, (command, r.stderr)
    both = [*c.names, c.names[0].replace(HOST, "localhost")]  # one server twice in -volumes
    r = admin("rebalance", c, volumes=both)
    assert r.returncode == 2 and "one server under two names" in r.stderr, r.stderr
    assert _values(c) == before
    r = admin("verify", c)
    assert r.returncode == 0, r.stderr


# A subvolume folder linked to another shows every file of that one a second time, as no
# record's: repair and gc -delete-orphans deleted those "orphans" through the link, which were
# the files the records name.
def test_orphans_seen_through_a_linked_subvolume_are_not_deleted(make_cluster):
    c = _written(make_cluster)
    top = c.volume_dir(c.names[0])
    os.symlink("sv01", top / "sv07")
    before = {p: v for p, v in _values(c).items() if "sv07" not in p.parts}
    c.index.stop()
    for command, flags in (("repair", ["-delete-orphans"]), ("gc", ["-delete-orphans", "-age", "0s"])):
        r = admin(command, c, *flags)
        assert "a folder linked to another" in r.stderr, (command, r.stderr)
        assert {p: v for p, v in _values(c).items() if "sv07" not in p.parts} == before, command
    (top / "sv07").unlink()
    r = admin("verify", c)
    assert r.returncode == 0, r.stderr


# `rebalance -server` lists the keys through `?list`, which holds no multipart part or manifest
# (internal keys no URL names), and took a multipart object's 200 for "gone": it said done, and
# the object was lost once the old volumes were retired. A REBALANCE of the object now moves its
# parts and manifest.
def test_an_online_rebalance_moves_the_parts_of_multipart_objects(make_cluster):
    import subprocess
    import sys


    pytest.importorskip("boto3")
    from test_s3 import client

    c = make_cluster(volumes=3, replicas=1, subvolumes=2)
    s3 = client(c.port)
    s3.create_bucket(Bucket="mig")
    parts = [os.urandom(5 << 20), b"tail of it"]
    upload = s3.create_multipart_upload(Bucket="mig", Key="obj")["UploadId"]
    etags = [s3.upload_part(Bucket="mig", Key="obj", UploadId=upload, PartNumber=n + 1, Body=body)["ETag"]
             for n, body in enumerate(parts)]
    s3.complete_multipart_upload(Bucket="mig", Key="obj", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)]})
    s3.put_object(Bucket="mig", Key="plain", Body=b"plain value")
    c.restart_index(flags=["-volumes", c.names[2]])  # onto the third volume alone
    r = subprocess.run([sys.executable, "-m", "minikv", "rebalance", "-server", f"{HOST}:{c.port}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for v in c.volumes[:2]:
        v.stop()  # the old volumes are retired
    assert s3.get_object(Bucket="mig", Key="obj")["Body"].read() == b"".join(parts)
    assert s3.get_object(Bucket="mig", Key="plain")["Body"].read() == b"plain value"


# -max-value-size was checked for each part of a multipart upload, never for their sum: three
# parts of 5 MB made a 15 MB object past a 6 MB limit.
def test_a_multipart_object_over_max_value_size_is_refused_at_complete(make_cluster):

    pytest.importorskip("boto3")
    from botocore.exceptions import ClientError
    from test_s3 import client

    c = make_cluster(volumes=1, replicas=1, subvolumes=1, flags=["-max-value-size", "6000000"])
    s3 = client(c.port)
    s3.create_bucket(Bucket="big")
    upload = s3.create_multipart_upload(Bucket="big", Key="obj")["UploadId"]
    etags = [s3.upload_part(Bucket="big", Key="obj", UploadId=upload, PartNumber=n, Body=b"x" * (5 << 20))["ETag"]
             for n in (1, 2)]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket="big", Key="obj", UploadId=upload, MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": t} for n, t in zip((1, 2), etags)]})
    assert e.value.response["Error"]["Code"] == "EntityTooLarge"
    assert c.request("HEAD", "/big/obj").status_code == 404
    # within the limit, the same upload completes
    done = s3.complete_multipart_upload(Bucket="big", Key="obj", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": etags[0]}]})
    assert done["ETag"].endswith('-1"')


# -voltimeout 0 timed out every request to the volumes: verify reported a healthy cluster's
# every key lost (exit 1, as if it were true). It is refused as the other bad flags are.
def test_a_voltimeout_of_0_is_refused(make_cluster):
    c = _written(make_cluster, 3)
    c.index.stop()
    for command in ("verify", "repair", "rebalance", "rebuild"):
        r = admin(command, c, "-voltimeout", "0")
        assert r.returncode == 2 and "-voltimeout 0s" in r.stderr, (command, r.returncode, r.stderr)
    assert admin("verify", c).returncode == 0


class _FakeVolume:
    """Something in a volume's place that answers every GET with `body` (JSON, as nginx's
    listings say they are), on a loopback port of its own."""

    def __init__(self, body):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the server's name for it
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                answer = body(self.path) if callable(body) else body
                if not isinstance(answer, bytes):  # endless: chunked until the client gives up
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in answer:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.name = f"{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _endless(path: str):
    entry = b'{ "name":"x", "type":"file", "mtime":"Fri, 04 Dec 2026 10:00:00 GMT", "size":1 },\n' * 10_000
    yield b"[\n"
    for _ in range(2_000):  # 1.6 GB if nothing stops it: bounded all the same
        yield entry


# A listing that is JSON but not nginx's (entries that are not objects, names that are not text,
# sizes that are not numbers or are negative) crashed rebuild and verify with a traceback; an
# answer that never ends was gathered whole (4 GB in 3 s). Each is now that volume's error.
@pytest.mark.parametrize("body", [
    b'[1, 2, "x", null]',
    b'[{ "name": 12, "type": "directory" }]',
    b'[{ "name": "sv00", "type": "directory", "mtime": "x" }, { "name": "f", "type": "file", "size": "abc" }]',
    b'[{ "name": "ab", "type": "file", "mtime": "x", "size": -5 }]',
    b'{"not": "a list"}',
    _endless,
])
def test_a_listing_that_is_not_nginxs_is_that_volumes_error(make_cluster, tmp_path, body):
    import resource
    import subprocess
    import sys

    c = _written(make_cluster, 3)
    fake = _FakeVolume(body)
    try:
        for command, db in (("rebuild", tmp_path / "new"), ("verify", c.root / "index")):
            args = [sys.executable, "-m", "minikv", command, "-volumes", ",".join([*c.names, fake.name]),
                    "-db", str(db), "-replicas", "2", "-subvolumes", "2", "-workers", "1"]
            r = subprocess.run(args, capture_output=True, text=True, timeout=120)
            # verify may find it at its first probe of the volumes, and then counts it as down
            # (its copies unreachable: none here) rather than as a failed walk
            assert r.returncode == 1 or command == "verify", (command, r.returncode, r.stderr[-2000:])
            assert fake.name in r.stderr, (command, r.returncode, r.stderr[-2000:])
            assert "Traceback" not in r.stderr, r.stderr[-3000:]
            assert "minikv volume" in r.stderr or "not JSON" in r.stderr, r.stderr[-2000:]
    finally:
        fake.close()
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1_000_000  # KB: no answer gathered whole


# -protect kept a plain DELETE from destroying a value, and S3's DeleteObject only unlinked, but
# an S3 write over the object replaced it all the same.
def test_protect_refuses_s3_writes_over_an_object(make_cluster):
    pytest.importorskip("boto3")
    from botocore.exceptions import ClientError
    from test_s3 import client

    c = make_cluster(volumes=2, replicas=2, subvolumes=1, flags=["-protect"])
    s3 = client(c.port)
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="k", Body=b"first")
    s3.put_object(Bucket="keep", Key="src", Body=b"other")
    upload = s3.create_multipart_upload(Bucket="keep", Key="k")["UploadId"]
    etag = s3.upload_part(Bucket="keep", Key="k", UploadId=upload, PartNumber=1, Body=b"part")["ETag"]
    for write in (lambda: s3.put_object(Bucket="keep", Key="k", Body=b"second"),
                  lambda: s3.copy_object(Bucket="keep", Key="k", CopySource={"Bucket": "keep", "Key": "src"}),
                  lambda: s3.complete_multipart_upload(Bucket="keep", Key="k", UploadId=upload, MultipartUpload={
                      "Parts": [{"PartNumber": 1, "ETag": etag}]})):
        with pytest.raises(ClientError) as e:
            write()
        assert e.value.response["Error"]["Code"] == "AccessDenied"
        assert s3.get_object(Bucket="keep", Key="k")["Body"].read() == b"first"
    s3.delete_object(Bucket="keep", Key="k")  # unlinks it: now it may be written again
    s3.put_object(Bucket="keep", Key="k", Body=b"second")
    assert s3.get_object(Bucket="keep", Key="k")["Body"].read() == b"second"


def _drip(path: str):
    """The top lists a subvolume; every other listing comes a byte every 0.2 s, without end."""
    if path == "/":
        return b'[\n{ "name":"sv00", "type":"directory", "mtime":"Fri, 04 Dec 2026 10:00:00 GMT" }\n]\n'

    def bytes_slowly():
        yield b"["
        while True:
            time.sleep(0.2)
            yield b" "
    return bytes_slowly()


# A volume that answered its listings a byte at a time was waited for without end (the limit was
# on silence only): every listing now has a total time, and a volume that fails one for good is
# left out of the rest of the walk instead of being waited for folder after folder.
def test_a_volume_that_lists_a_byte_at_a_time_is_left_out_not_waited_for(make_cluster, monkeypatch):
    import asyncio

    from minikv.admin import lister, walk
    from minikv.http.client import Pool

    monkeypatch.setattr(lister, "LIST_TOTAL", 2.0)
    monkeypatch.setattr(walk, "LIST_TIMEOUT", 1.0)
    c = _written(make_cluster, 20)
    fake = _FakeVolume(_drip)

    async def run():
        pool = Pool(1.0)
        walker = walk.Walker(pool, [*c.names, fake.name], 4)
        found: dict = {}

        async def handle(group):
            found.update(group)

        try:
            await walker.walk(await walker.roots(), handle, lambda: None)
        finally:
            pool.close()
        return walker, found

    started = time.monotonic()
    try:
        walker, found = asyncio.run(run())
    finally:
        fake.close()
    assert time.monotonic() - started < 60
    assert len(found) == 20  # the real volumes' keys, all of them
    # one error for each listing that was in flight when the volume failed (4 walk at once), not
    # one for each of its 256 folders
    assert 1 <= len(walker.errors) <= 4, walker.errors
    assert all(fake.name in e and "left out of this walk" in e for e in walker.errors), walker.errors


# The server compares volumes by name as the admin commands do: restarted with -volumes naming a
# server otherwise than its records, a REBALANCE (or an S3 overwrite) took a copy on that server
# for another one's and deleted it after the move.
def test_the_server_refuses_a_volume_named_two_ways(make_cluster):
    import subprocess
    import sys

    from cluster import free_port

    c = _written(make_cluster, 10)
    c.index.stop()
    respelled = ",".join(n.replace(HOST, "localhost") if i == 1 else n for i, n in enumerate(c.names))
    twice = ",".join([*c.names, c.names[0].replace(HOST, "localhost")])
    for volumes in (respelled, twice):
        r = subprocess.run([sys.executable, "-m", "minikv", "server", "-port", str(free_port()), "-host", HOST,
                            "-volumes", volumes, "-db", str(c.root / "index"), "-replicas", "2",
                            "-subvolumes", "2"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "one server under two names" in r.stderr, r.stderr
