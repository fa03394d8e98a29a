"""S3 errors: one typed exception, and the table that turns it into S3's error XML.

Every failure an S3 client can see is raised as `S3Error(code, message)`; the status comes
from the code (the table below, as AWS documents it), and the front (`front.py`) renders it in
one place, as `<Error><Code>…</Code><Message>…</Message>…</Error>` with
`Content-Type: application/xml`, or bodiless for HEAD.
"""

from __future__ import annotations

from minikv.http.response import HTTPError

STATUS: dict[str, int] = {
    "AccessDenied": 403,
    "BadDigest": 400,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MaxMessageLengthExceeded": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "OperationAborted": 409,
    "PreconditionFailed": 412,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "UserKeyMustBeSpecified": 400,
    "XAmzContentSHA256Mismatch": 400,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "InvalidObjectState": 403,
    "NotModified": 304,
}


class S3Error(Exception):
    """An error an S3 client should see, by S3 error code."""

    def __init__(self, code: str, message: str = "", status: int | None = None,
                 headers: list[tuple[str, str]] | None = None, **fields: str):
        super().__init__(message or code)
        self.code = code
        self.message = message or code
        self.status = status or STATUS.get(code, 400)
        self.headers = headers or []  # response headers (the ETag of a 304)
        self.fields = fields  # extra elements of the error document (Key, UploadId, ...)


def from_http(e: HTTPError) -> S3Error:
    """The S3 error for an HTTPError raised by code shared with the plain API."""
    reason = e.reason or str(e)
    if e.status == 414:
        return S3Error("KeyTooLongError", reason)
    if e.status == 409:
        return S3Error("OperationAborted", reason)
    if e.status == 404:
        return S3Error("NoSuchKey", reason or "The specified key does not exist.")
    if e.status == 411:
        return S3Error("MissingContentLength", reason)
    if e.status == 413:
        return S3Error("EntityTooLarge", reason)
    if e.status >= 500:
        return S3Error("ServiceUnavailable" if e.status == 503 else "InternalError", reason, e.status)
    return S3Error("InvalidArgument" if e.status == 400 else "InvalidRequest", reason, e.status)
