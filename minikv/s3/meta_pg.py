"""What S3 keeps beside the index records (meta.py says what and why), in the index's own
PostgreSQL database, so that every index server sharing it sees the same uploads, buckets and
object attributes. The same interface as meta.py's Meta, but every call is a coroutine.

Tables (created on first use, versioned in `minikv_s3_schema` as index/pg.py versions its own):
- `minikv_s3_uploads`: upload id -> the object's key and when it was created; indexed by
  (key, id), so ListMultipartUploads reads one page of one bucket's uploads in key order
  (bytea: ordered by byte value, as LMDB orders them).
- `minikv_s3_attrs`: hash of the key + fingerprint of the value -> its attributes (attrs.py),
  and NUL "u" + upload id -> the headers given to CreateMultipartUpload. Written before the
  record that makes the value LIVE, as on LMDB.
- `minikv_s3_buckets`: `/name/` -> created (ms), the buckets CreateBucket made.

Every change is one statement, its own compare-and-set (INSERT ... ON CONFLICT DO NOTHING,
DELETE ... RETURNING): two servers cannot both create one bucket, or both drop one upload.
There is no `etags` table: it only holds what LMDB stores made before `attrs` existed.
"""

from __future__ import annotations

import asyncio
import secrets

from minikv.index.pg import IndexUnavailable, PgStore, _down, make_tables, prefix_end
from minikv.s3.attrs import decode, encode
from minikv.s3.meta import _CREATED, attrs_key

SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x6D696E696B7633  # "minikv3": serialises the first S3 request of several servers
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS minikv_s3_schema (version integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS minikv_s3_uploads (id bytea PRIMARY KEY, k bytea NOT NULL, created bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS minikv_s3_uploads_k ON minikv_s3_uploads (k, id)",
    "CREATE TABLE IF NOT EXISTS minikv_s3_attrs (h bytea PRIMARY KEY, a bytea NOT NULL)",
    "CREATE TABLE IF NOT EXISTS minikv_s3_buckets (name bytea PRIMARY KEY, created bigint NOT NULL)",
]


def _upload_attrs_key(upload_id: str) -> bytes:
    return b"\0u" + upload_id.encode("latin-1")


class PgMeta:
    def __init__(self, engine: PgStore):
        self.engine = engine
        self._ready = False
        self._making: asyncio.Lock | None = None

    def close(self) -> None:
        pass  # the connections are the engine's

    async def _run(self, method: str, query: str, *args, read: bool = False):
        if not self._ready:
            await self._create_schema()
        return await self.engine._run(method, query, *args, read=read)

    async def _create_schema(self) -> None:
        import asyncpg

        if self._making is None:
            self._making = asyncio.Lock()
        async with self._making:
            if self._ready:
                return
            try:
                pool = await self.engine._get_pool()
                async with pool.acquire() as conn:
                    version = await make_tables(conn, SCHEMA, "minikv_s3_schema", SCHEMA_VERSION, _SCHEMA_LOCK)
                    if version > SCHEMA_VERSION:  # a 503 that says so, on every S3 request
                        raise IndexUnavailable(f"the S3 tables are version {version}, made by a later minikv; "
                                               f"this one knows version {SCHEMA_VERSION}: run the later minikv")
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                raise _down(e) from None
            self._ready = True

    # -- multipart uploads --
    async def new_upload(self, key: bytes, now_ms: int, attrs: bytes | None = None) -> str:
        upload_id = secrets.token_hex(16)
        # one statement: the upload and its headers appear together or not at all
        await self._run("execute", "WITH u AS (INSERT INTO minikv_s3_uploads (id, k, created) VALUES ($1, $2, $3)) "
                        "INSERT INTO minikv_s3_attrs (h, a) SELECT $4, $5::bytea WHERE $5::bytea IS NOT NULL",
                        upload_id.encode(), key, now_ms, _upload_attrs_key(upload_id), attrs or None)
        return upload_id

    async def upload_attrs(self, upload_id: str) -> dict:
        return decode(await self._run("fetchval", "SELECT a FROM minikv_s3_attrs WHERE h = $1",
                                      _upload_attrs_key(upload_id), read=True))

    async def upload(self, upload_id: str) -> tuple[bytes, int] | None:
        row = await self._run("fetchrow", "SELECT k, created FROM minikv_s3_uploads WHERE id = $1",
                              upload_id.encode("latin-1"), read=True)
        return None if row is None else (row[0], row[1])

    async def drop_upload(self, upload_id: str) -> bool:
        return bool(await self._run(
            "fetchval", "WITH a AS (DELETE FROM minikv_s3_attrs WHERE h = $2) "
            "DELETE FROM minikv_s3_uploads WHERE id = $1 RETURNING true",
            upload_id.encode("latin-1"), _upload_attrs_key(upload_id)))

    async def uploads_from(self, start: bytes, prefix: bytes, limit: int) -> list[tuple[bytes, str, int]]:
        """As Meta.uploads_from: (key, id) order from `start` (a key, or key + NUL + id) on. A row
        comparison on the (key, id) index: one range read of `limit` rows, however many uploads
        one key has."""
        key_from, _, id_from = max(start, prefix).partition(b"\0")
        end = prefix_end(prefix)
        rows = await self._run(
            "fetch", "SELECT k, id, created FROM minikv_s3_uploads WHERE (k, id) >= ($1, $2) "
            "AND ($3::bytea IS NULL OR k < $3) ORDER BY k, id LIMIT $4",
            key_from, id_from, end, limit, read=True)
        return [(r[0], r[1].decode(), r[2]) for r in rows]

    async def all_uploads(self) -> list[tuple[str, bytes, int]]:
        rows = await self._run("fetch", "SELECT id, k, created FROM minikv_s3_uploads ORDER BY id", read=True)
        return [(r[0].decode(), r[1], r[2]) for r in rows]

    # -- object attributes (attrs.py) --
    async def put_attrs(self, key: bytes, raw: bytes, encoded: bytes) -> None:
        await self._run("execute", "INSERT INTO minikv_s3_attrs (h, a) VALUES ($1, $2) "
                        "ON CONFLICT (h) DO UPDATE SET a = EXCLUDED.a", attrs_key(key, raw), encoded)

    async def attrs(self, key: bytes, raw: bytes) -> dict:
        return decode(await self._run("fetchval", "SELECT a FROM minikv_s3_attrs WHERE h = $1",
                                      attrs_key(key, raw), read=True))

    async def drop_attrs(self, key: bytes, raw: bytes) -> None:
        await self._run("execute", "DELETE FROM minikv_s3_attrs WHERE h = $1", attrs_key(key, raw))

    async def etag(self, key: bytes, raw: bytes) -> str | None:
        return (await self.attrs(key, raw)).get("e")

    async def etags_for(self, pairs: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
        """ETags of a listing page's objects, in one statement."""
        if not pairs:
            return {}
        wanted = {attrs_key(key, raw): key for key, raw in pairs}
        rows = await self._run("fetch", "SELECT h, a FROM minikv_s3_attrs WHERE h = ANY($1::bytea[])",
                               list(wanted), read=True)
        out = {}
        for h, a in rows:
            if etag := decode(a).get("e"):
                out[wanted[h]] = etag
        return out

    def drop_etag(self, key: bytes) -> None:
        return None  # no `etags` table here (see the docstring)

    # -- buckets made by CreateBucket --
    async def create_bucket(self, name: bytes, now_ms: int) -> bool:
        return bool(await self._run("fetchval", "INSERT INTO minikv_s3_buckets (name, created) VALUES ($1, $2) "
                                    "ON CONFLICT (name) DO NOTHING RETURNING true", b"/" + name + b"/", now_ms))

    async def bucket_created(self, name: bytes) -> int | None:
        return await self._run("fetchval", "SELECT created FROM minikv_s3_buckets WHERE name = $1",
                               b"/" + name + b"/", read=True)

    async def drop_bucket(self, name: bytes) -> bool:
        return bool(await self._run("fetchval", "DELETE FROM minikv_s3_buckets WHERE name = $1 RETURNING true",
                                    b"/" + name + b"/"))

    async def buckets_from(self, start: bytes, limit: int) -> list[tuple[bytes, int]]:
        rows = await self._run("fetch", "SELECT name, created FROM minikv_s3_buckets WHERE name >= $1 "
                               "ORDER BY name LIMIT $2", start, limit, read=True)
        return [(r[0], r[1]) for r in rows]


# -- copy-index (admin/copy_index.py): S3's data moves with the records --
COPY_PAGE = 10_000


async def copy_from_lmdb(meta, target: PgMeta) -> int:
    """Every upload, attribute and bucket of an LMDB meta store (meta.py) into empty tables; an
    `etags` entry (stores older than `attrs`) becomes the attributes entry it stands for. How
    many entries were copied."""
    await target._create_schema()
    tables = {"minikv_s3_uploads": [], "minikv_s3_attrs": [], "minikv_s3_buckets": []}
    with meta.env.begin() as txn:
        for upload_id, raw in txn.cursor(db=meta.uploads):
            tables["minikv_s3_uploads"].append((upload_id, raw[_CREATED.size:], _CREATED.unpack_from(raw)[0]))
        attrs = dict(txn.cursor(db=meta.attrs_db))
        for key, raw in txn.cursor(db=meta.etags):
            entry = attrs_key(key, b"L" + raw[:32])  # the fingerprint is bytes 1-33 of a record
            attrs.setdefault(entry, encode({"e": raw[32:].decode()}))
        tables["minikv_s3_attrs"] = list(attrs.items())
        for name, raw in txn.cursor(db=meta.buckets):
            tables["minikv_s3_buckets"].append((name, _CREATED.unpack(raw)[0]))
    pool = await target.engine._get_pool()
    async with pool.acquire() as conn, conn.transaction():
        for table, rows in tables.items():
            for i in range(0, len(rows), COPY_PAGE):
                await conn.copy_records_to_table(table, records=rows[i:i + COPY_PAGE])
    return sum(len(rows) for rows in tables.values())


async def copy_to_lmdb(source: PgMeta, meta) -> int:
    """The tables of `source` into an empty LMDB meta store, as meta.py keeps them, a page of
    rows per LMDB transaction."""
    await source._create_schema()
    pool = await source.engine._get_pool()
    n = 0

    def write(table: str, rows: list) -> None:
        with meta.env.begin(write=True) as txn:
            for row in rows:
                if table == "minikv_s3_uploads":
                    upload_id, key, created = row
                    txn.put(upload_id, _CREATED.pack(created) + key, db=meta.uploads)
                    txn.put(key + b"\0" + upload_id, _CREATED.pack(created), db=meta.upload_keys)
                elif table == "minikv_s3_attrs":
                    txn.put(row[0], row[1], db=meta.attrs_db)
                else:
                    txn.put(row[0], _CREATED.pack(row[1]), db=meta.buckets)

    async with pool.acquire() as conn, conn.transaction():
        for table, columns in (("minikv_s3_uploads", "id, k, created"), ("minikv_s3_attrs", "h, a"),
                               ("minikv_s3_buckets", "name, created")):
            rows = []
            async for row in conn.cursor(f"SELECT {columns} FROM {table}", prefetch=COPY_PAGE):
                rows.append(tuple(row))
                if len(rows) == COPY_PAGE:
                    write(table, rows)
                    n, rows = n + len(rows), []
            write(table, rows)
            n += len(rows)
    return n
