"""The S3 front of the index server: which requests are S3's, who may make them, and which
operation each one is. Every S3 error is rendered here, in one place (`Ctx.error`).

Requests are path-style: `/<bucket>/<object key>`, and the object `k` of bucket `b` is the
plain API's key `/b/k`, so both APIs see the same data. A bucket exists when CreateBucket made
it or any key lies under `/b/` (buckets.py); DeleteBucket refuses while keys are left under it.

Authentication: with no credentials configured every request is served, signed or not (the
plain API is open too). With `-s3-access-key` and `-s3-secret-key` (or MINIKV_S3_ACCESS_KEY /
MINIKV_S3_SECRET_KEY) every S3 request must carry a valid SigV4 signature (header or presigned
URL): 403 SignatureDoesNotMatch otherwise, and every x-amz-* header must be one the signature
covers; the plain API then asks for the same pair as HTTP Basic (api/access.py). Either way,
the response-* overrides of a GET (which set the answer's Content-Type...) are refused on a
request that carries no signature at all.
"""

from __future__ import annotations

import os
import sys

from minikv.http.response import ClientGone, HTTPError
from minikv.index.engine import settle
from minikv.index.store import StoreError
from minikv.s3 import buckets, listing, multipart, objects
from minikv.s3.common import Ctx, md5_etag
from minikv.s3.detect import claims
from minikv.s3.errors import S3Error, from_http
from minikv.s3.meta import Meta
from minikv.s3.sigv4 import Signed, parse_query, verify
from minikv.s3.values import Values

# sub-resources of S3 this front does not implement: answered NotImplemented, never mistaken
# for a read or write of the object or bucket itself
UNSUPPORTED = ("acl", "policy", "tagging", "cors", "lifecycle", "website", "replication", "logging",
               "notification", "encryption", "object-lock", "retention", "legal-hold", "torrent",
               "restore", "select", "accelerate", "requestPayment", "analytics", "metrics",
               "inventory", "intelligent-tiering", "ownershipControls", "publicAccessBlock", "attributes")

# headers that ask for what minikv does not do: it says so rather than let the client believe
# the value is encrypted, retained or tagged
REFUSED_HEADERS = {
    b"x-amz-server-side-encryption": "server-side encryption (values are stored as sent)",
    b"x-amz-copy-source-server-side-encryption": "server-side encryption (values are stored as sent)",
    b"x-amz-object-lock": "object lock (nothing keeps a value from being deleted)",
    b"x-amz-bucket-object-lock-enabled": "object lock (nothing keeps a value from being deleted)",
    b"x-amz-tagging": "object tagging",
}
_REFUSED = tuple(REFUSED_HEADERS)
# conditional writes and deletes (If-Match on a PUT...): not implemented, and ignoring them would
# overwrite or delete what the client asked to keep
WRITE_CONDITIONS = (b"if-match", b"if-none-match", b"x-amz-if-match-last-modified-time", b"x-amz-if-match-size")


class S3:
    def __init__(self, app):
        self.app = app
        self.config = app.config
        self.store = app.store
        self.pool = app.pool
        self.health = app.health
        self.values = Values(app.config, app.store, app.pool, app.health)
        self.meta = Meta(os.path.join(app.config.db, "s3"), sync=app.config.fsync)
        self.values.meta = self.meta
        self.values.uploads = app  # S3 writes count in the plain API's budget of upload files
        self.access_key = getattr(app.config, "s3_access_key", "") or ""
        self.secret_key = getattr(app.config, "s3_secret_key", "") or ""

    def close(self) -> None:
        self.meta.close()

    @staticmethod
    def claims(req, query: bytes) -> bool:
        return claims(req.headers, query)

    def etag(self, key: bytes, raw: bytes) -> str:
        return self.meta.etag(key, raw) or md5_etag(raw)

    # -- entry point --
    def handle(self, req, key: bytes, path: bytes, query: bytes, signed: Signed | None = None):
        """The answer to one request; `signed`: its signature, checked already (front_pg.py)."""
        ctx = Ctx(req, key, path, query)
        try:
            if query:
                ctx.params = {n.decode("latin-1"): v for n, v in parse_query(query)}
            if self.secret_key:
                ctx.signed = signed or verify(req.method, path, key, query, req.headers, self.access_key,
                                              self.secret_key)
            result = self._dispatch(ctx)
        except S3Error as e:
            return self._error(ctx, e)
        except HTTPError as e:
            return self._error(ctx, from_http(e))
        except StoreError as e:
            return ctx.error(S3Error("ServiceUnavailable", str(e)))
        except Exception as e:  # a bug: an S3 error the client can read, as in _finish
            print(f"minikv s3: internal error: {e!r}", file=sys.stderr)
            return ctx.error(S3Error("InternalError", f"internal error: {e}"))
        if isinstance(result, bytes):
            return result
        return self._finish(ctx, result)

    async def _finish(self, ctx: Ctx, coro):
        try:
            return await coro
        except S3Error as e:
            return await settle(self._error(ctx, e))
        except HTTPError as e:
            return await settle(self._error(ctx, from_http(e)))
        except StoreError as e:  # the index's disk is full: nothing was acknowledged
            return ctx.error(S3Error("ServiceUnavailable", str(e)))
        except ClientGone:
            raise
        except Exception as e:  # a bug must cost one request, as an S3 error the client can read
            print(f"minikv s3: internal error: {e!r}", file=sys.stderr)
            return ctx.error(S3Error("InternalError", f"internal error: {e}"))

    def _error(self, ctx: Ctx, e: S3Error) -> bytes:
        # no such key in a bucket that does not exist: S3 names the bucket (a lookup on 404s only)
        if e.code == "NoSuchKey" and ctx.bucket and not buckets.exists(self, ctx.bucket):
            e = S3Error("NoSuchBucket", "The specified bucket does not exist",
                        BucketName=ctx.bucket.decode("utf-8", "replace"))
        return ctx.error(e)

    def _dispatch(self, ctx: Ctx):
        m, p = ctx.method, ctx.params
        if self.config.verbose:
            print(f"S3 {m.decode()} bucket={ctx.bucket!r} object={ctx.obj!r} {sorted(p)}", file=sys.stderr)
        if any(word in p for word in UNSUPPORTED):
            raise S3Error("NotImplemented", "this S3 sub-resource is not implemented by minikv")
        for name, _ in ctx.req.headers:
            if name.startswith(_REFUSED):
                what = next(v for k, v in REFUSED_HEADERS.items() if name.startswith(k))
                raise S3Error("NotImplemented", f"{what} is not implemented by minikv: send the request "
                              f"without the header {name.decode('latin-1')}")
        if not ctx.bucket:
            if m == b"GET" and ctx.key == b"/":
                return listing.list_buckets(self, ctx)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
        if not ctx.obj:  # bucket level
            if m == b"GET":
                if "uploads" in p:
                    return multipart.list_uploads(self, ctx)
                if "location" in p:
                    return ctx.xml("LocationConstraint", [])
                if "versioning" in p:
                    return ctx.xml("VersioningConfiguration", [])
                if "versions" in p:  # no versioning: every object is its one version, "null"
                    return listing.list_objects(self, ctx, versions=True)
                return listing.list_objects(self, ctx)
            if m == b"HEAD":
                return buckets.head(self, ctx)
            if m == b"PUT":
                return buckets.create(self, ctx)
            if m == b"DELETE":
                buckets.must_exist(self, ctx.bucket)
                if not listing.bucket_is_empty(self, ctx):
                    raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty",
                                  BucketName=ctx.bucket.decode("utf-8", "replace"))
                buckets.forget(self, ctx.bucket)
                return ctx.respond(204)
            if m == b"POST" and "delete" in p:
                return objects.delete_objects(self, ctx)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
        if m == b"GET":
            if "uploadId" in p:
                return multipart.list_parts(self, ctx)
            return objects.get_object(self, ctx)
        if m == b"HEAD":
            return objects.head_object(self, ctx)
        if m != b"GET" and m != b"HEAD" and any(ctx.header(h) is not None for h in WRITE_CONDITIONS):
            raise S3Error("NotImplemented", "conditional writes and deletes (If-Match, If-None-Match...) "
                          "are not implemented by minikv: send the request without them")
        if m in (b"PUT", b"POST"):
            buckets.made_by_write(self, ctx.bucket)
        if m == b"PUT":
            if "uploadId" in p or "partNumber" in p:
                return multipart.upload_part(self, ctx)
            if ctx.header(b"x-amz-copy-source") is not None:
                return objects.copy_object(self, ctx)
            return objects.put_object(self, ctx)
        if m == b"POST":
            if "uploads" in p:
                return multipart.create(self, ctx)
            if "uploadId" in p:
                return multipart.complete(self, ctx)
            raise S3Error("NotImplemented", "POST object uploads (browser forms) are not implemented")
        if m == b"DELETE":
            if "uploadId" in p:
                return multipart.abort(self, ctx)
            return objects.delete_object(self, ctx)
        raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
