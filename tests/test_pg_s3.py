"""S3 on a PostgreSQL index: two index servers on one database share uploads, object attributes
and buckets (the S3 tests themselves run on both engines: test_s3.py...); ListBuckets walks the
keys a bounded number of steps per page; copy-index moves S3's data too; a database that is down
makes S3 answer 503."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid

import pytest
from botocore.exceptions import ClientError
from cluster import Cluster, open_dir
from test_pg import copy_index, pair, wait_until  # noqa: F401 - pair: two index servers on one database
from test_s3 import bucket, client

from minikv.index.pg import TOP_STEPS, PgStore, connect, create_schema


def test_an_upload_started_on_one_server_is_completed_on_the_other(pair):  # noqa: F811
    c, other = pair
    a, b = client(c.port), client(other.port)
    bk = bucket()
    a.create_bucket(Bucket=bk)
    upload = a.create_multipart_upload(Bucket=bk, Key="big", ContentType="text/csv",
                                       Metadata={"m": "1"})["UploadId"]
    assert [u["UploadId"] for u in b.list_multipart_uploads(Bucket=bk)["Uploads"]] == [upload]
    first, last = os.urandom(5 << 20), b"the tail"
    e1 = a.upload_part(Bucket=bk, Key="big", UploadId=upload, PartNumber=1, Body=first)["ETag"]
    e2 = b.upload_part(Bucket=bk, Key="big", UploadId=upload, PartNumber=2, Body=last)["ETag"]
    assert [p["ETag"] for p in a.list_parts(Bucket=bk, Key="big", UploadId=upload)["Parts"]] == [e1, e2]
    parts = {"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]}
    done = b.complete_multipart_upload(Bucket=bk, Key="big", UploadId=upload, MultipartUpload=parts)
    md5s = hashlib.md5(hashlib.md5(first).digest() + hashlib.md5(last).digest()).hexdigest()
    assert done["ETag"] == f'"{md5s}-2"'
    got = a.get_object(Bucket=bk, Key="big")
    assert got["Body"].read() == first + last and got["ETag"] == done["ETag"]
    assert got["ContentType"] == "text/csv" and got["Metadata"] == {"m": "1"}  # given to Create on the other
    assert a.get_object(Bucket=bk, Key="big", PartNumber=2)["Body"].read() == last
    assert b.list_multipart_uploads(Bucket=bk).get("Uploads", []) == []
    # a Complete retried on the first server (its answer lost) gets the same answer
    again = a.complete_multipart_upload(Bucket=bk, Key="big", UploadId=upload, MultipartUpload=parts)
    assert again["ETag"] == done["ETag"]


def test_metadata_and_buckets_written_through_one_are_read_through_the_other(pair):  # noqa: F811
    c, other = pair
    a, b = client(c.port), client(other.port)
    bk = bucket()
    a.put_object(Bucket=bk, Key="doc", Body=b"text", ContentType="text/plain", Metadata={"k": "v"})
    head = b.head_object(Bucket=bk, Key="doc")
    assert head["ContentType"] == "text/plain" and head["Metadata"] == {"k": "v"}
    b.copy_object(Bucket=bk, Key="doc", CopySource={"Bucket": bk, "Key": "doc"}, MetadataDirective="REPLACE",
                  Metadata={"k": "w"})
    assert a.head_object(Bucket=bk, Key="doc")["Metadata"] == {"k": "w"}
    b.put_object(Bucket=bk, Key="doc", Body=b"plain")  # a new value: the old one's headers do not stay
    got = a.get_object(Bucket=bk, Key="doc")
    assert got["Body"].read() == b"plain" and got["Metadata"] == {} and got["ContentType"] == "binary/octet-stream"
    empty = bucket()
    a.create_bucket(Bucket=empty)
    names = [x["Name"] for x in b.list_buckets()["Buckets"]]
    assert empty in names and bk in names
    b.head_bucket(Bucket=empty)
    b.delete_bucket(Bucket=empty)
    assert empty not in [x["Name"] for x in a.list_buckets()["Buckets"]]


def test_top_folders_walk_is_bounded_and_resumes(postgres):
    """Folders among many keys outside any folder: one call probes at most TOP_STEPS of those,
    and its answer says where to go on; going on finds every folder once, in order."""
    db = postgres.create_db("t" + uuid.uuid4().hex[:12])
    flat = [b"/f%06d" % i for i in range(TOP_STEPS * 2 + 50)]
    folders = [b"/a/", b"/b.x/", b"/f000100x/", b"/f003000/", b"/zz/"]
    keys = flat + [f + b"k%d" % i for f in folders for i in range(3)] + [b"//empty-name", b"noslash/x/"]

    async def run():
        conn = await connect(db)
        try:
            await create_schema(conn)
            await conn.execute("INSERT INTO minikv_keys (k, rec) SELECT k, 'x'::bytea FROM unnest($1::bytea[]) k", keys)
        finally:
            await conn.close()
        store = PgStore(db, "test")
        try:
            calls, found, start = 0, [], b"/"
            while start is not None:
                tops, start = await store.top_folders(start, 3)
                found += tops
                calls += 1
                assert calls < 10
            assert (await store.top_folders(b"/b.x/", 1))[0] == [b"/b.x/"]
            assert (await store.top_folders(b"/b", 1))[0] == [b"/b.x/"]  # "." sorts before "/"
            # ListBuckets' dates: each folder's first records, for a whole page in one statement
            firsts = await store.first_records([b"/a/", b"/zz/", b"/none/"], 2)
            assert firsts == {b"/a/": [b"x", b"x"], b"/zz/": [b"x", b"x"]}
            return found, calls
        finally:
            await store.close()

    found, calls = asyncio.run(run())
    assert found == folders
    assert calls >= 3  # the flat keys cut the walk short at least twice


def test_s3_answers_on_a_postgresql_index(pair):  # noqa: F811
    """S3 on a PostgreSQL-indexed server is served (it answered 501 before)."""
    c, _ = pair
    s3 = client(c.port)
    bk = bucket()
    s3.put_object(Bucket=bk, Key="a/b", Body=b"v")
    listed = s3.list_objects_v2(Bucket=bk, Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["a/"]


def test_copy_index_moves_s3_uploads_attributes_and_buckets_both_ways(postgres):
    root = open_dir()
    c = Cluster(root, db=str(root / "index")).start()
    try:
        s3 = client(c.port)
        bk, empty = bucket(), bucket()
        s3.create_bucket(Bucket=empty)
        s3.put_object(Bucket=bk, Key="doc", Body=b"text", ContentType="text/plain", Metadata={"k": "v"})
        made = s3.create_multipart_upload(Bucket=bk, Key="mp")["UploadId"]
        etag = s3.upload_part(Bucket=bk, Key="mp", UploadId=made, PartNumber=1, Body=b"one part")["ETag"]
        parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
        multipart = s3.complete_multipart_upload(Bucket=bk, Key="mp", UploadId=made, MultipartUpload=parts)["ETag"]
        waiting = s3.create_multipart_upload(Bucket=bk, Key="later", ContentType="text/csv")["UploadId"]
        c.index.stop()

        def check(where: str) -> None:
            c.db = where
            c.index = c._index(2, [])
            c.index.start()
            s3 = client(c.port)
            head = s3.head_object(Bucket=bk, Key="doc")
            assert head["ContentType"] == "text/plain" and head["Metadata"] == {"k": "v"}
            assert s3.head_object(Bucket=bk, Key="mp")["ETag"] == multipart
            assert empty in [b["Name"] for b in s3.list_buckets()["Buckets"]]
            assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bk)["Uploads"]] == [waiting]
            c.index.stop()

        db = postgres.create_db("t" + uuid.uuid4().hex[:12])
        r = copy_index(str(root / "index"), db)
        assert r.returncode == 0 and "S3 entries" in r.stderr, r.stderr
        check(db)
        back = str(root / "index-back")
        r = copy_index(db, back)
        assert r.returncode == 0 and "S3 entries" in r.stderr, r.stderr
        check(back)
        c.index = c._index(2, [])
        c.index.start()  # the upload copied back completes, with the headers given to Create
        s3 = client(c.port)
        etag = s3.upload_part(Bucket=bk, Key="later", UploadId=waiting, PartNumber=1, Body=b"a,b")["ETag"]
        s3.complete_multipart_upload(Bucket=bk, Key="later", UploadId=waiting,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
        assert s3.head_object(Bucket=bk, Key="later")["ContentType"] == "text/csv"
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_s3_on_a_database_that_is_down_is_503_never_404_and_comes_back(postgres):
    from pg import Postgres

    pg = Postgres().init().start()  # of this test's own: the shared one serves the other tests
    root = open_dir()
    c = Cluster(root, db=pg.create_db("t1")).start()
    try:
        s3 = client(c.port)
        bk = bucket()
        s3.put_object(Bucket=bk, Key="here", Body=b"v", Metadata={"k": "v"})
        pg.stop()
        calls = [lambda: s3.head_object(Bucket=bk, Key="here"), lambda: s3.get_object(Bucket=bk, Key="missing"),
                 lambda: s3.put_object(Bucket=bk, Key="new", Body=b"w"), lambda: s3.list_objects_v2(Bucket=bk),
                 lambda: s3.list_buckets(), lambda: s3.create_multipart_upload(Bucket=bk, Key="mp"),
                 lambda: s3.delete_object(Bucket=bk, Key="here")]
        for call in calls:
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503, e.value.response
        pg.start()

        def back() -> bool:
            try:
                return s3.head_object(Bucket=bk, Key="here")["Metadata"] == {"k": "v"}
            except ClientError:
                return False

        wait_until(back, 20, "S3 reads again")
        s3.put_object(Bucket=bk, Key="new", Body=b"w")
        assert s3.get_object(Bucket=bk, Key="new")["Body"].read() == b"w"
    finally:
        c.stop()
        pg.remove()
        shutil.rmtree(root, ignore_errors=True)


def test_s3_tables_of_a_later_minikv_are_refused_with_a_503_that_says_so(postgres):
    name = "t" + uuid.uuid4().hex[:12]
    db = postgres.create_db(name)
    postgres.psql(name, "CREATE TABLE minikv_s3_schema (version integer NOT NULL); "
                        "INSERT INTO minikv_s3_schema VALUES (99)")
    root = open_dir()
    c = Cluster(root, db=db).start()
    try:
        with pytest.raises(ClientError) as e:
            client(c.port).put_object(Bucket=bucket(), Key="k", Body=b"v")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert "made by a later minikv" in e.value.response["Error"]["Message"]
        assert c.put("/plain/k", b"v").status_code == 201  # the plain API goes on
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_on_lmdb_s3_reads_are_still_answered_without_a_task(tmp_path):
    """The engine-neutral S3 code must not cost LMDB's reads a coroutine: HEAD, a listing and a
    NoSuchKey are answered as bytes by the call itself (a GET's only coroutine streams the value)."""
    from minikv.api.app import App
    from minikv.config import Config
    from minikv.health import Health
    from minikv.http.client import Pool
    from minikv.http.server import Body, Request
    from minikv.index.record import LIVE, OP_PUT, encode_data, encode_pending
    from minikv.index.store import Store
    from minikv.s3 import S3

    cfg = Config(volumes=["127.0.0.1:1"], db=str(tmp_path), replicas=1, subvolumes=1)
    pool = Pool()
    app = App(cfg, Store(str(tmp_path / "index")), pool, Health(pool, cfg.hosts))
    s3 = S3(app)
    try:
        pending = encode_pending(OP_PUT, 1, 1, ["127.0.0.1:1"], b"")
        app.store.cas(b"/b/k", None, pending)  # as a PUT writes it: PENDING, then LIVE
        app.store.cas(b"/b/k", pending, encode_data(LIVE, ["127.0.0.1:1"], 5, 1, b"\1" * 16))
        for method, key, query, status in ((b"HEAD", b"/b/k", b"", b"200"), (b"GET", b"/b", b"list-type=2", b"200"),
                                           (b"HEAD", b"/b/missing", b"", b"404")):
            req = Request(method, key + (b"?" + query if query else b""), [(b"x-amz-date", b"20250101T000000Z")],
                          False, Body(None, False), None, True)
            answer = s3.handle(req, key, key, query)
            assert isinstance(answer, bytes) and answer.split(b" ", 2)[1] == status, answer
    finally:
        s3.close()
        app.store.close()


def test_kill9_of_a_server_mid_s3_put_leaves_the_old_value_and_no_lock(pair, postgres):  # noqa: F811
    """An S3 write takes its key's lock only once its body is complete (s3/values.py): a server
    that dies mid-body holds nothing in the database, the old value stays readable through the
    other server, and the other server's S3 PUT of the key goes through at once (no lease to wait
    for)."""
    import signal
    import socket

    from minikv.index.lease import LEASE

    c, other = pair
    bk = bucket()
    b = client(other.port)
    b.create_bucket(Bucket=bk)
    b.put_object(Bucket=bk, Key="obj", Body=b"before")
    s = socket.create_connection(("127.0.0.1", c.port))
    s.sendall(f"PUT /{bk}/obj HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
              f"Content-Length: {10 << 20}\r\n\r\n".encode() + os.urandom(1 << 20))
    time.sleep(0.5)  # the first MB is with the server, the rest never comes
    name = c.db.rsplit("/", 1)[1]
    locks = (f"SELECT count(*) FROM minikv_keys WHERE k = '\\x{f'/{bk}/obj'.encode().hex()}'::bytea "
             "AND owner IS NOT NULL")
    assert postgres.psql(name, locks).split() == ["0"]
    c.index.send(signal.SIGKILL)
    c.index.proc.wait(5)
    s.close()
    assert b.get_object(Bucket=bk, Key="obj")["Body"].read() == b"before"
    start = time.monotonic()
    b.put_object(Bucket=bk, Key="obj", Body=b"after")
    assert time.monotonic() - start < LEASE / 2
    assert b.get_object(Bucket=bk, Key="obj")["Body"].read() == b"after"


def test_an_object_s_head_and_get_are_answered_on_the_loop_the_rest_through_a_thread(postgres, monkeypatch):
    """On PostgreSQL an object's HEAD (and GET, up to its streaming) awaits its two reads on the
    loop and runs S3's code there: no helper thread, whose hops cost five times LMDB's CPU. A
    304 is told at once; what needs another read (a 404's bucket, ListParts) goes the
    thread's way and answers as before, given the read made. A read that fails is a 503, made
    once (what S3 refuses unread is still its 501); with credentials, an unsigned request is refused before any read."""
    from minikv.api.app_pg import PgApp
    from minikv.config import Config
    from minikv.health import Health
    from minikv.http.client import Pool
    from minikv.http.server import Body, Request
    from minikv.index.pg import IndexUnavailable
    from minikv.index.record import LIVE, OP_PUT, encode_data, encode_pending
    from minikv.s3 import objects
    from minikv.s3.front_pg import PgS3

    db = postgres.create_db("t" + uuid.uuid4().hex[:12])
    threads = []
    to_thread = asyncio.to_thread

    def counted(func, *args, **kwargs):
        threads.append(getattr(func, "__name__", func))
        return to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)

    async def ask(s3, method: bytes, key: bytes, query: bytes = b"", headers=()) -> bytes:
        req = Request(method, key + (b"?" + query if query else b""),
                      [(b"x-amz-date", b"20250101T000000Z"), *headers], False, Body(None, False), None, True)
        threads.clear()
        answer = await s3.handle(req, key, key, query)
        return answer if isinstance(answer, bytes) else b""

    async def body():
        cfg = Config(volumes=["127.0.0.1:1"], db=db, replicas=1, subvolumes=1)
        pool = Pool()
        store = PgStore(db, "a:1")
        app = PgApp(cfg, store, pool, Health(pool, cfg.hosts))
        s3 = PgS3(app)
        try:
            conn = await connect(db)
            try:
                await create_schema(conn)
            finally:
                await conn.close()
            pending = encode_pending(OP_PUT, 1, 1, ["127.0.0.1:1"], b"")
            assert (await store.cas(b"/b/k", None, pending))[0]
            assert (await store.cas(b"/b/k", pending, encode_data(LIVE, ["127.0.0.1:1"], 5, 1, b"\1" * 16)))[0]
            head = await ask(s3, b"HEAD", b"/b/k")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 5\r\n" in head, head
            assert threads == []
            etag = head.split(b"ETag: ", 1)[1].split(b"\r\n", 1)[0]
            same = await ask(s3, b"GET", b"/b/k", headers=[(b"if-none-match", etag)])
            assert same.startswith(b"HTTP/1.1 304 ") and threads == [], (same, threads)
            part = await ask(s3, b"HEAD", b"/b/k", b"partNumber=1")  # a query: still on the loop
            assert part.startswith(b"HTTP/1.1 200 ") and threads == [], (part, threads)
            reads = []
            real_get = store.get

            async def get(key):
                reads.append(key)
                return await real_get(key)

            store.get = get
            missing = await ask(s3, b"HEAD", b"/b/nothing")
            assert missing.startswith(b"HTTP/1.1 404 ") and threads == ["handle"], (missing, threads)
            assert reads == [b"/b/nothing"]  # the thread's way is given the read made, not made again
            parts = await ask(s3, b"GET", b"/b/k", b"uploadId=" + b"0" * 32)  # ListParts: none of its reads
            assert b"NoSuchUpload" in parts and threads == ["handle"], (parts, threads)
            real_head = objects.head_object

            def head_reading_more(s3, ctx):
                s3.store.get(b"/b/other")  # a read the loop's way did not make: all again, in a thread
                return real_head(s3, ctx)

            monkeypatch.setattr(objects, "head_object", head_reading_more)
            again = await ask(s3, b"HEAD", b"/b/k")
            assert again.startswith(b"HTTP/1.1 200 ") and b"ETag: " + etag in again, again
            assert b"Content-Length: 5\r\n" in again and threads == ["handle"], (again, threads)
            monkeypatch.setattr(objects, "head_object", real_head)

            async def unavailable(key):
                reads.append(key)
                raise IndexUnavailable("the index database did not answer")

            store.get = unavailable
            reads.clear()
            down = await ask(s3, b"HEAD", b"/b/k")  # a read that fails: told, not made again
            assert down.startswith(b"HTTP/1.1 503 ") and reads == [b"/b/k"] and threads == [], (down, reads, threads)
            refused = await ask(s3, b"GET", b"/b/k", b"acl")  # refused unread: its 501, database or not
            assert refused.startswith(b"HTTP/1.1 501 ") and threads == [], (refused, threads)
            store.get = get
            reads.clear()
            locked = PgS3(PgApp(Config(volumes=cfg.volumes, db=db, replicas=1, subvolumes=1, s3_access_key="ak",
                                       s3_secret_key="sk"), store, pool, app.health))
            refused = await ask(locked, b"HEAD", b"/b/k")  # unsigned: refused before any read
            assert refused.startswith(b"HTTP/1.1 403 ") and reads == [], (refused, reads)
        finally:
            s3.close()
            pool.close()
            await store.close()

    asyncio.run(body())
