"""Multipart objects as composites (minikv/s3/composite.py): CompleteMultipartUpload writes no copy
of the data; the object reads back whole (S3 GET, HEAD, ranges, ?partNumber=, the plain API);
overwrite, DELETE, UNLINK + gc remove its parts; rebuild from the volumes, rebalance, verify and
crash recovery keep it. Real volumes, real index, boto3."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

boto3 = pytest.importorskip("boto3")
from test_admin import all_files  # noqa: E402
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
