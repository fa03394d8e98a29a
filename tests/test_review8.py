"""Review of the local rebuild, Store.add_many, gc and the manifests' checks against hostile or
damaged volume contents, and of the PostgreSQL index's wait for a database that is down: each
test here failed on the code reviewed."""

from __future__ import annotations

import base64
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_local_fast import put_file, rebuild  # noqa: E402
from test_rebuild_fast import lmdb_records  # noqa: E402

from minikv.admin.local import LocalWalker  # noqa: E402
from minikv.index.record import decode_composite  # noqa: E402
from minikv.s3.composite import PART_PREFIX, manifest, part_key  # noqa: E402


def test_a_manifest_named_with_no_upload_id_of_ours_restores_no_object(tmp_path):
    # a file on a volume can be named anything: a manifest's key whose upload id is not UTF-8
    # ended rebuild's multipart step with UnicodeDecodeError (a traceback, the objects after it
    # not restored); one whose id holds a `/` became a composite record no reader can decode
    good = "0123456789abcdef" * 2
    strays = {b"/not-utf8": PART_PREFIX + b"\x80\x81", b"/slash": PART_PREFIX + b"00/x"}
    files = {part_key(good, 1): b"part", part_key(good, 0): manifest(b"/good", 5, [1])}
    for obj, upload in strays.items():
        files[upload + b"/00000"] = manifest(obj, 5, [1])
        files[upload + b"/00001"] = b"part"
    assert not any(b"//" in base64.b64encode(key) for key in files)  # each a file nginx could hold
    dirs = [tmp_path / "v1", tmp_path / "v2"]
    for key, data in files.items():
        for folder in dirs:
            put_file(folder, key, data)
    r = rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "1 multipart objects" in r.stderr and r.stderr.count("no upload's manifest") == 2, r.stderr
    records = lmdb_records(tmp_path / "idx")
    assert decode_composite(records[b"/good"]) == (good, [1])
    assert not set(strays) & set(records), sorted(records)


def test_a_nested_file_deleted_while_its_folder_is_walked_is_no_listing_error(tmp_path):
    # a live server's DELETE between the listing of a nested folder (a base64 name holding `/`)
    # and the stat of its file: FileNotFoundError was taken for an unreadable folder, its other
    # files went unread, and rebuild and verify said the walk was incomplete. A thread deletes
    # the files last in the listing's order while the walk stats them first to last.
    folder = tmp_path / "nested"
    folder.mkdir()
    for i in range(5_000):
        (folder / f"f{i}").write_bytes(b"")
    order = [e.name for e in os.scandir(folder)][::-1]
    walker = LocalWalker({})
    out: list = []
    deleter = threading.Thread(target=lambda: [os.unlink(folder / name) for name in order])
    deleter.start()
    walker.files(str(folder), "x/", out)
    deleter.join()
    assert walker.errors == [], walker.errors[:1]


@pytest.mark.parametrize("engine", ["lmdb", "postgresql"], indirect=True)
def test_gc_keeps_the_parts_of_a_completed_multipart_object(make_cluster):
    # Complete drops the upload and keeps its parts (the object is made of them, its manifest
    # says so): gc took them for the parts of an upload gone and deleted them, manifest too,
    # and the object could no longer be read
    pytest.importorskip("boto3")
    from test_s3 import client
    from test_s3_get_gc import _gc

    c = make_cluster(volumes=2, replicas=2)
    s3 = client(c.port)
    s3.create_bucket(Bucket="mpu")
    upload = s3.create_multipart_upload(Bucket="mpu", Key="done")["UploadId"]
    parts = [b"a" * (5 << 20), b"b" * 1000]
    etags = [s3.upload_part(Bucket="mpu", Key="done", UploadId=upload, PartNumber=n, Body=body)["ETag"]
             for n, body in enumerate(parts, 1)]
    s3.complete_multipart_upload(Bucket="mpu", Key="done", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]})
    done = _gc(c)
    assert done.returncode == 0 and "orphan parts" not in done.stderr, done.stderr
    assert s3.get_object(Bucket="mpu", Key="done")["Body"].read() == b"".join(parts)


def test_an_outage_clock_left_by_cancelled_waiters_does_not_fail_the_next_outage_at_once(monkeypatch):
    # every request that waited through an outage was cancelled (their clients went) before the
    # database was seen back: its clock stayed, and a later outage, however short, answered
    # every request 503 at once instead of waiting up to WAIT for the database
    import asyncio
    import socket
    import time

    from minikv.index import pg

    with socket.socket() as s:  # a loopback port nothing listens on: a database that is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(pg, "WAIT", 0.6)
    store = pg.PgStore(f"postgresql://minikv@127.0.0.1:{port}/postgres", "review8")

    async def one_get() -> float:
        start = time.monotonic()
        with pytest.raises(pg.IndexUnavailable):
            await store.get(b"/k")
        return time.monotonic() - start

    async def main() -> tuple[float, float]:
        waiter = asyncio.ensure_future(store.get(b"/k"))
        await asyncio.sleep(0.2)
        waiter.cancel()  # its client went while it waited
        await asyncio.sleep(1.0)  # the database came back and went down again, unseen: longer than WAIT
        later = await one_get()
        right_after = await one_get()  # the same outage, its WAIT spent: at once
        await store.close()
        return later, right_after

    later, right_after = asyncio.run(main())
    assert later >= 0.5, f"the new outage failed after {later:.2f} s, without waiting for the database"
    assert right_after < 0.4


def test_verify_and_repair_report_a_multipart_object_missing_a_part_or_its_manifest(make_cluster):
    # repair skipped every composite record: after verify said "2 lost", repair said 0 lost and
    # exited 0. Both now name what the object lacks, and exit 1
    pytest.importorskip("boto3")
    from test_admin import admin, ready
    from test_s3 import client

    from minikv.index.record import OP_DELETE, UNLINKED, encode_pending, now_ms, with_state
    from minikv.index.store import Store
    from minikv.s3.composite import manifest_key

    c = make_cluster(volumes=2, replicas=2)
    s3 = client(c.port)
    s3.create_bucket(Bucket="mpu")
    uploads = {}
    for key in ("no-part", "no-manifest", "whole", "unlinked"):
        upload = uploads[key] = s3.create_multipart_upload(Bucket="mpu", Key=key)["UploadId"]
        etag = s3.upload_part(Bucket="mpu", Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 100)["ETag"]
        s3.complete_multipart_upload(Bucket="mpu", Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    ready(c)
    store = Store(str(c.root / "index"))
    try:
        # an UNLINKED one whose parts are gone too (gc's work half done) is no loss: it was deleted
        raw = store.get(b"/mpu/unlinked")
        assert store.cas(b"/mpu/unlinked", raw, with_state(raw, UNLINKED))[0]
        for key in (part_key(uploads["no-part"], 1), manifest_key(uploads["no-manifest"]),
                    part_key(uploads["unlinked"], 1)):
            raw = store.get(key)  # a record goes by way of a DELETE's lock: its files stay
            deleting = encode_pending(OP_DELETE, 1, now_ms(), [], raw)
            assert store.cas(key, raw, deleting)[0] and store.cas(key, deleting, None)[0]
    finally:
        store.close()
    for command in ("verify", "repair"):
        r = admin(command, c)
        assert r.returncode == 1 and "2 lost" in r.stderr, (command, r.stderr)
        assert "/mpu/no-part: " in r.stderr and "part 1 has no record" in r.stderr, r.stderr
        assert "/mpu/no-manifest: " in r.stderr and "whose manifest has no record" in r.stderr, r.stderr
        assert "/mpu/whole" not in r.stderr and "/mpu/unlinked" not in r.stderr
