"""Multipart objects as composites (minikv/s3/composite.py): CompleteMultipartUpload writes no copy
of the data; the object reads back whole (S3 GET, HEAD, ranges, ?partNumber=, the plain API);
overwrite, DELETE, UNLINK + gc remove its parts; rebuild from the volumes, rebalance, verify and
crash recovery keep it. Real volumes, real index, boto3."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402
from test_admin import admin, all_files, ready, restart  # noqa: E402
from test_s3 import bucket, client, code  # noqa: E402
from test_s3_objects_more import _multipart  # noqa: E402

from minikv.index.record import (  # noqa: E402
    LIVE,
    OP_DELETE,
    OP_PUT,
    UNLINKED,
    decode_composite,
    decode_data,
    encode_composite,
    encode_pending,
    is_composite,
    readable,
    with_state,
)
from minikv.s3.composite import byte_range, manifest, parse_manifest  # noqa: E402
from minikv.s3.errors import S3Error  # noqa: E402

ENGINES = ["lmdb", "postgresql"]
MB = 1 << 20
SIZES = [5 * MB, 5 * MB, 777]


def _upload(s3, b: str, key: str, sizes=SIZES) -> tuple[str, list[dict], bytes]:
    return _multipart(s3, b, key, sizes, ContentType="text/x-mine")


def _complete(s3, b, key, upload, parts):
    return s3.complete_multipart_upload(Bucket=b, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})


def _stored(c) -> tuple[int, int]:
    """(files, bytes) the volumes hold."""
    files = all_files(c)
    return len(files), sum(p.stat().st_size for p in files)


# ---------------------------------------------------------------- pure parts


def test_composite_records_and_manifests_round_trip():
    raw = encode_composite(LIVE, 10 * MB + 3, 1234, "ab" * 16, [1, 2, 7])
    assert is_composite(raw) and decode_data(raw).size == 10 * MB + 3 and decode_data(raw).mtime_ms == 1234
    assert decode_composite(raw) == ("ab" * 16, [1, 2, 7])
    assert is_composite(with_state(raw, UNLINKED)) and decode_composite(with_state(raw, UNLINKED))[1] == [1, 2, 7]
    pending = encode_pending(OP_PUT, 1, 2, ["v:1"], raw)
    assert not is_composite(pending) and readable(pending) == raw
    assert not is_composite(encode_pending(OP_DELETE, 1, 2, [], raw))
    key = b"/b/k\xff\n with\x00odd bytes"
    assert parse_manifest(manifest(key, 99, [1, 3])) == (key, 99, [1, 3])
    assert parse_manifest(b"not a manifest") is None and parse_manifest(b"minikv-composite 1\nzz\nx\n") is None
    # what no record can hold is no manifest (it ended rebuild's multipart step)
    for bad in (manifest(b"", 99, [1]), manifest(b"/k" * 300, 99, [1]), manifest(key, -1, [1]),
                manifest(key, 1 << 64, [1]), manifest(key, 99, [0]), manifest(key, 99, [10_001])):
        assert parse_manifest(bad) is None, bad


def test_a_complete_takes_the_manifest_only_where_none_is_or_a_stale_one_no_object_uses():
    from types import SimpleNamespace

    from test_fuzz import MemStore

    from minikv.index.record import OP_PUT, encode_data, now_ms
    from minikv.s3.composite import manifest_key
    from minikv.s3.multipart import STALE_MANIFEST, _only_complete

    upload, key = "ab" * 16, b"/b/k"
    s3 = SimpleNamespace(store=MemStore())

    def check(previous: bytes | None) -> str:
        """What the check says with the manifest locked by us over `previous`."""
        s3.store.data[manifest_key(upload)] = encode_pending(OP_PUT, 1, now_ms(), ["v:1"], previous or b"")
        try:
            asyncio.run(_only_complete(s3, upload, key)())
        except S3Error as e:
            return e.code
        return "taken"

    young = encode_data(LIVE, ["v:1"], 10, now_ms() - 1000, b"m" * 16)
    stale = encode_data(LIVE, ["v:1"], 10, now_ms() - int(STALE_MANIFEST * 1000) - 1000, b"m" * 16)
    assert check(None) == "taken"
    assert check(young) == "OperationAborted"  # another Complete is in flight
    assert check(stale) == "taken"  # left by a Complete that failed and could not delete it
    s3.store.data[key] = encode_composite(LIVE, 10, 1, upload, [1])
    assert check(stale) == "OperationAborted"  # it is the manifest of the object: never replaced
    s3.store.data[key] = encode_composite(LIVE, 10, 1, "cd" * 16, [1])
    assert check(stale) == "taken"


def test_byte_ranges_of_a_composite_are_read_as_nginx_reads_them():
    assert byte_range("bytes=0-9", 100) == (0, 9)
    assert byte_range("bytes=90-", 100) == (90, 99)
    assert byte_range("bytes=-10", 100) == (90, 99)
    assert byte_range("bytes=-1000", 100) == (0, 99)
    assert byte_range("bytes=50-5000", 100) == (50, 99)
    for ignored in ("bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=x-1", "bytes=" + "9" * 50, "bytes=\xb2-3"):
        assert byte_range(ignored, 100) is None, ignored
    for past in ("bytes=100-", "bytes=-0"):
        with pytest.raises(S3Error):
            byte_range(past, 100)


# ---------------------------------------------------------------- through a cluster


def test_complete_writes_no_copy_and_every_read_gives_the_concatenation(cluster):
    s3 = client(cluster.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "big")
    files, size = _stored(cluster)
    done = _complete(s3, b, "big", upload, parts)
    files2, size2 = _stored(cluster)
    # only the manifest (one small file per replica) was written: no second copy of the data
    assert files2 - files == cluster.replicas and size2 - size < 4096, (files2 - files, size2 - size)
    assert done["ETag"].endswith('-3"')
    assert _complete(s3, b, "big", upload, parts)["ETag"] == done["ETag"]  # retried after success
    got = s3.get_object(Bucket=b, Key="big")
    assert got["Body"].read() == data and got["ETag"] == done["ETag"] and got["ContentType"] == "text/x-mine"
    head = s3.head_object(Bucket=b, Key="big")
    assert head["ContentLength"] == len(data) and head["ETag"] == done["ETag"]
    for first, last in ((0, 0), (5 * MB - 3, 5 * MB + 2), (len(data) - 800, len(data) - 1), (7, 10 * MB + 5)):
        got = s3.get_object(Bucket=b, Key="big", Range=f"bytes={first}-{last}")
        assert got["Body"].read() == data[first:last + 1] and got["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
    assert s3.get_object(Bucket=b, Key="big", Range="bytes=-5")["Body"].read() == data[-5:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=b, Key="big", Range=f"bytes={len(data)}-")
    assert code(e.value) == "InvalidRange"
    first = 0
    for number, size in enumerate(SIZES, 1):
        got = s3.get_object(Bucket=b, Key="big", PartNumber=number)
        assert got["PartsCount"] == 3 and got["Body"].read() == data[first:first + size]
        first += size
    listed = s3.list_objects_v2(Bucket=b)["Contents"]
    assert [(o["Key"], o["Size"], o["ETag"]) for o in listed] == [("big", len(data), done["ETag"])]
    # the plain API: no file to redirect to, so the bytes come through the index
    plain = cluster.get(f"/{b}/big", allow_redirects=False)
    assert plain.status_code == 200 and plain.content == data and plain.headers["Content-Length"] == str(len(data))
    assert cluster.request("HEAD", f"/{b}/big").headers["Content-Length"] == str(len(data))
    ranged = cluster.get(f"/{b}/big", headers={"Range": "bytes=5242870-5242889"})
    assert ranged.status_code == 206 and ranged.content == data[5242870:5242890]
    assert cluster.get(f"/{b}/big", headers={"Range": f"bytes={len(data) + 1}-"}).status_code == 416
    assert f"/{b}/big" in cluster.get(f"/{b}/?list").json()["keys"]
    assert cluster.put(f"/{b}/big", b"x").status_code == 403
    assert cluster.request("REBALANCE", f"/{b}/big").status_code == 204
    # a copy of it is an ordinary object with the same bytes
    s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "big"})
    assert s3.get_object(Bucket=b, Key="copy")["Body"].read() == data
    dst = s3.create_multipart_upload(Bucket=b, Key="dst")["UploadId"]
    s3.upload_part_copy(Bucket=b, Key="dst", UploadId=dst, PartNumber=1, CopySource={"Bucket": b, "Key": "big"},
                        CopySourceRange="bytes=5242000-5243999")
    etag = s3.list_parts(Bucket=b, Key="dst", UploadId=dst)["Parts"][0]["ETag"]
    _complete(s3, b, "dst", dst, [{"ETag": etag, "PartNumber": 1}])
    assert s3.get_object(Bucket=b, Key="dst")["Body"].read() == data[5242000:5244000]


def test_a_part_lost_on_every_volume_is_a_503_before_the_answer_or_a_cut_after_it(cluster):
    import requests

    s3 = client(cluster.port)
    b = bucket()
    sizes = [5 * MB, 5 * MB + 1, 777]  # each part told by its files' size
    for key, lost in (("first", 0), ("second", 1)):
        before = all_files(cluster)
        upload, parts, data = _upload(s3, b, key, sizes)
        _complete(s3, b, key, upload, parts)
        gone = [p for p in all_files(cluster) - before if p.stat().st_size == sizes[lost]]
        assert len(gone) == cluster.replicas, gone
        for p in gone:
            p.unlink()
        if lost == 0:  # nothing was sent yet: a clear 503, through either API
            plain = cluster.get(f"/{b}/{key}")
            assert plain.status_code == 503, (plain.status_code, plain.text)
            with pytest.raises(ClientError) as e:
                s3.get_object(Bucket=b, Key=key)
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        else:  # the head and the first part are out: the answer is cut short, never padded
            got = b""
            with pytest.raises(requests.exceptions.RequestException):
                with cluster.get(f"/{b}/{key}", stream=True) as r:
                    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
                    for chunk in r.iter_content(1 << 20):
                        got += chunk
            assert len(got) < len(data) and data.startswith(got)
    assert cluster.put(f"/{b}/after", b"still serving").status_code == 201
    assert cluster.get(f"/{b}/after").content == b"still serving"


def test_parts_of_a_completed_upload_cannot_be_replaced_nor_aborted_away(cluster):
    s3 = client(cluster.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "k")
    _complete(s3, b, "k", upload, parts)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=b, Key="k", UploadId=upload, PartNumber=1, Body=b"evil")
    assert code(e.value) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        s3.abort_multipart_upload(Bucket=b, Key="k", UploadId=upload)
    assert code(e.value) == "NoSuchUpload"
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == data


def _complete_at(start: threading.Barrier, answers: list, i: int, port: int, b: str, key: str, upload: str,
                 parts: list[dict]) -> None:
    """answers[i]: the ETag or error code of a Complete sent when `start` lets every thread go."""
    mine = client(port)
    start.wait()
    try:
        answers[i] = _complete(mine, b, key, upload, parts)["ETag"]
    except ClientError as e:
        answers[i] = code(e)


def test_two_completes_of_one_upload_at_once_make_one_whole_object_gc_keeps(make_cluster):
    """Two Completes of one upload at once, naming different parts, each wrote the one manifest
    and deleted the parts the other's object read: both answered 200 and GET gave 503, or the
    object was left without its manifest and gc deleted a part it reads. Now the manifest is
    written only where none is: one Complete makes the object, the other changes nothing."""
    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    b = bucket()
    made = {}
    for trial in range(10):
        key = f"race{trial}"
        upload, parts, data = _upload(s3, b, key, [5 * MB, 10])
        answers: list = [None, None]
        start = threading.Barrier(2)
        # the same list twice (an SDK's retry): the same manifest bytes when both fall in one
        # millisecond, and the one refused once deleted the other's manifest as its own
        lists = (parts, parts[:1]) if trial % 2 else (parts, parts)
        threads = [threading.Thread(target=_complete_at, args=(start, answers, i, c.port, b, key, upload, named))
                   for i, named in enumerate(lists)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        etag = s3.head_object(Bucket=b, Key=key)["ETag"]
        assert etag in answers and all(a in (etag, "OperationAborted", "InvalidPart", "NoSuchUpload")
                                       for a in answers), (trial, answers)
        made[key] = data if etag.endswith('-2"') else data[:5 * MB]
        assert s3.get_object(Bucket=b, Key=key)["Body"].read() == made[key], (trial, answers)
    ready(c)
    r = admin("verify", c, db=c.db)
    assert r.returncode == 0, r.stdout + r.stderr
    r = admin("gc", c, "-age", "0", db=c.db)
    assert r.returncode == 0, r.stderr
    for key, data in made.items():
        assert s3.get_object(Bucket=b, Key=key)["Body"].read() == data, key


def test_overwrite_delete_and_unlink_remove_the_parts(cluster, make_cluster):
    s3 = client(cluster.port)
    b = bucket()
    before = all_files(cluster)
    for key in ("over", "del", "plaindel", "relinked"):
        upload, parts, _ = _upload(s3, b, key)
        _complete(s3, b, key, upload, parts)
    assert cluster.request("UNLINK", f"/{b}/relinked").status_code == 204
    assert cluster.put(f"/{b}/relinked", b"plain API").status_code == 201  # over the unlinked object
    s3.put_object(Bucket=b, Key="over", Body=b"small now")
    assert s3.get_object(Bucket=b, Key="over")["Body"].read() == b"small now"
    s3.delete_object(Bucket=b, Key="del")
    assert cluster.delete(f"/{b}/plaindel").status_code == 204
    # nothing is left of the four uploads but the new values of "over" and "relinked"
    left = all_files(cluster) - before
    assert len(left) == 2 * cluster.replicas and all(p.stat().st_size == 9 for p in left), left
    assert cluster.get(f"/{b}/relinked").content == b"plain API"


def test_unlink_then_gc_removes_the_parts(make_cluster):
    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "u")
    before = all_files(c)
    _complete(s3, b, "u", upload, parts)
    assert c.request("UNLINK", f"/{b}/u").status_code == 204
    assert c.get(f"/{b}/u").status_code == 404 and f"/{b}/u" in c.get("/?unlinked").json()["keys"]
    ready(c)
    r = admin("gc", c, "-age", "0", db=c.db)
    assert r.returncode == 0, r.stderr
    gone = before - all_files(c)
    assert len(gone) == 3 * 2 and not (all_files(c) - before), (gone, r.stderr)  # parts gone, manifest too
    assert c.get("/?unlinked").json()["keys"] == []


def test_rebuild_from_the_volumes_brings_the_object_back(make_cluster, engine, request):
    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "rb")
    _complete(s3, b, "rb", upload, parts)
    old_upload, old_parts, _ = _upload(s3, b, "replaced")
    _complete(s3, b, "replaced", old_upload, old_parts)
    s3.put_object(Bucket=b, Key="replaced", Body=b"newer")
    ready(c)
    c.index.stop()
    new = request.getfixturevalue("postgres").create_db("t" + uuid.uuid4().hex[:12]) if engine == "postgresql" \
        else c.root / "rebuilt"
    r = admin("rebuild", c, db=new)
    assert r.returncode == 0, r.stderr
    assert "1 multipart objects" in r.stderr, r.stderr
    restart(c, db=new)
    s3 = client(c.port)
    assert s3.get_object(Bucket=b, Key="rb")["Body"].read() == data
    assert s3.head_object(Bucket=b, Key="rb")["ContentLength"] == len(data)
    assert c.get(f"/{b}/rb").content == data
    assert s3.get_object(Bucket=b, Key="replaced")["Body"].read() == b"newer"
    again = admin("rebuild", c, "-force", db=new)
    assert again.returncode == 0, again.stderr
    assert s3.get_object(Bucket=b, Key="rb")["Body"].read() == data


def test_rebalance_3_to_4_volumes_and_verify_keep_the_object(make_cluster):
    c = make_cluster(volumes=4, replicas=2)
    restart(c, c.names[:3])
    s3 = client(c.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "moved")
    done = _complete(s3, b, "moved", upload, parts)
    restart(c, c.names)
    r = admin("rebalance", c, db=c.db)
    assert r.returncode == 0 and "0 failed" in r.stderr, r.stderr
    s3 = client(c.port)
    assert s3.get_object(Bucket=b, Key="moved")["Body"].read() == data
    assert s3.head_object(Bucket=b, Key="moved")["ETag"] == done["ETag"]
    v = admin("verify", c, db=c.db)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "5 ok, 0 under-replicated, 0 lost, 0 misplaced" in v.stderr, v.stderr  # 3 parts, manifest, object


def test_recovery_puts_back_a_composite_an_overwrite_was_replacing_and_unlinks_one_being_deleted(tmp_path):
    from minikv.http.client import Pool
    from minikv.index.recovery import resolve
    from minikv.index.store import Store

    store = Store(str(tmp_path / "db"))
    try:
        composite = encode_composite(LIVE, 10, 5, "cd" * 16, [1, 2])

        async def main():
            pool = Pool()
            try:
                for op, volumes, after in ((OP_PUT, [], composite), (OP_PUT, ["127.0.0.1:1"], composite),
                                           (OP_DELETE, [], with_state(composite, UNLINKED))):
                    pending = encode_pending(op, 1, 2, volumes, composite)
                    store.merge_many([(b"/k", pending)], lambda key, current, new: new)
                    await resolve(pool, b"/k", pending, store.cas)
                    assert store.get(b"/k") == after, op
            finally:
                pool.close()

        asyncio.run(main())
    finally:
        store.close()


def test_copy_index_carries_the_object_from_lmdb_to_postgresql(make_cluster, engine, request):
    if engine != "lmdb":
        pytest.skip("copies an LMDB index into PostgreSQL: one run covers both engines")
    c = make_cluster(volumes=3, replicas=2)
    s3 = client(c.port)
    b = bucket()
    upload, parts, data = _upload(s3, b, "copied")
    done = _complete(s3, b, "copied", upload, parts)
    ready(c)
    c.index.stop()
    db = request.getfixturevalue("postgres").create_db("t" + uuid.uuid4().hex[:12])
    r = subprocess.run([sys.executable, "-m", "minikv", "copy-index", c.db, db], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    restart(c, db=db)
    s3 = client(c.port)
    got = s3.get_object(Bucket=b, Key="copied")
    assert got["Body"].read() == data and got["ETag"] == done["ETag"]
    assert c.get(f"/{b}/copied").content == data

