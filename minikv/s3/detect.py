"""Telling an S3 request from a minikeyvalue one, cheaply, on every request.

minikeyvalue's own API has no authentication, no `x-amz-*` headers and only the query words
`list`, `unlinked`, `limit` and `start`, so a request is S3's when it has any of:
- an `Authorization: AWS…` header (SigV4 `AWS4-HMAC-SHA256`, or SigV2 `AWS key:sig`);
- an `x-amz-date`, `x-amz-content-sha256`, `x-amz-copy-source` or `x-amz-security-token` header;
- a query word only S3 uses (`list-type`, `uploads`, `uploadId`, `delete`, `X-Amz-Signature`,
  `AWSAccessKeyId`, `prefix`, …): bucket listings, multipart, batch delete, presigned URLs;
- a User-Agent of an AWS SDK (anonymous SDK clients send neither of the above).

A plain `curl -L` user of the minikeyvalue API sends none of these and gets the plain API,
unchanged. The cost on the hot path is one set lookup per header name (about 0.1 µs for
curl's three headers) and nothing for an empty query string.
"""

from __future__ import annotations

import re

# words of S3's query strings; none of them is a word of minikeyvalue's API
_QUERY = re.compile(
    rb"(?:^|&)(?:list-type|uploads|uploadId|partNumber|delete|prefix|delimiter|max-keys|marker"
    rb"|continuation-token|start-after|encoding-type|fetch-owner|location|versioning|versions|acl"
    rb"|tagging|policy|cors|lifecycle|website|x-id|versionId|response-[a-z-]+|X-Amz-[A-Za-z-]+"
    rb"|AWSAccessKeyId|Signature)(?:[=&]|$)",
    re.IGNORECASE,
)
# User-Agents start with the SDK's name: boto3 "Boto3/…", s3fs "aiobotocore/…", pyarrow "aws-sdk-cpp/…"
_SDK_AGENTS = (b"aws-sdk", b"Boto", b"aiobotocore", b"aws-cli", b"MinIO")
# Set lookups, not prefix tests: a header name costs one hash probe. Every SigV4 request has
# Authorization (or X-Amz-* query words when presigned) and x-amz-date / x-amz-content-sha256.
_NAMES = frozenset((b"authorization", b"user-agent", b"x-amz-date", b"x-amz-content-sha256",
                    b"x-amz-copy-source", b"x-amz-security-token"))


def claims(headers: list, query: bytes) -> bool:
    """Is this request S3's? `headers` as Request.headers: [(lower-case name, value)]."""
    for name, value in headers:
        if name in _NAMES:
            if name == b"user-agent":
                if value.startswith(_SDK_AGENTS):
                    return True
            elif name == b"authorization":
                if value[:3] == b"AWS":
                    return True
            else:
                return True
    return bool(query) and _QUERY.search(query) is not None
