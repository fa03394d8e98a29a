"""What a bucket is: the top-level folder `/name/` of the keys.

A bucket exists when CreateBucket made it (recorded with its date in the S3 meta store) OR any
key lies below `/name/` (the index's table of top-level folders says so in one read). So keys
written through the plain API stay visible through S3 as they always were, an S3 PUT into a
bucket nobody created makes it (as the plain API's PUT does), and an empty bucket made by
CreateBucket stays until DeleteBucket. Names are checked as S3 checks them at CreateBucket; the
other operations take the name as the first segment of the key, as before.
"""

from __future__ import annotations

import re
import time

import lmdb

from minikv.s3.errors import S3Error

_NAME = re.compile(rb"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(rb"\d+\.\d+\.\d+\.\d+")
_RESERVED_START = (b"xn--", b"sthree-", b"amzn-s3-demo-")
_RESERVED_END = (b"-s3alias", b"--ol-s3", b".mrap", b"--x-s3", b"--table-s3")


def check_name(name: bytes) -> None:
    """Refuse a name S3's CreateBucket refuses, saying which rule it breaks."""
    why = name_problem(name)
    if why:
        shown = name[:70].decode("utf-8", "replace")
        raise S3Error("InvalidBucketName", f"The specified bucket is not valid: {shown!r} {why}",
                      BucketName=shown)


def name_problem(name: bytes) -> str | None:
    why = None
    if not 3 <= len(name) <= 63:
        why = "must be 3 to 63 characters long"
    elif not _NAME.fullmatch(name):
        why = "may hold only lower-case letters, digits, dots and hyphens, and start and end with a letter or digit"
    elif b".." in name or b".-" in name or b"-." in name:
        why = "may not have two dots, or a dot and a hyphen, side by side"
    elif _IP.fullmatch(name):
        why = "may not look like an IP address"
    elif name.startswith(_RESERVED_START) or name.endswith(_RESERVED_END):
        why = "uses a prefix or suffix S3 reserves"
    return why


def has_keys(store, name: bytes) -> bool:
    """Does any key lie below `/name/`? One read of the table of top-level folders."""
    top = b"/" + name + b"/"
    if getattr(store, "walks_tops", False):  # no table of folders (PostgreSQL): one seek says it
        pairs, _ = store.scan(top, top, 1, None, 1)
        return bool(pairs)
    tops = store.top_folders(top, 1)
    if tops is None:  # a database made before that table, opened read-only: one seek instead
        pairs, _ = store.scan(top, top, 1)
        return bool(pairs)
    return tops == [top]


def exists(s3, name: bytes) -> bool:
    return s3.meta.bucket_created(name) is not None or has_keys(s3.store, name)


def must_exist(s3, name: bytes) -> None:
    if not exists(s3, name):
        raise S3Error("NoSuchBucket", "The specified bucket does not exist",
                      BucketName=name.decode("utf-8", "replace"))


def create(s3, ctx) -> bytes:
    """CreateBucket. Making a bucket one already has answers 200, as S3 does in us-east-1 (the
    only region minikv names); a bucket that exists through its keys gets its date now."""
    check_name(ctx.bucket)
    try:
        s3.meta.create_bucket(ctx.bucket, int(time.time() * 1000))
    except lmdb.Error as e:  # the index's disk is full, say: nothing was made
        raise S3Error("ServiceUnavailable", f"the bucket could not be recorded: {e}") from None
    return ctx.respond(200, [("Location", "/" + ctx.bucket.decode("latin-1"))])


def made_by_write(s3, name: bytes) -> None:
    """Before an S3 write into `name`: record the bucket if nobody made it yet (one read when
    it was; a name CreateBucket would refuse is left to exist through its keys only)."""
    if s3.meta.bucket_created(name) is None and name_problem(name) is None:
        try:
            s3.meta.create_bucket(name, int(time.time() * 1000))
        except lmdb.Error:  # a full disk: the write itself will say so, and its key makes the bucket
            pass


def forget(s3, name: bytes) -> None:
    """DeleteBucket's last step, once nothing is left under the bucket."""
    try:
        s3.meta.drop_bucket(name)
    except lmdb.Error as e:  # the index's disk is full, say: the bucket stays
        raise S3Error("ServiceUnavailable", f"the bucket could not be deleted: {e}") from None


def head(s3, ctx) -> bytes:
    must_exist(s3, ctx.bucket)
    return ctx.respond(200, [("x-amz-bucket-region", "us-east-1")])
