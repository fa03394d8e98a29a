"""The minikeyvalue API: what GET, HEAD, PUT, DELETE, UNLINK, REBALANCE and `?list` mean.

`App.handle(request)` answers reads at once with the response bytes (one LMDB read, no network
call, no task) and returns a coroutine for anything that talks to volumes.

Order of writes (each arrow is one compare-and-set on the key's record, see index/record.py):
- PUT: record -> PENDING(put, volumes) before the body is read; stream the body to every
  replica at once; all answered 2xx -> LIVE -> 201. Any failure or a client that goes away:
  delete what reached the volumes, drop the record, 5xx. A crash anywhere leaves PENDING,
  which recovery undoes the same way.
- DELETE: record -> PENDING(delete); delete every replica; -> absent -> 204. If a replica could
  not be deleted the record becomes UNLINKED (unreadable, still listed by ?unlinked) and the
  answer is a 5xx: DELETE again once the volume is back.
- REBALANCE: record -> PENDING(rebalance); copy to the new volumes; -> LIVE on the new volumes;
  then delete the copies on volumes no longer named. A failure before the switch deletes the
  new copies and puts the old record back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import re
import time
from urllib.parse import parse_qs, quote, unquote_to_bytes

import httptools

from minikv import replicas
from minikv.api.access import access_for
from minikv.api.digest import StreamingMd5
from minikv.config import Config
from minikv.health import Health
from minikv.http.client import Pool, VolumeError
from minikv.http.response import HTTPError, head, http_date_bytes, not_found, response
from minikv.http.server import Request
from minikv.index import fence
from minikv.index.group import GroupCommit
from minikv.index.record import (
    COMPOSITE_MARK,
    EPOCH_AT,
    LIVE,
    MD5_AT,
    NO_MD5,
    OP_DELETE,
    OP_PUT,
    OP_REBALANCE,
    PENDING,
    UNLINKED,
    VOLUMES_AT,
    decode_data,
    decode_pending,
    encode_data,
    encode_pending,
    is_composite,
    now_ms,
    readable,
    with_state,
)
from minikv.index.recovery import abandoned, retry_when_writable
from minikv.index.store import MAX_KEY, Store, StoreError
from minikv.placement import epoch, host_of, key2path_bytes, key2volume, keys_above, name_too_long

MAX_LIST = 1_000_000
STALE_LOCK = 60  # seconds a lock is held before a 409 says how a dead process's lock goes
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(r"[0-9]{1,30}")  # a ?list limit: plain digits, never thousands of them
LIST_CHUNK = 5000  # index records a listing reads between two turns of the event loop
_random = random.random  # a bound builtin: cheaper than random.choice's Python frames



def split_target(url: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, raw path, query) of a request target. The key is the decoded path."""
    path, _, query = url.partition(b"?")
    if not path.startswith(b"/"):
        if path == b"*":
            raise HTTPError(400, "request target `*` is not a key")
        try:  # absolute form: http://host/key
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise HTTPError(400, "malformed request target") from None
        path, query = parsed.path or b"/", parsed.query or b""
    # find, not `in`: `bytes in bytes` first tries the operand as an int and pays for a TypeError
    if path.find(b"%") < 0:
        return path, path, query
    if _BAD_ESCAPE.search(path):
        # unquote would keep it as text, so /a%zz and /a%25zz would name one key; Go's net/http
        # (minikeyvalue) answers 400 too
        raise HTTPError(400, "malformed percent-escape in the URL: a % must be followed by two hex "
                             "digits (write % itself as %25)")
    return unquote_to_bytes(path), path, query


def check_key(key: bytes) -> None:
    """Refuse, with the reason, a key that cannot be stored."""
    if key == b"/":
        raise HTTPError(400, "empty key: use PUT /<key>")
    if key.find(b"\0") >= 0:
        raise HTTPError(400, "key contains a NUL byte")
    if len(key) > MAX_KEY:
        raise HTTPError(414, f"key is {len(key)} bytes; the limit is {MAX_KEY}")
    name = base64.b64encode(key)
    if name.endswith(b"/") or b"//" in name:
        # a name ending in "/" would be a folder; nginx merges "//", so rebuild could not find it
        raise HTTPError(400, "this key cannot be stored in minikeyvalue's on-disk layout (its base64 "
                             "file name ends in '/' or holds '//'): add or remove a character")
    if too_long := name_too_long(key):
        raise HTTPError(414, f"key is too long for a file name on the volumes "
                             f"({too_long} bytes encoded, the limit is 255)")


def _page_next(keys: list[bytes], want: int, limit: int, url: bool) -> str:
    """`next` of a listing that read `keys` (one more than the page when there is a next page),
    taken off the list, as text."""
    if len(keys) < want:
        return ""
    if not limit:
        raise HTTPError(413, f"more than {MAX_LIST} keys: page with &limit=N&start=KEY")
    nxt = keys.pop()
    if not url:
        try:
            return nxt.decode()
        except UnicodeDecodeError:
            pass  # its U+FFFD form would not lead back to it: percent-encoded, it does
    return quote(nxt, safe="/")


def _keys_json(keys: list[bytes], url: bool) -> str:
    """Keys as the inside of a JSON array."""
    if url:
        shown = [quote(k, safe="/") for k in keys]
    else:
        shown = [k.decode("utf-8", "replace") for k in keys]
    return json.dumps(shown, separators=(",", ":"), ensure_ascii=False)[1:-1]


def _page(nxt: str, parts: list[str]) -> bytes:
    keys = ",".join(p for p in parts if p)
    body = f'{{"next":{json.dumps(nxt, ensure_ascii=False)},"keys":[{keys}]}}'
    return response(200, [("Content-Type", "application/json")], body.encode())


async def _status(upload) -> int | BaseException:
    try:
        return await upload.finish()
    except VolumeError as e:
        return e


class App:
    def __init__(self, config: Config, store: Store, pool: Pool, health: Health):
        self.config = config
        self.store = store
        self.pool = pool
        self.health = health
        self.pid = os.getpid()
        # -fsync: record changes go through one helper thread, batched (index/group.py)
        self.group = GroupCommit(store) if config.fsync else None
        self.s3 = None  # the S3 front (minikv/s3), when the server runs one
        self.access = access_for(config)  # None: the plain API is open (api/access.py)
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)
        self.epoch_bytes = self.epoch.to_bytes(4, "little")
        # volume connections (open files) the PUTs in flight may hold, one per replica while
        # each runs (0: not counted; the server sets it from its open-file limit), and hold
        self.max_held_files = 0
        self.held_files = 0


    # -- dispatch --
    def handle(self, req: Request):
        key, path, query = split_target(req.url)
        method = req.method
        if self.s3 is not None and self.s3.claims(req, query):
            return self.s3.handle(req, key, path, query)  # SigV4-checked there when credentials are set
        if self.access is not None:
            self.access.check(method, req.headers)
        if method == b"GET" or method == b"HEAD":
            if query:
                op = query.split(b"&", 1)[0]
                if method == b"GET" and op in (b"list", b"unlinked"):
                    return self.list(key, op, query)
            return self.get(key, path, method == b"HEAD", req)
        if method == b"PUT":
            return self.put(req, key)
        if method == b"DELETE":
            return self.delete(key)
        if method == b"UNLINK":
            return self.unlink(key)
        if method == b"REBALANCE":
            return self.rebalance(key)
        raise HTTPError(405, f"method {method.decode('latin-1')} is not supported",
                        [("Allow", "GET, HEAD, PUT, DELETE, UNLINK, REBALANCE")])

    # -- reads --
    def get(self, key: bytes, path: bytes, is_head: bool, req=None):
        raw = self.store.get(key) if len(key) <= MAX_KEY else None
        if raw is None or raw[0] != LIVE:
            # a key being moved (REBALANCE, rebalance, repair) stays readable from its old record
            raw = raw and readable(raw)
        if raw is None:
            if self.config.fallback:
                return head(302, [("Location", f"http://{self.config.fallback}{path.decode('latin-1')}")])
            return not_found()
        if raw[VOLUMES_AT] == COMPOSITE_MARK:  # an S3 multipart object: no file to redirect to
            from minikv.api import composite_read  # here: it needs the S3 modules, which need this one

            return composite_read.read(self, key, raw, is_head, req)
        if self.config.verify_get:
            return self._get_verified(key, raw, raw[VOLUMES_AT:].decode().split(","))
        # bytes all the way: the volume name goes from the record into the response as it is
        candidates = raw[VOLUMES_AT:].split(b",")
        if self.health.down:
            volumes = [v.decode() for v in candidates]
            candidates = [v.encode() for v in volumes if host_of(v) not in self.health.down]
            if not candidates:
                raise HTTPError(503, "no replica of this key is on a volume that is up: "
                                + "; ".join(self.health.reasons.get(host_of(v), host_of(v)) for v in volumes))
        return self._redirect(key, raw, candidates[int(_random() * len(candidates))])

    def _redirect(self, key: bytes, raw: bytes, volume: bytes) -> bytes:
        volumes = raw[VOLUMES_AT:]
        balanced = (raw[EPOCH_AT:VOLUMES_AT] == self.epoch_bytes
                    or volumes == ",".join(self._volumes(key)).encode())
        md5 = raw[MD5_AT:EPOCH_AT]
        path = key2path_bytes(key)
        if self.config.signed:
            path = self._sign(volume.decode(), path.decode()).encode()
        return b"".join((
            b"HTTP/1.1 302 Found\r\nLocation: http://", volume, path,
            b"\r\nKey-Volumes: ", volumes,
            b"\r\nKey-Balance: balanced" if balanced else b"\r\nKey-Balance: unbalanced",
            b"" if md5 == NO_MD5 else b"\r\nContent-Md5: " + md5.hex().encode(),
            b"\r\nDate: ", http_date_bytes(),
            b"\r\nContent-Length: 0\r\n\r\n",
        ))

    def _sign(self, volume: str, path: str) -> str:
        """The path with nginx secure_link arguments: valid for -signed seconds, for this file."""
        _, slash, sub = volume.partition("/")
        uri = (slash + sub if slash else "") + path
        expires = int(time.time() + self.config.signed)
        digest = hashlib.md5(f"{expires}{uri} {self.config.secret}".encode()).digest()
        sig = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return f"{path}?md5={sig}&expires={expires}"

    async def _get_verified(self, key: bytes, raw: bytes, volumes: list[str]) -> bytes:
        """The Go original's read: HEAD replicas in random order, redirect to the first found."""
        for volume in random.sample(volumes, len(volumes)):
            try:
                if await replicas.exists(self.pool, volume, key) is not None:
                    return self._redirect(key, raw, volume.encode())
            except VolumeError:
                continue
        return not_found()

    def list(self, prefix: bytes, op: bytes, query: bytes):
        """`?list` / `?unlinked`. A page holds at most `limit` keys (a larger limit is taken as
        MAX_LIST, the most one answer may hold); the index is read LIST_CHUNK records at a time,
        and a listing that needs more than one chunk goes on in a coroutine that lets the loop
        serve other clients between chunks.

        `&encoding=url` gives keys and `next` percent-encoded (every byte exact, as S3's
        encoding-type=url). Without it, keys are text as in the Go original (bytes that are not
        UTF-8 shown as U+FFFD), except a `next` that is not UTF-8: it is percent-encoded, so
        that `&start=` followed by it as given resumes exactly where the page ended."""
        # latin-1 both ways: percent-escapes become the key's raw bytes, whatever they encode
        params = parse_qs(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        text = params.get("limit", ["0"])[0] or "0"
        if not _DIGITS.fullmatch(text):  # int() would take "1_0", "+3", " 5"
            raise HTTPError(400, f"limit must be a whole number of digits, not {text[:32]!r}")
        limit = int(text)
        encoding = params.get("encoding", [""])[0]
        if encoding not in ("", "url"):
            raise HTTPError(400, "encoding must be url (percent-encoded keys) or absent")
        start = params.get("start", [""])[0].encode("latin-1")
        state = LIVE if op == b"list" else UNLINKED
        if state == LIVE:  # keys being moved are still there
            def keep(v: bytes) -> bool:
                return v[0] == LIVE or (v[0] == PENDING and readable(v) is not None)
        else:  # an unlinked key being moved (offline rebalance) too
            def keep(v: bytes) -> bool:
                return v[0] == state or (v[0] == PENDING and v[1:2] == OP_REBALANCE
                                         and decode_pending(v).previous[:1] == b"U")
        # one key more than the page: it is `next` (or, without a limit, the sign of too many)
        want = min(limit, MAX_LIST) + 1 if limit else MAX_LIST + 1
        pairs, pos = self.store.scan(prefix, start, want, keep, LIST_CHUNK)
        keys = [k for k, _ in pairs]
        if pos and len(keys) < want:
            return self._list_rest(prefix, pos, keep, want, keys, limit, encoding == "url")
        return self._list_page(keys, want, limit, encoding == "url")

    async def _list_rest(self, prefix: bytes, pos: bytes, keep, want: int, keys: list[bytes],
                         limit: int, url: bool) -> bytes:
        while pos and len(keys) < want:
            await asyncio.sleep(0)  # a turn for the other clients of this worker
            pairs, pos = self.store.scan(prefix, pos, want - len(keys), keep, LIST_CHUNK)
            keys.extend(k for k, _ in pairs)
        nxt = _page_next(keys, want, limit, url)
        parts = []
        for i in range(0, len(keys), LIST_CHUNK):  # a million keys take 0.3 s to encode
            await asyncio.sleep(0)
            parts.append(_keys_json(keys[i:i + LIST_CHUNK], url))
        return _page(nxt, parts)

    def _list_page(self, keys: list[bytes], want: int, limit: int, url: bool) -> bytes:
        return _page(_page_next(keys, want, limit, url), [_keys_json(keys, url)])

    # -- writes --
    def _volumes(self, key: bytes) -> list[str]:
        c = self.config
        return key2volume(key, c.volumes, c.replicas, c.subvolumes)

    async def _cas(self, key: bytes, expect: bytes | None, new: bytes | None) -> tuple[bool, bytes | None]:
        """Store.cas, through the group commit when every commit is fsync'd (-fsync)."""
        try:
            if self.group is None:
                return self.store.cas(key, expect, new)
            return await self.group.cas(key, expect, new)
        except StoreError as e:
            raise HTTPError(503, str(e)) from None

    async def _lock(self, key: bytes, expect: bytes | None, pending: bytes) -> None:
        """Take the key's record from `expect` to PENDING, or answer why not."""
        done, current = await self._cas(key, expect, pending)
        if not done:
            raise self._raced(current, pending[1:2] == OP_PUT)

    @staticmethod
    def _conflict(current: bytes | None) -> HTTPError:
        if current is None:
            return HTTPError(404)
        if current[0] == PENDING:
            held = (now_ms() - decode_pending(current).started_ms) // 1000
            if held < STALE_LOCK:
                return HTTPError(409, "another write or delete of this key is in progress")
            return HTTPError(409, f"another write or delete of this key is in progress, for {held}s (process "
                                  f"{decode_pending(current).owner}): if that process is gone (a killed rebalance, "
                                  "repair or gc), `minikv gc` resolves its locks")
        if current[0] == LIVE:
            return HTTPError(403, "key exists: DELETE it first")
        return HTTPError(409, "the key changed meanwhile")

    @classmethod
    def _raced(cls, current: bytes | None, put: bool) -> HTTPError:
        """Why a compare-and-set failed: the record changed since this request read it (another
        worker, or the S3 front). "In progress", "missing" (but not to a PUT) and, to a PUT,
        "key exists" are still true; anything else is a race the client should retry: 409, not
        a 404 to a PUT nor a "key exists" to a DELETE of a value replaced meanwhile."""
        if current is None:
            return HTTPError(409, "the key was deleted while this PUT was starting: try again") if put \
                else HTTPError(404)
        if current[0] == PENDING or (put and current[0] == LIVE):
            return cls._conflict(current)
        return HTTPError(409, "the key changed while this request was being handled: try again")

    def put(self, req: Request, key: bytes):
        check_key(key)
        if not req.has_body:
            raise HTTPError(411, "PUT needs a body (Content-Length > 0): empty values cannot be stored")
        length = None
        if req.header(b"transfer-encoding") is None:
            length = int(req.header(b"content-length"))
        limit = self.config.max_value_size
        if limit and length is not None and length > limit:
            raise HTTPError(413, f"value of {length} bytes is over the limit of {limit} (-max-value-size)")
        raw = self.store.get(key)
        if raw is not None and raw[0] != UNLINKED:
            raise self._conflict(raw)
        volumes = self._volumes(key)
        self._check_not_below(key, volumes)
        if self.health.down:  # fail now, not after a hung volume's stall timeout
            down = [host_of(v) for v in volumes if host_of(v) in self.health.down]
            if down:
                raise HTTPError(503, "; ".join(self.health.reasons.get(h, f"volume {h} is down") for h in down)
                                + "; nothing was stored")
        pending = encode_pending(OP_PUT, self.pid, now_ms(), volumes, raw or b"")
        if self.max_held_files:  # a PUT holds a file (a volume connection) per replica while it streams
            if self.held_files + len(volumes) > self.max_held_files:
                raise HTTPError(503, f"the index is out of open files for uploads ({self.held_files} held by "
                                     f"uploads in flight, limit {self.max_held_files}): try again; "
                                     "nothing was stored")
            return self._put_holding(len(volumes), req, key, volumes, pending, length, raw)
        return self._put_body(req, key, volumes, pending, length, raw)

    def _check_not_below(self, key: bytes, volumes: list[str]) -> None:
        """Refuse a key whose file would be below another key's file (their base64 names share a
        folder): the volume could not write it, and answers only 500."""
        for other in keys_above(key):
            raw = self.store.get(other)
            if raw is None:
                continue
            theirs = decode_pending(raw).volumes if raw[0] == PENDING else decode_data(raw).volumes
            if set(theirs) & set(volumes):
                raise HTTPError(409, f"this key's file would be below the file of the key "
                                     f"{quote(other, safe='/')} (its base64 name continues that key's "
                                     f"with '/'): DELETE that key first, or choose another name")

    async def _put_holding(self, files: int, *args) -> bytes:
        self.held_files += files
        try:
            return await self._put_body(*args)
        finally:
            self.held_files -= files

    async def _put_body(self, req: Request, key: bytes, volumes: list[str], pending: bytes,
                        length: int | None, previous: bytes | None) -> bytes:
        # before the body is read, so `Expect: 100-continue` clients are refused before sending it
        since = fence.epoch()
        await self._lock(key, previous, pending)
        uploads = []
        ended = False
        md5 = StreamingMd5() if self.config.md5sum else None
        try:
            for host, path in replicas.locate_all(volumes, key):  # idle kept-alive connections: immediate
                uploads.append(await self.pool.upload(host, path, length))
            size = 0
            limit = self.config.max_value_size
            held = b""  # the last bytes, sent once the body is whole: they make nginx commit
            while chunk := await req.body.read():
                size += len(chunk)
                if limit and size > limit:
                    raise HTTPError(413, f"value is over the limit of {limit} bytes (-max-value-size)")
                if held:
                    for u in uploads:
                        u.write(held)
                held = chunk
                if md5 is not None:
                    await md5.update(chunk)
                for u in uploads:
                    if u.paused:
                        await u.drain()
            if fence.suspect(since) and (why := await fence.refused(since)):  # a shared index's lease
                raise HTTPError(503, f"{why}; nothing was stored")
            ended = True  # from here a volume may have the value in place of what was there
            for u in uploads:
                if held:
                    u.write(held)
                u.end()  # every replica has the whole value before we wait for any answer
            statuses = [await _status(u) for u in uploads]
            digest = await md5.digest() if md5 is not None else NO_MD5
        except Exception as e:  # anything at all: undo, so no lock and no partial value stays
            for u in uploads:
                u.abort()
            if md5 is not None:
                await md5.close()
            if isinstance(e, VolumeError):
                self.health.mark_down(e.host, str(e))
            await self._abandon(key, pending, volumes, volumes if ended else ())
            if isinstance(e, VolumeError):
                raise HTTPError(503, f"{e}; nothing was stored") from None
            raise  # ClientGone, an HTTPError of ours, or a bug (500)
        failed = [f"{s}" if isinstance(s, BaseException) else f"volume {host_of(v)} answered {s} to PUT"
                  for v, s in zip(volumes, statuses) if isinstance(s, BaseException) or s not in (201, 204)]
        if failed or size == 0:  # an empty body: empty files replaced what was there
            await self._abandon(key, pending, volumes, volumes if size == 0 else
                                [v for v, s in zip(volumes, statuses) if s in (201, 204)])
            if folders := [host_of(v) for v, s in zip(volumes, statuses) if s == 409]:
                # nginx's 409 to PUT: the file's path is a folder (another key's file sits below it)
                raise HTTPError(409, f"this key's file is a folder on volume {folders[0]}: other keys' "
                                     "files are below it (base64 names that continue this one's with '/'), "
                                     "or were: once those keys are deleted, `minikv gc` given the volume "
                                     "directories removes the empty folders (10 minutes after their last "
                                     "change); nothing was stored")
            if failed:
                raise HTTPError(502, "; ".join(failed) + "; nothing was stored")
            raise HTTPError(411, "empty body: empty values cannot be stored")
        live = encode_data(LIVE, volumes, size, now_ms(), digest, self.epoch)
        try:
            done, _ = await self._cas(key, pending, live)
        except HTTPError as e:  # the index cannot record the value: take it off the volumes
            why = e.reason
            if await self._abandon(key, pending, volumes, volumes):
                why += "; the key stays locked (409) until the index can write again"
            raise HTTPError(503, f"{why}; nothing was stored") from None
        if not done:
            raise HTTPError(500, "lost the key's lock while writing (was the index recovered meanwhile?)")
        if previous and is_composite(previous):  # an unlinked S3 multipart object: its manifest and parts
            await self.s3.values.replaced(key, previous, live, volumes)
        elif previous:  # an unlinked value on volumes placement no longer names
            stale = [v for v in decode_data(previous).volumes if v not in volumes]
            if stale:
                await replicas.delete_all(self.pool, stale, key)
        return head(201)

    async def _abandon(self, key: bytes, pending: bytes, volumes: list[str], touched=()) -> str:
        """Undo a PUT: remove whatever reached the volumes, then the record ("" or, see _drop,
        why it stays for now). A PUT over an UNLINKED value writes at that value's very paths:
        it stays UNLINKED (still listed, DELETE-able, found by a rebuild) on the volumes that
        still hold it, those that did not take the PUT's bytes (`touched` did, or may have)."""
        delete, record = abandoned(pending, volumes, touched)
        await replicas.delete_all(self.pool, delete, key)
        return await self._undo(key, pending, record)

    async def _undo(self, key: bytes, pending: bytes, raw: bytes | None) -> str:
        """Put the record `raw` back (None: no record) in place of our lock `pending`, if it is
        still there: "" when done, else why it could not be now; it is then done once the
        database takes writes again (a lock left behind is a key stuck in 409)."""
        try:
            await self._cas(key, pending, raw)
        except HTTPError as e:
            retry_when_writable(lambda: self.store.cas(key, pending, raw))  # done, or resolved by someone
            return e.reason
        return ""

    async def _drop(self, key: bytes, pending: bytes) -> str:
        """Drop the PENDING record of a key whose files are gone (as _undo)."""
        return await self._undo(key, pending, None)

    def delete(self, key: bytes):
        raw = self.store.get(key) if len(key) <= MAX_KEY else None
        if raw is None:
            return not_found()
        if raw[0] == PENDING:
            raise self._conflict(raw)
        if self.config.protect and raw[0] == LIVE:
            raise HTTPError(403, "-protect is on: UNLINK the key before DELETE")
        if is_composite(raw):
            return self._delete_composite(key)
        volumes = decode_data(raw).volumes
        pending = encode_pending(OP_DELETE, self.pid, now_ms(), volumes, raw)
        return self._delete_files(key, volumes, pending, raw)

    async def _delete_files(self, key: bytes, volumes: list[str], pending: bytes, raw: bytes) -> bytes:
        since = fence.epoch()
        await self._lock(key, raw, pending)
        if fence.suspect(since) and (why := await fence.refused(since, "nothing was deleted")):
            # a shared index's lease: another server may have undone this lock and let the key be
            # written again, at the very paths these deletes would remove
            await self._undo(key, pending, raw)  # when still ours (a stale renewal): as it was
            raise HTTPError(503, why)
        failed = await replicas.delete_all(self.pool, volumes, key)
        if failed:
            await self._cas(key, pending, with_state(raw, UNLINKED))
            raise HTTPError(503, "; ".join(failed) + "; the key is now unlinked: DELETE it again later")
        if why := await self._drop(key, pending):
            raise HTTPError(503, f"{why}; the key's files are deleted, and so will be its record "
                                 "once the index can write again")
        return head(204)

    async def _delete_composite(self, key: bytes) -> bytes:
        """An S3 multipart object: its record, then its manifest and parts (s3/values.py)."""
        from minikv.s3.errors import S3Error

        try:
            await self.s3.values.delete(key)
        except S3Error as e:
            raise HTTPError(e.status, e.message) from None
        return head(204)

    def unlink(self, key: bytes):
        raw = self.store.get(key) if len(key) <= MAX_KEY else None
        if raw is None:
            return not_found()
        if raw[0] == PENDING:
            raise self._conflict(raw)
        if raw[0] == UNLINKED:  # as minikeyvalue: only a readable key can be unlinked
            return not_found()
        return self._unlink(key, raw)

    async def _unlink(self, key: bytes, raw: bytes) -> bytes:
        done, current = await self._cas(key, raw, with_state(raw, UNLINKED))
        if not done:
            raise self._raced(current, False)
        return head(204)

    def rebalance(self, key: bytes):
        raw = self.store.get(key) if len(key) <= MAX_KEY else None
        if raw is None or raw[0] == UNLINKED:
            return not_found()
        if raw[0] == PENDING:
            raise self._conflict(raw)
        if is_composite(raw):  # an S3 multipart object: its bytes are its parts', moved as their own keys
            return self._rebalance_composite(raw)
        volumes = self._volumes(key)
        if decode_data(raw).volumes == volumes:
            return head(204)
        pending = encode_pending(OP_REBALANCE, self.pid, now_ms(), volumes, raw)
        return self._rebalance(key, raw, volumes, pending)

    async def _rebalance_composite(self, raw: bytes) -> bytes:
        from minikv.s3 import composite
        from minikv.s3.errors import S3Error

        try:
            await composite.rebalance(self.s3.values, raw)
        except S3Error as e:
            raise HTTPError(e.status, e.message) from None
        return head(204)

    async def _rebalance(self, key: bytes, raw: bytes, volumes: list[str], pending: bytes) -> bytes:
        from minikv.admin.move import LostLock, move_key

        await self._lock(key, raw, pending)
        try:
            # detach: the old copies are deleted a moment later, in the background (admin/move.py)
            await move_key(self.pool, self.store, key, raw, volumes, pending, self.health.is_up, self.epoch,
                           detach=True)
        except VolumeError as e:
            raise HTTPError(503, f"{e}; the key stays where it was") from None
        except LostLock as e:
            raise HTTPError(409, str(e)) from None
        except Exception:
            self.store.cas(key, pending, raw)  # a bug must not leave the key locked
            raise
        return head(204)
