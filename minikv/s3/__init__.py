"""minikv's S3 API: path-style S3 on the index server, over the same data as the plain API.

`S3(app)` is installed as `app.s3` by the server; `App.handle` hands it the requests for which
`S3.claims(request, query)` is true (detect.py). Modules:

- front.py      dispatch, authentication, the one place errors become S3 error XML
- front_pg.py   the same front on a PostgreSQL index (its plain functions in a helper thread)
- detect.py     which requests are S3's (cheap: it runs on every request)
- sigv4.py      AWS Signature Version 4 (headers, presigned URLs, chunk signatures)
- payload.py    request bodies: aws-chunked decoding, checksums and digests
- values.py     overwrite-safe streaming writes, deletes, reads from a replica
- objects.py    Head/Get/Put/Copy/DeleteObject(s)
- listing.py    ListObjectsV2/V1, ListBuckets
- multipart.py  multipart uploads (parts are values under internal keys)
- meta.py       the S3 side store: uploads in progress, multipart ETags
- meta_pg.py    the same in the PostgreSQL index's database (minikv_s3_* tables)
- xml.py        XML out (namespaced) and in (safe parser)
"""

from minikv.s3.front import S3

__all__ = ["S3"]
